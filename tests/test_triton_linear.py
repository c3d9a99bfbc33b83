"""Fused binary linear + LIF (kernels/linear_lif.py) against binwslt.reference, through binwslt.functional."""
import itertools

import pytest
import torch
from helpers import LaunchSpy, compare_spike_dtype, compare_triton_to_reference, exact_projection, randn, saved_bytes, \
    spikes

from binwslt import functional as Fn
from binwslt.config import LIFConfig
from binwslt.spikes import mark_spikes

pytest.importorskip("triton")

RESETS = {"hard": 0.0, "soft": None}


def _dyadic_weight(C, K, seed):
    """Every |w| equal (alpha = 0.25 exactly), random signs: all currents are multiples of 1/32."""
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand((C, K), generator=g) < 0.5, -0.25, 0.25)


def _dyadic_vec(C, seed, center):
    g = torch.Generator().manual_seed(seed)
    return center + torch.randint(-2, 3, (C,), generator=g).float() / 8.0


def _layer_case(T, N, K, C, *, direct, analog, scale, shift, residual, dyadic, bn, seed=0):
    if direct:
        x = randn(N, K, seed=seed + 1)
    elif analog:
        x = randn(T, N, K, seed=seed + 1).relu()
    else:
        x = spikes(T, N, K, seed=seed + 1)
    if dyadic and (direct or analog):
        x = torch.round(x * 8.0) / 8.0
    weight = _dyadic_weight(C, K, seed + 2) if dyadic else randn(C, K, seed=seed + 2, scale=0.3)
    scores = randn(C, K, seed=seed + 3)
    kw = dict(timesteps=T if direct else None, batch_norm=bn)
    if scale:
        kw["scale"] = _dyadic_vec(C, seed + 4, 1.0) if dyadic else randn(C, seed=seed + 4, scale=0.2) + 1.0
    if shift:
        kw["shift"] = _dyadic_vec(C, seed + 5, 0.25) if dyadic else randn(C, seed=seed + 5, scale=0.2) + 0.25
    if residual:
        res = randn(T, N, C, seed=seed + 6, scale=0.5)
        kw["residual"] = torch.round(res * 8.0) / 8.0 if dyadic else res
    if bn:
        kw["running_mean"] = randn(C, seed=seed + 7, scale=0.1)
        kw["running_var"] = randn(C, seed=seed + 8, scale=0.1).abs() + 1.0
    return x, weight, scores, kw


def _compare(x, weight, scores, prune_rate, kw, **tolerances):
    return compare_triton_to_reference("binw_linear_lif", x, weight, scores, prune_rate, kw, **tolerances)


GRID = list(itertools.product(
    [1, 3, 5],                 # T
    ["spike", "analog", "direct"],
    [(True, True, False), (False, True, True), (False, False, False)],  # scale, shift, residual
))


@pytest.mark.parametrize("T,kind,epilogue", GRID)
def test_linear_lif_dyadic_bit_identical(T, kind, epilogue):
    """Dyadic weights (all |w| = 0.125), inputs, scale/shift, residual and decay: spikes bit-identical."""
    scale, shift, residual = epilogue
    x, weight, scores, kw = _layer_case(T, 5, 37, 19, direct=kind == "direct", analog=kind == "analog",
                                        scale=scale, shift=shift, residual=residual, dyadic=True, bn=False, seed=T)
    if kind == "spike" and not shift:
        kw["shift"] = torch.full((19,), 0.25)  # spikes x 0.125 alone rarely reach threshold in T=1
    kw["neuron"] = LIFConfig(decay=0.75 if T != 3 else 0.5)
    _compare(x, weight, scores, 0.4, kw, exact=True)


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("decay_input", [False, True])
@pytest.mark.parametrize("surrogate,detach_reset", [("atan", False), ("sigmoid", True), ("triangle", False)])
def test_linear_lif_neuron_variants(reset, decay_input, surrogate, detach_reset):
    """Every neuron variant through the fused backward (spiking input, scale + shift + residual)."""
    x, weight, scores, kw = _layer_case(3, 4, 40, 21, direct=False, analog=False, scale=True, shift=True,
                                        residual=True, dyadic=True, bn=False, seed=11)
    if decay_input:
        kw["shift"] = kw["shift"] * 4.0 + 1.0
        kw["residual"] = kw["residual"] * 4.0
    kw["neuron"] = LIFConfig(decay=0.5, v_reset=RESETS[reset], decay_input=decay_input, surrogate=surrogate,
                             detach_reset=detach_reset)
    _compare(x, weight, scores, 0.3, kw, exact=True)


@pytest.mark.parametrize("kind", ["spike", "analog", "direct"])
@pytest.mark.parametrize("residual", [False, True])
def test_linear_lif_random_general(kind, residual):
    """General random inputs and weights, default neuron (decay 0.99): mismatch <= 1e-3, gradients close."""
    x, weight, scores, kw = _layer_case(4, 6, 45, 33, direct=kind == "direct", analog=kind == "analog",
                                        scale=True, shift=True, residual=residual, dyadic=False, bn=False, seed=21)
    kw["neuron"] = LIFConfig()
    _compare(x, weight, scores, 0.5, kw, exact=False)


@pytest.mark.parametrize("kind", ["spike", "analog", "direct"])
@pytest.mark.parametrize("affine", [False, True])
def test_linear_lif_batch_norm_train(kind, affine):
    """Training-mode BatchNorm over (T, N): spikes, every gradient and the running statistics."""
    x, weight, scores, kw = _layer_case(3, 6, 33, 19, direct=kind == "direct", analog=kind == "analog",
                                        scale=affine, shift=affine, residual=kind == "spike", dyadic=False, bn=True,
                                        seed=31)
    kw["neuron"] = LIFConfig(decay=0.8)
    kw["momentum"] = 0.2
    _compare(x, weight, scores, 0.4, kw, exact=False)


def test_linear_lif_single_sample_and_t1():
    x, weight, scores, kw = _layer_case(1, 1, 17, 3, direct=False, analog=True, scale=True, shift=True,
                                        residual=False, dyadic=True, bn=False, seed=41)
    kw["shift"] = torch.tensor([0.75, 1.25, 0.5])
    kw["neuron"] = LIFConfig(decay=0.5)
    _compare(x, weight, scores, 0.2, kw, exact=True)


def test_linear_lif_saved_bytes_small():
    """Distinct bytes saved for backward, parameters not counted: spikes as bits, y as int16, the mask bits and
    per-channel statistics - nothing else."""
    T, N, F_in, F_out = 4, 8, 64, 32
    x, weight, scores, kw = _layer_case(T, N, F_in, F_out, direct=False, analog=False, scale=True, shift=True,
                                        residual=False, dyadic=False, bn=True, seed=61)
    kw["neuron"] = LIFConfig()
    scores_leaf = scores.clone().requires_grad_(True)
    xs = mark_spikes(x.clone()).requires_grad_(True)  # a clone carries no spike mark
    triton_bytes = saved_bytes(lambda: Fn.binw_linear_lif(xs, weight, scores_leaf, 0.4, backend="triton", **kw),
                               exclude=(weight, scores_leaf))
    budget = 2 * T * N * F_out + x.numel() // 8 + weight.numel() // 4
    assert triton_bytes <= budget + 64 * F_out, (triton_bytes, budget)


def test_linear_lif_no_grad_path_and_fp16():
    """Inference (no autograd state) and fp16 analog input (fp16 dot, fp16 output)."""
    x, weight, scores, kw = _layer_case(3, 4, 32, 16, direct=False, analog=True, scale=True, shift=True,
                                        residual=False, dyadic=True, bn=False, seed=71)
    neuron = LIFConfig(decay=0.75)
    want = Fn.binw_linear_lif(x, weight, scores, 0.25, neuron=neuron, backend="reference", **kw)
    with torch.no_grad():
        got = Fn.binw_linear_lif(x, weight, scores, 0.25, neuron=neuron, backend="triton", **kw)
        got16 = Fn.binw_linear_lif(x.half(), weight, scores, 0.25, neuron=neuron, backend="triton", **kw)
    assert torch.equal(got, want)
    assert got16.dtype == torch.float16 and torch.equal(got16.float(), want)


@pytest.mark.gpu
@pytest.mark.parametrize("bn", [False, True])
def test_linear_lif_gpu_model_size(bn):
    """CONV-4's fc 8192 -> 256 at T=4, N=128 on the GPU against the reference on the CPU (fp32, no TF32).
    General inputs: at most 1e-3 of the neurons may flip (FMA contraction), those are masked out of both backwards
    and every gradient is compared. rtol 1e-3, atol 1e-4 x the gradient's max: 8192-term fp32 sums (and the
    T*N-term score gradients) added in another order drift ~1e-5 of the terms' scale, which elements that cancel
    to ~0 inherit."""
    g = torch.Generator().manual_seed(0)
    T, N, K, C = 4, 128, 8192, 256
    x = (torch.rand((T, N, K), generator=g) < 0.2).float()
    weight = torch.randn((C, K), generator=g) * (2.0 / K) ** 0.5
    scores = torch.randn((C, K), generator=g)
    kw = dict(neuron=LIFConfig(), batch_norm=bn, scale=torch.ones(C) * 0.5, shift=torch.full((C,), 0.5))
    if bn:
        kw.update(running_mean=torch.zeros(C), running_var=torch.ones(C))
    _compare(x, weight, scores, 0.4, kw, exact=False, grad_rtol=1e-3, grad_atol=1e-4, atol_relative=True)


def test_linear_lif_training_steps_same_masks():
    """A few SGD steps of a small direct-encoded MLP (BN, LIF) on triton and on reference: same masks, same loss."""
    from binwslt.nn import BinWLinearLIF

    def build(backend):
        torch.manual_seed(0)
        hidden = torch.nn.ModuleList([
            BinWLinearLIF(20, 24, prune_rate=0.5, timesteps=3, backend=backend),
            BinWLinearLIF(24, 16, prune_rate=0.5, backend=backend)])
        readout = torch.nn.Linear(16, 4)
        return hidden, readout

    def run(backend):
        hidden, readout = build(backend)
        params = [p for p in list(hidden.parameters()) + list(readout.parameters()) if p.requires_grad]
        opt = torch.optim.SGD(params, lr=2.0)
        x = randn(8, 20, seed=81)
        target = torch.arange(8) % 4
        losses, masks = [], []
        for _ in range(3):
            out = x
            for layer in hidden:
                out = layer(out)
            loss = torch.nn.functional.cross_entropy(readout(out.mean(0)), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            masks.append([layer.mask().clone() for layer in hidden])
        return losses, masks

    losses_ref, masks_ref = run("reference")
    losses_tri, masks_tri = run("triton")
    assert any(not torch.equal(m0, m2) for m0, m2 in zip(masks_ref[0], masks_ref[-1])), "masks never changed"
    for step_ref, step_tri in zip(masks_ref, masks_tri):
        for m_ref, m_tri in zip(step_ref, step_tri):
            assert torch.equal(m_ref, m_tri)
    torch.testing.assert_close(torch.tensor(losses_tri), torch.tensor(losses_ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("shape", [(3, 5, 37, 19), (2, 4, 64, 16)], ids=str)
def test_linear_lif_spike_input_dtypes(shape, dtype):
    """Spikes in every dtype a fused layer or a caller hands over, read by the kernel as they are (converted to
    int8 in registers), odd and tile-multiple K: spikes bit-identical to the reference on the fp32 twin, gradients
    within rtol 1e-4."""
    x, weight, scores, kw = _layer_case(*shape, direct=False, analog=False, scale=True, shift=True, residual=True,
                                        dyadic=True, bn=False, seed=shape[2])
    compare_spike_dtype("binw_linear_lif", x, weight, scores, 0.4, dict(kw, neuron=LIFConfig(decay=0.75)), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_lif_chain_hands_spikes_on_without_a_pass(dtype, monkeypatch):
    """Two fused linear layers: the second layer's forward kernel reads the first layer's output storage itself
    (data_ptr equality: no cast pass; before, the spikes were cast to int8 in a pass of their own). Spikes
    bit-identical to the reference chain; for the fp32 chain every gradient (x, both layers' scores, scale, shift)
    within rtol 1e-4 (a bf16 chain's gradient between the layers is bf16 itself; one layer: the test above)."""
    from binwslt.kernels import linear_lif
    x = spikes(3, 5, 37, seed=91)
    layers = [_layer_case(3, 5, k, c, direct=False, analog=False, scale=True, shift=True, residual=False,
                          dyadic=True, bn=False, seed=92 + 10 * i)[1:] for i, (k, c) in enumerate(((37, 24), (24, 9)))]
    spy = LaunchSpy(linear_lif.binary_linear_lif_fwd_kernel)
    monkeypatch.setattr(linear_lif, "binary_linear_lif_fwd_kernel", spy)

    def run(backend, x_dtype):
        leaves = [x.clone().to(x_dtype).requires_grad_(True)]
        out = mark_spikes(leaves[0])
        for weight, scores, kw in layers:
            kw = {k: (v.clone().requires_grad_(True) if k in ("scale", "shift") else v) for k, v in kw.items()}
            scores = scores.clone().requires_grad_(True)
            leaves += [scores, kw["scale"], kw["shift"]]
            out = Fn.binw_linear_lif(out, weight, scores, 0.4, neuron=LIFConfig(decay=0.75), backend=backend, **kw)
        return out, leaves

    want, want_leaves = run("reference", torch.float32)
    got, got_leaves = run("triton", dtype)
    assert [call[0].dtype for call in spy.calls] == [dtype, dtype]
    assert spy.calls[1][0].data_ptr() == spy.calls[0][6].data_ptr(), "the second layer's kernel read a copy"
    assert got.dtype == dtype and torch.equal(got.float(), want)
    assert 0.02 < want.mean() < 0.98
    if dtype != torch.float32:
        return
    proj = exact_projection(want.shape)
    want_grads = torch.autograd.grad((want * proj.float()).sum(), want_leaves)
    got_grads = torch.autograd.grad((got * proj.float()).sum(), got_leaves)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"leaf {i}: {m}")
