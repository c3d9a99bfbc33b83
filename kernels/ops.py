"""The Triton backend entry (``backend="triton"`` in binwslt.functional).

Same internal signatures as binwslt.reference / binwslt.torch_backend (arguments already validated):
    lif(x_seq, neuron) -> spikes
    binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron,
                    timesteps, batch_norm, running_mean, running_var, momentum, eps, subnet, grad_precision)
    binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, subnet, grad_precision, memory)
    make_subnet(weight, scores, prune_rate) -> binwslt.subnet.Subnet   (used by the nn modules' SubnetCache)
Float64: binwslt.backends.resolve_backend runs float64 x on the torch backend (double precision kept), so these
entries never compute a float64 input in fp32; called directly with one they raise TypeError.
The fused layer modules are imported on first use, so ``lif`` works even while a layer module is
being edited and importing this module never traces a kernel.
"""

from .launch import check_float64
from .lif import lif as _triton_lif

# memory= modes the fused ops take as a keyword (binwslt.functional checks them): both rebuild y in the backward
# with the forward's GEMM (kernels/memory.py chooses for "auto").
MEMORY_MODES = {"binw_conv2d_lif": ("auto", "save", "recompute"), "binw_linear_lif": ("auto", "save", "recompute")}

__all__ = ["lif", "binw_conv2d_lif", "binw_linear_lif", "make_subnet", "MEMORY_MODES"]


def lif(x_seq, neuron):
    """Multi-step LIF: x_seq float [T, ...] currents (fp32/fp16/bf16), neuron a LIFConfig -> spikes, same shape and
    dtype. The kernels compute in fp32 (fp16/bf16 inputs are widened on load)."""
    check_float64(x_seq, "LIF")
    return _triton_lif(x_seq, neuron)


def make_subnet(weight, scores, prune_rate):
    """The layer's `binwslt.subnet.Subnet` (kernels/subnet.py): ternary int8 in weight's shape, alpha 0-dim fp32,
    selected on the device without a host sync."""
    from .subnet import make_subnet as impl

    return impl(weight, scores, prune_rate)


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, subnet=None, grad_precision="split",
                    memory="auto"):
    """Fused binary-subnet conv2d + LIF (kernels/conv_lif.py). Spikes [T, N, C_out, H', W'] in
    ``spike_output_dtype(x.dtype)``, marked as spikes."""
    from .conv_lif import binw_conv2d_lif as conv_impl

    return conv_impl(x, weight, scores, prune_rate, stride=stride, padding=padding, scale=scale, shift=shift,
                     residual=residual, neuron=neuron, timesteps=timesteps, batch_norm=batch_norm,
                     running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps,
                     grad_precision=grad_precision, memory=memory, subnet=subnet)


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, subnet=None, grad_precision="split", memory="auto"):
    """Fused binary-subnet linear + LIF (kernels/linear_lif.py). Spikes [T, N, out] in
    ``spike_output_dtype(x.dtype)``, marked as spikes."""
    from .linear_lif import binw_linear_lif as linear_impl

    return linear_impl(x, weight, scores, prune_rate, scale=scale, shift=shift, residual=residual, neuron=neuron,
                       timesteps=timesteps, batch_norm=batch_norm, running_mean=running_mean,
                       running_var=running_var, momentum=momentum, eps=eps, subnet=subnet,
                       grad_precision=grad_precision, memory=memory)
