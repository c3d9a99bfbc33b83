"""Shared test inputs: spikes, weights, and the runner comparing a backend's outputs and gradients."""
import pathlib
import sys

import torch

from binwslt import functional as Fn
from binwslt.spikes import is_spikes, mark_spikes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.memory import saved_bytes  # noqa: E402,F401  (the one saved-for-backward counter)


def spikes(*shape, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mark_spikes((torch.rand(shape, generator=g) < p).float())


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def _leaf_like(v):
    """A fresh leaf copy of ``v`` that keeps its spike mark (binwslt.spikes)."""
    leaf = v.detach().clone().requires_grad_(True)
    return mark_spikes(leaf) if is_spikes(v) else leaf


def run_layer(op, backend, x, weight, scores, prune_rate, grad_seed=123, **kw):
    """Run ``op`` on fresh leaf copies; return spikes and the gradients of a random projection of them."""
    leaves = {"x": x, "scores": scores}
    for name in ("scale", "shift", "residual"):
        if kw.get(name) is not None:
            leaves[name] = kw[name]
    leaves = {k: _leaf_like(v) for k, v in leaves.items()}
    for name in ("scale", "shift", "residual"):
        if name in leaves:
            kw[name] = leaves[name]
    for name in ("running_mean", "running_var"):
        if kw.get(name) is not None:
            kw[name] = kw[name].clone()
    out = getattr(Fn, op)(leaves["x"], weight, leaves["scores"], prune_rate, backend=backend, **kw)
    proj = randn(*out.shape, seed=grad_seed)
    (out * proj).sum().backward()
    grads = {k: v.grad for k, v in leaves.items()}
    stats = {k: kw[k] for k in ("running_mean", "running_var") if kw.get(k) is not None}
    return out.detach(), grads, stats


def assert_close_grads(got, want, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def compare_triton_to_reference(op, x, weight, scores, prune_rate, kw, *, exact, grad_rtol=1e-4, grad_atol=1e-5):
    """Run ``op`` on the triton and reference backends: spikes bit-identical when ``exact`` (else mismatch
    <= 1e-3), every gradient within tolerance wherever the spikes agree (a flipped spike legitimately changes
    gradients), running statistics. Returns the reference spikes."""
    s_ref, g_ref, st_ref = run_layer(op, "reference", x, weight, scores, prune_rate, **dict(kw))
    s_tri, g_tri, st_tri = run_layer(op, "triton", x, weight, scores, prune_rate, **dict(kw))
    assert s_tri.shape == s_ref.shape and s_tri.dtype == s_ref.dtype
    assert 0.02 < s_ref.mean() < 0.98, f"degenerate test input: firing rate {s_ref.mean():.3f}"
    if exact:
        assert torch.equal(s_tri, s_ref)
    else:
        assert (s_tri != s_ref).float().mean().item() <= 1e-3
    if torch.equal(s_tri, s_ref):
        assert_close_grads(g_tri, g_ref, rtol=grad_rtol, atol=grad_atol)
    for name in st_ref:
        torch.testing.assert_close(st_tri[name], st_ref[name], rtol=1e-5, atol=1e-6)
    return s_ref
