"""Fused binary-weight conv2d + LIF for backend="triton": launchers, autograd Function and the backend entry.

Forward (kernels in ``conv_lif_fwd.py``): the subnet's ternary weight is built once per call; spike inputs are
read channels-last in the dtype they come in (a fused layer's output as it is: no cast or copy pass; converted to
int8 in registers) and convolved with exact int8 x int8 -> int32 dots; every program runs all
T steps of its output tile with the membrane in registers. Without training BatchNorm this is one kernel and the
float current never reaches memory. With training BatchNorm, pass 1 stores the exact pre-activation ``y`` and
per-tile partial sums of y and y^2 (int64 for spikes: exact), the host folds the batch statistics and gamma/beta
into per-channel ``a, b``, and pass 2 runs the LIF scan over ``y``.

Saved for backward (documented trade): the input spikes as packed bits (1 bit per spike, packed by the forward
kernel and unpacked in the backward kernels' loads, kernels/spike_bits.py; an analog input is kept as it is), ``y``
as int16 (int32 when the fan-in exceeds 32767; fp32 for an analog input), the ternary weight as 2 bits per weight, a
0/1 residual as bits (packed by the forward kernel that reads it, BatchNorm's scan pass included, and unpacked in the
backward scan's loads; an analog residual as it is). The membrane is recomputed from ``y`` in the backward scan
rather than stored: recomputing is one cheap elementwise pass per step, storing it would cost 4 bytes per neuron per
step. About 0.09-0.11 of the reference backend's saved bytes on a 16->16 channel layer.

No spike counter: binwslt.energy needs each layer's input firing rate, which this layer's output count equals only
when nothing (pooling) sits between two layers, and it must give the same figures on every backend, so it measures
the rates itself; the kernels count nothing (the former ``spike_counts`` argument is gone).

Layout: every kernel works channels-last (see ``conv_lif_fwd``); the returned spikes are ``[T, N, C_out, OH, OW]``
with channels-last strides, which the next fused layer reads without a copy.

Backward (kernels in ``conv_lif_bwd.py``): reverse LIF scan fused with the recompute and the per-channel
reductions, the BatchNorm fold, then the grad-input and grad-weight implicit GEMMs (straight-through epilogue).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import triton

from binwslt.batchnorm import BatchStats
from binwslt.bits import pack_ternary, unpack_ternary
from binwslt.config import LIFConfig
from binwslt.spikes import is_spikes, mark_spikes, spike_output_dtype

from .conv_lif_bwd import bn_grad_fold_kernel, conv_grad_input_kernel, conv_grad_weight_kernel, \
    conv_lif_bwd_scan_kernel
from .conv_lif_fwd import binary_conv_lif_fwd_kernel, conv_lif_scan_kernel
from .launch import bn_forward, check_float64, check_int32, derived, device_arch, device_sms, epilogue_backward, \
    grad_multiplier, io_dtype, plain_affine, prepare_input, subnet_operands, y_dtype
from .gemm import SPLIT_BY_PRECISION
from .memory import choose_memory
from .spike_bits import unpack_rows
from .lif import neuron_params
from .tiles import FOLD_BLOCK, forward_config, grad_input_config, grad_weight_config, grad_weight_split, \
    launch_kwargs, recompute_scan_config, scan_config, stats_fit_int32

# ------------------------------------------------------------------------------------------------ helpers
def _out_size(size, k, stride, pad):
    return (size + 2 * pad - k) // stride + 1


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def to_channels_last(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """``[..., C, H, W]`` -> contiguous, 16-byte aligned ``[..., H, W, C]`` of ``dtype`` (default: t's). No copy when
    ``t`` already has that memory layout (e.g. the output of this op), else one fused convert-and-copy pass."""
    dims = t.dim()
    cl = t.permute(*range(dims - 3), dims - 2, dims - 1, dims - 3)
    dtype = cl.dtype if dtype is None else dtype
    if cl.dtype == dtype and cl.is_contiguous() and _aligned(cl):
        return cl
    out = torch.empty(cl.shape, dtype=dtype, device=cl.device)  # fresh allocations are aligned
    return out.copy_(cl)


def from_channels_last(t: torch.Tensor) -> torch.Tensor:
    """View of a contiguous ``[..., H, W, C]`` tensor as ``[..., C, H, W]`` (channels-last strides)."""
    dims = t.dim()
    return t.permute(*range(dims - 3), dims - 1, dims - 3, dims - 2)


class _Geometry:
    """Shapes of one call: input [T?, N, C_in, H, W], weight [C_out, C_in, KH, KW], stride, padding."""

    def __init__(self, x, weight, stride, padding, timesteps):
        self.direct = timesteps is not None
        self.T = int(timesteps) if self.direct else x.shape[0]
        self.N, self.C_in, self.H, self.W = x.shape[-4:]
        self.C_out, c_in_w, self.KH, self.KW = weight.shape
        if c_in_w != self.C_in:
            raise ValueError(f"weight has {c_in_w} input channels but x has {self.C_in}")
        self.SH, self.SW = (int(s) for s in stride)
        self.PH, self.PW = (int(p) for p in padding)
        self.OH = _out_size(self.H, self.KH, self.SH, self.PH)
        self.OW = _out_size(self.W, self.KW, self.SW, self.PW)
        if self.OH < 1 or self.OW < 1:
            raise ValueError(f"output size {self.OH}x{self.OW} is empty for input {self.H}x{self.W}, kernel "
                             f"{self.KH}x{self.KW}, stride {tuple(stride)}, padding {tuple(padding)}")
        self.M = self.N * self.OH * self.OW
        self.fan_in = self.C_in * self.KH * self.KW
        self.T_y = 1 if self.direct else self.T
        self.cl_out_shape = (self.T, self.N, self.OH, self.OW, self.C_out)


def _kmajor(tern, subnet):
    """The forward's K-major ternary weight ``[KH, KW, C_out, C_in]`` (kept with a cached subnet)."""
    return derived(subnet, "triton_conv_kmajor", lambda: tern.permute(2, 3, 0, 1).contiguous())


@dataclass(frozen=True)
class ConvLIFState:
    """What the conv + LIF backward needs from its forward.

    Tensors: ``saved_x`` the channels-last input, spikes as bits packed by the forward kernel (uint8, the
    bytes of ``[T*N*H*W, cdiv(C_in, 8)]`` padded to whole int32 words, kernels/spike_bits.py), analog (fp16/fp32) as is; ``y`` the
    exact pre-activation ``[T_y, M, C_out]`` (None with memory="recompute": rebuilt in the backward); ``tern`` int8
    ``[C_out, C_in, KH, KW]``; ``alpha`` fp32 ``[1]``; ``a, b`` fp32 ``[C_out]``; ``bn`` the training BatchNorm
    statistics or None; ``res_cl`` the residual as the backward scan reads it: a spiking residual as the bits the
    forward kernel wrote (uint8, the bytes of ``[T*M, cdiv(C_out, 8)]`` padded to whole int32 words,
    kernels/spike_bits.py; set by the forward when it has one, ``res_bits`` True), an analog one channels-last (set
    by the backward). Fields: the call's geometry, the input's flags, the neuron, the memory choice, dtypes, the
    saved residual's form and ``split``.
    """

    geo: Any
    is_spike: bool
    saved_x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    tern: Optional[torch.Tensor]
    alpha: Optional[torch.Tensor]
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]
    bn: Optional[BatchStats]
    neuron: LIFConfig
    memory: Any
    out_dtype: torch.dtype
    res_bits: bool = False
    has_res: bool = False
    res_dtype: Optional[torch.dtype] = None
    split: bool = True
    res_cl: Optional[torch.Tensor] = None


# ------------------------------------------------------------------------------------------------ forward
def conv_lif_forward(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron,
                     timesteps, batch_norm, running_mean, running_var, momentum, eps, need_y=False,
                     memory="auto", subnet=None):
    """Run the fused forward. Returns ``(spikes, state)``.

    ``spikes``: ``[T, N, C_out, OH, OW]`` in x's dtype, with channels-last strides (memory ``[T, N, OH, OW, C_out]``:
    the layout the kernels write coalesced, and the one the next fused layer reads without a copy). ``state``: the
    `ConvLIFState` backward needs (None unless ``need_y``). ``memory``: "auto" | "save" | "recompute" (kernels/memory.py): with "recompute" the state holds no ``y`` and the backward rebuilds it.
    """
    geo = _Geometry(x, weight, stride, padding, timesteps)
    device = x.device
    p = neuron_params(neuron)
    tern, alpha = subnet_operands(weight, scores, prune_rate, subnet)
    tern_cl = _kmajor(tern, subnet)
    x_cl, is_spike, dot_fp16 = prepare_input(x, geo.direct, to_channels_last)
    out_cl = torch.empty(geo.cl_out_shape, dtype=spike_output_dtype(x.dtype), device=device)
    check_int32("conv", x=x_cl.numel(), output=out_cl.numel())
    res_cl = to_channels_last(residual.detach(), io_dtype(residual.dtype)) if residual is not None else None
    # a spiking residual saved for backward: its bits written by the kernel that reads it (kernels/spike_bits.py)
    res_bits = None
    if need_y and residual is not None and is_spikes(residual):
        res_bits = torch.empty(triton.cdiv(geo.T * geo.M * triton.cdiv(geo.C_out, 8), 4), dtype=torch.int32,
                               device=device)
    cfg = forward_config(is_spike, geo.C_in, geo.C_out, geo.M, sms=device_sms(device),
                         x_bytes=x_cl.element_size() if is_spike else 1)
    grid = (triton.cdiv(geo.M, cfg["BLOCK_M"]), triton.cdiv(geo.C_out, cfg["BLOCK_N"]))
    choice = choose_memory(memory, is_spike=is_spike, fan_in=geo.fan_in,
                           y_bytes=torch.empty(0, dtype=y_dtype(is_spike, geo.fan_in)).element_size(),
                           batch_norm=batch_norm, gy=scale is not None and scale.requires_grad)
    store_y = (need_y and not choice.recompute) or batch_norm
    y = None
    if store_y:
        y = torch.empty((geo.T_y, geo.M, geo.C_out), dtype=y_dtype(is_spike, geo.fan_in), device=device)
    # the saved input: spikes packed to bits by the forward kernel itself (kernels/spike_bits.py), analog as is
    bits = None
    if need_y and is_spike:
        n_bytes = x_cl.numel() // geo.C_in * triton.cdiv(geo.C_in, 8)
        bits = torch.empty(triton.cdiv(n_bytes, 4), dtype=torch.int32, device=device)
    common = dict(T=geo.T, N=geo.N, M=geo.M, C_in=geo.C_in, C_out=geo.C_out, H=geo.H, W=geo.W, OH=geo.OH,
                  OW=geo.OW, SH=geo.SH, SW=geo.SW, PH=geo.PH, PW=geo.PW,
                  decay=p["decay"], threshold=p["threshold"], v_reset=p["v_reset"],
                  KH=geo.KH, KW=geo.KW, IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=geo.direct,
                  HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], **launch_kwargs(cfg))
    bn_state = None
    if not batch_norm:
        a, b = plain_affine(scale, shift, geo.C_out, device)
        binary_conv_lif_fwd_kernel[grid](x_cl, tern_cl, alpha, a, b, res_cl, res_bits, out_cl, y, None, bits,
                                         **common)
    else:
        stat_dtype = torch.int64 if is_spike else torch.float32
        stats = torch.empty((2, grid[0], geo.C_out), dtype=stat_dtype, device=device)
        binary_conv_lif_fwd_kernel[grid](x_cl, tern_cl, alpha, None, None, None, None, None, y, stats, bits,
                                         STATS_I32=stats_fit_int32(geo.fan_in, cfg["BLOCK_M"]), **common)
        # mean/var of alpha*y over (T, N, OH, OW) from the exact per-tile sums (binwslt.batchnorm).
        a, b, bn_state = bn_forward(stats, geo.T_y * geo.M, geo.T * geo.M, alpha, scale, shift, running_mean,
                                    running_var, momentum, eps)
        scfg = scan_config(geo.C_out, geo.M)
        sgrid = (triton.cdiv(geo.M, scfg["BLOCK_M"]), triton.cdiv(geo.C_out, scfg["BLOCK_N"]))
        conv_lif_scan_kernel[sgrid](
            y, alpha, a, b, res_cl, res_bits, out_cl, geo.T, geo.M, geo.C_out, p["decay"], p["threshold"],
            p["v_reset"],
            DIRECT=geo.direct, HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], **launch_kwargs(scfg))
    spikes = mark_spikes(from_channels_last(out_cl))
    state = None
    if need_y:
        state = ConvLIFState(geo=geo, is_spike=is_spike, saved_x=bits.view(torch.uint8) if is_spike else x_cl,
                             y=None if choice.recompute else y, tern=tern, alpha=alpha, a=a, b=b, bn=bn_state,
                             neuron=neuron, memory=choice, out_dtype=x.dtype, res_bits=res_bits is not None,
                             res_cl=None if res_bits is None else res_bits.view(torch.uint8))
    return spikes, state


def binary_conv_gemm(x, weight, scores, prune_rate, *, stride, padding, timesteps=None, subnet=None):
    """The forward's implicit GEMM alone (no LIF epilogue): the baseline the fused kernel is timed against.

    Same kernel and tiles as the fused forward with FIRE off, storing y = conv(X, tern) channels-last
    ``[T_y, N*OH*OW, C_out]`` (int16/int32 for spikes, fp32 for analog input; ``T_y = 1`` when direct).
    """
    geo = _Geometry(x, weight, stride, padding, timesteps)
    tern, alpha = subnet_operands(weight, scores, prune_rate, subnet)
    x_cl, is_spike, dot_fp16 = prepare_input(x, geo.direct, to_channels_last)
    return _gemm_y(x_cl, _kmajor(tern, subnet), alpha, geo, is_spike, dot_fp16)


def _gemm_y(x_cl, tern_cl, alpha, geo, is_spike, dot_fp16):
    """y = conv(X, tern) ``[T_y, M, C_out]`` by the forward kernel with FIRE off (the benchmark baseline, and the
    recompute of ``memory="recompute"`` with BatchNorm): channels-last ``x_cl``, K-major ``tern_cl``
    ``[KH, KW, C_out, C_in]``."""
    y = torch.empty((geo.T_y, geo.M, geo.C_out), dtype=y_dtype(is_spike, geo.fan_in), device=x_cl.device)
    cfg = forward_config(is_spike, geo.C_in, geo.C_out, geo.M, sms=device_sms(x_cl.device),
                         x_bytes=x_cl.element_size() if is_spike else 1)
    grid = (triton.cdiv(geo.M, cfg["BLOCK_M"]), triton.cdiv(geo.C_out, cfg["BLOCK_N"]))
    binary_conv_lif_fwd_kernel[grid](
        x_cl, tern_cl, alpha, None, None, None, None, None, y, None, None,
        T=geo.T, N=geo.N, M=geo.M, C_in=geo.C_in, C_out=geo.C_out, H=geo.H, W=geo.W, OH=geo.OH, OW=geo.OW,
        SH=geo.SH, SW=geo.SW, PH=geo.PH, PW=geo.PW, decay=0.0, threshold=1.0, v_reset=0.0,
        KH=geo.KH, KW=geo.KW, IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=geo.direct, HARD_RESET=True, DECAY_INPUT=False, **launch_kwargs(cfg))
    return y


# ------------------------------------------------------------------------------------------------ backward
def conv_lif_backward(state, grad_spikes, weight, scores, scale, needs):
    """Gradients ``(grad_x, grad_weight, grad_scores, grad_scale, grad_shift, grad_residual)`` (None where
    ``needs`` is False). ``grad_spikes``: dL/dspikes ``[T, N, C_out, OH, OW]``, any strides. ``state`` holds what
    the forward kept (``res_cl``: the residual as bits or channels-last, or None; ``res_dtype``: its dtype)."""
    need_x, need_w, need_s, need_scale, need_shift, need_res = needs
    geo = state.geo
    device = grad_spikes.device
    p = neuron_params(state.neuron)
    y, alpha, a, b, bn = state.y, state.alpha, state.a, state.b, state.bn
    # memory="recompute": the backward scan rebuilds y with the forward's GEMM (RECOMPUTE) so y never reaches
    # memory; with BatchNorm the grad fold needs y at every element after a reduction over all tiles, so there y is
    # rebuilt once by the forward kernel before the scan (_gemm_y) and the scan reads it.
    fused = y is None and bn is None
    w_kmajor = state.tern.permute(2, 3, 0, 1).contiguous()  # [KH, KW, C_out, C_in], as the forward reads it
    if y is None and not fused:
        x_in = state.saved_x
        if state.is_spike:  # the forward kernel would stage the unpacked bytes through shared memory one by one
            x_in = unpack_rows(x_in, geo.T_y * geo.N * geo.H * geo.W, geo.C_in)
        y = _gemm_y(x_in, w_kmajor, alpha, geo, state.is_spike, x_in.dtype == torch.float16)
    mult = grad_multiplier(scale, bn, geo.C_out, device)
    gout_cl = to_channels_last(grad_spikes, io_dtype(grad_spikes.dtype))
    g = torch.empty((geo.T, geo.M, geo.C_out), dtype=torch.float32, device=device)
    res_cl = state.res_cl
    gres_cl = None
    if need_res and res_cl is not None:
        gres_cl = torch.empty(geo.cl_out_shape, dtype=io_dtype(state.res_dtype), device=device)
    if fused:
        cfg = recompute_scan_config(state.is_spike, geo.C_in, geo.C_out, geo.M)
        x_in, w_in = state.saved_x, w_kmajor  # passed: RECOMPUTE (kernels/optional.py)
        gemm_flags = dict(KH=geo.KH, KW=geo.KW, IS_SPIKE=state.is_spike, DOT_FP16=x_in.dtype == torch.float16)
    else:
        cfg = scan_config(geo.C_out, geo.M)
        x_in = w_in = None
        gemm_flags = {}
    grid = (triton.cdiv(geo.M, cfg["BLOCK_M"]), triton.cdiv(geo.C_out, cfg["BLOCK_N"]))
    part = torch.empty((2, grid[0], geo.C_out), dtype=torch.float32, device=device)
    conv_lif_bwd_scan_kernel[grid](
        y, x_in, w_in, alpha, a, b, mult, res_cl, gout_cl, g, gres_cl, part,
        geo.T, geo.N, geo.M, geo.C_in, geo.C_out, geo.H, geo.W, geo.OH, geo.OW, geo.SH, geo.SW, geo.PH, geo.PW,
        p["decay"], p["threshold"], p["v_reset"], p["alpha"], DIRECT=geo.direct,
        HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], DETACH_RESET=p["DETACH_RESET"],
        SURROGATE=p["SURROGATE"], GY=bn is not None or need_scale, **gemm_flags, **launch_kwargs(cfg))
    grad_res = from_channels_last(gres_cl).to(state.res_dtype) if gres_cl is not None else None
    g_frames = g[: geo.T_y]  # direct: slot 0 holds sum_t dL/dI[t]
    coeffs = epilogue_backward(part, alpha, scale, bn, geo.T_y * geo.M)
    grad_scale = coeffs.grad_scale if need_scale else None
    grad_shift = coeffs.grad_shift if need_shift else None
    if coeffs.c1 is not None and (need_x or need_w or need_s):
        numel = g_frames.numel()
        bn_grad_fold_kernel[(triton.cdiv(numel, FOLD_BLOCK),)](g_frames, y, coeffs.c1, coeffs.c2, coeffs.c3, numel,
                                                              geo.C_out, BLOCK=FOLD_BLOCK, num_warps=4)
    grad_x = None
    if need_x:
        grad_x = _grad_input(state, g_frames, w_kmajor, geo, device)
    grad_w = grad_s = None
    if need_w or need_s:
        grad_w, grad_s = _grad_weight(state, g_frames, geo, weight, scores, need_w, need_s, device)
    if grad_scale is not None and scale is not None:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_x, grad_w, grad_s, grad_scale, grad_shift, grad_res


def _grad_input(state, g_frames, tern_t, geo, device):
    frames = geo.T_y * geo.N
    dx_cl = torch.empty((frames, geo.H, geo.W, geo.C_in), dtype=io_dtype(state.out_dtype), device=device)
    P = frames * geo.H * geo.W
    cfg = grad_input_config(geo.C_in, geo.C_out, P)
    grid = (triton.cdiv(P, cfg["BLOCK_M"]), triton.cdiv(geo.C_in, cfg["BLOCK_N"]))
    conv_grad_input_kernel[grid](
        g_frames, tern_t, state.alpha, dx_cl, P, geo.C_in, geo.C_out, geo.H, geo.W, geo.OH, geo.OW,
        geo.SH, geo.SW, geo.PH, geo.PW, KH=geo.KH, KW=geo.KW, SPLIT=state.split, **launch_kwargs(cfg))
    dx = from_channels_last(dx_cl).to(state.out_dtype)
    if geo.direct:
        return dx
    return dx.unflatten(0, (geo.T, geo.N))


def _grad_weight(state, g_frames, geo, weight, scores, need_w, need_s, device):
    x_cl = state.saved_x  # spikes as bits, unpacked in the kernel's loads
    P = geo.T_y * geo.M
    cfg = grad_weight_config(geo.C_in, geo.C_out, P, arch=device_arch(device))
    tiles = geo.KH * geo.KW * triton.cdiv(geo.C_in, cfg["BLOCK_M"]) * triton.cdiv(geo.C_out, cfg["BLOCK_N"])
    split = grad_weight_split(tiles, P, cfg["BLOCK_K"], device_sms(device))
    p_per_split = triton.cdiv(triton.cdiv(P, split), cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    split = triton.cdiv(P, p_per_split)
    shape = (split,) + tuple(weight.shape)
    gs = torch.empty(shape, dtype=torch.float32, device=device) if need_s else None
    gw = torch.empty(shape, dtype=torch.float32, device=device) if need_w else None
    # the epilogue reads fp32 weight and scores (only for the scores' gradient)
    w_in = weight.detach().to(torch.float32).contiguous() if need_s else None
    s_in = scores.detach().to(torch.float32).contiguous() if need_s else None
    grid = (geo.KH * geo.KW * triton.cdiv(geo.C_in, cfg["BLOCK_M"]), triton.cdiv(geo.C_out, cfg["BLOCK_N"]), split)
    conv_grad_weight_kernel[grid](
        x_cl, g_frames, w_in, s_in, state.tern, state.alpha, gs, gw, P, geo.C_in, geo.C_out, geo.H, geo.W, geo.OH, geo.OW, p_per_split,
        geo.SH, geo.SW, geo.PH, geo.PW, KH=geo.KH, KW=geo.KW, SPLIT=state.split, **launch_kwargs(cfg))
    grad_s = gs.sum(0).to(scores.dtype) if gs is not None else None
    grad_w = gw.sum(0).to(weight.dtype) if gw is not None else None
    return grad_w, grad_s


# ------------------------------------------------------------------------------------------------ autograd
class BinWConv2dLIFFunction(torch.autograd.Function):
    """Autograd wrapper of the fused op; gradients to x, weight, scores, scale, shift, residual.

    Saved: input spikes as bits (analog input as is), y as int16, the ternary weight as 2 bits per weight, a
    spiking residual as bits (an analog residual as is), per-channel vectors, and the caller's weight/scores."""

    @staticmethod
    def forward(ctx, x, weight, scores, scale, shift, residual, running_mean, running_var, prune_rate, stride,
                padding, neuron, timesteps, batch_norm, momentum, eps, grad_precision, memory, subnet):
        need_grad = any(ctx.needs_input_grad[:6])
        spikes, state = conv_lif_forward(
            x, weight, scores, prune_rate, stride=stride, padding=padding, scale=scale, shift=shift,
            residual=residual, neuron=neuron, timesteps=timesteps, batch_norm=batch_norm,
            running_mean=running_mean, running_var=running_var, momentum=momentum, eps=eps, need_y=need_grad,
            memory=memory, subnet=subnet)
        if need_grad:
            saved_res = state.res_cl if state.res_bits else residual  # spiking: the kernel-written bits
            bn = state.bn
            tensors = [state.saved_x, state.y, *pack_ternary(state.tern), state.alpha, state.a, state.b, weight,
                       scores, scale, saved_res]
            tensors += [bn.mean, bn.rstd] if bn is not None else [None, None]
            ctx.save_for_backward(*tensors)
            # tensors go through save_for_backward; ctx keeps the state's non-tensor fields only
            ctx.state = replace(state, saved_x=None, y=None, tern=None, alpha=None, a=None, b=None, bn=None,
                                res_cl=None, has_res=residual is not None,
                                res_dtype=residual.dtype if residual is not None else None,
                                split=SPLIT_BY_PRECISION[grad_precision])
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        (saved_x, y, mask_bits, sign_bits, alpha, a, b, weight, scores, scale, saved_res, mean,
         rstd) = ctx.saved_tensors
        info = ctx.state
        res_cl = saved_res  # a spiking residual's bits are read as they are by the backward scan
        if info.has_res and not info.res_bits:
            res_cl = to_channels_last(saved_res.detach(), io_dtype(info.res_dtype))
        state = replace(info, saved_x=saved_x, y=y, tern=unpack_ternary(mask_bits, sign_bits, weight.shape),
                        alpha=alpha, a=a, b=b, bn=None if mean is None else BatchStats(mean, rstd), res_cl=res_cl)
        grads = conv_lif_backward(state, grad_spikes, weight, scores, scale, ctx.needs_input_grad[:6])
        return grads + (None,) * 13


def binw_conv2d_lif(x, weight, scores, prune_rate, *, stride, padding, scale, shift, residual, neuron, timesteps,
                    batch_norm, running_mean, running_var, momentum, eps, grad_precision="split", memory="auto",
                    subnet=None):
    """Fused binary-subnet conv2d + LIF (backend="triton"; arguments validated by `binwslt.functional`).

    x: spikes ``[T, N, C_in, H, W]`` (float; 0/1, or analog values) or an analog image ``[N, C_in, H, W]`` with
    ``timesteps=T``; weight/scores ``[C_out, C_in, KH, KW]`` float; stride/padding pairs of ints; scale/shift
    ``[C_out]`` float or None; residual ``[T, N, C_out, OH, OW]`` or None; neuron a LIFConfig; batch_norm uses
    batch statistics over (T, N, OH, OW) (running stats updated in place). ``grad_precision``: "split" (backward GEMMs with the fp32 gradient as three bf16 terms) or "bf16" (one term), kernels/gemm.py.
    ``memory``: "auto" | "save" | "recompute", whether y is kept for backward or rebuilt there (kernels/memory.py).
    ``subnet``: the layer's cached `binwslt.subnet.Subnet` (kernels/subnet.py make_subnet) or None to select now.
    Spike-ness of x and residual from their dtype or mark (binwslt.spikes.is_spikes); float64 x is an error (the
    backend resolution sends it to backend="torch").
    Returns spikes ``[T, N, C_out, OH, OW]`` in ``spike_output_dtype(x.dtype)``, marked as spikes, channels-last
    strides; differentiable to x, weight, scores, scale, shift, residual.
    """
    if not isinstance(neuron, LIFConfig):
        raise TypeError(f"neuron must be a LIFConfig, got {type(neuron).__name__}")
    check_float64(x, "conv")
    return mark_spikes(BinWConv2dLIFFunction.apply(
        x, weight, scores, scale, shift, residual, running_mean, running_var, prune_rate, tuple(stride),
        tuple(padding), neuron, timesteps, batch_norm, momentum, eps, grad_precision, memory, subnet))
