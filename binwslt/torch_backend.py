"""The ``torch`` backend: the fast path where there is no GPU.

One convolution (or matmul) over all T·N frames, computed once for a direct-encoded input; the subnet from a
`Subnet` the nn modules cache (`make_subnet`), else built once per call. Over spikes (spike-ness by dtype or
mark, `binwslt.spikes`, never by reading values) the forward GEMM runs where exact and fastest on this CPU
(`binwslt.cpu`): an int8 oneDNN convolution/linear with an fp32 output where the CPU has VNNI/AMX int8 dot
products (channels-last), fp32 elsewhere (``BINWSLT_CPU_MATMUL=fp32`` forces it); it reads the uint8 copy of its
input spikes that the previous layer's epilogue wrote in the same pass (`binwslt.spikes.attach_uint8`), so no
cast pass. The direct-encoded first layer and analog inputs stay fp32, so their spikes equal the reference's; the
first layer's y is made channels-last (it is 1/T of the spikes), so every layer's spikes are. BatchNorm
statistics come from exact float64 channel sums (binwslt.batchnorm holds the formulas). On CPU the rest of the
epilogue is one compiled pass per neuron, vectorised over blocks of 64 neurons on contiguous or channels-last
frames (binwslt/csrc/lif_scan.cpp, built once per source/torch/Python): the current ``a·y + b (+ residual)``, the
LIF scan, the spikes (and their uint8 copy in int8 mode) and the int16 copy of y in the forward; in the backward
the current, the BPTT, dL/dresidual and the per-channel Σg, Σg·y, then the BatchNorm fold ``c1·g + c2·y + c3``.
The subnet (selection, ternary, α) and the score gradient are one compiled pass each, and the bit packing too.
Eager PyTorch ops (the LIF scan a `torch.library` op with a hand-written BPTT) where the extension cannot be built
(``BINWSLT_NO_CPP_EXT=1``, no compiler) or for other devices, dtypes and layouts.

Backward GEMMs with ``grad_precision="split"``: a stride-1 convolution over spikes runs both of them in one AMX
pass where the CPU has AMX-BF16 (`binwslt.amx`: g in three bf16 terms, fp32 output, the BatchNorm fold applied as
g is staged, the saved spike bits read as they are); everything else runs fp32 channels-last (PyTorch's CPU bf16
convolutions round their output to bf16, so a split through them would lose its low terms, and the exact int8
split of g measured slower than fp32: benchmarks/cpu_gemm.py). ``"bf16"`` runs grad-input as one bf16 term and
keeps grad-weight in fp32 (the bf16 weight-gradient convolution measured slower). What a fused layer saves for
backward is compact: input spikes as packed bits (in memory order), the pre-activation as the exact integer
``y = conv(X, M·sign(w))`` in int16, the mask as bits (or the cached subnet itself); nothing at all under
``no_grad``. Analog inputs (a direct-encoded image, pooled features) are saved as they are, and their ``y`` in
float.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight

from ._affine import channel_view
from . import _cpu_ext, amx, batchnorm, cpu
from ._cpu_ext import SURROGATE_CODES
from .bits import pack_bits, unpack_bits
from .config import LIFConfig
from .spikes import attach_uint8, is_spikes, mark_spikes, uint8_spikes
from .subnet import Subnet, derived, n_pruned, straight_through_grads, ternary_subnet
from .surrogate import surrogate_grad_


# ---------------------------------------------------------------------------------------------------- LIF scan
def _scan(current, decay, threshold, v_reset, decay_input, keep_membrane):
    """Forward LIF scan over dim 0. Returns spikes ``[T, ...]`` and, if asked, the pre-reset membranes U and the
    spikes as bool (both ``[T, ...]``, for the backward); otherwise ``None, None``.

    In place on two step buffers: every op rounds exactly as the reference's ``decay*v + I`` and
    ``u*(1-s) + v_reset*s`` do (the reset products are exact), so the spikes are bit-identical to it.
    ``current`` may be a stride-0 expansion over T (direct encoding): it is only read step by step.
    """
    drive = (1.0 - decay) * current if decay_input else current
    T = current.shape[0]
    spikes = torch.empty(current.shape, dtype=current.dtype, device=current.device)
    membranes = torch.empty_like(spikes) if keep_membrane else None
    fired_all = torch.empty(current.shape, dtype=torch.bool, device=current.device) if keep_membrane else None
    v = torch.zeros_like(spikes[0])
    u = torch.empty_like(v)
    fired = torch.empty(v.shape, dtype=torch.bool, device=v.device)
    for t in range(T):
        torch.mul(v, decay, out=u)
        u.add_(drive[t])
        if keep_membrane:
            membranes[t].copy_(u)
            fired = fired_all[t]
        torch.ge(u, threshold, out=fired)
        spikes[t].copy_(fired)
        if v_reset is None:
            u.sub_(spikes[t], alpha=threshold)
        else:
            u.masked_fill_(fired, v_reset)
        u, v = v, u
    return spikes, membranes, fired_all


def _dense_step_strides(step: torch.Tensor):
    """The strides of ``step`` when its elements fill one dense block in some dimension order (contiguous,
    channels-last, ...), else None."""
    dims = sorted((d for d in range(step.dim()) if step.shape[d] != 1), key=lambda d: step.stride(d))
    expected = 1
    for d in dims:
        if step.stride(d) != expected:
            return None
        expected *= step.shape[d]
    return step.stride()


def _steps(current):
    """``current`` ``[T, ...]`` as a ``[T, M]`` view with unit inner stride over its dense steps (any memory
    format; step stride 0 for a direct-encoded input), with the strides the spikes take; or None."""
    if current.dim() < 2:
        return None
    strides = _dense_step_strides(current[0])
    if strides is None:
        return None
    M = current[0].numel()
    return torch.as_strided(current, (current.shape[0], M), (current.stride(0), 1)), (M,) + tuple(strides)


def _ext_for(t: torch.Tensor, dtypes=(torch.float32, torch.float64)):
    """The compiled CPU extension for a CPU tensor ``t`` of one of ``dtypes``, else None (eager ops)."""
    if t.device.type != "cpu" or t.dtype not in dtypes:
        return None
    return _cpu_ext.load()


def _fused_scan_ext(current):
    """The compiled CPU scan for float32/float64 CPU tensors whose steps are dense (any memory format), else
    None (eager scan)."""
    return None if _steps(current) is None else _ext_for(current)


def _spike_strides(current):
    """Strides of the spikes (and dL/dI) for ``current``: its steps' layout where they are dense, else contiguous."""
    steps = _steps(current)
    return steps[1] if steps is not None else torch.empty(current.shape, device="meta").stride()


@torch.library.custom_op("binwslt::lif_forward", mutates_args=())
def lif_forward(current: torch.Tensor, decay: float, threshold: float, v_reset: Optional[float],
                decay_input: bool, surrogate: str, alpha: float, detach_reset: bool) -> torch.Tensor:
    """LIF spikes ``[T, ...]`` (dtype of ``current``, its steps' memory format) for currents ``current``."""
    ext = _fused_scan_ext(current)
    if ext is not None:
        flat, strides = _steps(current)
        out = ext.lif_forward(flat, decay, threshold, v_reset, decay_input)
        return torch.as_strided(out, current.shape, strides)
    return _scan(current, decay, threshold, v_reset, decay_input, keep_membrane=False)[0]


@lif_forward.register_fake
def _(current, decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset):
    return torch.empty_strided(current.shape, _spike_strides(current), dtype=current.dtype, device=current.device)


@torch.library.custom_op("binwslt::lif_backward", mutates_args=())
def lif_backward(current: torch.Tensor, grad_spikes: torch.Tensor, decay: float, threshold: float,
                 v_reset: Optional[float], decay_input: bool, surrogate: str, alpha: float,
                 detach_reset: bool) -> torch.Tensor:
    """BPTT through the LIF: dL/dI ``[T, ...]`` from the currents and dL/dS, recomputing the membrane."""
    ext = _fused_scan_ext(current)
    if ext is not None:
        flat, strides = _steps(current)
        if grad_spikes.stride() != strides:
            grad_spikes = torch.empty_strided(current.shape, strides, dtype=grad_spikes.dtype).copy_(grad_spikes)
        g_flat = torch.as_strided(grad_spikes, flat.shape, (flat.shape[1], 1))
        grad = ext.lif_backward(flat, g_flat, decay, threshold, v_reset, decay_input, SURROGATE_CODES[surrogate],
                                alpha, detach_reset)
        return torch.as_strided(grad, current.shape, strides)
    _, membranes, fired = _scan(current, decay, threshold, v_reset, decay_input, keep_membrane=True)
    # dL/dV at the reset, then dS/dU for every step at once (in place over the membranes)
    reset_slope = None if v_reset is None or detach_reset else torch.neg(membranes).add_(v_reset)
    surrogate_slope = surrogate_grad_(membranes.sub_(threshold), surrogate, alpha)
    grad_current = torch.empty(current.shape, dtype=current.dtype, device=current.device)
    grad_v = torch.zeros_like(grad_current[0])  # dL/dV[t], carried backwards in time
    grad_s = torch.empty_like(grad_v)
    grad_spikes = grad_spikes.contiguous()
    for t in range(current.shape[0] - 1, -1, -1):
        grad_s.copy_(grad_spikes[t])
        if v_reset is None:  # V = U - θS
            if not detach_reset:
                grad_s.sub_(grad_v, alpha=threshold)
        else:  # V = U(1 - S) + v_r S
            if not detach_reset:
                grad_s.addcmul_(grad_v, reset_slope[t])
            grad_v.masked_fill_(fired[t], 0.0)
        grad_u = grad_v.addcmul_(grad_s, surrogate_slope[t])
        if decay_input:
            torch.mul(grad_u, 1.0 - decay, out=grad_current[t])
        else:
            grad_current[t].copy_(grad_u)
        grad_v = grad_u.mul_(decay)
    return grad_current


@lif_backward.register_fake
def _(current, grad_spikes, decay, threshold, v_reset, decay_input, surrogate, alpha, detach_reset):
    return torch.empty_strided(current.shape, _spike_strides(current), dtype=current.dtype, device=current.device)


def _lif_spikes(current, neuron):
    return torch.ops.binwslt.lif_forward(current, *_neuron_args(neuron))


def _lif_grad(current, grad_spikes, neuron):
    return torch.ops.binwslt.lif_backward(current, grad_spikes, *_neuron_args(neuron))


def _neuron_args(neuron: LIFConfig):
    return (neuron.decay, neuron.threshold, neuron.v_reset, neuron.decay_input, neuron.surrogate, neuron.alpha,
            neuron.detach_reset)


def _lif_setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.neuron_args = inputs[1:]


def _lif_autograd_backward(ctx, grad_spikes):
    (current,) = ctx.saved_tensors
    grad = torch.ops.binwslt.lif_backward(current, grad_spikes, *ctx.neuron_args)
    return (grad,) + (None,) * 7


lif_forward.register_autograd(_lif_autograd_backward, setup_context=_lif_setup_context)


def lif(x_seq: torch.Tensor, neuron: LIFConfig) -> torch.Tensor:
    """LIF over input currents ``x_seq`` ``[T, ...]`` (float); spikes of the same shape and dtype."""
    return torch.ops.binwslt.lif_forward(x_seq.contiguous(), *_neuron_args(neuron))


# ------------------------------------------------------------------------------------------ fused layers
def make_subnet(weight: torch.Tensor, scores: torch.Tensor, prune_rate: float) -> Subnet:
    """The layer's `Subnet` for this backend: ``ternary`` int8 with the shape of ``weight`` (M⊙sign(w)),
    ``alpha`` 0-dim float32 on the weight's device. The fused ops reuse it (and the int8 weights prepacked from
    it, kept in ``Subnet.derived``) instead of recomputing. float32 CPU weights and scores take one compiled
    pass after the selection (`binwslt.subnet.ternary_subnet`'s values)."""
    k = n_pruned(scores.numel(), prune_rate)
    ext = _ext_for(weight, (torch.float32,)) if scores.dtype == torch.float32 and scores.device == weight.device \
        and weight.shape == scores.shape else None
    if ext is not None:
        compiled = ext.ternary_subnet(weight.detach().contiguous(), scores.detach().contiguous(), k)
        if compiled:  # else a NaN score: the eager selection decides
            return Subnet(compiled[0], compiled[1])
    tern, alpha = ternary_subnet(weight, scores, prune_rate)
    return Subnet(tern, alpha)


def _straight_through(grad_weff, weight, scores, tern, alpha, needs):
    """`binwslt.subnet.straight_through_grads`, the score gradient in one compiled pass for float32 CPU tensors."""
    ext = _ext_for(grad_weff, (torch.float32,)) if needs[1] and weight.dtype == scores.dtype == torch.float32 \
        else None
    if ext is None:
        return straight_through_grads(grad_weff, weight, scores, tern, alpha, needs)
    grad_w = straight_through_grads(grad_weff, weight, scores, tern, alpha, (True, False))[0] if needs[0] else None
    grad_s = ext.score_grad(grad_weff.contiguous(), weight.detach().contiguous(), scores.detach().contiguous())
    return grad_w, grad_s.view(scores.shape)


_ONEDNN_KW = dict(output_scale=1.0, output_zero_point=0, output_dtype=torch.float32)


def _int8_forward(frames: torch.Tensor) -> bool:
    """True when a forward GEMM over float spikes like ``frames`` runs as an exact int8 oneDNN op here (CPU
    float32, `binwslt.cpu`): this layer's over its input, the next layer's over this one's output spikes."""
    return frames.device.type == "cpu" and frames.dtype == torch.float32 and cpu.matmul_mode() == "int8"


class _ConvMap:
    """conv2d and its two gradients, for frames ``[F, C_in, H, W]``."""

    def __init__(self, stride, padding):
        self.stride, self.padding = list(stride), list(padding)

    def __call__(self, frames, w):
        return F.conv2d(frames, w, stride=self.stride, padding=self.padding)

    def spikes_int8(self, frames, subnet, frames_u8=None):
        """conv(frames, ternary) as an int8 oneDNN convolution with an fp32 output (exact; channels-last);
        ``frames_u8``: the same spikes as uint8 where the previous layer wrote them (no cast), else None."""
        tern = subnet.ternary
        packed = derived(subnet, ("conv", tuple(self.stride), tuple(self.padding)),
                         lambda: torch.ops.onednn.qconv_prepack(tern, torch.ones(tern.shape[0]), 1.0, 0, self.stride,
                                                                self.padding, [1, 1], 1, None))
        ones, zeros = torch.ones(tern.shape[0]), torch.zeros(tern.shape[0], dtype=torch.int64)
        x8 = (frames if frames_u8 is None else frames_u8).to(torch.uint8, memory_format=torch.channels_last)
        return torch.ops.onednn.qconv2d_pointwise(x8, 1.0, 0, packed, ones, zeros, None, self.stride,
                                                  self.padding, [1, 1], 1, 1.0, 0, torch.float32, "none", [], "")

    def amx_ready(self, weight_shape) -> bool:
        """Whether this conv's backward GEMMs run on AMX here (`binwslt.amx`)."""
        return amx.eligible(weight_shape, self.stride, self.padding) and amx.available()

    def grads_amx(self, input_shape, bits, channels_last, tern, subnet, alpha, grad, fold, want_input, want_weight,
                  grad_dead):
        """(α·dL/dx or None, dL/dW_eff or None) on AMX (`binwslt.amx.conv_grads`) from the saved input bits; the
        packed weight is kept in ``subnet.derived`` (a cached `Subnet`, else None) for the next backward. With
        ``grad_dead`` (nothing reads ``grad`` afterwards), dL/dx takes its memory where it has dL/dx's shape and
        layout (no fresh pages)."""
        packed = derived(subnet, "amx", lambda: amx.pack_weight(tern)) if want_input else None
        overwrite = grad_dead and want_input and tuple(grad.shape) == tuple(input_shape) and \
            grad.is_contiguous(memory_format=torch.channels_last)
        return amx.conv_grads(grad, input_shape, tern.shape[2], self.padding[0], packed=packed,
                              overwrite_grad=overwrite,
                              bits=bits if want_weight else None, channels_last=channels_last, scale=float(alpha),
                              fold=fold)

    def grad_input(self, input_shape, w, grad):
        if grad.is_contiguous(memory_format=torch.channels_last):
            w = w.contiguous(memory_format=torch.channels_last)
        return conv2d_input(input_shape, w, grad, stride=self.stride, padding=self.padding)

    def grad_weight(self, frames, weight_shape, grad):
        if grad.is_contiguous(memory_format=torch.channels_last):
            frames = frames.contiguous(memory_format=torch.channels_last)
        return conv2d_weight(frames, weight_shape, grad, stride=self.stride, padding=self.padding)


class _LinearMap:
    """linear and its two gradients, for frames ``[F, in]``."""

    def __call__(self, frames, w):
        return F.linear(frames, w)

    def spikes_int8(self, frames, subnet, frames_u8=None):
        """frames @ ternaryᵀ as an int8 oneDNN linear with an fp32 output (exact); ``frames_u8`` as for conv."""
        tern = subnet.ternary
        packed = derived(subnet, "linear", lambda: torch.ops.onednn.qlinear_prepack(tern, None))
        ones, zeros = torch.ones(tern.shape[0]), torch.zeros(tern.shape[0], dtype=torch.int64)
        x8 = (frames if frames_u8 is None else frames_u8).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(x8, 1.0, 0, packed, ones,
                                                  zeros, None, 1.0, 0, torch.float32, "none", [], "")

    def amx_ready(self, weight_shape) -> bool:
        return False

    def grad_input(self, input_shape, w, grad):
        return grad @ w

    def grad_weight(self, frames, weight_shape, grad):
        return grad.t() @ frames


def _per_channel(alpha, scale, shift, stats):
    """The current's ``I = a·y + b`` per channel: α folded into binwslt.batchnorm's gain of α·y."""
    gain, bias = batchnorm.current_affine(scale, shift, stats)
    return (alpha if gain is None else alpha * gain), bias


def _batch_moments(y, alpha):
    """Mean and biased variance of α·y per channel (``y`` ``[F, C, ...]``): from exact float64 sums in the
    compiled pass where it runs (fp32 CPU ``y``, contiguous or channels-last), else from the values."""
    ext = _ext_for(y) if y.dtype == torch.float32 else None
    C = y.shape[1]
    if ext is not None and (y.is_contiguous() or _is_channels_last(y)):
        if y.is_contiguous():
            inner = y[0, 0].numel()
            sums = ext.channel_moments(y, C, inner)
        else:
            sums = ext.channel_moments(_physical(y), C, 1)
        return batchnorm.stats_from_sums(sums[0], sums[1], y.numel() // C, alpha)
    return batchnorm.stats_from_values(y, alpha, 1)


def _current_sequence(y, a, b, residual, T, direct):
    """I = a·y + b (+ residual) as ``[T, N, C, ...]``: a stride-0 expansion over T for direct encoding."""
    a = channel_view(a.expand(y.shape[1]), y, 1)
    cur = y * a if b is None else torch.addcmul(channel_view(b, y, 1), y, a)
    seq = cur.expand((T,) + tuple(cur.shape)) if direct else cur.view((T, -1) + tuple(cur.shape[1:]))
    return seq if residual is None else seq + residual


def _frame_layout(y):
    """``(C, inner)`` of frames ``y`` ``[F, C, ...]`` in memory order, where the channel of flat (storage-order)
    index q is ``(q // inner) % C``: ``inner`` = H·W for contiguous frames, 1 for channels-last or linear ones;
    None for any other layout."""
    if y.dim() < 2:
        return None
    if y.is_contiguous():
        return y.shape[1], y[0, 0].numel()
    return (y.shape[1], 1) if _is_channels_last(y) else None


def _flat(t):
    """A dense tensor (contiguous or channels-last) as a 1-D view in its memory order."""
    return torch.as_strided(t, (t.numel(),), (1,))


def _sequence_geometry(y, T, direct):
    """Shape and strides of the ``[T, N, C, ...]`` current/spikes whose frames are laid out as ``y``'s."""
    N = y.shape[0] if direct else y.shape[0] // T
    s = y.stride()
    return (T, N) + tuple(y.shape[1:]), (N * s[0], s[0]) + tuple(s[1:])


def _flat_as(t, shape, strides, dtype):
    """``t`` (``shape``) flat in the memory order that ``strides`` gives (copied when it is laid out otherwise)."""
    if t.stride() != strides or t.dtype != dtype:
        t = torch.empty_strided(shape, strides, dtype=dtype, device=t.device).copy_(t)
    return _flat(t)


def _vector(v, C, dtype):
    """A per-channel ``[C]`` contiguous vector of ``dtype`` (a 0-dim value expanded), or None."""
    return None if v is None else v.to(dtype).expand(C).contiguous()


def _fused_epilogue_ext(y, residual, dtype):
    """The extension when the fused epilogue can run in float32/float64 ``dtype`` on CPU frames ``y`` (of
    ``dtype``, or the int16/int32 saved copy) laid out contiguous or channels-last, with a residual of
    ``dtype``; else None."""
    if dtype not in (torch.float32, torch.float64) or _frame_layout(y) is None \
            or (residual is not None and residual.dtype != dtype):
        return None
    return _ext_for(y, (dtype, torch.int16, torch.int32))


def _fused_forward(ext, y, a, b, residual, T, direct, neuron, y_save_dtype, want_u8, over_y=False):
    """Spikes ``[T, N, C, ...]`` (y's frame layout) of the current ``a·y + b (+ residual)`` in one compiled pass,
    y as ``y_save_dtype`` (int16/int32, y's layout) when asked, and the spikes as uint8 (their shape and strides)
    when ``want_u8`` (None otherwise for both). ``over_y``: the spikes overwrite y (not direct; y is not needed
    after: no fresh pages for them, which cost more than the pass on a VM)."""
    C, inner = _frame_layout(y)
    shape, strides = _sequence_geometry(y, T, direct)
    res = None if residual is None else _flat_as(residual, shape, strides, y.dtype)
    y_save = None if y_save_dtype is None else torch.empty_like(y, dtype=y_save_dtype)
    u8 = torch.empty(torch.Size(shape).numel(), dtype=torch.uint8) if want_u8 else None
    out = ext.epilogue_forward(_flat(y), _vector(a, C, y.dtype), _vector(b, C, y.dtype), res, T, direct, C, inner,
                               neuron.decay, neuron.threshold, neuron.v_reset, neuron.decay_input,
                               None if y_save is None else _flat(y_save), u8, _flat(y) if over_y else None)
    u8 = None if u8 is None else torch.as_strided(u8, shape, strides)
    return torch.as_strided(out, shape, strides), y_save, u8


def _fused_backward(ext, y, a, b, residual, grad_spikes, T, direct, neuron, dtype, want_grad_residual):
    """The compiled BPTT through the epilogue: ``(G, sum_g, sum_gy, grad_residual)`` with G = dL/dI as frames
    laid out as ``y`` (summed over T for direct encoding), the per-channel sums Σ G and Σ G·y in ``dtype``, and
    dL/dresidual (``[T, N, C, ...]``) or None."""
    C, inner = _frame_layout(y)
    shape, strides = _sequence_geometry(y, T, direct)
    res = None if residual is None else _flat_as(residual, shape, strides, dtype)
    out = ext.epilogue_backward(_flat(y), _vector(a, C, dtype), _vector(b, C, dtype), res,
                                _flat_as(grad_spikes, shape, strides, dtype), T, direct, C, inner, neuron.decay,
                                neuron.threshold, neuron.v_reset, neuron.decay_input,
                                SURROGATE_CODES[neuron.surrogate], neuron.alpha, neuron.detach_reset,
                                want_grad_residual)
    G = torch.as_strided(out[0], y.shape, y.stride())
    grad_residual = torch.as_strided(out[2], shape, strides) if want_grad_residual else None
    return G, out[1][0].to(dtype), out[1][1].to(dtype), grad_residual


def _fold_gradient(ext, G, y, coeff, scale):
    """dL/d(α·y) from G = dL/dI (frames): c1·G + c2·y + c3 with BatchNorm (binwslt.batchnorm's coefficients),
    scale·G without; in place over G where the extension runs."""
    if coeff.c1 is None and scale is None:
        return G
    C, dtype = G.shape[1], G.dtype
    if ext is not None:
        C, inner = _frame_layout(G)
        if coeff.c1 is None:
            ext.epilogue_fold(_flat(G), _flat(y), _vector(scale, C, dtype), None, None, C, inner)
        else:
            ext.epilogue_fold(_flat(G), _flat(y), _vector(coeff.c1, C, dtype), _vector(coeff.c2, C, dtype),
                              _vector(coeff.c3, C, dtype), C, inner)
        return G
    y = y.to(dtype)
    if coeff.c1 is not None:
        grad_cur = torch.addcmul(channel_view(coeff.c3, G, 1), G, channel_view(coeff.c1, G, 1))
        return grad_cur.addcmul_(y, channel_view(coeff.c2, G, 1))
    return G * channel_view(scale, G, 1)


def _amx_fold(G, y, coeff, scale) -> Optional[amx.Fold]:
    """`_fold_gradient`'s fold as the AMX kernels apply it while they stage G (None: nothing to fold)."""
    C, dtype = G.shape[1], G.dtype
    if coeff.c1 is not None:
        return amx.Fold(y, _vector(coeff.c1, C, dtype), _vector(coeff.c2, C, dtype), _vector(coeff.c3, C, dtype))
    return None if scale is None else amx.Fold(c1=_vector(scale, C, dtype))


def _pack_frames(frames):
    """Spike frames as packed bits in memory order (`binwslt.bits.pack_bits` of `_physical`)."""
    ext = _ext_for(frames, (torch.float32, torch.float64, torch.bfloat16, torch.uint8, torch.bool, torch.int8))
    if ext is not None and _frame_layout(frames) is not None:
        return ext.pack_nonzero(_flat(frames))
    return pack_bits(_physical(frames))


def _is_channels_last(frames):
    return frames.dim() == 4 and not frames.is_contiguous() and frames.is_contiguous(memory_format=torch.channels_last)


def _physical(frames):
    """``frames`` as a view in its memory order (``[F, H, W, C]`` for channels-last frames), else as it is."""
    return frames.permute(0, 2, 3, 1) if _is_channels_last(frames) else frames


def _unpack_frames(bits, shape, channels_last, dtype):
    """Inverse of `_pack_frames`: ``[F, C, H, W]`` (channels-last where it was) of ``dtype``."""
    physical = shape if not channels_last else (shape[0],) + tuple(shape[2:]) + (shape[1],)
    ext = _ext_for(bits, (torch.uint8,))
    if ext is not None:
        out = ext.unpack_to(bits, torch.Size(physical).numel(), dtype).view(physical)
    else:
        out = unpack_bits(bits, physical).to(dtype)
    return out.permute(0, 3, 1, 2) if channels_last else out


def _low_precision_grads(dtype, grad_precision) -> Optional[torch.dtype]:
    """bf16 for the grad-input GEMM in the one-term ``grad_precision="bf16"`` mode (fp32/fp64 layers), else None.

    ``"split"`` runs them in the layer's dtype: PyTorch's CPU bf16 convolutions round their output to bf16, so a
    high + low split of g would still lose the low bits there; fp32 (channels-last) keeps the reference's
    accuracy.
    """
    if grad_precision not in ("split", "bf16"):
        raise ValueError(f"grad_precision must be 'split' or 'bf16', got {grad_precision!r}")
    return torch.bfloat16 if grad_precision == "bf16" and dtype in (torch.float32, torch.float64) else None


class _BinWLIF(torch.autograd.Function):
    """Fused binary-subnet conv/linear + epilogue + LIF; see the module docstring for what it saves."""

    @staticmethod
    def forward(ctx, x, weight, scores, scale, shift, residual, running_mean, running_var,
                linear_map, prune_rate, neuron, timesteps, batch_norm, momentum, eps, subnet, spiking_input,
                grad_precision, needs_backward, x_u8):
        cached = subnet is not None
        if not cached:
            subnet = make_subnet(weight, scores, prune_rate)
        tern = subnet.ternary
        alpha = subnet.alpha.to(x.dtype)
        direct = timesteps is not None
        T = timesteps if direct else x.shape[0]
        frames = x if direct else x.flatten(0, 1)
        frames_u8 = None if x_u8 is None else x_u8.flatten(0, 1)  # x's spikes as uint8 (the previous layer's)
        if spiking_input and _int8_forward(frames):
            y = linear_map.spikes_int8(frames, subnet, frames_u8)  # [F, C, ...] fp32, exact integers
        else:
            y = linear_map(frames, tern.to(x.dtype))  # [F, C, ...], exact integers when frames are spikes
        if direct and y.dim() == 4 and y.device.type == "cpu":
            # spikes channels-last, the layout the int8 layers and the AMX backward take (y is 1/T of them)
            y = y.contiguous(memory_format=torch.channels_last)
        stats = None
        if batch_norm:
            mean, var = _batch_moments(y, alpha)
            count = (T if direct else 1) * (y.numel() // y.shape[1])  # BN counts every (t, n, h, w)
            stats = batchnorm.train_rstd(mean.to(x.dtype), var.to(x.dtype), count, running_mean, running_var,
                                         momentum, eps)
        mean, rstd = (None, None) if stats is None else (stats.mean, stats.rstd)
        a, b = _per_channel(alpha, scale, shift, stats)
        save_integer = needs_backward and spiking_input  # y saved as exact integers
        y_dtype = torch.int16 if weight[0].numel() <= 32767 else torch.int32
        ext = _fused_epilogue_ext(y, residual, y.dtype)
        if ext is not None:  # current, scan, spikes (also as uint8 for the next int8 layer), the int16 y: one pass
            over_y = not direct and (save_integer or not needs_backward)  # y is dead after this pass
            spikes, y_saved, spikes_u8 = _fused_forward(ext, y, a, b, residual, T, direct, neuron,
                                                        y_dtype if save_integer else None, _int8_forward(y), over_y)
            if spikes_u8 is not None:
                attach_uint8(spikes, spikes_u8)
        else:
            spikes = _lif_spikes(_current_sequence(y, a, b, residual, T, direct), neuron)
            y_saved = y.to(y_dtype) if save_integer else None
        if not needs_backward:  # inference (no_grad, or nothing requires grad): nothing to pack or save
            return spikes

        if spiking_input:
            saved_x = _pack_frames(frames if frames_u8 is None else frames_u8)  # in memory order
        else:
            saved_x, y_saved = frames, y
        # a cached subnet is held by its cache anyway; else the ternary weight is sign(weight) on 1 bit per weight
        saved_tern = tern if cached else pack_bits(tern != 0)
        ctx.save_for_backward(saved_x, y_saved, saved_tern, alpha, weight, scores, scale, shift, residual, mean,
                              rstd)
        ctx.spiking_input, ctx.frames_shape, ctx.dtype = spiking_input, tuple(frames.shape), x.dtype
        ctx.channels_last = _is_channels_last(frames)
        ctx.linear_map, ctx.neuron, ctx.direct, ctx.cached = linear_map, neuron, direct, cached
        ctx.subnet = subnet if cached else None  # its derived forms (the AMX packed weight) outlive this call
        ctx.grad_dtype = _low_precision_grads(x.dtype, grad_precision)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        saved_x, y, saved_tern, alpha, weight, scores, scale, shift, residual, mean, rstd = ctx.saved_tensors
        tern = saved_tern if ctx.cached else \
            torch.sign(weight.detach()).to(torch.int8) * unpack_bits(saved_tern, weight.shape)
        dtype, direct, T = ctx.dtype, ctx.direct, grad_spikes.shape[0]
        stats = None if mean is None else batchnorm.BatchStats(mean=mean, rstd=rstd)
        a, b = _per_channel(alpha, scale, shift, stats)
        ext = _fused_epilogue_ext(y, residual, dtype)
        if ext is not None:  # current, BPTT and the per-channel sums in one pass, y read as saved
            g, sum_g, sum_gy, grad_residual = _fused_backward(ext, y, a, b, residual, grad_spikes, T, direct,
                                                              ctx.neuron, dtype, ctx.needs_input_grad[5])
        else:
            y = y.to(dtype)
            grad_current = _lif_grad(_current_sequence(y, a, b, residual, T, direct), grad_spikes, ctx.neuron)
            grad_residual = grad_current if ctx.needs_input_grad[5] else None
            g = grad_current.sum(0) if direct else grad_current.flatten(0, 1)  # [F, C, ...], like y
            dims = [d for d in range(g.dim()) if d != 1]
            sum_g, sum_gy = g.sum(dims), (g * y).sum(dims)
        coeff = batchnorm.backward_coefficients(alpha, scale, stats, sum_g, sum_gy, y.numel() // y.shape[1])
        grad_scale, grad_shift = coeff.grad_scale, coeff.grad_shift
        grad_scale = grad_scale if ctx.needs_input_grad[3] else None
        grad_shift = grad_shift if ctx.needs_input_grad[4] else None

        low = ctx.grad_dtype  # bf16 in the one-term mode: g rounded once for grad-input, the weight exact
        # spikes times the ternary weight, g split in three bf16 terms: fp32 accuracy on AMX (binwslt.amx), which
        # applies the fold as it reads g; elsewhere dL/d(α·y) is folded first (frames like y)
        on_amx = ctx.spiking_input and low is None and dtype == torch.float32 and \
            ctx.linear_map.amx_ready(tern.shape)
        fold = _amx_fold(g, y, coeff, scale) if on_amx else None
        grad_cur = g if on_amx else _fold_gradient(ext, g, y, coeff, scale)
        frames = saved_x if not ctx.spiking_input else None if on_amx else \
            _unpack_frames(saved_x, ctx.frames_shape, ctx.channels_last, dtype)  # AMX reads the bits
        want_input, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_x = grad_weff = None
        if on_amx and (want_input or want_weight):  # both in one pass over the frames
            grad_dead = grad_residual is None or \
                grad_residual.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()
            grad_x, grad_weff = ctx.linear_map.grads_amx(ctx.frames_shape, saved_x, ctx.channels_last, tern,
                                                         ctx.subnet, alpha, grad_cur, fold, want_input, want_weight,
                                                         grad_dead)
        elif want_input and low is None:
            grad_x = ctx.linear_map.grad_input(ctx.frames_shape, alpha * tern.to(dtype), grad_cur)
        elif want_input:
            grad_x = ctx.linear_map.grad_input(ctx.frames_shape, tern.to(low), grad_cur.to(low))
            grad_x = grad_x.to(dtype).mul_(alpha)
        if grad_x is not None and not direct:
            grad_x = grad_x.view((T, -1) + tuple(grad_x.shape[1:]))
        grad_weight = grad_scores = None
        if want_weight:
            if not on_amx:
                grad_weff = ctx.linear_map.grad_weight(frames, tern.shape, grad_cur)
            grad_weight, grad_scores = _straight_through(
                grad_weff.to(weight.dtype), weight, scores, tern, alpha, ctx.needs_input_grad[1:3])
        return (grad_x, grad_weight, grad_scores, grad_scale, grad_shift, grad_residual,
                None, None, None, None, None, None, None, None, None, None, None, None, None, None)


def _apply(x, weight, scores, scale, shift, residual, running_mean, running_var, linear_map, prune_rate, neuron,
           timesteps, batch_norm, momentum, eps, subnet, grad_precision):
    spiking_input = timesteps is None and is_spikes(x)  # by dtype or mark, never by reading values
    needs_backward = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, scores, scale, shift, residual))
    x_u8 = uint8_spikes(x) if spiking_input else None
    out = _BinWLIF.apply(x, weight, scores, scale, shift, residual, running_mean, running_var, linear_map,
                         prune_rate, neuron, timesteps, batch_norm, momentum, eps, subnet, spiking_input,
                         grad_precision, needs_backward, x_u8)
    return mark_spikes(out)


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, subnet=None, grad_precision="split"):
    """Fused binary conv + LIF, see `binwslt.functional.binw_conv2d_lif`. Spikes ``[T, N, C_out, H', W']``
    (marked as spikes; channels-last frames where the int8 path ran)."""
    return _apply(x, weight, scores, scale, shift, residual, running_mean, running_var, _ConvMap(stride, padding),
                  prune_rate, neuron, timesteps, batch_norm, momentum, eps, subnet, grad_precision)


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, subnet=None, grad_precision="split"):
    """Fused binary linear + LIF, see `binwslt.functional.binw_linear_lif`. Spikes ``[T, N, out]`` (marked)."""
    return _apply(x, weight, scores, scale, shift, residual, running_mean, running_var, _LinearMap(), prune_rate,
                  neuron, timesteps, batch_norm, momentum, eps, subnet, grad_precision)
