"""One comparison of a fused op's spikes and gradients against an oracle's: tests, gpu_check and run.py use it.

A backend and its oracle may legitimately disagree on a spike: the membrane of a neuron sitting on its threshold
moves by an ulp when the GPU contracts a multiply-add (FMA) or sums in another order, and a flipped spike changes
every later step of that neuron and every gradient that flows through it. So gradients are never compared only
"if the spikes happen to be equal" (on GPU-sized inputs they almost never are): the backward of both runs is
driven by the same random projection of the spikes, zeroed on every neuron whose spike train differs at any
step. Then every gradient (input, scores, scale/shift or BatchNorm affine, residual) is determined by neurons
whose spikes agree, and must match within tolerance; the fraction of masked neurons is itself bounded.
On dyadic inputs (every current exact in fp32) the spikes must be identical and nothing is masked.

Shapes: op outputs are time-major ``[T, ...]``; a neuron is one element of ``out[0]``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Mapping, Optional, Tuple

import torch

# Neurons whose spike train may differ from the oracle's on general (non-dyadic) inputs: an FMA-contracted or
# reordered fp32 sum moves a membrane by ~1e-7 relative, so a spike flips only for neurons within ~1e-6 of the
# threshold; 1e-3 of the neurons is ~100x what that predicts for random currents of unit scale.
MAX_NEURON_MISMATCH = 1e-3

# General (non-dyadic) cases: rtol 1e-3 and atol 1e-4 x the gradient's max. A backend sums in fp32 (the Triton
# backward's split bf16 terms are fp32-level) in another order than the oracle: ~1e-5 of the terms' scale, which
# elements of a score gradient that cancel to ~0 over T*N*H*W positions inherit.
GENERAL_TOL = dict(rtol=1e-3, atol=1e-4, atol_relative=True)
# Dyadic cases (every current exact in fp32): identical spikes, gradients at rtol 1e-4, atol 1e-5 absolute.
DYADIC_TOL = dict(rtol=1e-4, atol=1e-5, atol_relative=False)

# The tensors a fused op takes that move to the run's device (and, if floating, its dtype).
_TENSOR_ARGS = ("scale", "shift", "residual", "running_mean", "running_var")
# The ones that get gradients.
_LEAVES = ("x", "scores", "scale", "shift", "residual")


@dataclasses.dataclass(frozen=True)
class GradError:
    """How one gradient differs from the oracle's (both taken to float64 on the CPU)."""
    max_abs_err: float
    max_rel_err: float      # max |got - want| / |want| over elements with |want| >= 1e-3 * max |want|
    rel_l2: float           # ||got - want|| / ||want||
    close: bool             # |got - want| <= atol' + rtol |want| everywhere (atol' = atol, or atol * max |want|
                            # when the atol is relative to the gradient's scale); NaN never close

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Comparison:
    """A backend's run against the oracle's: spike agreement, per-gradient errors and what failed (empty: ok)."""
    shape: Tuple[int, ...]
    firing_rate: float
    spikes_equal: bool
    spike_mismatch: float        # fraction of spikes that differ
    neuron_mismatch: float       # fraction of neurons whose spike train differs somewhere: masked in the backward
    grads: Dict[str, GradError]
    stats: Dict[str, GradError]  # running_mean / running_var after the forward
    rtol: float
    atol: float
    atol_relative: bool
    failures: Tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        return d


def move(t: Optional[torch.Tensor], device, dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """A new tensor object: ``t`` detached, on ``device``; floating tensors also cast to ``dtype`` (None: keep).
    Spikes stored as bool/uint8 keep their dtype; a float tensor marked as spikes (binwslt.spikes) keeps its
    mark."""
    if t is None:
        return None
    from binwslt.spikes import is_spikes, mark_spikes
    moved = t.detach()
    if dtype is not None and moved.is_floating_point():
        moved = moved.to(device=device, dtype=dtype)
    else:
        moved = moved.to(device=device)
    moved = moved.detach()  # a new object even when .to() had nothing to do
    return mark_spikes(moved) if is_spikes(t) and t.is_floating_point() else moved


def run_forward(op: str, backend: str, x, weight, scores, prune_rate, kw: Mapping, *, device=None,
                dtype: Optional[torch.dtype] = None):
    """Forward of ``binwslt.functional.<op>`` on fresh leaf copies moved to ``device``/``dtype``.

    Returns ``(out, leaves, stats)``: the output (with its graph), ``{name: leaf}`` for x (when floating),
    scores, scale, shift, residual, and ``{name: tensor}`` of the running statistics after the call.
    """
    from binwslt import functional as Fn
    from binwslt.spikes import is_spikes, mark_spikes
    device = x.device if device is None else torch.device(device)
    kw = dict(kw)
    leaves = {"x": move(x, device, dtype), "scores": move(scores, device, dtype)}
    for name in _TENSOR_ARGS:
        if kw.get(name) is not None:
            moved = move(kw[name], device, dtype)
            kw[name] = mark_spikes(moved.clone()) if is_spikes(moved) else moved.clone()  # a clone drops the mark
            if name in _LEAVES:
                leaves[name] = kw[name]
    leaves = {k: (v.requires_grad_(True) if v.is_floating_point() else v) for k, v in leaves.items()}
    for name in _TENSOR_ARGS:
        if name in leaves:
            kw[name] = leaves[name]
    out = getattr(Fn, op)(leaves["x"], move(weight, device, dtype), leaves["scores"], prune_rate,
                          backend=backend, **kw)
    leaves = {k: v for k, v in leaves.items() if v.requires_grad}
    stats = {k: kw[k] for k in ("running_mean", "running_var") if kw.get(k) is not None}
    return out, leaves, stats


def projection(shape, seed: int = 123) -> torch.Tensor:
    """The fixed random output gradient (float64, CPU) that drives every compared backward."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float64)


def backward(out: torch.Tensor, leaves: Mapping[str, torch.Tensor], proj: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Gradients of ``(out * proj).sum()`` to ``leaves`` (None where a leaf got none)."""
    grads = torch.autograd.grad((out * proj.to(device=out.device, dtype=out.dtype)).sum(), list(leaves.values()),
                                allow_unused=True)
    return dict(zip(leaves, grads))


def grad_error(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float,
               atol_relative: bool = False) -> GradError:
    """`GradError` of ``got`` against ``want`` (any device/dtype; compared in float64 on the CPU). With
    ``atol_relative`` the absolute tolerance is ``atol * max |want|``: a gradient summed over ~10^5 terms has
    elements that cancel to ~0 whose fp32 rounding is set by the terms, not by the element."""
    g = got.detach().to("cpu", torch.float64)
    w = want.detach().to("cpu", torch.float64)
    diff = (g - w).abs()
    scale = w.abs()
    big = scale >= 1e-3 * float(scale.max()) if scale.numel() and float(scale.max()) > 0 else scale > 0
    max_rel = float((diff[big] / scale[big]).max()) if bool(big.any()) else 0.0
    norm = float(w.norm())
    rel_l2 = float(diff.norm()) / norm if norm > 0 else float(diff.norm())
    finite = bool(torch.isfinite(g).all())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    atol_eff = atol * float(scale.max()) if atol_relative and scale.numel() else atol
    close = finite and bool(torch.allclose(g, w, rtol=rtol, atol=atol_eff))
    return GradError(max_abs, max_rel if finite else float("nan"), rel_l2 if finite else float("nan"), close)


def compare(got, want, *, exact: bool, rtol: float = 1e-4, atol: float = 1e-5,
            atol_relative: bool = False, max_neuron_mismatch: float = MAX_NEURON_MISMATCH,
            stats_rtol: float = 1e-5, stats_atol: float = 1e-6, grad_seed: int = 123) -> Comparison:
    """Compare two `run_forward` results ``(out, leaves, stats)`` (not yet backpropagated).

    ``exact``: the spikes must be bit-identical (dyadic inputs); else at most ``max_neuron_mismatch`` of the
    neurons may differ, and those are masked out of the backward of both runs (module docstring). Every
    gradient must then satisfy ``allclose(rtol, atol)`` (``atol_relative``: atol times the gradient's max, see
    `grad_error`); running statistics ``allclose(stats_rtol, stats_atol)``.
    """
    out_g, leaves_g, stats_g = got
    out_w, leaves_w, stats_w = want
    failures = []
    shape = tuple(out_w.shape)
    if tuple(out_g.shape) != shape:
        failures.append(f"output shape {tuple(out_g.shape)} != oracle's {shape}")
        return Comparison(shape, float("nan"), False, 1.0, 1.0, {}, {}, rtol, atol, atol_relative, tuple(failures))
    s_g = out_g.detach().to("cpu", torch.float64)
    s_w = out_w.detach().to("cpu", torch.float64)
    if not bool(((s_g == 0) | (s_g == 1)).all()):
        failures.append("output is not 0/1 spikes")
    differ = s_g != s_w
    spike_mismatch = float(differ.double().mean())
    same_neuron = ~differ.any(0)
    neuron_mismatch = 1.0 - float(same_neuron.double().mean())
    equal = not bool(differ.any())
    if exact and not equal:
        failures.append(f"spikes must be bit-identical (dyadic case): {int(differ.sum())} of {differ.numel()} differ")
    elif neuron_mismatch > max_neuron_mismatch:
        failures.append(f"neuron mismatch {neuron_mismatch:.2e} > {max_neuron_mismatch:.0e}")
    proj = projection(shape, grad_seed) * same_neuron.unsqueeze(0)
    grads_g, grads_w = backward(out_g, leaves_g, proj), backward(out_w, leaves_w, proj)
    errors = {}
    if set(grads_g) != set(grads_w):
        failures.append(f"gradients to {sorted(grads_g)} != oracle's {sorted(grads_w)}")
    for name in grads_w:
        if grads_w[name] is None:
            continue
        if grads_g.get(name) is None:
            failures.append(f"no gradient for {name}")
            continue
        errors[name] = grad_error(grads_g[name], grads_w[name], rtol, atol, atol_relative)
        if not errors[name].close:
            e = errors[name]
            failures.append(f"grad {name}: max abs {e.max_abs_err:.3g}, max rel {e.max_rel_err:.3g} "
                            f"(rtol {rtol:g}, atol {atol:g}{' x max' if atol_relative else ''})")
    stat_errors = {}
    for name in stats_w:
        stat_errors[name] = grad_error(stats_g[name], stats_w[name], stats_rtol, stats_atol)
        if not stat_errors[name].close:
            failures.append(f"{name}: max abs {stat_errors[name].max_abs_err:.3g}")
    return Comparison(shape, float(s_w.mean()), equal, spike_mismatch, neuron_mismatch, errors, stat_errors, rtol,
                      atol, atol_relative, tuple(failures))
