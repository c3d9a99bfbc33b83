"""The torch backend's fused binary conv/linear + LIF against the reference: spikes identical, every gradient close."""
import itertools

import pytest
import torch

from binwslt import LIFConfig
from binwslt import functional as Fn
from binwslt import torch_backend

from helpers import assert_close_grads, randn, run_layer, saved_bytes, spikes

NEURONS = [LIFConfig(decay=0.75, threshold=0.8, v_reset=vr, decay_input=di, surrogate=sg, detach_reset=dr)
           for vr, di, sg, dr in itertools.product((0.0, None), (False, True), ("atan", "sigmoid", "triangle"),
                                                   (False, True))]
CONV_CASES = [  # T, N, C_in, C_out, H, W, k, stride, padding
    (1, 2, 3, 5, 7, 7, 3, 1, 1),
    (3, 1, 5, 3, 9, 8, 3, 2, 0),
    (4, 2, 3, 19, 7, 9, 3, 2, 1),
    (3, 2, 19, 5, 5, 5, 1, 1, 0),
]


def _conv_inputs(case, seed=0, direct=False):
    T, N, C_in, C_out, H, W, k, stride, padding = case
    x = randn(N, C_in, H, W, seed=seed) if direct else spikes(T, N, C_in, H, W, seed=seed)
    weight = randn(C_out, C_in, k, k, seed=seed + 1)
    scores = randn(C_out, C_in, k, k, seed=seed + 2)
    return x, weight, scores, dict(stride=stride, padding=padding)


def _compare(op, x, weight, scores, prune_rate, **kw):
    got = run_layer(op, "torch", x, weight, scores, prune_rate, **dict(kw))
    want = run_layer(op, "reference", x, weight, scores, prune_rate, **dict(kw))
    assert torch.equal(got[0], want[0])
    assert 0 < want[0].mean() < 1, "the case must both fire and stay silent somewhere"
    assert_close_grads(got[1], want[1])
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("neuron", NEURONS, ids=str)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_conv_lif_matches_reference(case, neuron):
    x, weight, scores, geo = _conv_inputs(case)
    C_out = weight.shape[0]
    scale, shift = randn(C_out, seed=5, scale=0.1) + 0.6, randn(C_out, seed=6, scale=0.2)
    if neuron.decay_input:
        scale = scale * 4
    _compare("binw_conv2d_lif", x, weight, scores, 0.4, scale=scale, shift=shift, neuron=neuron, **geo)


@pytest.mark.parametrize("use_residual", [False, True])
@pytest.mark.usefixtures("scan_impl")
@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("case", CONV_CASES[1:3], ids=str)
def test_conv_lif_epilogues(case, direct, batch_norm, use_residual):
    x, weight, scores, geo = _conv_inputs(case, seed=3, direct=direct)
    T, N, C_out = case[0], case[1], weight.shape[0]
    out_hw = [(s + 2 * geo["padding"] - case[6]) // geo["stride"] + 1 for s in case[4:6]]
    kw = dict(neuron=LIFConfig(decay=0.9, threshold=0.5), timesteps=T if direct else None, **geo)
    kw.update(scale=randn(C_out, seed=7, scale=0.1) + 1.0, shift=randn(C_out, seed=8, scale=0.1))
    if use_residual:
        kw["residual"] = randn(T, N, C_out, *out_hw, seed=9, scale=0.3)
    if batch_norm:
        kw.update(batch_norm=True, running_mean=torch.zeros(C_out), running_var=torch.ones(C_out), momentum=0.3)
    _compare("binw_conv2d_lif", x, weight, scores, 0.5, **kw)


@pytest.mark.parametrize("neuron", NEURONS[:6], ids=str)
@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("analog", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_linear_lif_matches_reference(neuron, direct, analog, batch_norm):
    T, N, F_in, F_out = 3, 5, 33, 19
    if direct:
        x = randn(N, F_in, seed=1)
    else:
        x = randn(T, N, F_in, seed=1).abs() if analog else spikes(T, N, F_in, seed=1)
    weight, scores = randn(F_out, F_in, seed=2), randn(F_out, F_in, seed=3)
    kw = dict(neuron=neuron, timesteps=T if direct else None, residual=randn(T, N, F_out, seed=4, scale=0.2),
              scale=randn(F_out, seed=5, scale=0.1) + (3.0 if neuron.decay_input else 0.7),
              shift=randn(F_out, seed=6, scale=0.1))
    if batch_norm:
        kw.update(batch_norm=True, running_mean=torch.zeros(F_out), running_var=torch.ones(F_out))
    _compare("binw_linear_lif", x, weight, scores, 0.3, **kw)


def test_uint8_and_bool_spikes_give_float32():
    x, weight, scores, geo = _conv_inputs(CONV_CASES[0])
    want = Fn.binw_conv2d_lif(x, weight, scores, 0.4, backend="torch", **geo)
    for dtype in (torch.uint8, torch.bool):
        got = Fn.binw_conv2d_lif(x.to(dtype), weight, scores, 0.4, backend="torch", **geo)
        assert got.dtype == torch.float32 and torch.equal(got, want)


def test_non_contiguous_input():
    x, weight, scores, geo = _conv_inputs(CONV_CASES[2])
    x_nc = x.permute(0, 1, 2, 4, 3).contiguous().permute(0, 1, 2, 4, 3)
    assert not x_nc.is_contiguous()
    for backend in ("reference", "torch"):
        assert torch.equal(Fn.binw_conv2d_lif(x_nc, weight, scores, 0.4, backend=backend, **geo),
                           Fn.binw_conv2d_lif(x, weight, scores, 0.4, backend=backend, **geo))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradcheck_epilogue_and_conv_backward(monkeypatch, batch_norm):
    """gradcheck (float64, finite differences) of the hand-written backward through conv, BN, scale, shift and
    residual, with the LIF replaced by the identity (its step has no finite-difference gradient; the BPTT is
    checked against the reference's Jacobian in test_lif.py)."""
    monkeypatch.setattr(torch_backend, "_lif_spikes", lambda current, neuron: current.clone())
    monkeypatch.setattr(torch_backend, "_lif_grad", lambda current, grad, neuron: grad)
    T, N, C_in, C_out = 2, 1, 2, 3
    x = randn(T, N, C_in, 4, 4, seed=1).double().requires_grad_()
    weight, scores = randn(C_out, C_in, 3, 3, seed=2).double(), randn(C_out, C_in, 3, 3, seed=3).double()
    scale = (randn(C_out, seed=4) * 0.1 + 1).double().requires_grad_()
    shift = randn(C_out, seed=5).double().requires_grad_()
    residual = randn(T, N, C_out, 2, 2, seed=6).double().requires_grad_()

    def layer(x, scale, shift, residual):
        return Fn.binw_conv2d_lif(x, weight, scores, 0.4, stride=2, padding=1, scale=scale, shift=shift,
                                  residual=residual, batch_norm=batch_norm, backend="torch")

    assert torch.autograd.gradcheck(layer, (x, scale, shift, residual))


def test_saved_state_is_compact():
    """Spike input saved as bits, the pre-activation as int16: far below the reference's float tensors."""
    T, N, C_in, C_out = 4, 2, 16, 16
    x = spikes(T, N, C_in, 8, 8)
    weight, scores = randn(C_out, C_in, 3, 3, seed=1), randn(C_out, C_in, 3, 3, seed=2).requires_grad_()
    saved = {b: saved_bytes(lambda: Fn.binw_conv2d_lif(x, weight, scores, 0.4, padding=1, batch_norm=True,
                                                       backend=b), exclude=(weight, scores))
             for b in ("reference", "torch")}
    out_elems = T * N * C_out * 8 * 8
    # int16 pre-activation + input bits + int8 ternary weight + per-channel statistics
    assert saved["torch"] <= 2 * out_elems + x.numel() // 8 + weight.numel() + 1024
    assert saved["torch"] * 8 <= saved["reference"]


@pytest.mark.parametrize("mode", ["fp32", "auto"])
def test_forward_gemm_modes_match_reference(monkeypatch, mode):
    """BINWSLT_CPU_MATMUL=fp32 forces the fp32 path (CPUs without int8 dot products); auto takes int8 where the
    CPU has it: both give the reference's spikes and gradients, conv and linear."""
    from binwslt import cpu

    monkeypatch.setenv(cpu.ENV_VAR, mode)
    assert cpu.matmul_mode() == ("fp32" if mode == "fp32" else cpu.cpu_info()["matmul"])
    x, weight, scores, geo = _conv_inputs(CONV_CASES[2], seed=4)
    C_out = weight.shape[0]
    _compare("binw_conv2d_lif", x, weight, scores, 0.4, neuron=LIFConfig(decay=0.9, threshold=0.5),
             batch_norm=True, running_mean=torch.zeros(C_out), running_var=torch.ones(C_out), **geo)
    x = spikes(3, 5, 40, seed=2)
    weight, scores = randn(7, 40, seed=3), randn(7, 40, seed=4)
    _compare("binw_linear_lif", x, weight, scores, 0.3, neuron=LIFConfig(decay=0.9, threshold=0.5),
             scale=randn(7, seed=5, scale=0.1) + 0.7)


def test_forward_gemm_mode_is_checked(monkeypatch):
    from binwslt import cpu

    monkeypatch.setenv(cpu.ENV_VAR, "fp8")
    with pytest.raises(ValueError, match="BINWSLT_CPU_MATMUL"):
        cpu.matmul_mode()


def test_grad_precision_bf16_is_one_rounded_term():
    """grad_precision="bf16": same spikes, gradients within bf16's rounding of g (not the split's 1e-4)."""
    x, weight, scores, geo = _conv_inputs(CONV_CASES[0], seed=2)
    kw = dict(neuron=LIFConfig(decay=0.9, threshold=0.5), scale=randn(5, seed=3, scale=0.1) + 0.8, **geo)
    got = run_layer("binw_conv2d_lif", "torch", x, weight, scores, 0.4, grad_precision="bf16", **dict(kw))
    want = run_layer("binw_conv2d_lif", "reference", x, weight, scores, 0.4, **dict(kw))
    assert torch.equal(got[0], want[0])
    assert_close_grads(got[1], want[1], rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="grad_precision"):
        Fn.binw_conv2d_lif(x, weight, scores, 0.4, grad_precision="fp8", **geo)


@pytest.mark.parametrize("direct", [False, True])
def test_compiled_scan_takes_channels_last_steps(direct):
    """The compiled scan runs on any dense step layout (channels-last here), forward and BPTT, as the reference."""
    from binwslt import _cpu_ext, reference

    if _cpu_ext.load() is None:
        pytest.skip("the CPU scan extension did not build here")
    neuron = LIFConfig(decay=0.8, threshold=0.5, surrogate="sigmoid")
    base = randn(3, 4, 5, 6, seed=3).to(memory_format=torch.channels_last)  # [N, C, H, W] frames
    current = base.expand(4, *base.shape) if direct else \
        randn(4 * 3, 4, 5, 6, seed=4).to(memory_format=torch.channels_last).view(4, 3, 4, 5, 6)
    assert not current[0].is_contiguous() and torch_backend._fused_scan_ext(current) is not None
    leaf = current.detach().clone().requires_grad_()
    got = torch.ops.binwslt.lif_forward(current, *torch_backend._neuron_args(neuron))
    want = reference.lif(leaf, neuron)
    assert torch.equal(got, want)
    proj = randn(*got.shape, seed=5)
    (want * proj).sum().backward()
    grad = torch_backend._lif_grad(current, proj, neuron)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-5, atol=1e-6)


def test_cpu_info_names_the_forward_mode(monkeypatch):
    import binwslt
    from binwslt import cpu

    info = binwslt.cpu_info()
    assert info["matmul"] in ("int8", "fp32") and isinstance(info["flags"], list)
    monkeypatch.setenv(cpu.ENV_VAR, "fp32")
    assert binwslt.cpu_info()["matmul"] == "fp32"
    assert "forward GEMM fp32" in cpu.version_line()
