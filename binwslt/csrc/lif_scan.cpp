// Fused LIF scans for the torch backend on CPU: one pass over T per neuron, membrane in a register.
// Built on first use by binwslt/_cpu_ext.py (torch.utils.cpp_extension); compiled with -ffp-contract=off so
// every step rounds exactly as the reference's separate multiply and add do (bit-identical spikes).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>

#include "bn_fold.h"
#endif

namespace {

constexpr int kAtan = 0, kSigmoid = 1, kTriangle = 2;

template <typename scalar_t>
__attribute__((always_inline)) inline scalar_t surrogate_slope(scalar_t x, int surrogate, scalar_t alpha) {
  if (surrogate == kAtan) {
    const scalar_t z = static_cast<scalar_t>(M_PI / 2.0) * alpha * x;
    return (alpha / scalar_t(2)) / (scalar_t(1) + z * z);
  }
  if (surrogate == kSigmoid) {
    const scalar_t s = scalar_t(1) / (scalar_t(1) + std::exp(-alpha * x));
    return alpha * s * (scalar_t(1) - s);
  }
  const scalar_t tri = alpha - alpha * alpha * std::abs(x);
  return tri > scalar_t(0) ? tri : scalar_t(0);
}

constexpr int64_t kBlock = 64;  // neurons scanned together: the inner loops run over them and vectorise

// The neuron's constants in the scan's precision.
template <typename scalar_t>
struct Lif {
  scalar_t d, th, gain, vr, alpha;
  bool hard, decay_input, detach_reset;
  int surrogate;
};

template <typename scalar_t>
Lif<scalar_t> make_lif(double decay, double threshold, c10::optional<double> v_reset, bool decay_input,
                       int64_t surrogate = 0, double alpha = 0.0, bool detach_reset = false) {
  return Lif<scalar_t>{static_cast<scalar_t>(decay), static_cast<scalar_t>(threshold),
                       static_cast<scalar_t>(1.0 - decay), static_cast<scalar_t>(v_reset.value_or(0.0)),
                       static_cast<scalar_t>(alpha), v_reset.has_value(), decay_input, detach_reset,
                       static_cast<int>(surrogate)};
}

// One time step of n neurons: the membrane v (after reset) advances on the current x; the spike goes to
// `fired` and, when kRecord, the pre-reset membrane to u.
template <typename scalar_t, typename fired_t, bool kRecord>
__attribute__((always_inline)) inline void lif_step(const scalar_t* __restrict x, scalar_t* __restrict v,
                                                    scalar_t* __restrict u, fired_t* __restrict fired, int64_t n,
                                                    const Lif<scalar_t>& p) {
  // locals, not p's fields: the stores below (char ones included) could alias p and stop the vectoriser
  const scalar_t d = p.d, gain = p.gain, th = p.th, vr = p.vr;
  const bool hard = p.hard, decay_input = p.decay_input;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t dv = d * v[j];
    const scalar_t uu = decay_input ? dv + gain * x[j] : dv + x[j];
    const bool fire = uu >= th;
    if (kRecord) u[j] = uu;
    fired[j] = fire ? fired_t(1) : fired_t(0);
    v[j] = fire ? (hard ? vr : uu - th) : uu;
  }
}

// dS/dU at the membranes u of one step, into sl (the surrogate chosen outside the loop, so it vectorises).
template <typename scalar_t>
__attribute__((always_inline)) inline void slopes(const scalar_t* u, scalar_t* sl, int64_t n, const Lif<scalar_t>& p) {
  const scalar_t th = p.th, a = p.alpha;
  switch (p.surrogate) {
    case kAtan:
      for (int64_t j = 0; j < n; ++j) sl[j] = surrogate_slope<scalar_t>(u[j] - th, kAtan, a);
      break;
    case kSigmoid:
      for (int64_t j = 0; j < n; ++j) sl[j] = surrogate_slope<scalar_t>(u[j] - th, kSigmoid, a);
      break;
    default:
      for (int64_t j = 0; j < n; ++j) sl[j] = surrogate_slope<scalar_t>(u[j] - th, kTriangle, a);
  }
}

template <typename scalar_t, bool kHard, bool kDetach>
__attribute__((always_inline)) inline void bptt_steps(scalar_t* u, const scalar_t* s, const scalar_t* gs,
                                                      int64_t gstride, int64_t n, int64_t T, const Lif<scalar_t>& p) {
  scalar_t grad_v[kBlock], sl[kBlock];  // grad_v: dL/dV[t], carried backwards in time
  for (int64_t j = 0; j < n; ++j) grad_v[j] = 0;
  const scalar_t k = p.decay_input ? p.gain : scalar_t(1);  // dU/dI
  const scalar_t d = p.d, th = p.th, vr = p.vr;
  for (int64_t t = T - 1; t >= 0; --t) {
    scalar_t* ut = u + t * kBlock;
    const scalar_t* st = s + t * kBlock;
    const scalar_t* g = gs + t * gstride;
    slopes<scalar_t>(ut, sl, n, p);
    for (int64_t j = 0; j < n; ++j) {
      scalar_t grad_s = g[j];
      if (!kDetach) grad_s = kHard ? grad_s + grad_v[j] * (vr - ut[j]) : grad_s - th * grad_v[j];
      scalar_t grad_u = (kHard && st[j] != scalar_t(0)) ? scalar_t(0) : grad_v[j];
      grad_u = grad_u + grad_s * sl[j];
      ut[j] = k * grad_u;
      grad_v[j] = d * grad_u;
    }
  }
}

// BPTT of one block of n neurons, in place: u ([T][kBlock] pre-reset membranes, s the spikes, 0/1 of the
// membrane's type: a char store would keep the recompute loop scalar) becomes dL/dI.
// gs: dL/dS at t = 0 for the block's first neuron, step stride gstride.
template <typename scalar_t>
__attribute__((always_inline)) inline void bptt_block(scalar_t* u, const scalar_t* s, const scalar_t* gs,
                                                      int64_t gstride, int64_t n, int64_t T, const Lif<scalar_t>& p) {
  if (p.hard)
    p.detach_reset ? bptt_steps<scalar_t, true, true>(u, s, gs, gstride, n, T, p)
                   : bptt_steps<scalar_t, true, false>(u, s, gs, gstride, n, T, p);
  else
    p.detach_reset ? bptt_steps<scalar_t, false, true>(u, s, gs, gstride, n, T, p)
                   : bptt_steps<scalar_t, false, false>(u, s, gs, gstride, n, T, p);
}

// One block of `n` neurons over T steps. `in` points at the block's first neuron at t = 0 (step stride `st`,
// 0 for a direct-encoded input), `out` likewise with step stride `M`. Multiversioned for the vector widths.
#define BINWSLT_FORWARD_RUN(scalar_t)                                                                          \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void forward_run(                              \
      const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t T, int64_t st, int64_t M,          \
      const Lif<scalar_t>& p) {                                                                               \
    scalar_t v[kBlock];                                                                                       \
    for (int64_t m = begin; m < end; m += kBlock) {                                                           \
      const int64_t n = std::min(kBlock, end - m);                                                            \
      for (int64_t j = 0; j < n; ++j) v[j] = 0;                                                               \
      for (int64_t t = 0; t < T; ++t)                                                                         \
        lif_step<scalar_t, scalar_t, false>(in + m + t * st, v, nullptr, out + m + t * M, n, p);              \
    }                                                                                                         \
  }
BINWSLT_FORWARD_RUN(float)
BINWSLT_FORWARD_RUN(double)

// current: [T, M] with unit inner stride and any stride over T (0 for a direct-encoded input).
torch::Tensor lif_forward(torch::Tensor current, double decay, double threshold, c10::optional<double> v_reset,
                          bool decay_input) {
  TORCH_CHECK(current.dim() == 2 && current.stride(1) == 1, "lif_forward: current must be [T, M], inner-contiguous");
  const int64_t T = current.size(0), M = current.size(1), st = current.stride(0);
  auto spikes = torch::empty({T, M}, current.options());
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_forward", [&] {
    const scalar_t* in = current.data_ptr<scalar_t>();
    scalar_t* out = spikes.data_ptr<scalar_t>();
    const auto p = make_lif<scalar_t>(decay, threshold, v_reset, decay_input);
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
      forward_run(in, out, b0 * kBlock, std::min(M, b1 * kBlock), T, st, M, p);
    });
  });
  return spikes;
}

// BPTT over blocks: recompute U and S forward (kept in `u`, `s`: [T][kBlock]), then go back.
#define BINWSLT_BACKWARD_RUN(scalar_t)                                                                         \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void backward_run(                             \
      const scalar_t* in, const scalar_t* gs, scalar_t* gi, int64_t begin, int64_t end, int64_t T, int64_t st,  \
      int64_t M, const Lif<scalar_t>& p, scalar_t* u, scalar_t* s) {                                              \
    scalar_t v[kBlock];                                                                                       \
    for (int64_t m = begin; m < end; m += kBlock) {                                                           \
      const int64_t n = std::min(kBlock, end - m);                                                            \
      for (int64_t j = 0; j < n; ++j) v[j] = 0;                                                               \
      for (int64_t t = 0; t < T; ++t)                                                                         \
        lif_step<scalar_t, scalar_t, true>(in + m + t * st, v, u + t * kBlock, s + t * kBlock, n, p);             \
      bptt_block<scalar_t>(u, s, gs + m, M, n, T, p);                                                         \
      for (int64_t t = 0; t < T; ++t) std::copy(u + t * kBlock, u + t * kBlock + n, gi + m + t * M);          \
    }                                                                                                         \
  }
BINWSLT_BACKWARD_RUN(float)
BINWSLT_BACKWARD_RUN(double)

torch::Tensor lif_backward(torch::Tensor current, torch::Tensor grad_spikes, double decay, double threshold,
                           c10::optional<double> v_reset, bool decay_input, int64_t surrogate, double alpha,
                           bool detach_reset) {
  TORCH_CHECK(current.dim() == 2 && current.stride(1) == 1, "lif_backward: current must be [T, M], inner-contiguous");
  TORCH_CHECK(grad_spikes.is_contiguous() && grad_spikes.sizes() == current.sizes(),
              "lif_backward: grad_spikes must be contiguous [T, M]");
  const int64_t T = current.size(0), M = current.size(1), st = current.stride(0);
  auto grad_current = torch::empty({T, M}, current.options());
  AT_DISPATCH_FLOATING_TYPES(current.scalar_type(), "lif_backward", [&] {
    const scalar_t* in = current.data_ptr<scalar_t>();
    const scalar_t* gs = grad_spikes.data_ptr<scalar_t>();
    scalar_t* gi = grad_current.data_ptr<scalar_t>();
    const auto p = make_lif<scalar_t>(decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset);
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> u(T * kBlock);
      std::vector<scalar_t> s(T * kBlock);
      backward_run(in, gs, gi, b0 * kBlock, std::min(M, b1 * kBlock), T, st, M, p, u.data(), s.data());
    });
  });
  return grad_current;
}

// Per-channel Σy and Σy² in float64 of rows o in [begin, end) of y viewed as [outer, C, inner], into s / ss.
// Multiversioned: the inner == 1 (channels-last) loop vectorises over channels.
__attribute__((target_clones("avx512f", "avx2", "default"))) void moments_run(const float* p, int64_t begin,
                                                                              int64_t end, int64_t C, int64_t inner,
                                                                              double* s, double* ss) {
  for (int64_t o = begin; o < end; ++o) {
    const float* row = p + o * C * inner;
    if (inner == 1) {
      for (int64_t c = 0; c < C; ++c) {
        const double v = row[c];
        s[c] += v;
        ss[c] += v * v;
      }
    } else {
      for (int64_t c = 0; c < C; ++c) {
        double a = 0, b = 0;
        const float* q = row + c * inner;
        for (int64_t i = 0; i < inner; ++i) {
          const double v = q[i];
          a += v;
          b += v * v;
        }
        s[c] += a;
        ss[c] += b;
      }
    }
  }
}

// Per-channel Σy and Σy² in float64 of y viewed as [outer, C, inner] (contiguous): exact for integer y (a
// spike-input pre-activation) in any summation order, so the thread split cannot change the result.
std::vector<torch::Tensor> channel_moments(torch::Tensor y, int64_t channels, int64_t inner) {
  TORCH_CHECK(y.is_contiguous() && y.scalar_type() == torch::kFloat, "channel_moments: y must be contiguous float32");
  const int64_t C = channels, total = y.numel();
  TORCH_CHECK(C > 0 && inner > 0 && total % (C * inner) == 0, "channel_moments: shape does not split");
  const int64_t outer = total / (C * inner);
  const float* p = y.data_ptr<float>();
  const int nthreads = std::max<int>(1, at::get_num_threads());
  std::vector<double> partial(static_cast<size_t>(nthreads) * 2 * C, 0.0);
  at::parallel_for(0, outer, 64, [&](int64_t begin, int64_t end) {
    double* s = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
    moments_run(p, begin, end, C, inner, s, s + C);
  });
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto sum = torch::zeros({C}, opts), sumsq = torch::zeros({C}, opts);
  double* so = sum.data_ptr<double>();
  double* sso = sumsq.data_ptr<double>();
  for (int t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < C; ++c) {
      so[c] += partial[static_cast<size_t>(t) * 2 * C + c];
      sso[c] += partial[static_cast<size_t>(t) * 2 * C + C + c];
    }
  return {sum, sumsq};
}

// ------------------------------------------------------------------------------------------------------------
// The fused epilogue of a binary conv/linear layer: from the exact pre-activation y (any dense memory order),
// the current I = a[c]·y + b[c] (+ residual) in registers, the LIF scan over T, the spikes and the saved state
// in one pass; the backward recomputes I, runs the BPTT and reduces Σg, Σg·y per channel in the same pass.
//
// Layout: y is flat in its memory order, F frames of `frame` values each; the channel of flat index q (within
// a frame) is (q / inner) % C (inner = H·W for contiguous NCHW frames, 1 for channels-last or linear frames).
// Step t covers S = N·frame values of y (y step stride S), or all of y at every step for a direct-encoded
// input (step stride 0). Spikes, residual and grad-spikes are [T, S] flat in the same order.

// Per-block channel coefficients: av/bv/cj[j] for the neurons m .. m+n-1 of a step.
template <typename scalar_t>
__attribute__((always_inline)) inline void block_channels(int64_t m, int64_t n, int64_t C, int64_t inner,
                                                          const scalar_t* a, const scalar_t* b, scalar_t* av,
                                                          scalar_t* bv, int32_t* cj) {
  const int64_t q = m / inner;
  int64_t c = q % C, r = m - q * inner;
  for (int64_t j = 0; j < n; ++j) {
    av[j] = a[c];
    bv[j] = b ? b[c] : scalar_t(0);
    cj[j] = static_cast<int32_t>(c);
    if (++r == inner) {
      r = 0;
      if (++c == C) c = 0;
    }
  }
}

// I[j] for one step of one block, rounded as the eager y*a (+ b) (+ residual) is: each op separately.
template <typename scalar_t, typename y_t>
__attribute__((always_inline)) inline void block_current(const y_t* y, const scalar_t* res, const scalar_t* av,
                                                         const scalar_t* bv, bool has_b, int64_t n, scalar_t* cur) {
  for (int64_t j = 0; j < n; ++j) cur[j] = static_cast<scalar_t>(y[j]) * av[j];
  if (has_b)
    for (int64_t j = 0; j < n; ++j) cur[j] = cur[j] + bv[j];
  if (res)
    for (int64_t j = 0; j < n; ++j) cur[j] = cur[j] + res[j];
}

// 0/1 spikes to bytes (GCC leaves the mixed float/char loop scalar; AVX-512F narrows 16 at a time).
void to_bytes_scalar(const float* s, uint8_t* o, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<uint8_t>(s[j]);
}
void to_bytes_scalar(const double* s, uint8_t* o, int64_t n) {
  for (int64_t j = 0; j < n; ++j) o[j] = static_cast<uint8_t>(s[j]);
}
#if defined(__x86_64__)
__attribute__((target("avx512f"))) void to_bytes_avx512(const float* s, uint8_t* o, int64_t n) {
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(_mm512_loadu_ps(s + j)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(o + j), bytes);
  }
  to_bytes_scalar(s + j, o + j, n - j);
}
const bool kAvx512 = __builtin_cpu_supports("avx512f");
#endif
inline void to_bytes(const float* s, uint8_t* o, int64_t n) {
#if defined(__x86_64__)
  if (kAvx512) return to_bytes_avx512(s, o, n);
#endif
  to_bytes_scalar(s, o, n);
}
inline void to_bytes(const double* s, uint8_t* o, int64_t n) { to_bytes_scalar(s, o, n); }

struct Geometry {
  int64_t T, S, ystep, C, inner;  // ystep: S, or 0 (direct encoding)
};

#define BINWSLT_EPILOGUE_FORWARD_RUN(scalar_t, ysave_t)                                                        \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void epilogue_forward_run(                     \
      const scalar_t* y, const scalar_t* a, const scalar_t* b, const scalar_t* res, scalar_t* out,             \
      uint8_t* out8, ysave_t* ysave, int64_t begin, int64_t end, const Geometry& g, const Lif<scalar_t>& p) {  \
    scalar_t av[kBlock], bv[kBlock], cur[kBlock], v[kBlock];                                                  \
    int32_t cj[kBlock];                                                                                       \
    for (int64_t m = begin; m < end; m += kBlock) {                                                           \
      const int64_t n = std::min(kBlock, end - m);                                                            \
      block_channels<scalar_t>(m, n, g.C, g.inner, a, b, av, bv, cj);                                         \
      for (int64_t j = 0; j < n; ++j) v[j] = 0;                                                               \
      for (int64_t t = 0; t < g.T; ++t) {                                                                     \
        const scalar_t* yt = y + t * g.ystep + m;                                                             \
        block_current<scalar_t, scalar_t>(yt, res ? res + t * g.S + m : nullptr, av, bv, b != nullptr, n, cur); \
        if (ysave && (t == 0 || g.ystep != 0))                                                                \
          for (int64_t j = 0; j < n; ++j) ysave[t * g.ystep + m + j] = static_cast<ysave_t>(yt[j]);          \
        lif_step<scalar_t, scalar_t, false>(cur, v, nullptr, out + t * g.S + m, n, p);                        \
        if (out8) to_bytes(out + t * g.S + m, out8 + t * g.S + m, n);                                         \
      }                                                                                                       \
    }                                                                                                         \
  }
BINWSLT_EPILOGUE_FORWARD_RUN(float, int16_t)
BINWSLT_EPILOGUE_FORWARD_RUN(float, int32_t)
BINWSLT_EPILOGUE_FORWARD_RUN(double, int16_t)
BINWSLT_EPILOGUE_FORWARD_RUN(double, int32_t)

Geometry make_geometry(const torch::Tensor& y, int64_t T, bool direct, int64_t C, int64_t inner) {
  TORCH_CHECK(y.dim() == 1 && y.is_contiguous(), "epilogue: y must be flat (its memory order)");
  TORCH_CHECK(T > 0 && C > 0 && inner > 0, "epilogue: T, C and inner must be positive");
  const int64_t total = y.numel();
  TORCH_CHECK(total % (C * inner) == 0, "epilogue: y does not split into channels");
  TORCH_CHECK(direct || total % T == 0, "epilogue: y does not split into T steps");
  const int64_t S = direct ? total : total / T;
  return Geometry{T, S, direct ? 0 : S, C, inner};
}

void check_flat(const c10::optional<torch::Tensor>& t, int64_t numel, c10::ScalarType dtype, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->is_contiguous() && t->numel() == numel && t->scalar_type() == dtype, "epilogue: ", what,
              " must be a flat contiguous tensor of ", numel, " values of the current's dtype");
}

// Forward. y: flat float32/float64 (see above); a: [C], b: [C] or None, of y's dtype; residual: [T·S] or None.
// y_save: None, or an int16/int32 flat tensor of y's size that receives y (exact integers); spikes_u8: None, or a
// flat uint8 tensor [T·S] that receives the spikes as 0/1 bytes too (what the next int8 layer reads); out: None,
// or where the spikes go (flat [T·S] of y's dtype; may be y itself when y is not needed afterwards: every value is
// read before the spike of its index is written). Returns spikes [T·S].
torch::Tensor epilogue_forward(torch::Tensor y, torch::Tensor a, c10::optional<torch::Tensor> b,
                               c10::optional<torch::Tensor> residual, int64_t T, bool direct, int64_t C,
                               int64_t inner, double decay, double threshold, c10::optional<double> v_reset,
                               bool decay_input, c10::optional<torch::Tensor> y_save,
                               c10::optional<torch::Tensor> spikes_u8, c10::optional<torch::Tensor> out) {
  const Geometry g = make_geometry(y, T, direct, C, inner);
  check_flat(a, C, y.scalar_type(), "a");
  check_flat(b, C, y.scalar_type(), "b");
  check_flat(residual, T * g.S, y.scalar_type(), "residual");
  if (y_save.has_value())
    TORCH_CHECK(y_save->is_contiguous() && y_save->numel() == y.numel() &&
                    (y_save->scalar_type() == torch::kShort || y_save->scalar_type() == torch::kInt),
                "epilogue_forward: y_save must be a flat int16/int32 tensor of y's size");
  if (spikes_u8.has_value())
    TORCH_CHECK(spikes_u8->is_contiguous() && spikes_u8->numel() == T * g.S && spikes_u8->scalar_type() == torch::kByte,
                "epilogue_forward: spikes_u8 must be a flat uint8 tensor of the spikes' size");
  check_flat(out, T * g.S, y.scalar_type(), "out");
  auto spikes = out.has_value() ? *out : torch::empty({T * g.S}, y.options());
  const bool wide = y_save.has_value() && y_save->scalar_type() == torch::kInt;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "epilogue_forward", [&] {
    const auto p = make_lif<scalar_t>(decay, threshold, v_reset, decay_input);
    const scalar_t* yp = y.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* out = spikes.data_ptr<scalar_t>();
    uint8_t* out8 = spikes_u8.has_value() ? spikes_u8->data_ptr<uint8_t>() : nullptr;
    int16_t* ys16 = y_save.has_value() && !wide ? y_save->data_ptr<int16_t>() : nullptr;
    int32_t* ys32 = wide ? y_save->data_ptr<int32_t>() : nullptr;
    at::parallel_for(0, (g.S + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
      const int64_t begin = b0 * kBlock, end = std::min(g.S, b1 * kBlock);
      if (wide)
        epilogue_forward_run(yp, ap, bp, rp, out, out8, ys32, begin, end, g, p);
      else
        epilogue_forward_run(yp, ap, bp, rp, out, out8, ys16, begin, end, g, p);
    });
  });
  return spikes;
}

// Adds the block's per-neuron sums (lanes) into the per-channel sums. ``inner``: the run length of a channel in
// memory order (`Geometry::inner`).
__attribute__((always_inline)) inline void scatter_lanes(const double* lg, const double* lgy, const int32_t* cj,
                                                         int64_t n, int64_t C, int64_t inner, double* sg,
                                                         double* sgy) {
  const int32_t c0 = cj[0];
  // one channel (contiguous frames): a block no longer than a channel's run that ends in its first channel (with
  // channels-last frames the channel wraps every C lanes, and the last lane can be back at c0)
  if (n <= inner && cj[n - 1] == c0) {
    double x = 0, z = 0;
    for (int64_t j = 0; j < n; ++j) {
      x += lg[j];
      z += lgy[j];
    }
    sg[c0] += x;
    sgy[c0] += z;
  } else if (c0 + n <= C && cj[n - 1] == c0 + n - 1) {  // consecutive channels (channels-last frames)
    for (int64_t j = 0; j < n; ++j) {
      sg[c0 + j] += lg[j];
      sgy[c0 + j] += lgy[j];
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      sg[cj[j]] += lg[j];
      sgy[cj[j]] += lgy[j];
    }
  }
}

// BPTT of one block: recompute I, U and S forward, go back in time; write G = dL/dI (summed over T for a
// direct-encoded input) and dL/dresidual, and add Σ G and Σ G·y per channel into sg / sgy.
template <typename scalar_t, typename y_t>
__attribute__((always_inline)) inline void epilogue_backward_block(
    const y_t* y, const scalar_t* a, const scalar_t* b, const scalar_t* res, const scalar_t* gs, scalar_t* G,
    scalar_t* gres, int64_t m, int64_t n, const Geometry& g, const Lif<scalar_t>& p, scalar_t* u, scalar_t* s,
    double* sg, double* sgy) {
  scalar_t av[kBlock], bv[kBlock], cur[kBlock], v[kBlock];
  double lg[kBlock], lgy[kBlock];
  int32_t cj[kBlock];
  block_channels<scalar_t>(m, n, g.C, g.inner, a, b, av, bv, cj);
  const int64_t T = g.T;
  for (int64_t j = 0; j < n; ++j) v[j] = 0;
  for (int64_t t = 0; t < T; ++t) {
    block_current<scalar_t, y_t>(y + t * g.ystep + m, res ? res + t * g.S + m : nullptr, av, bv, b != nullptr, n,
                                 cur);
    lif_step<scalar_t, scalar_t, true>(cur, v, u + t * kBlock, s + t * kBlock, n, p);
  }
  bptt_block<scalar_t>(u, s, gs + m, g.S, n, T, p);  // u[t] := dL/dI[t]
  if (gres)
    for (int64_t t = 0; t < T; ++t) std::copy(u + t * kBlock, u + t * kBlock + n, gres + t * g.S + m);
  for (int64_t j = 0; j < n; ++j) lg[j] = lgy[j] = 0;
  if (g.ystep == 0) {  // direct: G = Σ_t dL/dI[t], in time order as the eager sum(0)
    for (int64_t j = 0; j < n; ++j) cur[j] = u[j];
    for (int64_t t = 1; t < T; ++t)
      for (int64_t j = 0; j < n; ++j) cur[j] = cur[j] + u[t * kBlock + j];
    const y_t* yt = y + m;
    for (int64_t j = 0; j < n; ++j) {
      G[m + j] = cur[j];
      lg[j] = cur[j];
      lgy[j] = static_cast<double>(cur[j]) * static_cast<double>(yt[j]);
    }
  } else {
    for (int64_t t = 0; t < T; ++t) {
      const scalar_t* ut = u + t * kBlock;
      const y_t* yt = y + t * g.S + m;
      scalar_t* Gt = G + t * g.S + m;
      for (int64_t j = 0; j < n; ++j) {
        Gt[j] = ut[j];
        lg[j] += ut[j];
        lgy[j] += static_cast<double>(ut[j]) * static_cast<double>(yt[j]);
      }
    }
  }
  scatter_lanes(lg, lgy, cj, n, g.C, g.inner, sg, sgy);
}

#define BINWSLT_EPILOGUE_BACKWARD_RUN(scalar_t, y_t)                                                           \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void epilogue_backward_run(                    \
      const y_t* y, const scalar_t* a, const scalar_t* b, const scalar_t* res, const scalar_t* gs, scalar_t* G, \
      scalar_t* gres, int64_t begin, int64_t end, const Geometry& g, const Lif<scalar_t>& p, scalar_t* u,      \
      scalar_t* s, double* sg, double* sgy) {                                                                     \
    for (int64_t m = begin; m < end; m += kBlock)                                                             \
      epilogue_backward_block<scalar_t, y_t>(y, a, b, res, gs, G, gres, m, std::min(kBlock, end - m), g, p, u, \
                                             s, sg, sgy);                                                     \
  }
BINWSLT_EPILOGUE_BACKWARD_RUN(float, float)
BINWSLT_EPILOGUE_BACKWARD_RUN(float, int16_t)
BINWSLT_EPILOGUE_BACKWARD_RUN(float, int32_t)
BINWSLT_EPILOGUE_BACKWARD_RUN(double, double)
BINWSLT_EPILOGUE_BACKWARD_RUN(double, int16_t)
BINWSLT_EPILOGUE_BACKWARD_RUN(double, int32_t)

template <typename scalar_t, typename y_t>
void epilogue_backward_typed(const torch::Tensor& y, const torch::Tensor& a, const c10::optional<torch::Tensor>& b,
                             const c10::optional<torch::Tensor>& residual, const torch::Tensor& grad_spikes,
                             torch::Tensor& G, c10::optional<torch::Tensor>& gres, const Geometry& g,
                             const Lif<scalar_t>& p, torch::Tensor& sums) {
  const y_t* yp = y.data_ptr<y_t>();
  const scalar_t* ap = a.data_ptr<scalar_t>();
  const scalar_t* bp = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
  const scalar_t* rp = residual.has_value() ? residual->data_ptr<scalar_t>() : nullptr;
  const scalar_t* gp = grad_spikes.data_ptr<scalar_t>();
  scalar_t* Gp = G.data_ptr<scalar_t>();
  scalar_t* rg = gres.has_value() ? gres->data_ptr<scalar_t>() : nullptr;
  const int64_t C = g.C, nblocks = (g.S + kBlock - 1) / kBlock;
  const int nthreads = std::max<int>(1, at::get_num_threads());
  std::vector<double> partial(static_cast<size_t>(nthreads) * 2 * C, 0.0);
  at::parallel_for(0, nblocks, 16, [&](int64_t b0, int64_t b1) {
    double* sg = partial.data() + static_cast<size_t>(at::get_thread_num()) * 2 * C;
    std::vector<scalar_t> u(g.T * kBlock);
    std::vector<scalar_t> s(g.T * kBlock);
    epilogue_backward_run(yp, ap, bp, rp, gp, Gp, rg, b0 * kBlock, std::min(g.S, b1 * kBlock), g, p, u.data(),
                          s.data(), sg, sg + C);
  });
  double* out = sums.data_ptr<double>();
  for (int t = 0; t < nthreads; ++t)
    for (int64_t c = 0; c < 2 * C; ++c) out[c] += partial[static_cast<size_t>(t) * 2 * C + c];
}

// Backward. y: flat, float (the current's dtype) or the int16/int32 saved copy; a, b, residual as in the
// forward; grad_spikes [T·S] of the current's dtype. Returns G = dL/dI ([F·frame] like y; summed over T for a
// direct-encoded input), the float64 sums [2, C] (Σ G, Σ G·y per channel) and dL/dresidual [T·S] if asked.
std::vector<torch::Tensor> epilogue_backward(torch::Tensor y, torch::Tensor a, c10::optional<torch::Tensor> b,
                                             c10::optional<torch::Tensor> residual, torch::Tensor grad_spikes,
                                             int64_t T, bool direct, int64_t C, int64_t inner, double decay,
                                             double threshold, c10::optional<double> v_reset, bool decay_input,
                                             int64_t surrogate, double alpha, bool detach_reset,
                                             bool want_grad_residual) {
  const Geometry g = make_geometry(y, T, direct, C, inner);
  const auto dtype = a.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kDouble, "epilogue_backward: a must be float32/float64");
  TORCH_CHECK(y.scalar_type() == dtype || y.scalar_type() == torch::kShort || y.scalar_type() == torch::kInt,
              "epilogue_backward: y must be of a's dtype or int16/int32");
  check_flat(a, C, dtype, "a");
  check_flat(b, C, dtype, "b");
  check_flat(residual, T * g.S, dtype, "residual");
  check_flat(grad_spikes, T * g.S, dtype, "grad_spikes");
  auto G = torch::empty({y.numel()}, a.options());
  c10::optional<torch::Tensor> gres;
  if (want_grad_residual) gres = torch::empty({T * g.S}, a.options());
  auto sums = torch::zeros({2, C}, a.options().dtype(torch::kDouble));
  AT_DISPATCH_FLOATING_TYPES(dtype, "epilogue_backward", [&] {
    const auto nr = make_lif<scalar_t>(decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset);
    switch (y.scalar_type()) {
      case torch::kShort:
        epilogue_backward_typed<scalar_t, int16_t>(y, a, b, residual, grad_spikes, G, gres, g, nr, sums);
        break;
      case torch::kInt:
        epilogue_backward_typed<scalar_t, int32_t>(y, a, b, residual, grad_spikes, G, gres, g, nr, sums);
        break;
      default:
        epilogue_backward_typed<scalar_t, scalar_t>(y, a, b, residual, grad_spikes, G, gres, g, nr, sums);
    }
  });
  std::vector<torch::Tensor> result{G, sums};
  if (gres.has_value()) result.push_back(*gres);
  return result;
}

// In place over G (flat, like y): G = c1[c]·G + c2[c]·y + c3[c], the BatchNorm fold (c2, c3 may be None: then
// G = c1[c]·G, the plain per-channel scale).
template <typename scalar_t, typename y_t>
void fold_typed(scalar_t* G, const y_t* y, const scalar_t* c1, const scalar_t* c2, const scalar_t* c3,
                int64_t total, int64_t C, int64_t inner) {
  at::parallel_for(0, (total + kBlock - 1) / kBlock, 64, [&](int64_t b0, int64_t b1) {
    scalar_t k1[kBlock], k2[kBlock], k3[kBlock];
    int32_t cj[kBlock];
    for (int64_t m = b0 * kBlock; m < std::min(total, b1 * kBlock); m += kBlock) {
      const int64_t n = std::min(kBlock, total - m);
      block_channels<scalar_t>(m % (C * inner), n, C, inner, c1, c2, k1, k2, cj);
      scalar_t* Gm = G + m;
      if (c2) {
        for (int64_t j = 0; j < n; ++j) k3[j] = c3[cj[j]];
        const y_t* ym = y + m;
        for (int64_t j = 0; j < n; ++j) Gm[j] = bn_fold(Gm[j], static_cast<scalar_t>(ym[j]), k1[j], k2[j], k3[j]);
      } else {
        for (int64_t j = 0; j < n; ++j) Gm[j] = Gm[j] * k1[j];
      }
    }
  });
}

void epilogue_fold(torch::Tensor G, torch::Tensor y, torch::Tensor c1, c10::optional<torch::Tensor> c2,
                   c10::optional<torch::Tensor> c3, int64_t C, int64_t inner) {
  TORCH_CHECK(G.dim() == 1 && G.is_contiguous() && y.dim() == 1 && y.is_contiguous() && G.numel() == y.numel(),
              "epilogue_fold: G and y must be flat of one size");
  TORCH_CHECK(G.numel() % (C * inner) == 0, "epilogue_fold: G does not split into channels");
  TORCH_CHECK(c2.has_value() == c3.has_value(), "epilogue_fold: c2 and c3 come together");
  check_flat(c1, C, G.scalar_type(), "c1");
  check_flat(c2, C, G.scalar_type(), "c2");
  check_flat(c3, C, G.scalar_type(), "c3");
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "epilogue_fold", [&] {
    scalar_t* Gp = G.data_ptr<scalar_t>();
    const scalar_t* p1 = c1.data_ptr<scalar_t>();
    const scalar_t* p2 = c2.has_value() ? c2->data_ptr<scalar_t>() : nullptr;
    const scalar_t* p3 = c3.has_value() ? c3->data_ptr<scalar_t>() : nullptr;
    switch (y.scalar_type()) {
      case torch::kShort:
        fold_typed<scalar_t, int16_t>(Gp, y.data_ptr<int16_t>(), p1, p2, p3, G.numel(), C, inner);
        break;
      case torch::kInt:
        fold_typed<scalar_t, int32_t>(Gp, y.data_ptr<int32_t>(), p1, p2, p3, G.numel(), C, inner);
        break;
      default:
        TORCH_CHECK(y.scalar_type() == G.scalar_type(), "epilogue_fold: y must be of G's dtype or int16/int32");
        fold_typed<scalar_t, scalar_t>(Gp, y.data_ptr<scalar_t>(), p1, p2, p3, G.numel(), C, inner);
    }
  });
}

// Bits of a flat tensor (value != 0), 8 per byte, little-endian: the layout of binwslt.bits.pack_bits.
// float32 values (the spike frames) to bits, 64 at a time: one 64-bit word per 64 values, stored little-endian
// (byte i = bits 8i..8i+7, pack_bits' order).
void pack_words(const float* p, uint8_t* o, int64_t w0, int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const float* q = p + 64 * w;
    uint64_t bits = 0;
    for (int j = 0; j < 64; ++j) bits |= static_cast<uint64_t>(q[j] != 0.0f) << j;
    for (int b = 0; b < 8; ++b) o[8 * w + b] = static_cast<uint8_t>(bits >> (8 * b));
  }
}

#if defined(__x86_64__)
// The same with AVX-512 compares (16 values to 16 mask bits at once); x86 is little-endian.
__attribute__((target("avx512f"))) void pack_words_avx512(const float* p, uint8_t* o, int64_t w0, int64_t w1) {
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t w = w0; w < w1; ++w) {
    const float* q = p + 64 * w;
    uint64_t bits = 0;
    for (int k = 0; k < 4; ++k)
      bits |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_loadu_ps(q + 16 * k), zero, _CMP_NEQ_UQ)) << (16 * k);
    std::memcpy(o + 8 * w, &bits, 8);
  }
}

// uint8 values (spike bytes) to bits, 64 at a time with AVX-512BW byte tests.
__attribute__((target("avx512f,avx512bw"))) void pack_bytes_avx512(const uint8_t* p, uint8_t* o, int64_t w0,
                                                                     int64_t w1) {
  for (int64_t w = w0; w < w1; ++w) {
    const __m512i v = _mm512_loadu_si512(reinterpret_cast<const void*>(p + 64 * w));
    const uint64_t bits = _mm512_test_epi8_mask(v, v);
    std::memcpy(o + 8 * w, &bits, 8);
  }
}
#endif

torch::Tensor pack_nonzero(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "pack_nonzero: x must be flat");
  const int64_t n = x.numel(), nbytes = (n + 7) / 8;
  auto out = torch::empty({nbytes}, x.options().dtype(torch::kByte));
  uint8_t* o = out.data_ptr<uint8_t>();
  AT_DISPATCH_ALL_TYPES_AND2(at::ScalarType::Bool, at::ScalarType::BFloat16, x.scalar_type(), "pack_nonzero", [&] {
    const scalar_t* p = x.data_ptr<scalar_t>();
    int64_t first = 0;  // the first byte the generic loop packs
    if constexpr (std::is_same_v<scalar_t, float>) {
      const int64_t words = n / 64;
      const float* pf = reinterpret_cast<const float*>(p);  // scalar_t is float here
#if defined(__x86_64__)
      const bool avx512 = __builtin_cpu_supports("avx512f");
#else
      const bool avx512 = false;
#endif
      at::parallel_for(0, words, 512, [&](int64_t w0, int64_t w1) {
#if defined(__x86_64__)
        if (avx512) return pack_words_avx512(pf, o, w0, w1);
#endif
        pack_words(pf, o, w0, w1);
      });
      first = 8 * words;
    }
#if defined(__x86_64__)
    if constexpr (std::is_same_v<scalar_t, uint8_t>) {
      if (__builtin_cpu_supports("avx512bw")) {
        const int64_t words = n / 64;
        const uint8_t* pb = reinterpret_cast<const uint8_t*>(p);  // scalar_t is uint8_t here
        at::parallel_for(0, words, 2048, [&](int64_t w0, int64_t w1) { pack_bytes_avx512(pb, o, w0, w1); });
        first = 8 * words;
      }
    }
#endif
    at::parallel_for(first, nbytes, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) {
        uint8_t byte = 0;
        const int64_t k = std::min<int64_t>(8, n - 8 * i);
        for (int64_t j = 0; j < k; ++j) byte |= static_cast<uint8_t>(p[8 * i + j] != scalar_t(0)) << j;
        o[i] = byte;
      }
    });
  });
  return out;
}

// Inverse of pack_nonzero: `numel` values 0/1 of `dtype`, flat (eight at a time from a table of the 256 bytes).
torch::Tensor unpack_to(torch::Tensor bits, int64_t numel, c10::ScalarType dtype) {
  TORCH_CHECK(bits.dim() == 1 && bits.is_contiguous() && bits.scalar_type() == torch::kByte &&
                  bits.numel() * 8 >= numel, "unpack_to: bits must be flat uint8 holding numel bits");
  auto out = torch::empty({numel}, bits.options().dtype(dtype));
  const uint8_t* p = bits.data_ptr<uint8_t>();
  AT_DISPATCH_ALL_TYPES_AND2(at::ScalarType::Bool, at::ScalarType::BFloat16, dtype, "unpack_to", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    std::unique_ptr<scalar_t[]> table(new scalar_t[256 * 8]);  // (no std::vector<bool>)
    for (int byte = 0; byte < 256; ++byte)
      for (int j = 0; j < 8; ++j) table[byte * 8 + j] = static_cast<scalar_t>(static_cast<float>((byte >> j) & 1));
    const int64_t whole = numel / 8;
    at::parallel_for(0, whole, 4096, [&](int64_t b0, int64_t b1) {
      for (int64_t i = b0; i < b1; ++i) std::memcpy(o + 8 * i, table.get() + 8 * p[i], 8 * sizeof(scalar_t));
    });
    for (int64_t q = 8 * whole; q < numel; ++q) o[q] = table[8 * p[whole] + (q - 8 * whole)];
  });
  return out;
}

// The subnet of binwslt.subnet.ternary_subnet in one pass after a selection: the k smallest |scores| pruned
// (ties at the threshold pruned in index order), tern = M·sign(w) (int8), α = Σ|w|·M / ΣM (summed in float64,
// compensated, rounded to float32). weight, scores: float32, contiguous, one size. Returns {} (the caller's
// eager path then runs) when a score is NaN, whose order the selection does not define alike.
std::vector<torch::Tensor> ternary_subnet(torch::Tensor weight, torch::Tensor scores, int64_t k) {
  TORCH_CHECK(weight.is_contiguous() && scores.is_contiguous() && weight.scalar_type() == torch::kFloat &&
                  scores.scalar_type() == torch::kFloat && weight.numel() == scores.numel(),
              "ternary_subnet: weight and scores must be contiguous float32 of one size");
  const int64_t n = weight.numel();
  TORCH_CHECK(k >= 0 && k < n, "ternary_subnet: k must lie in [0, numel)");
  const float* w = weight.data_ptr<float>();
  const float* sc = scores.data_ptr<float>();
  auto tern = torch::empty(weight.sizes(), weight.options().dtype(torch::kChar));
  int8_t* t = tern.data_ptr<int8_t>();
  float threshold = -1.0f;  // below every |score|: nothing pruned when k == 0
  int64_t tied_to_prune = 0;
  if (k > 0) {
    std::vector<float> mag(n);
    for (int64_t i = 0; i < n; ++i) {
      mag[i] = std::abs(sc[i]);
      if (std::isnan(mag[i])) return {};
    }
    std::nth_element(mag.begin(), mag.begin() + (k - 1), mag.end());
    threshold = mag[k - 1];
    int64_t less = 0;
    for (int64_t i = 0; i < n; ++i) less += std::abs(sc[i]) < threshold;
    tied_to_prune = k - less;
  }
  double sum = 0.0, comp = 0.0;
  int64_t kept = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float m = std::abs(sc[i]);
    bool keep = m > threshold;
    if (m == threshold) keep = tied_to_prune-- <= 0;
    const float wi = w[i];
    t[i] = keep ? static_cast<int8_t>((wi > 0.0f) - (wi < 0.0f)) : int8_t(0);
    if (keep) {
      const double yv = static_cast<double>(std::abs(wi)) - comp;  // Kahan: the sum is (almost) order-free
      const double tv = sum + yv;
      comp = (tv - sum) - yv;
      sum = tv;
      ++kept;
    }
  }
  auto alpha = torch::full({}, static_cast<float>(sum / static_cast<double>(kept)),
                           weight.options().dtype(torch::kFloat));
  return {tern, alpha};
}

// MPT's straight-through gradient to the scores, dL/ds = (dL/dW_eff · w) · sign(s), in one pass
// (float32, contiguous, one size): the values of binwslt.subnet.straight_through_grads.
torch::Tensor score_grad(torch::Tensor grad_weff, torch::Tensor weight, torch::Tensor scores) {
  TORCH_CHECK(grad_weff.is_contiguous() && weight.is_contiguous() && scores.is_contiguous() &&
                  grad_weff.scalar_type() == torch::kFloat && weight.scalar_type() == torch::kFloat &&
                  scores.scalar_type() == torch::kFloat && grad_weff.numel() == weight.numel() &&
                  scores.numel() == weight.numel(),
              "score_grad: grad_weff, weight and scores must be contiguous float32 of one size");
  auto out = torch::empty_like(grad_weff);
  const float* g = grad_weff.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* sc = scores.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, grad_weff.numel(), 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const float s = sc[i];
      const float sign = s > 0.0f ? 1.0f : (s < 0.0f ? -1.0f : (s == 0.0f ? 0.0f : s));  // NaN stays NaN
      o[i] = (g[i] * w[i]) * sign;
    }
  });
  return out;
}

// One output row of spike_pool2x2: the rows `top` and `bottom` of [W, C] bytes to OW·C pooled bytes and codes.
// Bitwise on 0/1 bytes and their masks (0xFF where 0), so it vectorises: code = ~a & (b | (~b & (2c | (~c & 3d)))).
__attribute__((target_clones("avx512f", "avx2", "default"))) void pool_row(const uint8_t* top, const uint8_t* bottom,
                                                                            uint8_t* o, uint8_t* k, int64_t OW,
                                                                            int64_t C) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    const uint8_t *t0 = top + 2 * ow * C, *t1 = t0 + C, *b0 = bottom + 2 * ow * C, *b1 = b0 + C;
    uint8_t *oq = o + ow * C, *kq = k + ow * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      const uint8_t a = t0[ch] != 0, b = t1[ch] != 0, c = b0[ch] != 0, d = b1[ch] != 0;
      oq[ch] = a | b | c | d;
      const uint8_t na = a - 1, nb = b - 1, nc = c - 1;  // 0xFF where the spike is 0
      kq[ch] = na & (b | (nb & ((c << 1) | (nc & (d * 3)))));
    }
  }
}

// One output row of spike_pool2x2_backward: g (OW·C) to the input rows top/bottom ([W, C]) at the coded positions.
void unpool_row_scalar(const float* g, const uint8_t* k, float* top, float* bottom, int64_t OW, int64_t C) {
  for (int64_t ow = 0; ow < OW; ++ow) {
    float *t0 = top + 2 * ow * C, *t1 = t0 + C, *b0 = bottom + 2 * ow * C, *b1 = b0 + C;
    const float* gq = g + ow * C;
    const uint8_t* kq = k + ow * C;
    for (int64_t ch = 0; ch < C; ++ch) {
      t0[ch] = kq[ch] == 0 ? gq[ch] : 0.0f;
      t1[ch] = kq[ch] == 1 ? gq[ch] : 0.0f;
      b0[ch] = kq[ch] == 2 ? gq[ch] : 0.0f;
      b1[ch] = kq[ch] == 3 ? gq[ch] : 0.0f;
    }
  }
}

#if defined(__x86_64__)
__attribute__((target("avx512f"))) void unpool_row_avx512(const float* g, const uint8_t* k, float* top,
                                                           float* bottom, int64_t OW, int64_t C) {
  const int64_t C16 = C / 16 * 16;
  for (int64_t ow = 0; ow < OW; ++ow) {
    float *t0 = top + 2 * ow * C, *t1 = t0 + C, *b0 = bottom + 2 * ow * C, *b1 = b0 + C;
    const float* gq = g + ow * C;
    const uint8_t* kq = k + ow * C;
    for (int64_t ch = 0; ch < C16; ch += 16) {
      const __m512i code = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(kq + ch)));
      const __m512 v = _mm512_loadu_ps(gq + ch);
      _mm512_storeu_ps(t0 + ch, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(0)), v));
      _mm512_storeu_ps(t1 + ch, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(1)), v));
      _mm512_storeu_ps(b0 + ch, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(2)), v));
      _mm512_storeu_ps(b1 + ch, _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(code, _mm512_set1_epi32(3)), v));
    }
    if (C16 < C) {  // the channels past the last 16: the scalar loop on this pixel alone
      for (int64_t ch = C16; ch < C; ++ch) {
        t0[ch] = kq[ch] == 0 ? gq[ch] : 0.0f;
        t1[ch] = kq[ch] == 1 ? gq[ch] : 0.0f;
        b0[ch] = kq[ch] == 2 ? gq[ch] : 0.0f;
        b1[ch] = kq[ch] == 3 ? gq[ch] : 0.0f;
      }
    }
  }
}
#endif

// 2×2 max-pool (stride 2, floor) of channels-last uint8 spikes x [F, H, W, C] (physical order, contiguous):
// {pooled [F, H/2, W/2, C] uint8, code of the same shape}: code is the window position (0..3 in row-major order)
// of the first spike, 0 when none fired: max_pool2d's argmax (the first maximum wins).
std::vector<torch::Tensor> spike_pool2x2(torch::Tensor x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.scalar_type() == torch::kByte,
              "spike_pool2x2: x must be contiguous uint8 [F, H, W, C]");
  const int64_t F = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3), OH = H / 2, OW = W / 2;
  auto out = torch::empty({F, OH, OW, C}, x.options());
  auto code = torch::empty({F, OH, OW, C}, x.options());
  const uint8_t* xp = x.data_ptr<uint8_t>();
  uint8_t* op = out.data_ptr<uint8_t>();
  uint8_t* kp = code.data_ptr<uint8_t>();
  at::parallel_for(0, F * OH, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* top = xp + ((r / OH) * H + 2 * (r % OH)) * W * C;
      pool_row(top, top + W * C, op + r * OW * C, kp + r * OW * C, OW, C);
    }
  });
  return {out, code};
}

// The gradient of spike_pool2x2: grad [F, H/2, W/2, C] float32 (contiguous) goes to the window position `code`
// names; every other input position (odd rows/columns left out included) gets 0. Returns [F, H, W, C] float32.
torch::Tensor spike_pool2x2_backward(torch::Tensor grad, torch::Tensor code, int64_t H, int64_t W) {
  TORCH_CHECK(grad.dim() == 4 && grad.is_contiguous() && grad.scalar_type() == torch::kFloat &&
                  code.sizes() == grad.sizes() && code.is_contiguous() && code.scalar_type() == torch::kByte,
              "spike_pool2x2_backward: grad must be contiguous float32 [F, H/2, W/2, C] and code uint8 of its shape");
  const int64_t F = grad.size(0), OH = grad.size(1), OW = grad.size(2), C = grad.size(3);
  TORCH_CHECK(OH == H / 2 && OW == W / 2, "spike_pool2x2_backward: H, W do not match grad");
  auto gi = (H % 2 || W % 2) ? torch::zeros({F, H, W, C}, grad.options()) : torch::empty({F, H, W, C}, grad.options());
  const float* gp = grad.data_ptr<float>();
  const uint8_t* kp = code.data_ptr<uint8_t>();
  float* ip = gi.data_ptr<float>();
#if defined(__x86_64__)
  const auto row = kAvx512 ? unpool_row_avx512 : unpool_row_scalar;
#else
  const auto row = unpool_row_scalar;
#endif
  at::parallel_for(0, F * OH, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* top = ip + ((r / OH) * H + 2 * (r % OH)) * W * C;
      row(gp + r * OW * C, kp + r * OW * C, top, top + W * C, OW, C);
    }
  });
  return gi;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused LIF forward scan over T (CPU)");
  m.def("lif_backward", &lif_backward, "fused LIF BPTT scan over T (CPU)");
  m.def("channel_moments", &channel_moments, "per-channel float64 sum and sum of squares (CPU)");
  m.def("epilogue_forward", &epilogue_forward, "fused current + LIF scan + spikes + saved y (CPU)");
  m.def("epilogue_backward", &epilogue_backward, "fused current + BPTT + per-channel sums (CPU)");
  m.def("epilogue_fold", &epilogue_fold, "in-place BatchNorm gradient fold c1*G + c2*y + c3 (CPU)");
  m.def("pack_nonzero", &pack_nonzero, "bits of a flat tensor, 8 per byte, little-endian (CPU)");
  m.def("unpack_to", &unpack_to, "bits to 0/1 values of a dtype (CPU)");
  m.def("ternary_subnet", &ternary_subnet, "ternary weight and alpha of the subnet in one pass (CPU)");
  m.def("score_grad", &score_grad, "straight-through gradient to the scores in one pass (CPU)");
  m.def("spike_pool2x2", &spike_pool2x2, "2x2 max-pool of channels-last uint8 spikes and its argmax codes (CPU)");
  m.def("spike_pool2x2_backward", &spike_pool2x2_backward, "gradient of spike_pool2x2 (CPU)");
}
