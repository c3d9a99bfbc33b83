// AMX-BF16 implicit-GEMM backward of a stride-1 convolution over spikes x ternary weights: the fp32 gradient is
// split into S bf16 terms (t1 = bf16(g), t2 = bf16(g - t1), ...), every product is exact and AMX accumulates in
// fp32, so S = 3 gives fp32-level results; fp32 output. Per frame, the operands are staged in a thread-local
// scratch (L2-sized) in the layouts the tile loads want: no full-size bf16 copy of g exists.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bn_fold.h"

namespace {
struct TileConfig {
  uint8_t palette_id = 1, start_row = 0, reserved[14] = {0};
  uint16_t colsb[16] = {0};
  uint8_t rows[16] = {0};
};

bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /*ARCH_REQ_XCOMP_PERM*/, 18 /*XTILEDATA*/) == 0;
  return ok;
}

// Eight 16 x 64-byte tiles. A global object: GCC does not see _tile_loadconfig read its argument, so the stores
// into a local configuration could be dropped.
TileConfig make_config() {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
  return cfg;
}
alignas(64) const TileConfig kTileConfig = make_config();

__attribute__((target("amx-tile,amx-bf16"))) void configure() { _tile_loadconfig(&kTileConfig); }

__attribute__((target("amx-tile"))) void release() { _tile_release(); }

inline uint16_t bf16_bits(float v) { return c10::BFloat16(v).x; }  // round to nearest even
inline float bf16_value(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; std::memcpy(&f, &u, 4); return f; }

// The S bf16 terms of fp32 values r (in a register) into dst[s*term_stride + i] under mask m: t1 = bf16(r),
// t2 = bf16(r - t1), ... (round to nearest even; flushes bf16 denormals as VCVTNEPS2BF16 does, and subtracts
// exactly the value it stored, so the terms still sum to r up to the last term's rounding).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
inline void split_register(__m512 r, __mmask16 m, uint16_t* dst, int64_t term_stride, int64_t S) {
  for (int64_t s = 0; s < S; ++s) {
    const __m256i b = (__m256i)_mm512_cvtneps_pbh(r);
    _mm256_mask_storeu_epi16(dst + s * term_stride, m, b);
    r = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
  }
}

// The BatchNorm fold of the backward applied while g is staged (no pass of its own): bn_fold (bn_fold.h, shared
// with lif_scan.cpp's epilogue_fold, so the result is identical to folding first), or G·c1 (a plain per-channel
// scale) without c2.
struct Fold {
  const float* c1 = nullptr;
  const float* c2 = nullptr;
  const float* c3 = nullptr;
  const void* y = nullptr;
  c10::ScalarType y_type = c10::ScalarType::Float;
  int64_t yf = 0, yc = 0, yh = 0, yw = 0;
};

Fold make_fold(const c10::optional<torch::Tensor>& y, const c10::optional<torch::Tensor>& c1,
               const c10::optional<torch::Tensor>& c2, const c10::optional<torch::Tensor>& c3, int64_t Co) {
  Fold fold;
  if (!c1.has_value()) return fold;
  TORCH_CHECK(c1->scalar_type() == torch::kFloat32 && c1->is_contiguous() && c1->numel() == Co, "fold: c1");
  fold.c1 = c1->data_ptr<float>();
  if (!c2.has_value()) return fold;
  TORCH_CHECK(c3.has_value() && y.has_value() && y->dim() == 4 && y->size(1) == Co, "fold: c2 needs c3 and y");
  TORCH_CHECK(c2->scalar_type() == torch::kFloat32 && c3->scalar_type() == torch::kFloat32 && c2->is_contiguous() &&
              c3->is_contiguous() && c2->numel() == Co && c3->numel() == Co, "fold: c2, c3");
  fold.y_type = y->scalar_type();
  TORCH_CHECK(fold.y_type == torch::kShort || fold.y_type == torch::kInt || fold.y_type == torch::kFloat,
              "fold: y must be int16, int32 or float32");
  fold.c2 = c2->data_ptr<float>();
  fold.c3 = c3->data_ptr<float>();
  fold.y = y->data_ptr();
  fold.yf = y->stride(0), fold.yc = y->stride(1), fold.yh = y->stride(2), fold.yw = y->stride(3);
  return fold;
}

template <typename y_t>
void fold_row(const float* g, int64_t sc, const y_t* y, int64_t yc, const Fold& fold, int64_t n, float* out) {
  for (int64_t c = 0; c < n; ++c)
    out[c] = bn_fold(g[c * sc], static_cast<float>(y[c * yc]), fold.c1[c], fold.c2[c], fold.c3[c]);
}

// The fp32 values of one pixel's n channels of G, folded: g itself (stride sc) when there is nothing to fold,
// else tmp (stride 1). ``y_off``: the pixel's offset in y.
inline const float* folded(const float* g, int64_t& sc, const Fold& fold, int64_t y_off, int64_t n, float* tmp) {
  if (!fold.c1) return g;
  if (!fold.c2) {
    for (int64_t c = 0; c < n; ++c) tmp[c] = g[c * sc] * fold.c1[c];
  } else if (fold.y_type == c10::ScalarType::Short) {
    fold_row(g, sc, static_cast<const int16_t*>(fold.y) + y_off, fold.yc, fold, n, tmp);
  } else if (fold.y_type == c10::ScalarType::Int) {
    fold_row(g, sc, static_cast<const int32_t*>(fold.y) + y_off, fold.yc, fold, n, tmp);
  } else {
    fold_row(g, sc, static_cast<const float*>(fold.y) + y_off, fold.yc, fold, n, tmp);
  }
  sc = 1;
  return tmp;
}

// The S bf16 terms of one pixel's n channels of G, folded (see Fold), into dst[s*term_stride + (c/32)*block_stride +
// c%32] (channel blocks of 32, so that every tile row the kernels load is 64 contiguous bytes). Vectorised
// where the channels are unit-stride in g and in y (channels-last, or one channel); the same operations in the
// same order as bn_fold, so both paths give the same bits.
template <typename y_t>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
void stage_vector(const float* g, const y_t* y, const Fold& fold, int64_t n, uint16_t* dst, int64_t block_stride,
                  int64_t term_stride, int64_t S) {
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 m = n - c >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - c)) - 1);
    __m512 r = _mm512_maskz_loadu_ps(m, g + c);
    if (fold.c1) r = _mm512_mul_ps(r, _mm512_maskz_loadu_ps(m, fold.c1 + c));
    if (fold.c2) {
      __m512 yv;
      if constexpr (std::is_same_v<y_t, int16_t>)
        yv = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(m, y + c)));
      else if constexpr (std::is_same_v<y_t, int32_t>)
        yv = _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(m, y + c));
      else
        yv = _mm512_maskz_loadu_ps(m, y + c);
      r = _mm512_add_ps(_mm512_add_ps(r, _mm512_maskz_loadu_ps(m, fold.c3 + c)),
                        _mm512_mul_ps(yv, _mm512_maskz_loadu_ps(m, fold.c2 + c)));
    }
    split_register(r, m, dst + (c / 32) * block_stride + c % 32, term_stride, S);
  }
}

inline void stage_terms(const float* g, int64_t sc, const Fold& fold, int64_t y_off, int64_t n, float* tmp,
                        uint16_t* dst, int64_t block_stride, int64_t term_stride, int64_t S) {
  if (sc == 1 && (!fold.c2 || fold.yc == 1 || n == 1)) {
    if (!fold.c2 || fold.y_type == c10::ScalarType::Float)
      return stage_vector(g, static_cast<const float*>(fold.y) + (fold.c2 ? y_off : 0), fold, n, dst, block_stride, term_stride, S);
    if (fold.y_type == c10::ScalarType::Short)
      return stage_vector(g, static_cast<const int16_t*>(fold.y) + y_off, fold, n, dst, block_stride, term_stride, S);
    return stage_vector(g, static_cast<const int32_t*>(fold.y) + y_off, fold, n, dst, block_stride, term_stride, S);
  }
  int64_t stride = sc;
  const float* v = folded(g, stride, fold, y_off, n, tmp);
  for (int64_t c = 0; c < n; ++c) {
    float r = v[c * stride];
    for (int64_t s = 0; s < S; ++s) {
      const uint16_t b = bf16_bits(r);
      dst[s * term_stride + (c / 32) * block_stride + c % 32] = b;
      r -= bf16_value(b);
    }
  }
}

// Row pairs interleaved (the VNNI layout of a B tile) in blocks of 16 channels: from src [Co32/32][2*n_pairs][32]
// (``block_stride`` values from one 32-channel block to the next) to dst [Co32/16][n_pairs][16][2], so that a tile
// of 16 pairs x 16 channels is 1 KB of contiguous memory.
__attribute__((target("avx512f,avx512bw")))
void interleave_pairs(const uint16_t* src, int64_t block_stride, int64_t n_pairs, int64_t Co32, uint16_t* dst) {
  alignas(64) static const uint16_t kIdx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kIdxHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i lo = _mm512_load_si512(kIdx), hi = _mm512_load_si512(kIdxHi);
  for (int64_t cb = 0; cb < Co32 / 32; ++cb) {
    const uint16_t* from = src + cb * block_stride;
    uint16_t* to = dst + 2 * cb * n_pairs * 32;
    for (int64_t p = 0; p < n_pairs; ++p) {
      const __m512i a = _mm512_loadu_si512(from + 2 * p * 32), b = _mm512_loadu_si512(from + (2 * p + 1) * 32);
      _mm512_storeu_si512(to + p * 32, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(to + (n_pairs + p) * 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Tile block of the grad-input GEMM: 32 flat padded pixels (q0..q0+31) x 32 input channels (n0..), all terms,
// taps and output channels; A rows from the staged padded g of this frame ([S][Co32/32][rows][32]: block_stride
// values per channel block), B from the packed weight; every tile 1 KB of contiguous memory.
__attribute__((target("amx-tile,amx-bf16"))) void grad_input_block(
    const uint16_t* gs, int64_t block_stride, int64_t term_stride, const uint16_t* wv, float* buf, int64_t S,
    int64_t Co32, int64_t Ci32, int64_t Wp, int64_t k, int64_t q0, int64_t n0) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const int64_t b_block = Co32 * 16;  // one block of 16 input channels of one tap in the packed weight
  // the weight tiles are loaded once per tap and channel step and reused by every term of g
  for (int64_t kh = 0; kh < k; ++kh)
    for (int64_t kw = 0; kw < k; ++kw) {
      const uint16_t* a = gs + (q0 + (k - 1 - kh) * Wp + (k - 1 - kw)) * 32;
      const uint16_t* b = wv + ((kh * k + kw) * Ci32 + n0) * Co32;
      for (int64_t c = 0; c < Co32; c += 32) {
        _tile_loadd(6, b + c * 16, 64);
        _tile_loadd(7, b + b_block + c * 16, 64);
        for (int64_t s = 0; s < S; ++s) {
          const uint16_t* at = a + s * term_stride + (c / 32) * block_stride;
          _tile_loadd(4, at, 64);
          _tile_loadd(5, at + 16 * 32, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
      }
    }
  _tile_stored(0, buf, 128);
  _tile_stored(1, buf + 16, 128);
  _tile_stored(2, buf + 16 * 32, 128);
  _tile_stored(3, buf + 16 * 32 + 16, 128);
}

// Tile block of the grad-weight GEMM for one frame and tap: 32 input channels (m0..) x 32 output channels (n0..),
// accumulated into acc [Ci32, Co32] (fp32, row stride Co32) over rows r0..r1; A rows from the staged padded x^T,
// B from the staged g terms in pair-interleaved (VNNI) order (interleave_pairs: [S][Co32/16][R/2][16][2]).
__attribute__((target("amx-tile,amx-bf16"))) void grad_weight_block(
    const uint16_t* xt, int64_t x_row, const uint16_t* gv, int64_t term_stride, float* acc, int64_t S, int64_t r0,
    int64_t r1, int64_t R, int64_t Co32, int64_t shift, int64_t m0, int64_t n0) {
  float* c = acc + m0 * Co32 + n0;
  _tile_loadd(0, c, Co32 * 4);
  _tile_loadd(1, c + 16, Co32 * 4);
  _tile_loadd(2, c + 16 * Co32, Co32 * 4);
  _tile_loadd(3, c + 16 * Co32 + 16, Co32 * 4);
  // the x tiles (rows far apart: the costly loads) are loaded once per step and reused by every term of g
  const uint16_t* x = xt + m0 * x_row + shift;
  const uint16_t* g = gv + n0 * R;  // n0/16 blocks of R/2 pairs x 32 values
  for (int64_t r = r0; r < r1; r += 32) {
    _tile_loadd(4, x + r, x_row * 2);
    _tile_loadd(5, x + 16 * x_row + r, x_row * 2);
    for (int64_t s = 0; s < S; ++s) {
      _tile_loadd(6, g + s * term_stride + r * 16, 64);
      _tile_loadd(7, g + s * term_stride + 16 * R + r * 16, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, Co32 * 4);
  _tile_stored(1, c + 16, Co32 * 4);
  _tile_stored(2, c + 16 * Co32, Co32 * 4);
  _tile_stored(3, c + 16 * Co32 + 16, Co32 * 4);
}

inline int64_t round32(int64_t n) { return (n + 31) / 32 * 32; }

// n <= 32 bits of a little-endian bit array from bit position pos (never reads past the byte of the last bit).
inline uint32_t read_bits(const uint8_t* bits, int64_t pos, int64_t n) {
  const uint8_t* b = bits + pos / 8;
  const int64_t shift = pos % 8, nbytes = (shift + n + 7) / 8;
  uint64_t v = 0;
  for (int64_t i = 0; i < nbytes; ++i) v |= uint64_t(b[i]) << (8 * i);
  return uint32_t((v >> shift) & ((uint64_t(1) << n) - 1));
}

// One frame of packed spikes (binwslt.bits order: frame f of [F, Ci, H, W], or of [F, H, W, Ci] when channels_last)
// as bf16 0/1 into the interior of the padded x^T rows xt[c * x_row + (h + p) * Wx + w + p]; the padding is left
// as it is (zero).
__attribute__((target("avx512f,avx512bw")))
void stage_spikes(const uint8_t* bits, bool channels_last, int64_t f, int64_t Ci, int64_t H, int64_t W, int64_t p,
                  int64_t Wx, int64_t x_row, uint16_t* xt) {
  const __m512i one = _mm512_set1_epi16(0x3F80);  // bf16 1.0
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w0 = 0; w0 < W; w0 += 32) {
      const int64_t n = std::min<int64_t>(32, W - w0);
      const __mmask32 valid = n == 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << n) - 1);
      uint16_t* dst = xt + (h + p) * Wx + w0 + p;
      if (!channels_last) {
        for (int64_t c = 0; c < Ci; ++c) {
          const __mmask32 m = read_bits(bits, ((f * Ci + c) * H + h) * W + w0, n);
          _mm512_mask_storeu_epi16(dst + c * x_row, valid, _mm512_maskz_mov_epi16(m, one));
        }
        continue;
      }
      // 32 pixels x 16 channels: each pixel's 16 channel bits in one 16-bit lane, then one mask per channel
      for (int64_t c0 = 0; c0 < Ci; c0 += 16) {
        const int64_t nc = std::min<int64_t>(16, Ci - c0);
        alignas(64) uint16_t words[32] = {0};
        for (int64_t j = 0; j < n; ++j) words[j] = uint16_t(read_bits(bits, ((f * H + h) * W + w0 + j) * Ci + c0, nc));
        const __m512i v = _mm512_load_si512(words);
        for (int64_t c = 0; c < nc; ++c) {
          const __mmask32 m = _mm512_test_epi16_mask(v, _mm512_set1_epi16(int16_t(1 << c)));
          _mm512_mask_storeu_epi16(dst + (c0 + c) * x_row, valid, _mm512_maskz_mov_epi16(m, one));
        }
      }
    }
}

// n zeroed 16-bit values on a 64-byte boundary (owned by ``storage``): a tile row that straddles two cache lines
// costs a second line per row, which measured 2x slower on the grad-weight tiles.
uint16_t* aligned_zeros(std::vector<uint16_t>& storage, int64_t n) {
  storage.assign(n + 32, 0);
  return reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
}
}  // namespace

bool amx_available() { return __builtin_cpu_supports("amx-bf16") && amx_permitted(); }

// The ternary weight [Co, Ci, k, k] packed for the grad-input B tiles: [k*k, Ci32/16, Co32/2, 16, 2] bf16 (per tap
// and block of 16 input channels, pairs of output channels interleaved: a tile is 1 KB of contiguous memory).
torch::Tensor pack_weight(torch::Tensor w) {
  const int64_t Co = w.size(0), Ci = w.size(1), k = w.size(2), Co32 = round32(Co), Ci32 = round32(Ci);
  auto wt = torch::zeros({k, k, Co32, Ci32}, torch::kBFloat16);
  wt.narrow(2, 0, Co).narrow(3, 0, Ci).copy_(w.permute({2, 3, 0, 1}));
  return wt.reshape({k * k, Co32 / 2, 2, Ci32 / 16, 16}).permute({0, 3, 1, 4, 2}).contiguous();
}

// Both gradients of y = conv2d(x, w, stride 1, padding p) for input frames [F, Ci, H, W], from g = dL/dy
// [F, Co, OH, OW] fp32 (any strides; with a fold, dL/dy is the fold of g) with S bf16 terms of g, in one pass over
// the frames: scale * dL/dx [F, Ci, H, W] fp32 (channels-last) where the packed weight wv (pack_weight) is given,
// dL/dw [Co, Ci, k, k] fp32 where the input spikes are given as bits (uint8, binwslt.bits order of the frames in
// memory order: [F, H, W, Ci] when x_channels_last, else [F, Ci, H, W]); undefined tensors for the others. Per
// frame, g is folded and split once: with "same" padding (k - 1 = 2p) the rows the grad-weight GEMM reads are a
// window of the grad-input GEMM's staged g, otherwise it stages its own. With overwrite_g, dL/dx is written over
// g, frame by frame after the frame is staged (g channels-last, of dL/dx's shape; the caller's g is dead after).
std::vector<torch::Tensor> conv_grads(c10::optional<torch::Tensor> x, bool x_channels_last, torch::Tensor g,
                                      c10::optional<torch::Tensor> wv, bool overwrite_g,
                                      int64_t Ci, int64_t H, int64_t W, int64_t k, int64_t p, int64_t S, double scale,
                                      c10::optional<torch::Tensor> y, c10::optional<torch::Tensor> c1,
                                      c10::optional<torch::Tensor> c2, c10::optional<torch::Tensor> c3) {
  TORCH_CHECK(g.scalar_type() == torch::kFloat32 && g.dim() == 4, "conv_grads: g must be 4-d float32");
  const int64_t F = g.size(0), Co = g.size(1), OH = g.size(2), OW = g.size(3), Co32 = round32(Co),
                Ci32 = round32(Ci);
  TORCH_CHECK(0 <= p && p < k && OH == H + 2 * p - k + 1 && OW == W + 2 * p - k + 1,
              "conv_grads: shapes do not match a stride-1 convolution");
  const bool want_x = wv.has_value(), want_w = x.has_value();
  if (want_x)
    TORCH_CHECK(wv->scalar_type() == torch::kBFloat16 && wv->dim() == 5 && wv->size(0) == k * k &&
                wv->size(1) * 16 == Ci32 && wv->size(2) * 2 == Co32 && wv->size(3) == 16 && wv->size(4) == 2,
                "conv_grads: wv must be pack_weight of a [Co, Ci, k, k] weight");
  if (want_w)
    TORCH_CHECK(x->scalar_type() == torch::kByte && x->is_contiguous() && x->numel() * 8 >= F * Ci * H * W,
                "conv_grads: x must be the frames' bits, uint8 holding F*Ci*H*W bits");
  // grad-input geometry: g padded by o on the Wp-wide grid, 32-row blocks of flat pixels
  const int64_t Wp = W + k - 1, o = k - 1 - p, qblocks = (H * Wp + 31) / 32, nblocks = Ci32 / 32;
  const int64_t rows_i = qblocks * 32 + (k - 1) * (Wp + 1), block_i = rows_i * 32, term_i = rows_i * Co32;
  // grad-weight geometry: x padded by p on the Wx-wide grid, R rows of g
  const int64_t Wx = W + 2 * p, R = round32(OH * Wx), x_row = R + (k - 1) * (Wx + 1), term_w = R * Co32;
  const bool shared = want_x && want_w && Wp == Wx;  // then g row r of the GEMM is staged row r + p*Wx + p
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), F));
  torch::Tensor out, part;
  if (overwrite_g) {
    TORCH_CHECK(want_x && Co == Ci && OH == H && OW == W && g.is_contiguous(at::MemoryFormat::ChannelsLast),
                "conv_grads: overwrite_g needs a channels-last g of dL/dx's shape");
    out = g.permute({0, 2, 3, 1});  // [F, H, W, Ci], contiguous
  } else if (want_x) {
    out = torch::empty({F, H, W, Ci}, torch::kFloat32);
  }
  if (want_w) part = torch::zeros({threads, k * k, Ci32, Co32}, torch::kFloat32);
  const float* gp = g.data_ptr<float>();
  const int64_t gf = g.stride(0), gc = g.stride(1), gh = g.stride(2), gw = g.stride(3);
  const Fold fold = make_fold(y, c1, c2, c3, Co);
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> tmp(Co);
    alignas(64) float buf[32 * 32];
    // zeroed once: the padding is never written, only the interior is rewritten per frame
    std::vector<uint16_t> storage[4];
    uint16_t* stage = want_x ? aligned_zeros(storage[0], S * term_i) : nullptr;
    uint16_t* rows = want_w && !shared ? aligned_zeros(storage[1], S * term_w) : nullptr;
    uint16_t* gv = want_w ? aligned_zeros(storage[2], S * term_w) : nullptr;
    uint16_t* xt = want_w ? aligned_zeros(storage[3], Ci32 * x_row) : nullptr;
    const uint16_t* wp = want_x ? reinterpret_cast<const uint16_t*>(wv->data_ptr<at::BFloat16>()) : nullptr;
    const uint8_t* xp = want_w ? x->data_ptr<uint8_t>() : nullptr;
    float* op = want_x ? out.data_ptr<float>() : nullptr;
    configure();
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t f = F * t / threads; f < F * (t + 1) / threads; ++f) {
        auto stage_g = [&](uint16_t* dst, int64_t row0, int64_t width, int64_t block_stride, int64_t term_stride) {
          for (int64_t oh = 0; oh < OH; ++oh)
            for (int64_t ow = 0; ow < OW; ++ow)
              stage_terms(gp + f * gf + oh * gh + ow * gw, gc, fold, f * fold.yf + oh * fold.yh + ow * fold.yw, Co,
                          tmp.data(), dst + (row0 + oh * width + ow) * 32, block_stride, term_stride, S);
        };
        if (want_w && !shared) stage_g(rows, 0, Wx, R * 32, term_w);  // before dL/dx may overwrite g
        if (want_x) {
          stage_g(stage, o * Wp + o, Wp, block_i, term_i);
          for (int64_t qb = 0; qb < qblocks; ++qb)
            for (int64_t nb = 0; nb < nblocks; ++nb) {
              grad_input_block(stage, block_i, term_i, wp, buf, S, Co32, Ci32, Wp, k, qb * 32, nb * 32);
              const int64_t n0 = nb * 32, nvalid = std::min<int64_t>(32, Ci - n0);
              if (nvalid <= 0) continue;
              for (int64_t r = 0; r < 32; ++r) {
                const int64_t q = qb * 32 + r, ih = q / Wp, iw = q % Wp;
                if (ih >= H || iw >= W) continue;
                float* dst = op + ((f * H + ih) * W + iw) * Ci + n0;
                for (int64_t c = 0; c < nvalid; ++c) dst[c] = buf[r * 32 + c] * float(scale);
              }
            }
        }
        if (want_w) {
          const uint16_t* src = shared ? stage + (p * Wx + p) * 32 : rows;
          const int64_t src_block = shared ? block_i : R * 32, src_term = shared ? term_i : term_w;
          stage_spikes(xp, x_channels_last, f, Ci, H, W, p, Wx, x_row, xt);
          for (int64_t s = 0; s < S; ++s)
            interleave_pairs(src + s * src_term, src_block, R / 2, Co32, gv + s * term_w);
          float* acc = part[t].data_ptr<float>();
          // r in chunks of 64, so that a chunk of x and of every term of g stays in L1 across the taps and channel
          // blocks (the x rows of a tile lie far apart; 256 measured 1.2-1.8x slower)
          for (int64_t r0 = 0; r0 < R; r0 += 64)
            for (int64_t kk = 0; kk < k * k; ++kk)
              for (int64_t m = 0; m < Ci32; m += 32)
                for (int64_t n = 0; n < Co32; n += 32)
                  grad_weight_block(xt, x_row, gv, term_w, acc + kk * Ci32 * Co32, S, r0,
                                    std::min<int64_t>(R, r0 + 64), R, Co32, (kk / k) * Wx + kk % k, m, n);
        }
      }
    release();
  });
  if (want_x) out = out.permute({0, 3, 1, 2});
  if (want_w)
    part = part.sum(0).narrow(1, 0, Ci).narrow(2, 0, Co).reshape({k, k, Ci, Co}).permute({3, 2, 0, 1}).contiguous();
  return {out, part};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("amx_available", &amx_available);
  m.def("pack_weight", &pack_weight);
  m.def("conv_grads", &conv_grads);
}
