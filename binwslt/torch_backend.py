"""The ``torch`` backend: the fast path where there is no GPU.

One convolution (or matmul) over all T·N frames, computed once for a direct-encoded input; the subnet weight
built once per call; the LIF scan as `torch.library` ops with a hand-written BPTT backward. What a fused layer
saves for backward is compact: input spikes as packed bits, and the pre-activation as the exact integer
``y = conv(X, M·sign(w))`` in int16 (a spike times a ternary weight is an integer, so ``y`` loses nothing);
the current, membrane and spikes are recomputed from them in the backward. Analog inputs (a direct-encoded
image, pooled features) are saved as they are, and their ``y`` in float.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from ._affine import batch_stats, channel_view, update_running_stats
from .bits import pack_bits, unpack_bits
from .config import LIFConfig
from .subnet import straight_through_grads, ternary_subnet
from .surrogate import surrogate_grad


# ---------------------------------------------------------------------------------------------------- LIF scan
def _scan(current, decay, threshold, v_reset, decay_input, keep_membrane):
    """Forward LIF scan over dim 0; returns spikes (and the pre-reset membranes U[t] if asked)."""
    v = torch.zeros_like(current[0])
    spikes = torch.empty_like(current)
    membranes = []
    for t in range(current.shape[0]):
        if decay_input:
            u = decay * v + (1.0 - decay) * current[t]
        else:
            u = decay * v + current[t]
        s = (u >= threshold).to(current.dtype)
        spikes[t] = s
        if keep_membrane:
            membranes.append(u)
        v = u - threshold * s if v_reset is None else u * (1.0 - s) + v_reset * s
    return spikes, membranes


@torch.library.custom_op("binwslt::lif_forward", mutates_args=())
def lif_forward(current: torch.Tensor, decay: float, threshold: float, v_reset: Optional[float],
                decay_input: bool, surrogate: str, alpha: float, detach_reset: bool) -> torch.Tensor:
    """LIF spikes ``[T, ...]`` (dtype of ``current``) for input currents ``current`` ``[T, ...]``."""
    return _scan(current, decay, threshold, v_reset, decay_input, keep_membrane=False)[0]


@lif_forward.register_fake
def _(current, decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset):
    return torch.empty_like(current)


@torch.library.custom_op("binwslt::lif_backward", mutates_args=())
def lif_backward(current: torch.Tensor, grad_spikes: torch.Tensor, decay: float, threshold: float,
                 v_reset: Optional[float], decay_input: bool, surrogate: str, alpha: float,
                 detach_reset: bool) -> torch.Tensor:
    """BPTT through the LIF: dL/dI ``[T, ...]`` from the currents and dL/dS, recomputing the membrane."""
    spikes, membranes = _scan(current, decay, threshold, v_reset, decay_input, keep_membrane=True)
    grad_current = torch.empty_like(current)
    grad_v = torch.zeros_like(current[0])  # dL/dV[t], carried backwards in time
    gain = 1.0 - decay if decay_input else 1.0
    for t in range(current.shape[0] - 1, -1, -1):
        u, s = membranes[t], spikes[t]
        grad_s = grad_spikes[t]
        if v_reset is None:
            grad_u = grad_v
            if not detach_reset:
                grad_s = grad_s - threshold * grad_v
        else:
            grad_u = grad_v * (1.0 - s)
            if not detach_reset:
                grad_s = grad_s + grad_v * (v_reset - u)
        grad_u = grad_u + grad_s * surrogate_grad(u - threshold, surrogate, alpha)
        grad_current[t] = gain * grad_u
        grad_v = decay * grad_u
    return grad_current


@lif_backward.register_fake
def _(current, grad_spikes, decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset):
    return torch.empty_like(current)


def _lif_spikes(current, neuron):
    return torch.ops.binwslt.lif_forward(current, *_neuron_args(neuron))


def _lif_grad(current, grad_spikes, neuron):
    return torch.ops.binwslt.lif_backward(current, grad_spikes.contiguous(), *_neuron_args(neuron))


def _neuron_args(neuron: LIFConfig):
    return (neuron.decay, neuron.threshold, neuron.v_reset, neuron.decay_input, neuron.surrogate, neuron.alpha,
            neuron.detach_reset)


def _lif_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.neuron_args = inputs[1:]


def _lif_autograd_backward(ctx, grad_spikes):
    (current,) = ctx.saved_tensors
    grad = torch.ops.binwslt.lif_backward(current, grad_spikes.contiguous(), *ctx.neuron_args)
    return (grad,) + (None,) * 7


lif_forward.register_autograd(_lif_autograd_backward, setup_context=_lif_setup_context)


def lif(x_seq: torch.Tensor, neuron: LIFConfig) -> torch.Tensor:
    """LIF over input currents ``x_seq`` ``[T, ...]`` (float); spikes of the same shape and dtype."""
    return torch.ops.binwslt.lif_forward(x_seq.contiguous(), *_neuron_args(neuron))


# ------------------------------------------------------------------------------------------ fused layers
class _ConvMap:
    """conv2d and its two gradients, for frames ``[F, C_in, H, W]``."""

    def __init__(self, stride, padding):
        self.stride, self.padding = stride, padding

    def __call__(self, frames, w):
        return F.conv2d(frames, w, stride=self.stride, padding=self.padding)

    def grad_input(self, input_shape, w, grad):
        return conv2d_input(input_shape, w, grad, stride=self.stride, padding=self.padding)

    def grad_weight(self, frames, weight_shape, grad):
        return conv2d_weight(frames, weight_shape, grad, stride=self.stride, padding=self.padding)


class _LinearMap:
    """linear and its two gradients, for frames ``[F, in]``."""

    def __call__(self, frames, w):
        return F.linear(frames, w)

    def grad_input(self, input_shape, w, grad):
        return grad @ w

    def grad_weight(self, frames, weight_shape, grad):
        return grad.t() @ frames


def _is_spike_tensor(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def _current(y, alpha, scale, shift, bn):
    """Per-frame current ``[F, C, ...]`` = epilogue(α·y); ``bn`` is ``(mean, rstd)`` or None."""
    cur = y * alpha
    if bn is not None:
        mean, rstd = bn
        a = rstd if scale is None else rstd * scale
        b = -mean * a if shift is None else shift - mean * a
        return cur * channel_view(a, cur, 1) + channel_view(b, cur, 1)
    if scale is not None:
        cur = cur * channel_view(scale, cur, 1)
    if shift is not None:
        cur = cur + channel_view(shift, cur, 1)
    return cur


def _sequence(cur, T, direct, residual):
    """Frames ``[F, C, ...]`` -> contiguous ``[T, N, C, ...]`` (repeated over T when direct), plus residual."""
    seq = cur.unsqueeze(0).expand((T,) + tuple(cur.shape)) if direct else cur.view((T, -1) + tuple(cur.shape[1:]))
    return (seq if residual is None else seq + residual).contiguous()


class _BinWLIF(torch.autograd.Function):
    """Fused binary-subnet conv/linear + epilogue + LIF; see the module docstring for what it saves."""

    @staticmethod
    def forward(ctx, x, weight, scores, scale, shift, residual, running_mean, running_var,
                linear_map, prune_rate, neuron, timesteps, batch_norm, momentum, eps):
        tern, alpha = ternary_subnet(weight, scores, prune_rate)
        alpha = alpha.to(x.dtype)
        T = timesteps if timesteps is not None else x.shape[0]
        frames = x if timesteps is not None else x.flatten(0, 1)
        y = linear_map(frames, tern.to(x.dtype))  # exact integers when frames are spikes
        bn = None
        if batch_norm:
            mean, var = batch_stats(y * alpha, channel_dim=1)
            count = (T if timesteps is not None else 1) * (y.numel() // y.shape[1])
            update_running_stats(running_mean, running_var, mean, var, count, momentum)
            bn = (mean, torch.rsqrt(var + eps))
        current = _sequence(_current(y, alpha, scale, shift, bn), T, timesteps is not None, residual)
        spikes = _lif_spikes(current, neuron)

        spiking_input = timesteps is None and _is_spike_tensor(frames)
        if spiking_input:
            saved_x = pack_bits(frames != 0)
            y_saved = y.to(torch.int16 if weight[0].numel() <= 32767 else torch.int32)
        else:
            saved_x, y_saved = frames, y
        bn_saved = bn if bn is not None else (None, None)
        ctx.save_for_backward(saved_x, y_saved, tern, alpha, weight, scores, scale, shift, residual, *bn_saved)
        ctx.spiking_input = spiking_input
        ctx.frames_shape = tuple(frames.shape)
        ctx.dtype = x.dtype
        ctx.linear_map, ctx.neuron, ctx.timesteps = linear_map, neuron, timesteps
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        saved_x, y, tern, alpha, weight, scores, scale, shift, residual, mean, rstd = ctx.saved_tensors
        timesteps, dtype = ctx.timesteps, ctx.dtype
        y = y.to(dtype)
        bn = None if mean is None else (mean, rstd)
        T = grad_spikes.shape[0]
        current = _sequence(_current(y, alpha, scale, shift, bn), T, timesteps is not None, residual)
        grad_current = _lif_grad(current, grad_spikes, ctx.neuron)
        grad_residual = grad_current if ctx.needs_input_grad[5] else None
        g = grad_current.sum(0) if timesteps is not None else grad_current.flatten(0, 1)  # [F, C, ...]
        dims = [d for d in range(g.dim()) if d != 1]
        grad_scale = grad_shift = None
        if bn is not None:
            xhat = (y * alpha - channel_view(mean, g, 1)) * channel_view(rstd, g, 1)
            if ctx.needs_input_grad[3]:
                grad_scale = (g * xhat).sum(dims)
            if ctx.needs_input_grad[4]:
                grad_shift = g.sum(dims)
            gx = g if scale is None else g * channel_view(scale, g, 1)
            grad_cur = channel_view(rstd, g, 1) * (
                gx - channel_view(gx.mean(dims), g, 1) - xhat * channel_view((gx * xhat).mean(dims), g, 1))
        else:
            if ctx.needs_input_grad[3]:
                grad_scale = (g * y * alpha).sum(dims)
            if ctx.needs_input_grad[4]:
                grad_shift = g.sum(dims)
            grad_cur = g if scale is None else g * channel_view(scale, g, 1)

        if ctx.spiking_input:
            frames = unpack_bits(saved_x, ctx.frames_shape).to(dtype)
        else:
            frames = saved_x
        grad_x = None
        if ctx.needs_input_grad[0]:
            w_eff = alpha * tern.to(dtype)
            grad_x = ctx.linear_map.grad_input(ctx.frames_shape, w_eff, grad_cur)
            if timesteps is None:
                grad_x = grad_x.view((T, -1) + tuple(grad_x.shape[1:]))
        grad_weight = grad_scores = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weff = ctx.linear_map.grad_weight(frames, tern.shape, grad_cur)
            grad_weight, grad_scores = straight_through_grads(
                grad_weff.to(weight.dtype), weight, scores, tern, alpha, ctx.needs_input_grad[1:3])
        return (grad_x, grad_weight, grad_scores, grad_scale, grad_shift, grad_residual,
                None, None, None, None, None, None, None, None, None)


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps):
    """Fused binary conv + LIF, see `binwslt.functional.binw_conv2d_lif`. Spikes ``[T, N, C_out, H', W']``."""
    return _BinWLIF.apply(x, weight, scores, scale, shift, residual, running_mean, running_var,
                          _ConvMap(stride, padding), prune_rate, neuron, timesteps, batch_norm, momentum, eps)


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps):
    """Fused binary linear + LIF, see `binwslt.functional.binw_linear_lif`. Spikes ``[T, N, out]``."""
    return _BinWLIF.apply(x, weight, scores, scale, shift, residual, running_mean, running_var,
                          _LinearMap(), prune_rate, neuron, timesteps, batch_norm, momentum, eps)
