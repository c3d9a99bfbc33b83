"""The LIF neuron: hand-computed traces, surrogates, gradcheck, and torch backend vs reference."""
import math

import pytest
import torch

from binwslt import LIFConfig
from binwslt import functional as Fn
from binwslt.surrogate import surrogate_grad

BACKENDS = ["reference", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_hard_reset_trace(backend):
    # λ=0.5, V_th=1: U = 0.6, 0.3+0.6=0.9, 0.45+0.6=1.05 -> fire, V=0; U = 0.6
    x = torch.full((4, 1), 0.6)
    s = Fn.lif(x, LIFConfig(decay=0.5, threshold=1.0), backend=backend)
    assert s.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_reset_and_threshold_equality_fires(backend):
    # U = 1.5 -> fire (V = 0.5); U = 0.5 + 0.5 = 1.0 -> H(0) = 1 fires; V = 0; U = 0.5
    x = torch.tensor([[1.5], [0.5], [0.5]])
    s = Fn.lif(x, LIFConfig(decay=1.0, threshold=1.0, v_reset=None), backend=backend)
    assert s.flatten().tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_decay_input_scales_the_current(backend):
    # λ=0.5, decay_input: U = 0.5*V + 0.5*I; I=1.5: 0.75, 0.375+0.75=1.125 fire
    x = torch.full((2, 1), 1.5)
    s = Fn.lif(x, LIFConfig(decay=0.5, decay_input=True), backend=backend)
    assert s.flatten().tolist() == [0.0, 1.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonzero_reset_value(backend):
    # v_reset=-0.5: fire at t0 (U=1.2), V=-0.5; U = 0.5*-0.5 + 1.2 = 0.95 -> no spike
    x = torch.full((2, 1), 1.2)
    s = Fn.lif(x, LIFConfig(decay=0.5, v_reset=-0.5), backend=backend)
    assert s.flatten().tolist() == [1.0, 0.0]


def test_surrogates_hand_values():
    x = torch.tensor([0.0, 0.5])
    atan = surrogate_grad(x, "atan", 2.0)
    assert atan[0].item() == pytest.approx(1.0)
    assert atan[1].item() == pytest.approx(1.0 / (1.0 + (math.pi / 2) ** 2))
    sig = surrogate_grad(x, "sigmoid", 4.0)
    s = 1 / (1 + math.exp(-2.0))
    assert sig[0].item() == pytest.approx(1.0)
    assert sig[1].item() == pytest.approx(4 * s * (1 - s))
    tri = surrogate_grad(torch.tensor([0.0, 0.5, 2.0]), "triangle", 1.0)
    assert tri.tolist() == pytest.approx([1.0, 0.5, 0.0])


def test_surrogate_codes_one_table():
    # the codes the Triton kernels and the C++ scans branch on come from binwslt.surrogate, one entry per surrogate
    # LIFConfig accepts, in the order of its default-sharpness table
    from binwslt import _cpu_ext
    from binwslt.config import SURROGATE_DEFAULT_ALPHA
    from binwslt.surrogate import SURROGATE_CODES

    assert list(SURROGATE_CODES) == list(SURROGATE_DEFAULT_ALPHA)
    assert sorted(SURROGATE_CODES.values()) == list(range(len(SURROGATE_CODES)))
    assert _cpu_ext.SURROGATE_CODES is SURROGATE_CODES  # the Triton kernels': tests/test_triton_lif.py


def test_hand_computed_bptt_single_step():
    # one step, U = I: dL/dI = dL/dS * σ'(I - V_th)
    x = torch.tensor([[0.8]], requires_grad=True)
    s = Fn.lif(x, LIFConfig(threshold=1.0), backend="torch")
    s.sum().backward()
    assert x.grad.item() == pytest.approx(1.0 / (1.0 + (math.pi / 2 * 2.0 * -0.2) ** 2))


NEURONS = [
    LIFConfig(decay=0.8, threshold=0.7, surrogate=sg, v_reset=vr, decay_input=di, detach_reset=dr)
    for sg in ("atan", "sigmoid", "triangle") for vr in (0.0, None, -0.2) for di in (False, True)
    for dr in (False, True)
]


@pytest.mark.parametrize("neuron", NEURONS, ids=str)
@pytest.mark.parametrize("T", [1, 3, 4])
def test_torch_matches_reference(neuron, T, scan_impl):
    g = torch.Generator().manual_seed(T)
    x = torch.randn(T, 3, 5, 7, generator=g) * (3.0 if neuron.decay_input else 1.0)
    grad = torch.randn(T, 3, 5, 7, generator=g)
    outs = {}
    for backend in BACKENDS:
        xi = x.clone().requires_grad_()
        s = Fn.lif(xi, neuron, backend=backend)
        (s * grad).sum().backward()
        outs[backend] = (s, xi.grad)
    assert torch.equal(outs["torch"][0], outs["reference"][0])
    assert outs["reference"][0].sum() > 0
    torch.testing.assert_close(outs["torch"][1], outs["reference"][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neuron", [LIFConfig(decay=0.7, threshold=0.5, surrogate="sigmoid"),
                                    LIFConfig(decay=0.9, threshold=0.6, v_reset=None, surrogate="atan")], ids=str)
def test_gradcheck_float64(neuron, scan_impl):
    # the spike is a step, so finite differences cannot see the surrogate: compare the hand-written BPTT's full
    # Jacobian with autograd's through the reference graph, in float64
    x = (torch.randn(3, 2, 4, dtype=torch.float64) * 0.8).requires_grad_()
    jac = {b: torch.autograd.functional.jacobian(lambda z: Fn.lif(z, neuron, backend=b), x) for b in BACKENDS}
    torch.testing.assert_close(jac["torch"], jac["reference"], rtol=1e-10, atol=1e-12)


def test_lif_config_validation():
    with pytest.raises(ValueError, match="surrogate"):
        LIFConfig(surrogate="relu")
    with pytest.raises(ValueError, match="decay"):
        LIFConfig(decay=1.5)
    with pytest.raises(ValueError, match="threshold"):
        LIFConfig(threshold=0.0)
    with pytest.raises(ValueError, match="v_reset"):
        LIFConfig(v_reset=2.0)
    assert LIFConfig().alpha == 2.0 and LIFConfig(surrogate="sigmoid").alpha == 4.0


def test_lif_bad_input():
    with pytest.raises(ValueError, match="x_seq"):
        Fn.lif(torch.zeros(3))
    with pytest.raises(TypeError, match="x_seq"):
        Fn.lif(torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="backend"):
        Fn.lif(torch.zeros(3, 2), backend="cuda")
    with pytest.raises(TypeError, match="neuron"):
        Fn.lif(torch.zeros(3, 2), neuron={"decay": 0.5})
