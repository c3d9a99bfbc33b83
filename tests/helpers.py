"""Shared test inputs: spikes, weights, and the runner comparing a backend's outputs and gradients.

``TRITON_DEVICE`` is where the triton backend runs in this session: "cuda" when Triton compiles for a GPU
(tests/conftest.py: a CUDA machine, unless BINWSLT_INTERPRET=1), else "cpu" under TRITON_INTERPRET=1. The
comparisons build their inputs on the CPU, run triton on ``TRITON_DEVICE`` and the reference oracle on the CPU
(no TF32 there), so the same test checks the interpreter here and the compiled kernels on a GPU.
"""
import os
import pathlib
import sys

import torch

from binwslt.spikes import mark_spikes

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.gpu_check_compare import compare, run_forward  # noqa: E402  (the one spike/gradient comparison)
from benchmarks.memory import saved_bytes  # noqa: E402,F401  (the one saved-for-backward counter)

TRITON_DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available() else "cuda"


def spikes(*shape, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return mark_spikes((torch.rand(shape, generator=g) < p).float())


def bits_rows(rows):
    """Torch reference of kernels/spike_bits.py's layout: 0/1 rows ``[R, C]`` -> uint8 ``[R, cdiv(C, 8)]``, channel
    ``c`` at bit ``c % 8`` of byte ``c // 8``, a row's last byte zero-padded."""
    rows = rows != 0
    rows = torch.cat([rows, rows.new_zeros(rows.shape[0], (-rows.shape[1]) % 8)], dim=1).view(rows.shape[0], -1, 8)
    return (rows.to(torch.int32) << torch.arange(8)).sum(-1).to(torch.uint8)


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale


def run_layer(op, backend, x, weight, scores, prune_rate, grad_seed=123, device=None, dtype=None, **kw):
    """Run ``op`` on fresh leaf copies (moved to ``device``/``dtype`` when given); return spikes and the gradients
    of a random projection of them, and the running statistics after the call."""
    from benchmarks.gpu_check_compare import backward, projection
    out, leaves, stats = run_forward(op, backend, x, weight, scores, prune_rate, kw, device=device, dtype=dtype)
    grads = backward(out, leaves, projection(out.shape, grad_seed))
    return out.detach(), grads, stats


def assert_close_grads(got, want, rtol=1e-4, atol=1e-5):
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def compare_triton_to_reference(op, x, weight, scores, prune_rate, kw, *, exact, grad_rtol=1e-4, grad_atol=1e-5,
                                atol_relative=False, max_neuron_mismatch=None):
    """Run ``op`` on triton (on ``TRITON_DEVICE``) and on the reference (CPU, float32: no TF32) and compare with
    `benchmarks.gpu_check_compare.compare`: spikes bit-identical when ``exact`` (dyadic inputs), else at most
    ``max_neuron_mismatch`` of the neurons differ (default: that module's bound) and those neurons are masked out
    of both backwards; every gradient is always compared, within ``grad_rtol``/``grad_atol`` (``atol_relative``:
    grad_atol times the gradient's max); running statistics too. Returns the reference spikes."""
    want = run_forward(op, "reference", x, weight, scores, prune_rate, kw, device="cpu")
    got = run_forward(op, "triton", x, weight, scores, prune_rate, kw, device=TRITON_DEVICE)
    assert got[0].dtype == want[0].dtype, (got[0].dtype, want[0].dtype)
    assert 0.02 < want[0].float().mean() < 0.98, f"degenerate test input: firing rate {want[0].float().mean():.3f}"
    extra = {} if max_neuron_mismatch is None else {"max_neuron_mismatch": max_neuron_mismatch}
    result = compare(got, want, exact=exact, rtol=grad_rtol, atol=grad_atol, atol_relative=atol_relative, **extra)
    assert result.ok, "; ".join(result.failures)
    assert set(result.grads) == set(want[1]), f"compared {sorted(result.grads)} of {sorted(want[1])}"
    return want[0].detach()


def one_line_error(capsys, command):
    """The stderr a CLI command printed, checked to be one ``binwslt COMMAND: error: ...`` line, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.startswith(f"binwslt {command}: error: ") and err.count("\n") == 1, err
    return err
