"""Fused binary conv2d + LIF (kernels/conv_lif*.py) against binwslt.reference, through binwslt.functional.

Runs under Triton's interpreter on CPU (tests/conftest.py), so shapes are tiny: the interpreter costs
milliseconds per program per dot iteration. The cases still cover odd channel counts (masked tails), channel
counts that are tile multiples (the unmasked, vectorised path), stride 2, padding 0/1, 1x1 and 3x3 kernels,
T in {1, 3, 5}, every neuron variant, direct encoding, analog input and training BatchNorm.
"""
import sys

import pytest
import torch
from helpers import LaunchSpy, compare_spike_dtype, compare_triton_to_reference, exact_projection, randn, saved_bytes, \
    spikes

from binwslt import functional as Fn
from binwslt.config import LIFConfig
from binwslt.spikes import mark_spikes

pytest.importorskip("triton")

RESETS = {"hard": 0.0, "soft": None}


def _dyadic_weight(shape, seed):
    """Every |w| equal (alpha = 0.25 exactly), random signs: with dyadic inputs every current is exact."""
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(shape, generator=g) < 0.5, -0.25, 0.25)


def _dyadic_vec(C, seed, center):
    g = torch.Generator().manual_seed(seed)
    return center + torch.randint(-2, 3, (C,), generator=g).float() / 8.0


def _out_hw(H, W, k, stride, padding):
    return (H + 2 * padding - k) // stride + 1, (W + 2 * padding - k) // stride + 1


def _conv_case(T, N, C_in, C_out, H, W, k, stride, padding, *, kind="spike", scale=True, shift=True,
               residual=False, dyadic=True, bn=False, seed=0):
    """Inputs and keyword arguments of one layer call; ``kind`` is "spike", "analog" or "direct"."""
    if kind == "direct":
        x = randn(N, C_in, H, W, seed=seed + 1)
    elif kind == "analog":
        x = randn(T, N, C_in, H, W, seed=seed + 1).relu()
    else:
        x = spikes(T, N, C_in, H, W, seed=seed + 1)
    if dyadic and kind != "spike":
        x = torch.round(x * 8.0) / 8.0
    shape = (C_out, C_in, k, k)
    weight = _dyadic_weight(shape, seed + 2) if dyadic else randn(*shape, seed=seed + 2, scale=0.3)
    scores = randn(*shape, seed=seed + 3)
    kw = dict(stride=stride, padding=padding, timesteps=T if kind == "direct" else None, batch_norm=bn)
    if scale:
        kw["scale"] = _dyadic_vec(C_out, seed + 4, 1.0) if dyadic else randn(C_out, seed=seed + 4, scale=0.2) + 1.0
    if shift:
        kw["shift"] = _dyadic_vec(C_out, seed + 5, 0.25) if dyadic else randn(C_out, seed=seed + 5, scale=0.2) + 0.25
    if residual:
        res = randn(T, N, C_out, *_out_hw(H, W, k, stride, padding), seed=seed + 6, scale=0.5)
        kw["residual"] = torch.round(res * 8.0) / 8.0 if dyadic else res
    if bn:
        kw["running_mean"] = randn(C_out, seed=seed + 7, scale=0.1)
        kw["running_var"] = randn(C_out, seed=seed + 8, scale=0.1).abs() + 1.0
    return x, weight, scores, kw


def _compare(x, weight, scores, prune_rate, kw, **tolerances):
    return compare_triton_to_reference("binw_conv2d_lif", x, weight, scores, prune_rate, kw, **tolerances)


# (T, N, C_in, C_out, H, W, k, stride, padding), neuron, epilogue (scale, shift, residual)
DYADIC_GRID = [
    ((1, 2, 3, 5, 7, 7, 3, 1, 1), dict(decay=0.75), (True, True, False)),
    ((3, 1, 5, 19, 9, 9, 3, 2, 0), dict(decay=0.5, v_reset=None, decay_input=True), (True, True, True)),
    ((5, 1, 19, 3, 7, 7, 1, 2, 0), dict(decay=0.75, v_reset=None), (False, True, False)),
    ((3, 1, 33, 5, 11, 11, 3, 2, 1), dict(decay=0.5, decay_input=True), (True, True, True)),
    ((3, 1, 5, 3, 7, 9, 3, 1, 0), dict(decay=0.75), (False, False, True)),
    ((2, 1, 32, 32, 5, 5, 3, 1, 1), dict(decay=0.5), (True, True, True)),  # tile-multiple channels
    ((3, 2, 64, 16, 4, 4, 1, 1, 0), dict(decay=0.75, v_reset=None), (True, True, False)),  # K = 64, 1x1
]


@pytest.mark.parametrize("case,neuron,epilogue", DYADIC_GRID, ids=[str(c[0]) for c in DYADIC_GRID])
def test_conv_lif_dyadic_bit_identical(case, neuron, epilogue):
    """Dyadic weights (all |w| = 0.25), scale/shift/residual and decay: spikes bit-identical, gradients close."""
    scale, shift, residual = epilogue
    x, weight, scores, kw = _conv_case(*case, scale=scale, shift=shift, residual=residual, seed=case[0])
    if neuron.get("decay_input"):
        kw["shift"] = kw.get("shift", torch.zeros(case[3])) * 4.0 + 1.0
        if residual:
            kw["residual"] = kw["residual"] * 4.0
    if not shift and not residual:
        kw["shift"] = torch.full((case[3],), 0.25)
    kw["neuron"] = LIFConfig(**neuron)
    _compare(x, weight, scores, 0.4, kw, exact=True)


@pytest.mark.parametrize("kind", ["direct", "analog"])
def test_conv_lif_analog_inputs_dyadic(kind):
    """Direct-encoded image (conv computed once for all T) and analog time-major input, rounded to 1/8."""
    x, weight, scores, kw = _conv_case(3, 2, 3, 5, 7, 7, 3, 1, 1, kind=kind, residual=kind == "direct", seed=5)
    kw["neuron"] = LIFConfig(decay=0.75)
    _compare(x, weight, scores, 0.4, kw, exact=True)


@pytest.mark.parametrize("reset", list(RESETS))
@pytest.mark.parametrize("surrogate,detach_reset", [("atan", True), ("sigmoid", False), ("triangle", True)])
def test_conv_lif_neuron_variants(reset, surrogate, detach_reset):
    """Every surrogate and reset through the fused backward (spiking input, scale + shift + residual)."""
    x, weight, scores, kw = _conv_case(3, 1, 5, 6, 5, 5, 3, 1, 1, residual=True, seed=11)
    kw["neuron"] = LIFConfig(decay=0.5, v_reset=RESETS[reset], surrogate=surrogate, detach_reset=detach_reset)
    _compare(x, weight, scores, 0.3, kw, exact=True)


@pytest.mark.parametrize("kind,bn,memory", [("spike", False, "save"), ("spike", False, "recompute"),
                                            ("spike", True, "save"), ("direct", False, "save")])
def test_conv_lif_spiking_residual(kind, bn, memory, monkeypatch):
    """A 0/1 residual (identity shortcut of a spiking ResNet block): the forward kernel (BatchNorm: its scan pass)
    writes its bits and the backward scan unpacks them in its loads; spikes (bit-identical on dyadic inputs) and
    every gradient, grad_residual included. Odd shapes: C_out 5, OH*OW 25, T 3. The spy: binwslt.bits never packs
    or unpacks a residual-sized tensor (it still packs the ternary weight, so the spy sees calls)."""
    from binwslt import bits

    T, C_out, H = 3, 5, 5
    x, weight, scores, kw = _conv_case(T, 1, 9, C_out, H, H, 3, 1, 1, kind=kind, dyadic=not bn, bn=bn, seed=15)
    kw["residual"] = spikes(T, 1, C_out, H, H, p=0.5, seed=16)
    kw["neuron"] = LIFConfig(decay=0.5, v_reset=None)
    from binwslt.kernels import conv_lif  # memory= only for triton (the reference has no "recompute")
    choose = conv_lif.choose_memory
    monkeypatch.setattr(conv_lif, "choose_memory", lambda _, **k: choose(memory, **k))
    calls = []
    for name in ("pack_bits", "unpack_bits"):
        original = getattr(bits, name)

        def spy(t, *args, _f=original):
            out = _f(t, *args)
            calls.append(max(t.numel(), out.numel()))  # the unpacked side: a bool tensor of the full size
            return out
        for module in [m for m in sys.modules.values() if getattr(m, name, None) is original]:  # every binding
            monkeypatch.setattr(module, name, spy)
    _compare(x, weight, scores, 0.4, kw, exact=not bn)
    assert calls and kw["residual"].numel() not in calls, calls


@pytest.mark.parametrize("kind", ["spike", "direct"])
def test_conv_lif_random_general(kind):
    """General random inputs and weights, default neuron (decay 0.99): mismatch <= 1e-3, gradients close."""
    x, weight, scores, kw = _conv_case(4, 2, 6, 7, 7, 7, 3, 1, 1, kind=kind, residual=True, dyadic=False, seed=21)
    kw["neuron"] = LIFConfig()
    _compare(x, weight, scores, 0.5, kw, exact=False)


@pytest.mark.parametrize("kind,affine", [("spike", True), ("spike", False), ("direct", True), ("analog", True)])
def test_conv_lif_batch_norm_train(kind, affine):
    """Training-mode BatchNorm over (T, N, H', W'): spikes, every gradient and the running statistics."""
    x, weight, scores, kw = _conv_case(3, 2, 5, 7, 7, 7, 3, 2, 1, kind=kind, scale=affine, shift=affine,
                                       residual=kind != "analog", dyadic=False, bn=True, seed=31)
    kw["neuron"] = LIFConfig(decay=0.8)
    kw["momentum"] = 0.2
    _compare(x, weight, scores, 0.4, kw, exact=False)


def test_conv_lif_long_sequence_and_fp16_image():
    """T = 16 steps in one program (forward only), and a direct-encoded fp16 image (fp16 dot) = its fp32 twin."""
    neuron = LIFConfig(decay=0.75)
    x, weight, scores, kw = _conv_case(16, 1, 3, 5, 5, 5, 3, 1, 1, residual=True, seed=53)
    want = Fn.binw_conv2d_lif(x, weight, scores, 0.4, neuron=neuron, backend="reference", **kw)
    with torch.no_grad():
        got = Fn.binw_conv2d_lif(x, weight, scores, 0.4, neuron=neuron, backend="triton", **kw)
    assert 0 < want.mean() < 1 and torch.equal(got, want)
    image, weight, scores, kw = _conv_case(3, 2, 3, 5, 6, 6, 3, 2, 1, kind="direct", seed=54)
    with torch.no_grad():
        got32 = Fn.binw_conv2d_lif(image, weight, scores, 0.4, neuron=neuron, backend="triton", **kw)
        got16 = Fn.binw_conv2d_lif(image.half(), weight, scores, 0.4, neuron=neuron, backend="triton", **kw)
    assert 0 < got32.mean() < 1 and torch.equal(got16.float(), got32)


def test_conv_gemm_baseline_is_the_exact_integer_conv():
    """binary_conv_gemm (the benchmark's no-epilogue baseline) returns conv(X, tern) exactly, channels-last."""
    from binwslt.kernels.conv_lif import binary_conv_gemm
    from binwslt.subnet import ternary_subnet

    x, weight, scores, kw = _conv_case(2, 2, 5, 7, 6, 6, 3, 2, 1, seed=55)
    y = binary_conv_gemm(x, weight, scores, 0.4, stride=(2, 2), padding=(1, 1))
    tern, _ = ternary_subnet(weight, scores, 0.4)
    want = torch.nn.functional.conv2d(x.flatten(0, 1), tern.float(), stride=2, padding=1)
    assert y.dtype == torch.int16
    assert torch.equal(y.float(), want.permute(0, 2, 3, 1).reshape(2, -1, 7))


def test_conv_lif_weight_gradient_for_fine_tuning():
    """When the frozen weight does require grad: dL/dw = dL/dW_eff * alpha * M, as binwslt.subnet defines it."""
    x, weight, scores, kw = _conv_case(2, 1, 5, 6, 5, 5, 3, 1, 1, seed=56)
    kw["neuron"] = LIFConfig(decay=0.5)
    grads = {}
    for backend in ("reference", "triton"):
        w = weight.clone().requires_grad_(True)
        s = scores.clone().requires_grad_(True)
        out = Fn.binw_conv2d_lif(x, w, s, 0.4, backend=backend, **kw)
        (out * randn(*out.shape, seed=57)).sum().backward()
        grads[backend] = (w.grad, s.grad)
    assert grads["reference"][0].abs().sum() > 0
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bn,spike_residual", [(True, False), (False, True)])
def test_conv_lif_saved_bytes_small(bn, spike_residual):
    """Distinct bytes saved for backward, the layer's parameters not counted: input spikes and a spiking residual
    as bits, y as int16, the ternary weight as 2 bits, per-channel statistics - nothing else. With BatchNorm (the
    default `BinWConv2dLIF` in training, issue 4's case) that is at most 1/8 of the reference's; without it the
    reference keeps no BatchNorm intermediates and the ratio is about 0.135, so that case checks the budget."""
    T, N, C, H = 4, 2, 16, 8
    x, weight, scores, kw = _conv_case(T, N, C, C, H, H, 3, 1, 1, dyadic=False, bn=bn, seed=61)
    kw["neuron"] = LIFConfig()
    if spike_residual:
        kw["residual"] = spikes(T, N, C, H, H, seed=62)

    def saved(backend):
        scores_leaf = scores.clone().requires_grad_(True)
        xs = mark_spikes(x.clone()).requires_grad_(True)  # a clone carries no spike mark
        return saved_bytes(lambda: Fn.binw_conv2d_lif(xs, weight, scores_leaf, 0.4, backend=backend, **kw),
                           exclude=(weight, scores_leaf))  # the layer's parameters exist anyway

    triton_bytes = saved("triton")
    out_elems = T * N * C * H * H
    budget = 2 * out_elems + x.numel() // 8 + (out_elems // 8 if spike_residual else 0) + weight.numel() // 4
    assert triton_bytes <= budget + 64 * C, (triton_bytes, budget)
    if bn:
        assert triton_bytes / saved("reference") <= 1 / 8


def test_conv_lif_no_grad_output_layout_and_fp16():
    """Inference (no autograd state): same spikes, channels-last memory; fp16 and bool spikes give the same."""
    x, weight, scores, kw = _conv_case(2, 2, 5, 7, 6, 6, 3, 2, 1, residual=True, seed=71)
    neuron = LIFConfig(decay=0.75)
    want = Fn.binw_conv2d_lif(x, weight, scores, 0.25, neuron=neuron, backend="reference", **kw)
    with torch.no_grad():
        got = Fn.binw_conv2d_lif(x, weight, scores, 0.25, neuron=neuron, backend="triton", **kw)
        kw16 = dict(kw, residual=kw["residual"].half())
        got16 = Fn.binw_conv2d_lif(x.half(), weight, scores, 0.25, neuron=neuron, backend="triton", **kw16)
        got_bool = Fn.binw_conv2d_lif(x.bool(), weight, scores, 0.25, neuron=neuron, backend="triton", **kw)
    assert torch.equal(got, want)
    assert got.permute(0, 1, 3, 4, 2).is_contiguous()
    assert got16.dtype == torch.float16 and torch.equal(got16.float(), want)
    assert torch.equal(got_bool, want)


def test_conv_lif_training_steps_keep_masks_equal():
    """A few SGD steps of a two-layer model (direct-encoded conv + BN, then a strided spiking conv with a
    residual) on backend="triton" and "reference" give the same subnet masks and nearly the same scores."""
    from binwslt.subnet import subnet_mask

    image = torch.round(randn(2, 3, 6, 6, seed=81) * 8.0) / 8.0
    w1, w2 = _dyadic_weight((6, 3, 3, 3), 82), _dyadic_weight((6, 6, 3, 3), 83)
    s1_0, s2_0 = randn(6, 3, 3, 3, seed=84), randn(6, 6, 3, 3, seed=85)
    target = spikes(3, 2, 6, 3, 3, p=0.3, seed=86)
    neuron = LIFConfig(decay=0.5)
    result = {}
    for backend in ("reference", "triton"):
        s1, s2 = s1_0.clone().requires_grad_(True), s2_0.clone().requires_grad_(True)
        opt = torch.optim.SGD([s1, s2], lr=20.0)
        for _ in range(3):
            opt.zero_grad()
            h = Fn.binw_conv2d_lif(image, w1, s1, 0.5, padding=1, timesteps=3, batch_norm=True, neuron=neuron,
                                   shift=torch.full((6,), 0.5), backend=backend)
            out = Fn.binw_conv2d_lif(h, w2, s2, 0.5, stride=2, padding=1, residual=h[..., ::2, ::2],
                                     shift=torch.full((6,), 0.25), neuron=neuron, backend=backend)
            ((out - target) ** 2).mean().backward()
            opt.step()
        result[backend] = [s1.detach(), s2.detach()]
    changed = [not torch.equal(subnet_mask(s, 0.5), subnet_mask(s0, 0.5))
               for s, s0 in zip(result["reference"], (s1_0, s2_0))]
    assert all(changed), "the steps must change both masks"
    for got, want in zip(result["triton"], result["reference"]):
        assert torch.equal(subnet_mask(got, 0.5), subnet_mask(want, 0.5))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("channels,stride", [((64, 64), 1), ((128, 256), 2), ((3, 64), 1)])
def test_conv_lif_gpu_layer_sizes(channels, stride, bn):
    """VGG-sized layers (T=4, N=16, 32x32 direct or 16x16) on the GPU against the reference on the CPU (fp32, no
    TF32). General inputs: at most 1e-3 of the neurons may flip (FMA contraction), those are masked out of both
    backwards and every gradient is compared. rtol 1e-3, atol 1e-4 x the gradient's max: fp32 sums over 9*C_in
    taps and the T*N*H*W positions of a score gradient, added in another order (and the fp32-level split
    backward), drift ~1e-5 of the terms' scale, which elements that cancel to ~0 inherit."""
    C_in, C_out = channels
    g = torch.Generator().manual_seed(0)
    T, N, H = 4, 16, 32 if C_in == 3 else 16
    direct = C_in == 3
    if direct:
        x = torch.randn((N, C_in, H, H), generator=g)
    else:
        x = (torch.rand((T, N, C_in, H, H), generator=g) < 0.2).float()
    weight = torch.randn((C_out, C_in, 3, 3), generator=g) * (2.0 / (9 * C_in)) ** 0.5
    scores = torch.randn((C_out, C_in, 3, 3), generator=g)
    kw = dict(neuron=LIFConfig(), batch_norm=bn, stride=stride, padding=1, timesteps=T if direct else None,
              scale=torch.full((C_out,), 0.5), shift=torch.full((C_out,), 0.5))
    if bn:
        kw.update(running_mean=torch.zeros(C_out), running_var=torch.ones(C_out))
    _compare(x, weight, scores, 0.4, kw, exact=False, grad_rtol=1e-3, grad_atol=1e-4, atol_relative=True)


def test_conv_lif_grad_weight_split_over_pixels(monkeypatch):
    """The grad-weight GEMM split over the pixel axis, as a GPU whose grid has few tiles gets it (forced here with a
    pretend SM count and one K step per split): fp32 partial results per split summed by the host in a fixed
    order; odd channels, a ragged last split; every gradient as the reference's."""
    from binwslt.kernels import conv_lif, tiles

    real, splits = conv_lif.grad_weight_split, []

    def recording(*args):
        splits.append(real(*args))
        return splits[-1]

    monkeypatch.setattr(conv_lif, "device_sms", lambda device: 8)
    monkeypatch.setattr(tiles, "MIN_SPLIT_STEPS", 1)
    monkeypatch.setattr(conv_lif, "grad_weight_split", recording)
    x, weight, scores, kw = _conv_case(3, 2, 5, 7, 7, 7, 3, 1, 1, dyadic=False, seed=71)
    kw["neuron"] = LIFConfig(decay=0.75)
    _compare(x, weight, scores, 0.4, kw, exact=False)
    assert splits and min(splits) >= 2, splits


SPIKE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.uint8]


@pytest.mark.parametrize("dtype", SPIKE_DTYPES, ids=str)
@pytest.mark.parametrize("case", [(3, 1, 5, 19, 9, 9, 3, 2, 0), (2, 1, 32, 32, 5, 5, 3, 1, 1)], ids=str)
def test_conv_lif_spike_input_dtypes(case, dtype):
    """Spikes in every dtype a fused layer or a caller hands over, read by the kernel as they are (converted to
    int8 in registers): odd channels (masked tiles) and tile multiples (the vectorised path). Spikes bit-identical to
    the reference on the fp32 twin, gradients within rtol 1e-4."""
    x, weight, scores, kw = _conv_case(*case, residual=True, seed=case[2])
    compare_spike_dtype("binw_conv2d_lif", x, weight, scores, 0.4, dict(kw, neuron=LIFConfig(decay=0.75)), dtype)


def _conv_chain(backend, x, layers):
    """Two fused conv layers, the second fed the first's spikes as returned; ``layers``: (weight, scores, kw)."""
    out = x
    for weight, scores, kw in layers:
        out = Fn.binw_conv2d_lif(out, weight, scores, 0.4, neuron=LIFConfig(decay=0.75), backend=backend, **kw)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_conv_lif_chain_hands_spikes_on_without_a_pass(dtype, monkeypatch):
    """Two fused conv layers: the second layer's forward kernel reads the first layer's output storage itself
    (data_ptr equality: no cast or layout pass of the spikes between them; before, they were cast to int8
    channels-last in a pass of their own). Spikes bit-identical to the reference chain, every gradient (x and both
    layers' scores, scale, shift) within rtol 1e-4 for the fp32 chain."""
    from binwslt.kernels import conv_lif
    x = spikes(2, 1, 5, 7, 7, seed=81)
    layers = []
    for i, (c_in, c_out) in enumerate(((5, 16), (16, 7))):
        _, weight, scores, kw = _conv_case(2, 1, c_in, c_out, 7, 7, 3, 1, 1, seed=82 + 10 * i)
        layers.append((weight, scores, kw))
    spy = LaunchSpy(conv_lif.binary_conv_lif_fwd_kernel)
    monkeypatch.setattr(conv_lif, "binary_conv_lif_fwd_kernel", spy)

    def run(backend, x_dtype):
        leaves = [x.clone().to(x_dtype).requires_grad_(True)]
        run_layers = []
        for weight, scores, kw in layers:
            kw = {k: (v.clone().requires_grad_(True) if k in ("scale", "shift") else v) for k, v in kw.items()}
            scores = scores.clone().requires_grad_(True)
            leaves += [scores, kw["scale"], kw["shift"]]
            run_layers.append((weight, scores, kw))
        out = _conv_chain(backend, mark_spikes(leaves[0]), run_layers)
        return out, leaves

    want, want_leaves = run("reference", torch.float32)
    got, got_leaves = run("triton", dtype)
    assert [call[0].dtype for call in spy.calls] == [dtype, dtype]
    first_out = spy.calls[0][7]  # out_ptr of the first launch: the first layer's spikes, channels-last
    assert spy.calls[1][0].data_ptr() == first_out.data_ptr(), "the second layer's kernel read a copy of the spikes"
    assert got.dtype == dtype and torch.equal(got.float(), want)
    assert 0.02 < want.mean() < 0.98
    if dtype != torch.float32:
        return  # an fp16 chain's gradient between the layers is fp16 itself (one layer: the dtype test above)
    proj = exact_projection(want.shape)
    want_grads = torch.autograd.grad((want * proj.float()).sum(), want_leaves)
    got_grads = torch.autograd.grad((got * proj.float()).sum(), got_leaves)
    for i, (g, w) in enumerate(zip(got_grads, want_grads)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"leaf {i}: {m}")
