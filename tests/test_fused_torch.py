"""The torch backend's fused binary conv/linear + LIF against the reference: spikes identical, every gradient close."""
import itertools

import pytest
import torch

from binwslt import LIFConfig
from binwslt import functional as Fn
from binwslt import torch_backend

from binwslt.spikes import mark_spikes

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
    monkeypatch.setattr(torch_backend, "_fused_epilogue_ext", lambda y, residual, dtype: None)  # the eager epilogue
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
    """grad_precision="bf16": same spikes, grad-input within bf16's rounding of g (not the split's 1e-4); the
    layer's score gradient stays at the split's tolerance (its grad-weight GEMM is not rounded on CPU)."""
    x, weight, scores, geo = _conv_inputs(CONV_CASES[0], seed=2)
    kw = dict(neuron=LIFConfig(decay=0.9, threshold=0.5), scale=randn(5, seed=3, scale=0.1) + 0.8, **geo)
    got = run_layer("binw_conv2d_lif", "torch", x, weight, scores, 0.4, grad_precision="bf16", **dict(kw))
    want = run_layer("binw_conv2d_lif", "reference", x, weight, scores, 0.4, **dict(kw))
    assert torch.equal(got[0], want[0])
    assert_close_grads(got[1], want[1], rtol=2e-2, atol=2e-2)
    assert_close_grads({"scores": got[1]["scores"]}, {"scores": want[1]["scores"]})
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

    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    info = binwslt.cpu_info()
    assert info["matmul"] in ("int8", "fp32") and isinstance(info["flags"], list)
    monkeypatch.setenv(cpu.ENV_VAR, "fp32")
    assert info["backward"] == ("amx-bf16x3" if "amx_bf16" in info["flags"] else "fp32")
    assert binwslt.cpu_info()["matmul"] == "fp32" and binwslt.cpu_info()["backward"] == "fp32"
    assert "forward GEMM fp32, backward fp32" in cpu.version_line()


def _spy_fused(monkeypatch):
    """Record the frame layout (``(C, inner)``) every fused forward and backward of the torch backend ran on."""
    seen = {"forward": [], "backward": []}
    for name, key in (("_fused_forward", "forward"), ("_fused_backward", "backward")):
        fn = getattr(torch_backend, name)

        def spy(ext, y, *args, _fn=fn, _key=key):
            seen[_key].append(torch_backend._frame_layout(y))
            return _fn(ext, y, *args)

        monkeypatch.setattr(torch_backend, name, spy)
    return seen


@pytest.mark.parametrize("neuron", NEURONS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_epilogue_odd_shapes(monkeypatch, layout, neuron):
    """The compiled epilogue (current, scan, spikes, int16 y; BPTT, sums, BatchNorm fold) on frames laid out
    either way, 67 channels (blocks of 64 neurons cross channels), odd pixels, with BatchNorm and a residual:
    spikes identical to the reference, every gradient close; and it is the compiled pass that ran."""
    if torch_backend._cpu_ext.load() is None:
        pytest.skip("the CPU extension did not build here")
    from binwslt import cpu

    monkeypatch.setenv(cpu.ENV_VAR, "fp32")  # the fp32 GEMM keeps the input's layout for y
    seen = _spy_fused(monkeypatch)
    T, N, C_in, C_out, H, W = 3, 2, 5, 67, 5, 3
    x = spikes(T, N, C_in, H, W, seed=11)
    if layout == "channels_last":
        x = mark_spikes(x.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(x.shape))
    weight, scores = randn(C_out, C_in, 3, 3, seed=12), randn(C_out, C_in, 3, 3, seed=13)
    kw = dict(padding=1, neuron=neuron, scale=randn(C_out, seed=14, scale=0.1) + (3.0 if neuron.decay_input else 1.0),
              shift=randn(C_out, seed=15, scale=0.1), residual=randn(T, N, C_out, H, W, seed=16, scale=0.3),
              batch_norm=True, running_mean=torch.zeros(C_out), running_var=torch.ones(C_out), momentum=0.2)
    _compare("binw_conv2d_lif", x, weight, scores, 0.4, **kw)
    inner = 1 if layout == "channels_last" else H * W
    assert seen["forward"] == [(C_out, inner)] and seen["backward"] == [(C_out, inner)]


@pytest.mark.usefixtures("scan_impl")
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid", "triangle"])
@pytest.mark.parametrize("case", ["direct", "linear", "analog-linear", "no-bn"])
def test_fused_epilogue_cases(monkeypatch, case, surrogate):
    """Direct encoding (one y for every step, G summed over T), linear frames (inner 1, 67 features), analog
    input (y saved in float) and no BatchNorm (the plain scale fold), with the compiled pass and eager ops."""
    neuron = LIFConfig(decay=0.8, threshold=0.6, surrogate=surrogate, v_reset=None if case == "no-bn" else 0.0)
    bn = dict(batch_norm=True, running_mean=torch.zeros(67), running_var=torch.ones(67))
    scale, shift = randn(67, seed=21, scale=0.1) + 1.0, randn(67, seed=22, scale=0.1)
    if case == "direct":
        x, weight, scores = randn(2, 3, 5, 7, seed=23), randn(67, 3, 3, 3, seed=24), randn(67, 3, 3, 3, seed=25)
        _compare("binw_conv2d_lif", x, weight, scores, 0.4, padding=1, timesteps=3, neuron=neuron, scale=scale,
                 shift=shift, residual=randn(3, 2, 67, 5, 7, seed=26, scale=0.3), **bn)
        return
    x = randn(3, 4, 29, seed=27).abs() if case == "analog-linear" else spikes(3, 4, 29, seed=27)
    weight, scores = randn(67, 29, seed=28), randn(67, 29, seed=29)
    extra = {} if case == "no-bn" else bn
    _compare("binw_linear_lif", x, weight, scores, 0.3, neuron=neuron, scale=scale * (0.5 if case == "no-bn" else 1),
             shift=shift, residual=randn(3, 4, 67, seed=30, scale=0.2), **extra)


def test_fused_bits_round_trip():
    """The compiled bit packing writes binwslt.bits.pack_bits' layout; unpacking restores frames of any dtype."""
    ext = torch_backend._cpu_ext.load()
    if ext is None:
        pytest.skip("the CPU extension did not build here")
    from binwslt.bits import pack_bits
    for shape in [(3, 5, 7, 2), (1, 1, 1, 1), (2, 67, 3, 3), (3, 67, 5, 7)]:
        frames = spikes(*shape, seed=31)
        for memory_format in (torch.contiguous_format, torch.channels_last):
            f = frames.contiguous(memory_format=memory_format)
            bits = torch_backend._pack_frames(f)
            assert torch.equal(bits, pack_bits(torch_backend._physical(f)))
            cl = torch_backend._is_channels_last(f)
            # uint8 frames (the epilogue's copy of the spikes) pack 64 bytes at a time, then the tail
            assert torch.equal(torch_backend._pack_frames(f.to(torch.uint8)), bits)
            for dtype in (torch.float32, torch.bfloat16, torch.uint8):
                back = torch_backend._unpack_frames(bits, shape, cl, dtype)
                assert back.dtype == dtype and torch.equal(back.float(), frames)


@pytest.mark.parametrize("shape", [(64, 3, 3, 3), (67, 29), (128, 64, 3, 3), (256, 2048)], ids=str)
@pytest.mark.parametrize("prune_rate", [0.0, 0.4, 0.95])
def test_compiled_subnet_equals_ternary_subnet(shape, prune_rate):
    """make_subnet's compiled pass (selection, ternary, α) and score gradient equal binwslt.subnet's, ties in
    the scores (pruned in index order) and zero weights included."""
    if torch_backend._cpu_ext.load() is None:
        pytest.skip("the CPU extension did not build here")
    from binwslt.subnet import straight_through_grads, ternary_subnet
    weight = randn(*shape, seed=41)
    weight.view(-1)[::7] = 0.0
    scores = randn(*shape, seed=42).round(decimals=1)  # many ties
    got = torch_backend.make_subnet(weight, scores, prune_rate)
    tern, alpha = ternary_subnet(weight, scores, prune_rate)
    assert got.ternary.dtype == torch.int8 and torch.equal(got.ternary, tern)
    assert got.alpha.dtype == torch.float32 and got.alpha.dim() == 0 and torch.equal(got.alpha, alpha)
    grad = randn(*shape, seed=43)
    for needs in ((False, True), (True, True)):
        want = straight_through_grads(grad, weight, scores, tern, alpha, needs)
        have = torch_backend._straight_through(grad, weight, scores, tern, alpha, needs)
        for h, w in zip(have, want):
            assert (h is None and w is None) or torch.equal(h, w)


@pytest.mark.parametrize("C_out", [7, 9, 21])  # 64 % C == 1: a 64-lane channels-last block ends in its first channel
def test_batch_norm_sums_over_channels_last_blocks(monkeypatch, C_out):
    """Regression: the compiled backward took a channels-last block whose last lane wrapped back to its first
    channel for a one-channel block, so Σg and Σg·y (BatchNorm's backward) went to one channel (errors of 10-80%).
    In float64, so that fp32 summation order (this small BatchNorm cancels) cannot blur the comparison; the
    compiled pass runs the same per-channel code in either dtype."""
    if torch_backend._cpu_ext.load() is None:
        pytest.skip("the CPU extension did not build here")
    seen = _spy_fused(monkeypatch)
    x = spikes(2, 2, 5, 9, 9, seed=7)
    weight, scores = randn(C_out, 5, 3, 3, seed=8), randn(C_out, 5, 3, 3, seed=9)
    for layout, inner in ((torch.contiguous_format, 81), (torch.channels_last, 1)):
        xl = mark_spikes(x.double().flatten(0, 1).contiguous(memory_format=layout).view(x.shape))
        _compare("binw_conv2d_lif", xl, weight.double(), scores.double(), 0.4, stride=1, padding=1,
                 batch_norm=True)
        assert seen["backward"][-1] == (C_out, inner)


def test_uint8_copy_of_the_spikes(monkeypatch):
    """Where the forward GEMM runs in int8 the compiled epilogue also writes the spikes as uint8 (same shape and
    strides, same values), and the next fused layer reads those instead of casting: a chain of two layers gives
    the reference's spikes and gradients. The copy is dropped once the float spikes change in place."""
    from binwslt import cpu
    from binwslt.spikes import attach_uint8, uint8_spikes

    if torch_backend._cpu_ext.load() is None or cpu.matmul_mode() != "int8":
        assert uint8_spikes(Fn.binw_conv2d_lif(spikes(2, 1, 3, 5, 5), randn(4, 3, 3, 3), randn(4, 3, 3, 3, seed=1),
                                               0.4, padding=1, backend="torch")) is None
        return
    read = []
    spikes_int8 = torch_backend._ConvMap.spikes_int8
    monkeypatch.setattr(torch_backend._ConvMap, "spikes_int8",
                        lambda self, frames, subnet, frames_u8=None: read.append(frames_u8 is not None) or
                        spikes_int8(self, frames, subnet, frames_u8))
    T, N, C, H, W = 3, 2, 67, 5, 7
    x = randn(N, 3, H, W, seed=40).mul(16).round().div(16)  # dyadic: the stem's sums are exact in any order
    w1, s1, w2, s2 = (randn(C, 3, 3, 3, seed=41), randn(C, 3, 3, 3, seed=42), randn(5, C, 3, 3, seed=43),
                      randn(5, C, 3, 3, seed=44))
    kw = dict(padding=1, neuron=LIFConfig(decay=0.8, threshold=0.6), batch_norm=True, momentum=0.2)
    results = {}
    for backend in ("torch", "reference"):
        leaves = [s1.clone().requires_grad_(), s2.clone().requires_grad_()]
        hidden = Fn.binw_conv2d_lif(x, w1, leaves[0], 0.4, timesteps=T, backend=backend, running_mean=torch.zeros(C),
                                    running_var=torch.ones(C), **kw)
        if backend == "torch":
            u8 = uint8_spikes(hidden)
            assert u8 is not None and u8.dtype == torch.uint8 and u8.stride() == hidden.stride()
            assert torch.equal(u8.float(), hidden)
        out = Fn.binw_conv2d_lif(hidden, w2, leaves[1], 0.4, backend=backend, running_mean=torch.zeros(5),
                                 running_var=torch.ones(5), **kw)
        (out * randn(*out.shape, seed=45)).sum().backward()
        results[backend] = (hidden.detach(), out.detach(), [leaf.grad for leaf in leaves])
    assert read == [True]
    got, want = results["torch"], results["reference"]
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert 0 < want[1].mean() < 1
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)

    # the layer computes from the copy: a copy that disagrees changes the output; an in-place change drops it
    hidden = mark_spikes(got[0].clone())
    wrong = torch.ones_like(hidden, dtype=torch.uint8)
    attach_uint8(hidden, wrong)
    run = lambda h: Fn.binw_conv2d_lif(h, w2, s2, 0.4, backend="torch", **kw)  # noqa: E731
    assert not torch.equal(run(hidden), want[1])
    hidden.mul_(1.0)
    assert uint8_spikes(hidden) is None and torch.equal(run(hidden), want[1])
