// Fused LIF scans for the torch backend on CPU: one pass over T per neuron, membrane in a register.
// Built on first use by binwslt/_cpu_ext.py (torch.utils.cpp_extension); compiled with -ffp-contract=off so
// every step rounds exactly as the reference's separate multiply and add do (bit-identical spikes).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

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

// One block of `n` neurons over T steps. `in` points at the block's first neuron at t = 0 (step stride `st`,
// 0 for a direct-encoded input), `out` likewise with step stride `M`. Multiversioned for the vector widths.
template <typename scalar_t>
__attribute__((always_inline)) inline void forward_block(const scalar_t* in, scalar_t* out, int64_t n, int64_t T,
                                                         int64_t st, int64_t M, scalar_t d, scalar_t th,
                                                         scalar_t gain, bool hard, scalar_t vr, bool decay_input) {
  scalar_t v[kBlock];
  for (int64_t j = 0; j < n; ++j) v[j] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* x = in + t * st;
    scalar_t* s = out + t * M;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t dv = d * v[j];
      const scalar_t u = decay_input ? dv + gain * x[j] : dv + x[j];
      const bool fire = u >= th;
      s[j] = fire ? scalar_t(1) : scalar_t(0);
      v[j] = fire ? (hard ? vr : u - th) : u;
    }
  }
}

#define BINWSLT_FORWARD_RUN(scalar_t)                                                                          \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void forward_run(                              \
      const scalar_t* in, scalar_t* out, int64_t begin, int64_t end, int64_t T, int64_t st, int64_t M,          \
      scalar_t d, scalar_t th, scalar_t gain, bool hard, scalar_t vr, bool decay_input) {                     \
    for (int64_t m = begin; m < end; m += kBlock)                                                             \
      forward_block<scalar_t>(in + m, out + m, std::min(kBlock, end - m), T, st, M, d, th, gain, hard, vr,    \
                              decay_input);                                                                   \
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
    const scalar_t d = static_cast<scalar_t>(decay), th = static_cast<scalar_t>(threshold);
    const scalar_t gain = static_cast<scalar_t>(1.0 - decay);
    const bool hard = v_reset.has_value();
    const scalar_t vr = static_cast<scalar_t>(hard ? *v_reset : 0.0);
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
      const int64_t begin = b0 * kBlock, end = std::min(M, b1 * kBlock);
      forward_run(in, out, begin, end, T, st, M, d, th, gain, hard, vr, decay_input);
    });
  });
  return spikes;
}

// BPTT of one block of `n` neurons: recompute U and S forward (kept in `u`, `s`: [T][kBlock]), then go back.
template <typename scalar_t>
__attribute__((always_inline)) inline void backward_block(const scalar_t* in, const scalar_t* gs, scalar_t* gi,
                                                          int64_t n, int64_t T, int64_t st, int64_t M, scalar_t d,
                                                          scalar_t th, scalar_t gain, bool hard, scalar_t vr,
                                                          bool decay_input, int surrogate, scalar_t a,
                                                          bool detach_reset, scalar_t* u, char* s) {
  scalar_t v[kBlock], grad_v[kBlock];
  for (int64_t j = 0; j < n; ++j) v[j] = 0;
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* x = in + t * st;
    scalar_t* ut = u + t * kBlock;
    char* st_ = s + t * kBlock;
    for (int64_t j = 0; j < n; ++j) {
      const scalar_t dv = d * v[j];
      const scalar_t uu = decay_input ? dv + gain * x[j] : dv + x[j];
      const bool fire = uu >= th;
      ut[j] = uu;
      st_[j] = fire;
      v[j] = fire ? (hard ? vr : uu - th) : uu;
    }
  }
  for (int64_t j = 0; j < n; ++j) grad_v[j] = 0;  // dL/dV[t], carried backwards in time
  for (int64_t t = T - 1; t >= 0; --t) {
    const scalar_t* g = gs + t * M;
    scalar_t* out = gi + t * M;
    const scalar_t* ut = u + t * kBlock;
    const char* sf = s + t * kBlock;
    for (int64_t j = 0; j < n; ++j) {
      scalar_t grad_s = g[j];
      scalar_t grad_u;
      if (hard) {
        if (!detach_reset) grad_s += grad_v[j] * (vr - ut[j]);
        grad_u = sf[j] ? scalar_t(0) : grad_v[j];
      } else {
        if (!detach_reset) grad_s -= th * grad_v[j];
        grad_u = grad_v[j];
      }
      grad_u += grad_s * surrogate_slope<scalar_t>(ut[j] - th, surrogate, a);
      out[j] = decay_input ? gain * grad_u : grad_u;
      grad_v[j] = d * grad_u;
    }
  }
}

#define BINWSLT_BACKWARD_RUN(scalar_t)                                                                         \
  __attribute__((target_clones("avx512f", "avx2", "default"))) void backward_run(                             \
      const scalar_t* in, const scalar_t* gs, scalar_t* gi, int64_t begin, int64_t end, int64_t T, int64_t st,  \
      int64_t M, scalar_t d, scalar_t th, scalar_t gain, bool hard, scalar_t vr, bool decay_input,              \
      int surrogate, scalar_t a, bool detach_reset, scalar_t* u, char* s) {                                   \
    for (int64_t m = begin; m < end; m += kBlock)                                                             \
      backward_block<scalar_t>(in + m, gs + m, gi + m, std::min(kBlock, end - m), T, st, M, d, th, gain, hard, \
                               vr, decay_input, surrogate, a, detach_reset, u, s);                            \
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
    const scalar_t d = static_cast<scalar_t>(decay), th = static_cast<scalar_t>(threshold);
    const scalar_t gain = static_cast<scalar_t>(1.0 - decay), a = static_cast<scalar_t>(alpha);
    const bool hard = v_reset.has_value();
    const scalar_t vr = static_cast<scalar_t>(hard ? *v_reset : 0.0);
    const int sg = static_cast<int>(surrogate);
    at::parallel_for(0, (M + kBlock - 1) / kBlock, 16, [&](int64_t b0, int64_t b1) {
      const int64_t begin = b0 * kBlock, end = std::min(M, b1 * kBlock);
      std::vector<scalar_t> u(T * kBlock);
      std::vector<char> s(T * kBlock);
      backward_run(in, gs, gi, begin, end, T, st, M, d, th, gain, hard, vr, decay_input, sg, a, detach_reset,
                   u.data(), s.data());
    });
  });
  return grad_current;
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
    double* ss = s + C;
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused LIF forward scan over T (CPU)");
  m.def("lif_backward", &lif_backward, "fused LIF BPTT scan over T (CPU)");
  m.def("channel_moments", &channel_moments, "per-channel float64 sum and sum of squares (CPU)");
}
