"""The standalone Triton LIF op (kernels/lif.py) against binwslt.reference, through binwslt.functional."""
import itertools

import pytest
import torch

from binwslt import functional as Fn
from binwslt.config import LIFConfig

pytest.importorskip("triton")

RESETS = {"hard0": 0.0, "hard_neg": -0.5, "soft": None}


def _run(x, neuron, backend, grad):
    leaf = x.detach().clone().requires_grad_(True)
    out = Fn.lif(leaf, neuron, backend=backend)
    (out * grad).sum().backward()
    return out.detach(), leaf.grad


def _dyadic(shape, seed, decay_input):
    g = torch.Generator().manual_seed(seed)
    x = torch.round(torch.randn(shape, generator=g) * 8.0) / 8.0  # multiples of 1/8
    return x * 2.0 + 1.0 if decay_input else x * 0.75 + 0.5


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid", "triangle"])
@pytest.mark.parametrize("T", [1, 3, 5])
def test_lif_dyadic_matches_reference(reset, decay_input, detach_reset, surrogate, T):
    """Dyadic inputs and decay: spikes bit-identical, every gradient within fp32 rounding of the reference."""
    decay = 0.75 if T != 3 else 0.5
    neuron = LIFConfig(decay=decay, v_reset=RESETS[reset], decay_input=decay_input, surrogate=surrogate,
                       detach_reset=detach_reset)
    x = _dyadic((T, 3, 7, 11), seed=T, decay_input=decay_input)  # 231 neurons: one program, masked tail
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    s_ref, g_ref = _run(x, neuron, "reference", grad)
    s_tri, g_tri = _run(x, neuron, "triton", grad)
    assert s_tri.dtype == x.dtype and s_tri.shape == x.shape
    assert torch.equal(s_tri, s_ref)
    assert 0.05 < s_ref.mean() < 0.95, "inputs should make some but not all neurons fire"
    torch.testing.assert_close(g_tri, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("decay_input", [False, True])
def test_lif_random_matches_reference(reset, decay_input):
    """General inputs, default decay 0.99, several programs (M = 2310 > BLOCK)."""
    neuron = LIFConfig(v_reset=RESETS[reset], decay_input=decay_input)
    g = torch.Generator().manual_seed(7)
    x = torch.randn((4, 2, 1155), generator=g) * 0.8 + (60.0 if decay_input else 0.5)
    grad = torch.randn(x.shape, generator=g)
    s_ref, g_ref = _run(x, neuron, "reference", grad)
    s_tri, g_tri = _run(x, neuron, "triton", grad)
    mismatch = (s_tri != s_ref).float().mean().item()
    assert mismatch <= 1e-3
    assert 0.05 < s_ref.mean() < 0.95
    same = (s_tri == s_ref).all(0)  # compare gradients of neurons whose whole spike train agrees
    torch.testing.assert_close(g_tri[:, same], g_ref[:, same], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_lif_low_and_double_precision(dtype):
    """Output keeps x's dtype; fp16/bf16 are computed in fp32 (mismatch vs the fp32 reference <= 1e-3)."""
    neuron = LIFConfig(decay=0.75)
    x32 = _dyadic((3, 5, 40), seed=3, decay_input=False)
    x = x32.to(dtype)  # multiples of 1/8 below 2**8: exact in every dtype here
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    s_ref, g_ref = _run(x32, neuron, "reference", grad)
    s_tri, g_tri = _run(x, neuron, "triton", grad.to(dtype))
    assert s_tri.dtype == dtype and g_tri.dtype == dtype
    assert torch.equal(s_tri.float(), s_ref)
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(g_tri.float(), g_ref, rtol=tol, atol=tol)


def test_lif_store_every_output():
    """conftest NaN-fills torch.empty: any neuron the kernel forgot would be NaN (here M = 1 and M = 1025)."""
    neuron = LIFConfig(decay=0.5)
    for m in (1, 1025):
        x = torch.full((2, m), 0.75)
        x.requires_grad_(True)
        s = Fn.lif(x, neuron, backend="triton")
        s.sum().backward()
        assert torch.equal(s.detach(), torch.tensor([[0.0], [1.0]]).expand(2, m))
        assert torch.isfinite(x.grad).all()


def test_lif_non_contiguous_input():
    neuron = LIFConfig(decay=0.5)
    x = _dyadic((6, 4, 3), seed=5, decay_input=False).transpose(0, 2)  # [3, 4, 6], non-contiguous
    assert torch.equal(Fn.lif(x, neuron, backend="triton"), Fn.lif(x, neuron, backend="reference"))


def test_lif_helpers_reject_unknown_surrogate():
    from binwslt.kernels.lif import surrogate_code

    with pytest.raises(ValueError, match="surrogate"):
        surrogate_code("relu")


def test_lif_surrogate_codes_are_the_one_table():
    from binwslt.kernels import lif as triton_lif
    from binwslt.surrogate import SURROGATE_CODES

    assert triton_lif.SURROGATE_CODES is SURROGATE_CODES
    assert [triton_lif.surrogate_code(name) for name in SURROGATE_CODES] == list(SURROGATE_CODES.values())


@pytest.mark.gpu
@pytest.mark.parametrize("surrogate,reset", list(itertools.product(["atan", "sigmoid", "triangle"], RESETS)))
def test_lif_gpu_large(surrogate, reset):
    """Real GPU, realistic size: spike mismatch <= 1e-3 (FMA contraction may move an ulp), gradients close."""
    neuron = LIFConfig(v_reset=RESETS[reset], surrogate=surrogate)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn((4, 128, 64, 16, 16), generator=g, device="cuda") + 0.5
    grad = torch.randn(x.shape, generator=g, device="cuda")
    s_ref, g_ref = _run(x, neuron, "torch", grad)
    s_tri, g_tri = _run(x, neuron, "triton", grad)
    assert (s_tri != s_ref).float().mean().item() <= 1e-3
    same = (s_tri == s_ref).all(0)
    torch.testing.assert_close(g_tri[:, same], g_ref[:, same], rtol=1e-5, atol=1e-6)


def test_compile_report_parsers():
    """The two tool outputs compile_report reads (cuobjdump resource usage, ptxas -v spill line)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compile_report.py"
    spec = importlib.util.spec_from_file_location("compile_report_under_test", path)
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    usage = report.parse_resource_usage(
        " Function lif_backward_kernel:\n  REG:62 STACK:8 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0")
    assert usage == {"REG": 62, "STACK": 8, "SHARED": 0, "LOCAL": 0}
    spills = report.parse_ptxas_spills("    8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n")
    assert spills == {"spill_stores": 16, "spill_loads": 12}
    with pytest.raises(ValueError, match="spill"):
        report.parse_ptxas_spills("ptxas info: nothing here")


def test_compile_report_compiles_lif_backward_for_sm80_sm90():
    """Ahead-of-time compile (no GPU needed) of one lif backward variant: a clean row per arch, exit status 0."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    name = "lif_backward_kernel[fp32,hard=True,decay_input=False,detach=False,atan]"
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "compile_report.py"), "--module", "lif",
                           "--filter", name, "--jobs", "1"], capture_output=True, text=True, env=env, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(name)]
    assert [row.split()[0] for row in rows] == ["sm_80", "sm_90"]
    assert all(" ok " in row for row in rows)
