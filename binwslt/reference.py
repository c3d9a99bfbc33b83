"""The reference backend: per-timestep Python loops with autograd, written to be read, never optimised.

Every other backend is tested against these functions. Shapes: spikes are time-major ``[T, N, C, H, W]`` or
``[T, N, F]``; a direct-encoded first layer takes the analog ``[N, C, H, W]`` / ``[N, F]`` input with
``timesteps=T``. The internal signature (validated arguments) is the one `binwslt.functional` dispatches to.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import LIFConfig
from .subnet import subnet_weight
from .surrogate import SurrogateSpike


def lif(x_seq: torch.Tensor, neuron: LIFConfig) -> torch.Tensor:
    """LIF over ``x_seq`` ``[T, ...]`` (input currents), one step at a time; returns spikes, same shape and dtype."""
    v = torch.zeros_like(x_seq[0])
    spikes = []
    for t in range(x_seq.shape[0]):
        if neuron.decay_input:
            u = neuron.decay * v + (1.0 - neuron.decay) * x_seq[t]
        else:
            u = neuron.decay * v + x_seq[t]
        s = SurrogateSpike.apply(u - neuron.threshold, neuron.surrogate, neuron.alpha)
        r = s.detach() if neuron.detach_reset else s
        if neuron.v_reset is None:
            v = u - neuron.threshold * r
        else:
            v = u * (1.0 - r) + neuron.v_reset * r
        spikes.append(s)
    return torch.stack(spikes)


def _epilogue(y, scale, shift, residual, batch_norm, running_mean, running_var, momentum, eps):
    """``y`` ``[T, N, C, ...]`` -> current: BatchNorm over (T, N, ...) or scale/shift per channel, plus residual."""
    C = y.shape[2]
    if batch_norm:
        flat = y.flatten(0, 1)
        out = F.batch_norm(flat, running_mean, running_var, weight=scale, bias=shift, training=True,
                           momentum=momentum, eps=eps).view_as(y)
    else:
        per_channel = (C,) + (1,) * (y.dim() - 3)
        out = y
        if scale is not None:
            out = out * scale.view(per_channel)
        if shift is not None:
            out = out + shift.view(per_channel)
    if residual is not None:
        out = out + residual
    return out


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, subnet=None, grad_precision="split"):
    """conv2d(X[t], α·M·sign(w)) per step, epilogue, LIF. Returns spikes ``[T, N, C_out, H', W']`` in x.dtype.

    ``subnet`` and ``grad_precision`` are accepted and ignored: the oracle always recomputes in full precision."""
    w_eff = subnet_weight(weight, scores, prune_rate).to(x.dtype)
    if timesteps is not None:
        current = F.conv2d(x, w_eff, stride=stride, padding=padding)
        y = torch.stack([current] * timesteps)
    else:
        y = torch.stack([F.conv2d(x[t], w_eff, stride=stride, padding=padding) for t in range(x.shape[0])])
    current = _epilogue(y, scale, shift, residual, batch_norm, running_mean, running_var, momentum, eps)
    return lif(current, neuron)


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, subnet=None, grad_precision="split"):
    """linear(X[t], α·M·sign(w)) per step, epilogue, LIF. Returns spikes ``[T, N, out]`` in x.dtype.

    ``subnet`` and ``grad_precision`` are accepted and ignored (see `binw_conv2d_lif`)."""
    w_eff = subnet_weight(weight, scores, prune_rate).to(x.dtype)
    if timesteps is not None:
        y = torch.stack([F.linear(x, w_eff)] * timesteps)
    else:
        y = torch.stack([F.linear(x[t], w_eff) for t in range(x.shape[0])])
    current = _epilogue(y, scale, shift, residual, batch_norm, running_mean, running_var, momentum, eps)
    return lif(current, neuron)
