"""The Triton backend entry (``backend="triton"`` in binwslt.functional).

Same internal signatures as binwslt.reference / binwslt.torch_backend (arguments already validated):
    lif(x_seq, neuron) -> spikes
    binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron,
                    timesteps, batch_norm, running_mean, running_var, momentum, eps) -> spikes
    binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps) -> spikes
The fused layer modules are imported on first use, so ``lif`` works even while a layer module is
being edited and importing this module never traces a kernel.
"""

import torch

from .lif import lif as _triton_lif

# memory= modes the fused ops take as a keyword (binwslt.functional checks them): conv rebuilds y in the backward
# with the forward's GEMM (kernels/memory.py chooses for "auto"); linear has no keyword: it always saves y.
MEMORY_MODES = {"binw_conv2d_lif": ("auto", "save", "recompute")}

__all__ = ["lif", "binw_conv2d_lif", "binw_linear_lif"]


def lif(x_seq, neuron):
    """Multi-step LIF: x_seq float [T, ...] currents, neuron a LIFConfig -> spikes, same shape and dtype.

    The kernels compute in fp32 (fp16/bf16 inputs are widened on load); float64 inputs go to
    binwslt.torch_backend so they keep double precision.
    """
    if x_seq.dtype == torch.float64:
        from binwslt import torch_backend

        return torch_backend.lif(x_seq, neuron)
    return _triton_lif(x_seq, neuron)


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, grad_precision="split", memory="auto"):
    """Fused binary-subnet conv2d + LIF (kernels/conv_lif.py). Spikes [T, N, C_out, H', W'] in x.dtype."""
    from .conv_lif import binw_conv2d_lif as conv_impl

    return conv_impl(x, weight, scores, prune_rate, stride=stride, padding=padding, scale=scale, shift=shift,
                     residual=residual, neuron=neuron, timesteps=timesteps, batch_norm=batch_norm,
                     running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps,
                     grad_precision=grad_precision, memory=memory)


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, grad_precision="split"):
    """Fused binary-subnet linear + LIF (kernels/linear_lif.py). Spikes [T, N, out] in x.dtype.

    The kernels compute in fp32; float64 inputs go to binwslt.torch_backend.
    """
    if x.dtype == torch.float64:
        from binwslt import torch_backend

        return torch_backend.binw_linear_lif(x, weight, scores, prune_rate, scale=scale, shift=shift,
                                             residual=residual, neuron=neuron, timesteps=timesteps,
                                             batch_norm=batch_norm, running_mean=running_mean,
                                             running_var=running_var, momentum=momentum, eps=eps)
    from .linear_lif import binw_linear_lif as linear_impl

    return linear_impl(x, weight, scores, prune_rate, scale=scale, shift=shift, residual=residual, neuron=neuron,
                       timesteps=timesteps, batch_norm=batch_norm, running_mean=running_mean,
                       running_var=running_var, momentum=momentum, eps=eps, grad_precision=grad_precision)
