// Fused LIF scans for the torch backend on CPU: one pass over T per neuron, membrane in a register.
// Built on first use by binwslt/_cpu_ext.py (torch.utils.cpp_extension); compiled with -ffp-contract=off so
// every step rounds exactly as the reference's separate multiply and add do (bit-identical spikes).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

namespace {

constexpr int kAtan = 0, kSigmoid = 1, kTriangle = 2;

template <typename scalar_t>
inline scalar_t surrogate_slope(scalar_t x, int surrogate, scalar_t alpha) {
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
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        scalar_t v = 0;
        for (int64_t t = 0; t < T; ++t) {
          const scalar_t x = in[t * st + m];
          const scalar_t dv = d * v;
          const scalar_t u = decay_input ? dv + gain * x : dv + x;
          const bool fire = u >= th;
          out[t * M + m] = fire ? scalar_t(1) : scalar_t(0);
          v = fire ? (hard ? vr : u - th) : u;
        }
      }
    });
  });
  return spikes;
}

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
    at::parallel_for(0, M, 2048, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> u(T);
      std::vector<char> s(T);
      for (int64_t m = begin; m < end; ++m) {
        scalar_t v = 0;
        for (int64_t t = 0; t < T; ++t) {  // recompute the membrane from the current
          const scalar_t x = in[t * st + m];
          const scalar_t dv = d * v;
          u[t] = decay_input ? dv + gain * x : dv + x;
          s[t] = u[t] >= th;
          v = s[t] ? (hard ? vr : u[t] - th) : u[t];
        }
        scalar_t grad_v = 0;  // dL/dV[t], carried backwards in time
        for (int64_t t = T - 1; t >= 0; --t) {
          scalar_t grad_s = gs[t * M + m];
          scalar_t grad_u;
          if (hard) {
            if (!detach_reset) grad_s += grad_v * (vr - u[t]);
            grad_u = s[t] ? scalar_t(0) : grad_v;
          } else {
            if (!detach_reset) grad_s -= th * grad_v;
            grad_u = grad_v;
          }
          grad_u += grad_s * surrogate_slope<scalar_t>(u[t] - th, static_cast<int>(surrogate), a);
          gi[t * M + m] = decay_input ? gain * grad_u : grad_u;
          grad_v = d * grad_u;
        }
      }
    });
  });
  return grad_current;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lif_forward", &lif_forward, "fused LIF forward scan over T (CPU)");
  m.def("lif_backward", &lif_backward, "fused LIF BPTT scan over T (CPU)");
}
