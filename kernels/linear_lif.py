"""Fused binary-weight linear + LIF for backend="triton": launchers, autograd Function, backend entry (the
@triton.jit kernels are in ``linear_lif_kernels.py``).

Shapes: x is ``[T, N, K]`` (spikes 0/1 or analog features) or a direct-encoded ``[N, K]`` with ``timesteps=T``;
the subnet weight ``[C, K]`` is ternary int8 (values -1/0/+1) times a scalar alpha; output spikes ``[T, N, C]``.
Row-major ``[.., K]`` inputs and ``[C, K]`` weights are already K-contiguous, so every GEMM tile load is
coalesced without a layout change; outputs ``[T, N, C]`` are C-contiguous, so spike tiles store coalesced.

Forward. Spike inputs are read in the dtype they come in (a fused layer's output as it is: no cast pass),
converted to int8 in registers and multiplied with int8 ternary weights by ``tl.dot`` into int32
(exact). Analog inputs use an fp16 dot (fp16 x; ternary weights are exact in fp16) or, for fp32 x, three bf16
dots of x split into three bf16 terms (kernels/gemm.py; the ternary factor is exact in bf16, so this is fp32
accurate at tensor-core speed). Each program owns a [BLOCK_M rows x BLOCK_N channels] tile for all T steps:
per step it runs the K loop, forms I = (alpha*y)*a + b (+ residual[t]) and advances the membrane in registers
(``lif_step``); the float current never reaches memory. A direct-encoded input runs the K loop once.
Training-mode BatchNorm: pass 1 (the same kernel, FIRE=False) stores y and per-program partial sums of y, y^2
(int64 for spikes: exact); the host folds mean/rstd and gamma/beta into per-channel a, b; pass 2 is the
elementwise LIF scan over y.

Saved for backward: input spikes as bits, packed by the forward kernel itself and unpacked inside the loads of the
grad-weight kernel and of the backward scan's recompute (kernels/spike_bits.py: rows of cdiv(K, 8) bytes; an analog
input is kept as is), y as int16 (int32 when K > 32767; fp32 for analog inputs) unless ``memory="recompute"``, the
ternary weight as 2 bits per weight (binwslt.bits.pack_ternary), alpha and the per-channel a, b. The membrane is
recomputed from y rather than stored. ``memory="recompute"`` (kernels/memory.py; "auto" picks it per shape from
the modelled cost, fan-in K): y is not saved; without BatchNorm the backward scan rebuilds each y[t] from the
saved bits with the forward's int8 GEMM (RECOMPUTE), with BatchNorm one forward-kernel launch rebuilds y before
the scan (the grad fold needs y at every element after a reduction over all tiles).

Backward: one scan kernel recomputes U over T (parked in the gradient buffer), runs the reverse BPTT scan
(``lif_grad_step``), writes dL/dI times the per-channel multiplier (scale without BN; 1 with BN, folded after),
the residual gradient and per-program partial sums of dL/dI and dL/dI*y per channel. With BN an elementwise
fold applies the batch-statistics gradient. Then the grad-input GEMM (dI @ alpha*tern) and the grad-weight GEMM
(dI^T @ x) whose epilogue applies the straight-through rule (x w x sign(s)) for the scores.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch
import triton

from binwslt.batchnorm import BatchStats
from binwslt.bits import pack_ternary, unpack_ternary
from binwslt.config import LIFConfig
from binwslt.spikes import mark_spikes, spike_output_dtype

from .gemm import SPLIT_BY_PRECISION
from .launch import bn_forward, check_float64, check_int32, device_sms, epilogue_backward, grad_multiplier, \
    io_dtype, plain_affine, prepare_input, subnet_operands, y_dtype
from .lif import neuron_params
from .conv_lif_bwd import bn_grad_fold_kernel
from .linear_lif_kernels import binary_linear_lif_fwd_kernel, linear_grad_input_kernel, \
    linear_grad_weight_kernel, linear_lif_bwd_scan_kernel, linear_lif_scan_kernel
from .memory import choose_memory
from .spike_bits import unpack_rows
from .tiles import FOLD_BLOCK, launch_kwargs, linear_forward_config, linear_gemm_config, \
    linear_recompute_scan_config, linear_scan_config


# ================================================================================================= launchers
@dataclass(frozen=True)
class LinearLIFState:
    """What the linear + LIF backward needs from its forward.

    Tensors: ``saved_x`` the input as bits (spikes, uint8 ``[T*N, cdiv(K, 8)]`` flat, kernels/spike_bits.py) or
    ``[T_y, N, K]`` fp16/fp32 (analog); ``y`` the exact pre-activation ``[T_y, N, C]`` (int16/int32 for spikes,
    fp32 for analog; None with memory="recompute": rebuilt in the backward); ``tern`` int8 ``[C, K]``;
    ``alpha`` fp32 ``[1]``; ``a, b`` fp32 ``[C]`` (the current is ``a·(α·y) + b``); ``bn`` the training BatchNorm
    statistics or None. Fields: shapes ``T, N, K, C``, ``is_spike``, ``direct``, the neuron, x's dtype, the memory
    choice (kernels/memory.py MemoryChoice) and the backward GEMMs' ``split`` (grad_precision).
    """

    saved_x: Optional[torch.Tensor]
    y: Optional[torch.Tensor]
    tern: Optional[torch.Tensor]
    alpha: Optional[torch.Tensor]
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]
    bn: Optional[BatchStats]
    is_spike: bool
    direct: bool
    T: int
    N: int
    K: int
    C: int
    neuron: LIFConfig
    x_dtype: torch.dtype
    memory: Any = None
    split: bool = True


def _io(t):
    """A caller tensor (residual) as the kernels read it: contiguous, in `io_dtype` (None stays None)."""
    return None if t is None else t.detach().to(io_dtype(t.dtype)).contiguous()


def linear_lif_forward(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                       running_mean, running_var, momentum, eps, need_state=False, memory="auto", subnet=None):
    """Fused forward. Returns ``(spikes [T, N, C], state)``; state (a `LinearLIFState`) only when ``need_state``.
    ``memory``: "auto" | "save" | "recompute" (kernels/memory.py): with "recompute" the state holds no ``y`` and the
    backward rebuilds it from the saved input bits."""
    direct = timesteps is not None
    T = int(timesteps) if direct else x.shape[0]
    N, K = x.shape[-2], x.shape[-1]
    C = weight.shape[0]
    device = x.device
    p = neuron_params(neuron)
    tern, alpha = subnet_operands(weight, scores, prune_rate, subnet)
    # kernel input [T_y, N, K] contiguous (T_y = 1 for a direct-encoded [N, K])
    x_k, is_spike, dot_fp16 = prepare_input(x, direct, lambda t, dtype: t.to(dtype).contiguous().view(-1, N, K))
    T_y = x_k.shape[0]
    check_int32("linear", x=x_k.numel(), output=T * N * C, weight=C * K)
    out = torch.empty((T, N, C), dtype=spike_output_dtype(x.dtype), device=device)
    res = _io(residual)
    choice = choose_memory(memory, is_spike=is_spike, fan_in=K,
                           y_bytes=torch.empty(0, dtype=y_dtype(is_spike, K)).element_size(),
                           batch_norm=batch_norm, gy=scale is not None and scale.requires_grad)
    store_y = (need_state and not choice.recompute) or batch_norm
    y = torch.empty((T_y, N, C), dtype=y_dtype(is_spike, K), device=device) if store_y else None
    cfg = linear_forward_config(is_spike, dot_fp16, N, C, sms=device_sms(device))
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_N"]))
    flags = dict(IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=direct, HARD_RESET=p["HARD_RESET"],
                 DECAY_INPUT=p["DECAY_INPUT"], **launch_kwargs(cfg))
    bn_state = None
    # saved spikes: packed to bits by the kernel itself (kernels/spike_bits.py layout, whole int32 words)
    bits = torch.empty(triton.cdiv(T * N * triton.cdiv(K, 8), 4), dtype=torch.int32, device=device) \
        if need_state and is_spike else None
    if not batch_norm:
        a, b = plain_affine(scale, shift, C, device)
        binary_linear_lif_fwd_kernel[grid](x_k, tern, alpha, a, b, res, out, y, None, bits,
                                           T, N, K, C, p["decay"], p["threshold"], p["v_reset"], **flags)
    else:
        stats = torch.empty((2, grid[0], C), dtype=torch.int64 if is_spike else torch.float32, device=device)
        binary_linear_lif_fwd_kernel[grid](x_k, tern, alpha, None, None, None, None, y, stats, bits,
                                           T, N, K, C, p["decay"], p["threshold"], p["v_reset"], **flags)
        # Batch statistics of alpha*y over (T, N) (a direct input's T copies share one frame).
        a, b, bn_state = bn_forward(stats, T_y * N, T * N, alpha, scale, shift, running_mean, running_var, momentum,
                                    eps)
        scfg = linear_scan_config(N, C, sms=device_sms(device))
        sgrid = (triton.cdiv(N, scfg["BLOCK_M"]), triton.cdiv(C, scfg["BLOCK_N"]))
        linear_lif_scan_kernel[sgrid](
            y, alpha, a, b, res, out, T, N, C, p["decay"], p["threshold"], p["v_reset"],
            DIRECT=direct, HARD_RESET=p["HARD_RESET"],
            DECAY_INPUT=p["DECAY_INPUT"], **launch_kwargs(scfg))
    state = None
    if need_state:
        saved_x = bits.view(torch.uint8) if is_spike else x_k
        state = LinearLIFState(saved_x=saved_x, y=None if choice.recompute else y, tern=tern, alpha=alpha, a=a, b=b,
                               bn=bn_state, is_spike=is_spike, direct=direct, T=T, N=N, K=K, C=C, neuron=neuron,
                               x_dtype=x.dtype, memory=choice)
    return out, state


def _gemm_y(x_k, tern, alpha, T_y, N, K, C, is_spike, direct, sms):
    """y = x_k @ tern^T ``[T_y, N, C]`` by the forward kernel with FIRE off (the rebuild of ``memory="recompute"``
    with BatchNorm): ``x_k`` ``[T_y, N, K]`` int8 spikes or fp16/fp32 analog, ``tern`` int8 ``[C, K]``."""
    y = torch.empty((T_y, N, C), dtype=y_dtype(is_spike, K), device=x_k.device)
    dot_fp16 = x_k.dtype == torch.float16
    cfg = linear_forward_config(is_spike, dot_fp16, N, C, sms=sms)
    grid = (triton.cdiv(N, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_N"]))
    binary_linear_lif_fwd_kernel[grid](x_k, tern, alpha, None, None, None, None, y, None, None, T_y, N, K, C,
                                       0.0, 1.0, 0.0, IS_SPIKE=is_spike, DOT_FP16=dot_fp16, DIRECT=direct,
                                       HARD_RESET=True, DECAY_INPUT=False, **launch_kwargs(cfg))
    return y


def linear_lif_backward(state, grad_spikes, weight, scores, scale, residual, needs):
    """Gradients ``(grad_x, grad_weight, grad_scores, grad_scale, grad_shift, grad_residual)``, None where
    ``needs`` (6 bools) is False. ``grad_spikes``: dL/dspikes ``[T, N, C]``."""
    need_x, need_w, need_s, need_scale, need_shift, need_res = needs
    T, N, K, C, direct = state.T, state.N, state.K, state.C, state.direct
    device = grad_spikes.device
    p = neuron_params(state.neuron)
    y, alpha, a, b, bn = state.y, state.alpha, state.a, state.b, state.bn
    T_y = 1 if direct else T
    sms = device_sms(device)
    # memory="recompute": the backward scan rebuilds y with the forward's GEMM (RECOMPUTE) so y never reaches
    # memory; with BatchNorm the grad fold needs y at every element after a reduction over all tiles, so there y is
    # rebuilt once by the forward kernel before the scan (_gemm_y) and the scan reads it.
    fused = y is None and bn is None
    if y is None and not fused:
        x_in = state.saved_x
        if state.is_spike:  # int8 rows, as the forward kernel reads (and is compiled for) them; as the conv does
            x_in = unpack_rows(x_in, T_y * N, K).view(T_y, N, K)
        y = _gemm_y(x_in, state.tern, alpha, T_y, N, K, C, state.is_spike, direct, sms)
    grad_spikes = grad_spikes.contiguous()
    mult = grad_multiplier(scale, bn, C, device)
    g = torch.empty((T, N, C), dtype=torch.float32, device=device)
    grad_res = torch.empty((T, N, C), dtype=residual.dtype, device=device) \
        if (need_res and residual is not None) else None
    res = _io(residual)
    if fused:
        x_in, w_in = state.saved_x, state.tern  # passed: RECOMPUTE (kernels/optional.py)
        dot_fp16 = x_in.dtype == torch.float16
        scfg = linear_recompute_scan_config(state.is_spike, dot_fp16, N, C, sms=sms)
        gemm_flags = dict(IS_SPIKE=state.is_spike, DOT_FP16=dot_fp16)
    else:
        x_in = w_in = None
        scfg = linear_scan_config(N, C, sms=sms)
        gemm_flags = {}
    grid = (triton.cdiv(N, scfg["BLOCK_M"]), triton.cdiv(C, scfg["BLOCK_N"]))
    part = torch.empty((2, grid[0], C), dtype=torch.float32, device=device)
    linear_lif_bwd_scan_kernel[grid](
        y, x_in, w_in, alpha, a, b, mult, res, grad_spikes, g, grad_res, part, T, N, K, C,
        p["decay"], p["threshold"], p["v_reset"], p["alpha"], DIRECT=direct, GY=bn is not None or need_scale,
        HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], DETACH_RESET=p["DETACH_RESET"],
        SURROGATE=p["SURROGATE"], **gemm_flags, **launch_kwargs(scfg))
    g_frames = g[:T_y]
    coeffs = epilogue_backward(part, alpha, scale, bn, T_y * N)
    grad_scale = coeffs.grad_scale if need_scale else None
    grad_shift = coeffs.grad_shift if need_shift else None
    if coeffs.c1 is not None and (need_x or need_w or need_s):
        numel = g_frames.numel()
        bn_grad_fold_kernel[(triton.cdiv(numel, FOLD_BLOCK),)](
            g_frames, y, coeffs.c1, coeffs.c2, coeffs.c3, numel, C, BLOCK=FOLD_BLOCK, num_warps=4)
    R = T_y * N
    grad_x = None
    if need_x:
        dx = torch.empty((R, K), dtype=state.x_dtype, device=device)
        gcfg = linear_gemm_config(R, K, sms=sms)
        linear_grad_input_kernel[(triton.cdiv(R, gcfg["BLOCK_M"]), triton.cdiv(K, gcfg["BLOCK_N"]))](
            g_frames, state.tern, alpha, dx, R, C, K, SPLIT=state.split, **launch_kwargs(gcfg))
        grad_x = dx.view(N, K) if direct else dx.view(T, N, K)
    grad_w = grad_s = None
    if need_w or need_s:
        gs = torch.empty((C, K), dtype=scores.dtype, device=device) if need_s else None
        gw = torch.empty((C, K), dtype=weight.dtype, device=device) if need_w else None
        gcfg = linear_gemm_config(C, K, sms=sms)
        linear_grad_weight_kernel[(triton.cdiv(C, gcfg["BLOCK_M"]), triton.cdiv(K, gcfg["BLOCK_N"]))](
            state.saved_x, g_frames, weight.detach().contiguous() if need_s else None,
            scores.detach().contiguous() if need_s else None, state.tern, alpha, gs, gw, R, C, K,
            X_BITS=state.is_spike, SPLIT=state.split,
            **launch_kwargs(gcfg))
        grad_w, grad_s = gw, gs
    if scale is not None and grad_scale is not None:
        grad_scale = grad_scale.to(scale.dtype)
    return grad_x, grad_w, grad_s, grad_scale, grad_shift, grad_res


class BinWLinearLIFFunction(torch.autograd.Function):
    """Autograd wrapper of the fused linear + LIF; gradients to x, weight, scores, scale, shift, residual."""

    @staticmethod
    def forward(ctx, x, weight, scores, scale, shift, residual, running_mean, running_var, prune_rate, neuron,
                timesteps, batch_norm, momentum, eps, grad_precision, memory, subnet):
        need_grad = any(ctx.needs_input_grad[:6])
        spikes, state = linear_lif_forward(
            x, weight, scores, prune_rate, scale=scale, shift=shift, residual=residual, neuron=neuron,
            timesteps=timesteps, batch_norm=batch_norm, running_mean=running_mean, running_var=running_var,
            momentum=momentum, eps=eps, need_state=need_grad, memory=memory, subnet=subnet)
        if need_grad:
            bn = state.bn
            tensors = [state.saved_x, state.y, *pack_ternary(state.tern), state.alpha, state.a, state.b, weight,
                       scores, scale, residual]
            tensors += [bn.mean, bn.rstd] if bn is not None else [None, None]
            ctx.save_for_backward(*tensors)
            # tensors go through save_for_backward; ctx keeps the state's non-tensor fields only
            ctx.state = replace(state, saved_x=None, y=None, tern=None, alpha=None, a=None, b=None, bn=None,
                                split=SPLIT_BY_PRECISION[grad_precision])
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        saved_x, y, mask_bits, sign_bits, alpha, a, b, weight, scores, scale, residual, mean, rstd = ctx.saved_tensors
        tern = unpack_ternary(mask_bits, sign_bits, weight.shape).contiguous()
        state = replace(ctx.state, saved_x=saved_x, y=y, tern=tern, alpha=alpha, a=a, b=b,
                     bn=None if mean is None else BatchStats(mean, rstd))
        grads = linear_lif_backward(state, grad_spikes, weight, scores, scale, residual, ctx.needs_input_grad[:6])
        return grads + (None,) * 11


def binw_linear_lif(x, weight, scores, prune_rate, *, scale, shift, residual, neuron, timesteps, batch_norm,
                    running_mean, running_var, momentum, eps, subnet=None, grad_precision="split", memory="auto"):
    """Fused binary-subnet linear + LIF (backend="triton"; arguments validated by `binwslt.functional`).

    x: ``[T, N, K]`` float (spikes 0/1 or analog) or an analog ``[N, K]`` with ``timesteps=T``; weight/scores
    ``[C, K]`` float; scale/shift ``[C]`` float or None; residual ``[T, N, C]`` or None; neuron a LIFConfig;
    batch_norm: training-mode BatchNorm over (T, N) per channel (running stats updated in place).
    ``subnet``: the layer's cached `binwslt.subnet.Subnet` or None to select now. ``grad_precision``: "split" or
    "bf16", the backward GEMMs' precision (kernels/gemm.py). ``memory``: "auto" | "save" | "recompute", whether y
    is kept for backward or rebuilt there from the saved input bits (kernels/memory.py; "auto" recomputes where the
    modelled GEMM is cheaper than y's HBM traffic: without BatchNorm, K < 619 with a trained scale, < 825 without).
    Spike-ness of x from its dtype or mark (binwslt.spikes.is_spikes); float64 x is an error (the backend
    resolution sends it to backend="torch").
    Returns spikes ``[T, N, C]`` in ``spike_output_dtype(x.dtype)``, marked as spikes; differentiable to x,
    weight, scores, scale, shift, residual.
    """
    if not isinstance(neuron, LIFConfig):
        raise TypeError(f"neuron must be a LIFConfig, got {type(neuron).__name__}")
    check_float64(x, "linear")
    return mark_spikes(BinWLinearLIFFunction.apply(x, weight, scores, scale, shift, residual, running_mean,
                                                   running_var, prune_rate, neuron, timesteps, batch_norm, momentum,
                                                   eps, grad_precision, memory, subnet))


__all__ = ["binw_linear_lif", "BinWLinearLIFFunction", "LinearLIFState", "linear_lif_forward", "linear_lif_backward"]
