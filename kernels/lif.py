"""LIF neuron in Triton: shared ``@triton.jit`` step helpers and the standalone ``lif`` op.

The helpers ``lif_step`` (one forward step) and ``lif_grad_step`` (one reverse BPTT step) are
imported by every fused kernel (conv+LIF, linear+LIF), so the neuron's arithmetic lives in one
place. They work on fp32 tiles of any shape; the flags that select the neuron variant are
``tl.constexpr`` so each variant compiles to straight-line code.

Math (design.md section 2), with c = 1 (decay_input=False) or c = 1 - decay (decay_input=True):
    U[t] = decay * V[t-1] + c * I[t]
    S[t] = U[t] >= threshold
    V[t] = U[t] * (1 - S[t]) + v_reset * S[t]      (hard reset)
    V[t] = U[t] - threshold * S[t]                 (soft reset)
Reverse step, given g_S = dL/dS[t] and g_V = dL/dV[t] (carried from step t+1):
    g_Stot = g_S + g_V * dV/dS       (dV/dS = v_reset - U (hard) or -threshold (soft); 0 if detach_reset)
    g_U    = g_Stot * sg(U - threshold) + g_V * dV/dU      (dV/dU = 1 - S (hard) or 1 (soft))
    dL/dI[t] = c * g_U,   dL/dV[t-1] = decay * g_U
"""

import torch
import triton
import triton.language as tl

from binwslt.surrogate import SURROGATE_CODES

from .tiles import LIF_BLOCK, LIF_NUM_WARPS


def surrogate_code(name):
    """Map a surrogate name ("atan", "sigmoid", "triangle") to the integer SURROGATE constexpr
    (binwslt.surrogate.SURROGATE_CODES, as surrogate_grad below branches)."""
    try:
        return SURROGATE_CODES[name]
    except (KeyError, TypeError):
        raise ValueError(f"surrogate must be one of {sorted(SURROGATE_CODES)}, got {name!r}") from None


@triton.jit
def lif_step(v, current, decay, threshold, v_reset, HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr):
    """One forward LIF step on fp32 tiles.

    v: membrane after the previous step (V[t-1]), current: I[t]; decay/threshold/v_reset: fp32 scalars.
    Returns (u, spike, v_next): U[t], S[t] as fp32 0.0/1.0, V[t]. v_reset is ignored for soft reset.
    """
    if DECAY_INPUT:
        u = decay * v + (1.0 - decay) * current
    else:
        u = decay * v + current
    fired = u >= threshold
    spike = fired.to(tl.float32)
    if HARD_RESET:
        # where() rather than u*(1-s)+v_reset*s: identical for finite u, and exact.
        v_next = tl.where(fired, v_reset, u)
    else:
        v_next = u - threshold * spike
    return u, spike, v_next


@triton.jit
def surrogate_grad(x, alpha, SURROGATE: tl.constexpr):
    """dS/dU evaluated at x = U - threshold (fp32 tile), for SURROGATE in {0: atan, 1: sigmoid, 2: triangle}."""
    if SURROGATE == 0:
        z = 1.5707963267948966 * alpha * x
        g = (alpha * 0.5) / (1.0 + z * z)
    elif SURROGATE == 1:
        s = 1.0 / (1.0 + tl.exp(-alpha * x))
        g = alpha * s * (1.0 - s)
    else:
        g = tl.maximum(alpha - alpha * alpha * tl.abs(x), 0.0)
    return g


@triton.jit
def lif_grad_step(grad_spike, grad_v, u, spike, decay, threshold, v_reset, alpha,
                  HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                  SURROGATE: tl.constexpr):
    """One reverse BPTT step of the LIF neuron on fp32 tiles.

    grad_spike: dL/dS[t]; grad_v: dL/dV[t] carried back from step t+1 (zeros at t = T-1);
    u: U[t] from the forward scan; spike: S[t] as fp32 0.0/1.0.
    Returns (grad_current, grad_v_prev): dL/dI[t] and dL/dV[t-1].
    """
    sg = surrogate_grad(u - threshold, alpha, SURROGATE)
    if HARD_RESET:
        if DETACH_RESET:
            grad_u = grad_spike * sg + grad_v * (1.0 - spike)
        else:
            grad_u = (grad_spike + grad_v * (v_reset - u)) * sg + grad_v * (1.0 - spike)
    else:
        if DETACH_RESET:
            grad_u = grad_spike * sg + grad_v
        else:
            grad_u = (grad_spike - grad_v * threshold) * sg + grad_v
    if DECAY_INPUT:
        grad_current = (1.0 - decay) * grad_u
    else:
        grad_current = grad_u
    grad_v_prev = decay * grad_u
    return grad_current, grad_v_prev


# ----------------------------------------------------------------------------------------------
# Standalone lif op: x_seq [T, M] (any trailing shape flattened) -> spikes [T, M].
# Each program owns BLOCK neurons for all T steps; the membrane stays in registers.
# ----------------------------------------------------------------------------------------------

@triton.jit
def lif_forward_kernel(x_ptr, spike_ptr, num_neurons, num_steps, decay, threshold, v_reset,
                       HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_neurons
    v = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(num_steps):
        # Offsets recomputed from t (int64), not pointers stepped in the loop: a loop-carried pointer loses
        # Triton's alignment facts, which de-vectorises the loads and round-trips pointers through shared memory.
        off = tl.cast(t, tl.int64) * num_neurons + offs
        current = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u, spike, v = lif_step(v, current, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
        tl.store(spike_ptr + off, spike.to(spike_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lif_backward_kernel(x_ptr, grad_spike_ptr, grad_x_ptr, num_neurons, num_steps,
                        decay, threshold, v_reset, alpha,
                        HARD_RESET: tl.constexpr, DECAY_INPUT: tl.constexpr, DETACH_RESET: tl.constexpr,
                        SURROGATE: tl.constexpr, BLOCK: tl.constexpr):
    # grad_x is fp32 [T, M]. The forward scan is recomputed from x and U[t] parked in grad_x[t]
    # (same program, same layout, so each thread reads back its own store); the reverse scan then
    # overwrites U[t] by dL/dI[t]. Nothing but x is kept between forward and backward.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num_neurons
    v = tl.zeros([BLOCK], dtype=tl.float32)
    for t in range(num_steps):
        off = tl.cast(t, tl.int64) * num_neurons + offs
        current = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        u, spike, v = lif_step(v, current, decay, threshold, v_reset, HARD_RESET, DECAY_INPUT)
        tl.store(grad_x_ptr + off, u, mask=mask)
    tl.debug_barrier()
    grad_v = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(num_steps):
        off = tl.cast(num_steps - 1 - i, tl.int64) * num_neurons + offs
        u = tl.load(grad_x_ptr + off, mask=mask, other=0.0)
        spike = (u >= threshold).to(tl.float32)
        grad_spike = tl.load(grad_spike_ptr + off, mask=mask, other=0.0).to(tl.float32)
        grad_current, grad_v = lif_grad_step(grad_spike, grad_v, u, spike, decay, threshold, v_reset, alpha,
                                             HARD_RESET, DECAY_INPUT, DETACH_RESET, SURROGATE)
        tl.store(grad_x_ptr + off, grad_current, mask=mask)


def neuron_params(neuron):
    """Unpack a LIFConfig into the scalar kernel arguments and constexpr flags.

    Returns a dict with decay, threshold, v_reset (float; 0.0 for soft reset), alpha (float),
    HARD_RESET, DECAY_INPUT, DETACH_RESET (bool) and SURROGATE (int code).
    """
    alpha = neuron.alpha  # LIFConfig fills the surrogate's default
    return {
        "decay": float(neuron.decay),
        "threshold": float(neuron.threshold),
        "v_reset": 0.0 if neuron.v_reset is None else float(neuron.v_reset),
        "alpha": float(alpha),
        "HARD_RESET": neuron.v_reset is not None,
        "DECAY_INPUT": bool(neuron.decay_input),
        "DETACH_RESET": bool(neuron.detach_reset),
        "SURROGATE": surrogate_code(neuron.surrogate),
    }


def _grid(num_neurons):
    return (triton.cdiv(num_neurons, LIF_BLOCK),)


def lif_forward(x_seq, neuron):
    """Run the LIF forward scan.

    x_seq: floating tensor [T, ...] (contiguous copy taken if needed); neuron: LIFConfig.
    Returns spikes with the shape and dtype of x_seq, values 0/1.
    """
    p = neuron_params(neuron)
    x = x_seq.contiguous()
    spikes = torch.empty_like(x)
    num_steps = x.shape[0]
    num_neurons = x.numel() // max(num_steps, 1)
    if x.numel() == 0:
        return spikes
    lif_forward_kernel[_grid(num_neurons)](
        x, spikes, num_neurons, num_steps, p["decay"], p["threshold"], p["v_reset"],
        HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], BLOCK=LIF_BLOCK, num_warps=LIF_NUM_WARPS)
    return spikes


def lif_backward(x_seq, grad_spikes, neuron):
    """BPTT through the LIF scan: dL/dx_seq from dL/dspikes.

    x_seq, grad_spikes: [T, ...] floating tensors of the same shape. Returns dL/dx_seq in x_seq.dtype.
    """
    p = neuron_params(neuron)
    x = x_seq.contiguous()
    grad_spikes = grad_spikes.contiguous()
    grad_x = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    num_steps = x.shape[0]
    num_neurons = x.numel() // max(num_steps, 1)
    if x.numel() == 0:
        return grad_x.to(x.dtype)
    lif_backward_kernel[_grid(num_neurons)](
        x, grad_spikes, grad_x, num_neurons, num_steps, p["decay"], p["threshold"], p["v_reset"], p["alpha"],
        HARD_RESET=p["HARD_RESET"], DECAY_INPUT=p["DECAY_INPUT"], DETACH_RESET=p["DETACH_RESET"],
        SURROGATE=p["SURROGATE"], BLOCK=LIF_BLOCK, num_warps=LIF_NUM_WARPS)
    return grad_x.to(x.dtype)


class LIFFunction(torch.autograd.Function):
    """Autograd wrapper: forward = lif_forward, backward = lif_backward (saves only x_seq)."""

    @staticmethod
    def forward(ctx, x_seq, neuron):
        ctx.neuron = neuron
        ctx.save_for_backward(x_seq)
        return lif_forward(x_seq, neuron)

    @staticmethod
    def backward(ctx, grad_spikes):
        (x_seq,) = ctx.saved_tensors
        return lif_backward(x_seq, grad_spikes, ctx.neuron), None


def lif(x_seq, neuron):
    """Multi-step LIF neuron (backend entry, same signature as binwslt.reference.lif).

    x_seq: floating tensor [T, ...] (validated by binwslt.functional); neuron: LIFConfig.
    Returns spikes [T, ...] in x_seq.dtype; differentiable w.r.t. x_seq with the surrogate gradient.
    """
    return LIFFunction.apply(x_seq, neuron)


__all__ = ["lif_step", "lif_grad_step", "surrogate_grad", "lif", "lif_forward", "lif_backward", "LIFFunction",
           "neuron_params", "surrogate_code", "SURROGATE_CODES"]

