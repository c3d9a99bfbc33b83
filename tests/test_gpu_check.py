"""The spike/gradient comparison every GPU check uses (benchmarks/gpu_check_compare.py) can fail."""
import pytest
import torch
from helpers import randn

from benchmarks.gpu_check_compare import compare, grad_error
from binwslt import functional as Fn
from binwslt.config import LIFConfig


def _lif_run(x, shift=None, grad_scale=1.0):
    """(out, leaves, stats) of a LIF on ``x`` (+ ``shift`` on the current); ``grad_scale`` scales the gradient
    that reaches x, as a wrong backward would."""
    leaf = x.clone().requires_grad_(True)
    current = leaf * grad_scale - leaf.detach() * (grad_scale - 1.0)  # same value, gradient times grad_scale
    if shift is not None:
        current = current + shift
    return Fn.lif(current, LIFConfig(decay=0.5), backend="reference"), {"x": leaf}, {}


def test_flipped_neurons_are_masked_and_bounded():
    x = randn(4, 50, 40, seed=1) + 0.6
    want = _lif_run(x)
    flip = torch.zeros_like(x)
    flip[0, 3, 7] = 5.0  # this neuron fires at step 0 in one run only; its later steps differ too
    got = _lif_run(x, flip)
    result = compare(got, want, exact=False)
    assert not result.spikes_equal and result.neuron_mismatch == pytest.approx(1 / 2000)
    assert result.ok, result.failures  # the flipped neuron is masked, every other gradient agrees
    assert "x" in result.grads and result.grads["x"].close
    strict = compare(_lif_run(x, flip), _lif_run(x), exact=False, max_neuron_mismatch=1e-4)
    assert not strict.ok and "neuron mismatch" in strict.failures[0]
    exact = compare(_lif_run(x, flip), _lif_run(x), exact=True)
    assert not exact.ok and "bit-identical" in exact.failures[0]


def test_wrong_gradient_fails_even_when_spikes_agree():
    x = randn(3, 20, 16, seed=2) + 0.6
    result = compare(_lif_run(x, grad_scale=1.001), _lif_run(x), exact=True, rtol=1e-4, atol=1e-5)
    assert result.spikes_equal and not result.ok
    assert result.failures[0].startswith("grad x")
    assert result.grads["x"].max_rel_err == pytest.approx(1e-3, rel=1e-2)


def test_relative_atol_scales_with_the_gradient():
    want = torch.tensor([1e3, -1e3, 0.0], dtype=torch.float64)
    got = want + torch.tensor([0.0, 0.0, 0.05], dtype=torch.float64)  # an element that cancelled to ~0
    assert not grad_error(got, want, rtol=1e-3, atol=1e-4).close
    assert grad_error(got, want, rtol=1e-3, atol=1e-4, atol_relative=True).close  # 0.05 <= 1e-4 * 1e3
    assert not grad_error(got * 1.01, want, rtol=1e-3, atol=1e-4, atol_relative=True).close
    assert not grad_error(got * float("nan"), want, rtol=1e-3, atol=1e-4, atol_relative=True).close


def test_run_py_reports_a_failed_check_and_does_not_time_it(monkeypatch):
    from benchmarks import run, shapes
    case = shapes.LayerCase(shapes.QUICK_LAYERS[3], 2, 2)
    real = run.check_case(case=case, kind="layer", impl="torch", device="cpu", dtype=torch.float32)
    assert real["ok"] and real["spike_mismatch"] == 0.0 and "scores" in real["grad_max_rel_err"]
    monkeypatch.setattr(run, "check_case", lambda *a, **k: {"ok": False, "failures": ["planted"]})
    entry = run.measure_case("layer", case, ("reference", "torch"), "cpu", torch.float32,
                             dict(rounds=1, warmup=0, budget_s=0.0))
    torch_res = entry["impls"]["torch"]
    assert torch_res["status"] == "failed" and "planted" in torch_res["reason"]
    assert "train" not in torch_res and "forward" not in torch_res
    assert entry["impls"]["reference"]["train"]["rounds"] == 1


def test_sass_counts():
    from benchmarks.gpu_check_inventory import sass_counts
    sass = """
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/              @!P0 FFMA R1, R2, R3, R1 ;
        /*0120*/                   STS.U8 [R5], R6 ;
        /*0130*/                   STS.128 [R5], R8 ;
        /*0140*/                   HGMMA.64x64x16.F32.BF16 gdesc[UR4], R24 ;
        /*0150*/                   IMMA.16832.S8.S8 R4, R8, R12, R4 ;
        /* FFMA in a comment */
    """
    assert sass_counts(sass) == {"HMMA": 1, "HGMMA": 1, "IMMA": 1, "IGMMA": 0, "FFMA": 1, "STS.U8": 1}


def test_correctness_cases_cover_the_paths():
    from benchmarks.gpu_check import CASES
    assert len(CASES) >= 12
    kinds = {(c.op, c.kind) for c in CASES}
    assert {("conv", "direct"), ("conv", "spike"), ("conv", "analog"), ("linear", "spike"),
            ("linear", "analog")} <= kinds
    assert any(c.bn for c in CASES) and any(not c.bn for c in CASES) and any(c.residual for c in CASES)
    assert sum(c.dyadic for c in CASES) >= 4 and not any(c.dyadic and c.bn for c in CASES)
    assert any(c.op == "conv" and c.geo[6] > 1 and c.geo[7] == 2 for c in CASES)  # stride 2
    assert any(c.op == "conv" and c.geo[2] == c.geo[3] == 512 for c in CASES)
