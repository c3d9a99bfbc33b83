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


def exact_projection(shape, seed=123):
    """`benchmarks.gpu_check_compare.projection` rounded to multiples of 1/8 (|p| < 8): exact in fp16 and bf16, so a
    backward driven through fp16/bf16 spikes gets the same dL/dspikes as its fp32 twin."""
    from benchmarks.gpu_check_compare import projection
    return (torch.round(projection(shape, seed) * 8.0) / 8.0).clamp(-7.875, 7.875)


def compare_spike_dtype(op, x, weight, scores, prune_rate, kw, dtype):
    """``op`` on backend="triton" with the 0/1 spikes ``x`` (fp32, marked) handed over in ``dtype`` (fp32, fp16,
    bf16: marked as a fused layer marks its output; uint8) against the reference on the fp32 ``x``: spikes
    bit-identical (the inputs are dyadic), gradients of the float leaves within rtol 1e-4. x's own gradient comes
    back in x's dtype: one rounding of the fp32 value, so it is compared within that dtype's epsilon."""
    from benchmarks.gpu_check_compare import backward
    want, want_leaves, _ = run_forward(op, "reference", x, weight, scores, prune_rate, kw, device="cpu")
    x_in = x.to(dtype)
    if x_in.is_floating_point():
        x_in = mark_spikes(x_in)
    got, got_leaves, _ = run_forward(op, "triton", x_in, weight, scores, prune_rate, kw, device=TRITON_DEVICE)
    assert got.dtype == (dtype if x_in.is_floating_point() else torch.float32), got.dtype
    assert 0.02 < want.float().mean() < 0.98, f"degenerate test input: firing rate {want.float().mean():.3f}"
    assert torch.equal(got.detach().float().cpu(), want.detach()), "spikes differ"
    proj = exact_projection(want.shape)
    want_grads = backward(want, want_leaves, proj)
    got_grads = backward(got, got_leaves, proj)
    assert set(got_grads) == set(want_grads) - ({"x"} if dtype == torch.uint8 else set()), sorted(got_grads)
    for name, grad in got_grads.items():
        rtol = torch.finfo(dtype).eps if name == "x" and dtype != torch.float32 else 1e-4
        torch.testing.assert_close(grad.float().cpu(), want_grads[name], rtol=rtol, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")


class LaunchSpy:
    """Stands in for a @triton.jit kernel (monkeypatched into its launcher's module) and records the positional
    arguments of every launch before launching the kernel itself."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(args)
            return self.kernel[grid](*args, **kwargs)
        return launch
