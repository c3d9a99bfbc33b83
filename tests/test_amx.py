"""The AMX-BF16 backward convolutions (binwslt.amx) against float64, and the torch backend taking them.

They run where the CPU has AMX-BF16 (this project's CPU machines do; `binwslt --version` says which backward
GEMM runs); elsewhere the fp32 convolutions run and these tests are skipped with that reason.
"""
import pytest
import torch
from torch.nn.grad import conv2d_input, conv2d_weight

from binwslt import amx, cpu
from binwslt.bits import pack_bits

from helpers import assert_close_grads, randn, run_layer, spikes

needs_amx = pytest.mark.skipif(not amx.available(), reason="needs a CPU with AMX-BF16 (and the C++ extension)")

CASES = [  # frames, C_in, C_out, H, W, k, padding: odd channel counts (not multiples of 32), odd sizes
    (3, 5, 7, 9, 9, 3, 1),
    (4, 19, 33, 11, 7, 3, 1),
    (2, 64, 64, 8, 8, 3, 0),
    (5, 3, 17, 7, 6, 1, 0),
    (3, 40, 20, 6, 5, 3, 2),
    (2, 33, 65, 5, 9, 5, 2),
    (2, 7, 9, 6, 6, 5, 1),
    (2, 21, 5, 3, 37, 3, 1),  # rows wider than 32 pixels
    (3, 11, 11, 5, 6, 3, 1),  # C_in = C_out, same padding: dL/dx can take g's memory
    (2, 9, 9, 7, 5, 1, 0),
]


def _bits(frames, layout):
    """The frames' spikes as the torch backend saves them: bits in memory order ([F, H, W, C] when channels-last)."""
    return pack_bits(frames.permute(0, 2, 3, 1) if layout == torch.channels_last else frames)


def _relative(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


@needs_amx
@pytest.mark.parametrize("case", CASES)
def test_backward_convolutions_match_float64(case):
    F, C_in, C_out, H, W, k, p = case
    x = spikes(F, C_in, H, W, seed=1)
    tern = torch.randint(-1, 2, (C_out, C_in, k, k), generator=torch.Generator().manual_seed(2)).float()
    OH, OW = H + 2 * p - k + 1, W + 2 * p - k + 1
    # badly scaled: magnitudes over ~20 orders, so a term lost would show
    g = randn(F, C_out, OH, OW, seed=3) * torch.exp(3 * randn(F, C_out, OH, OW, seed=4))
    for layout in (torch.contiguous_format, torch.channels_last):
        g_l = g.contiguous(memory_format=layout)
        want_x = conv2d_input(x.shape, tern.double(), g.double(), padding=p)
        want_w = conv2d_weight(x.double(), tern.shape, g.double(), padding=p)
        fp32_x = conv2d_input(x.shape, tern, g, padding=p)
        packed, bits, cl = amx.pack_weight(tern), _bits(x, layout), layout == torch.channels_last
        got_x, got_w = amx.conv_grads(g_l, x.shape, k, p, packed=packed, bits=bits, channels_last=cl, scale=0.5)
        assert got_x.shape == x.shape and got_w.shape == tern.shape
        if C_in == C_out and (OH, OW) == (H, W) and layout == torch.channels_last:  # dL/dx written over g
            g_dead = g_l.clone(memory_format=torch.channels_last)
            over_x, over_w = amx.conv_grads(g_dead, x.shape, k, p, packed=packed, bits=bits, channels_last=cl,
                                            scale=0.5, overwrite_grad=True)
            assert over_x.data_ptr() == g_dead.data_ptr()
            assert torch.equal(over_x, got_x) and torch.equal(over_w, got_w)
        # each alone: the same bits (with "same" padding the pair shares the staged g, else each stages its own)
        assert torch.equal(amx.conv_grads(g_l, x.shape, k, p, packed=packed, scale=0.5)[0], got_x)
        assert torch.equal(amx.conv_grads(g_l, x.shape, k, p, bits=bits, channels_last=cl)[1], got_w)
        # fp32 accuracy: within a few ulps of the largest value, like an fp32 convolution
        assert _relative(got_x, 0.5 * want_x) < 4 * max(_relative(fp32_x, want_x), 2 ** -24)
        assert _relative(got_w, want_w) < 1e-6


@needs_amx
def test_one_term_would_not_be_enough():
    """The three-term split is what makes it exact: bf16(g) alone misses by ~2^-9 (guards against a silent drop)."""
    F, C_in, C_out, H, k, p = 2, 8, 8, 6, 3, 1
    g = randn(F, C_out, H, H, seed=5)
    tern = torch.randint(-1, 2, (C_out, C_in, k, k), generator=torch.Generator().manual_seed(6)).float()
    want = conv2d_input((F, C_in, H, H), tern.double(), g.double(), padding=p)
    one_term = conv2d_input((F, C_in, H, H), tern.double(), g.bfloat16().double(), padding=p)
    got = amx.conv_grads(g, (F, C_in, H, H), k, p, packed=amx.pack_weight(tern))[0]
    assert _relative(one_term, want) > 1e-4 > 100 * _relative(got, want)


@needs_amx
@pytest.mark.parametrize("y_dtype", [torch.int16, torch.int32, torch.float32])
def test_fold_while_staging_equals_folding_first(y_dtype):
    """The BatchNorm fold (g·c1 + c3) + y·c2, and a plain scale g·c1, applied as the kernels stage g give the
    very same bits as folding with the CPU extension's epilogue_fold first."""
    from binwslt import _cpu_ext
    ext = _cpu_ext.load()
    if ext is None:
        pytest.skip("the CPU extension did not build here")
    F, C_in, C_out, H, k, p = 3, 6, 37, 7, 3, 1
    x = spikes(F, C_in, H, H, seed=10).contiguous(memory_format=torch.channels_last)
    tern = torch.randint(-1, 2, (C_out, C_in, k, k), generator=torch.Generator().manual_seed(11)).float()
    g = randn(F, C_out, H, H, seed=12).contiguous(memory_format=torch.channels_last)
    y = (randn(F, C_out, H, H, seed=13) * 20).round().to(y_dtype).contiguous(memory_format=torch.channels_last)
    c1, c2, c3 = randn(C_out, seed=14), randn(C_out, seed=15) * 1e-3, randn(C_out, seed=16) * 1e-2
    flat = lambda t: torch.as_strided(t, (t.numel(),), (1,))  # channels-last memory order
    for fold, (k2, k3) in ((amx.Fold(y, c1, c2, c3), (c2, c3)), (amx.Fold(c1=c1), (None, None))):
        folded = g.clone()
        ext.epilogue_fold(flat(folded), flat(y), c1, k2, k3, C_out, 1)
        packed = amx.pack_weight(tern)
        bits = _bits(x, torch.channels_last)
        want_x, want_w = amx.conv_grads(folded, x.shape, k, p, packed=packed, bits=bits, channels_last=True)
        # channels-last g and y take the vector staging, NCHW the scalar one: the same bits either way
        for layout in (torch.channels_last, torch.contiguous_format):
            g_l = g.contiguous(memory_format=layout)
            fold_l = fold._replace(y=None if fold.y is None else fold.y.contiguous(memory_format=layout))
            got_x, got_w = amx.conv_grads(g_l, x.shape, k, p, packed=packed, bits=bits, channels_last=True,
                                          fold=fold_l)
            assert torch.equal(got_x, want_x) and torch.equal(got_w, want_w)


@needs_amx
@pytest.mark.parametrize("case", [(2, 2, 5, 7, 9, 9, 3, 1), (3, 2, 19, 33, 7, 8, 3, 1), (2, 1, 3, 5, 6, 6, 1, 0),
                                  (2, 2, 6, 6, 7, 7, 3, 1)])  # the last: dL/dx written over g
@pytest.mark.parametrize("epilogue", ["batch_norm", "scale"])
def test_torch_backend_runs_its_backward_on_amx(case, epilogue, monkeypatch):
    """A fused conv layer over spikes takes both AMX kernels, and its gradients equal the reference's."""
    T, N, C_in, C_out, H, W, k, p = case
    calls = []
    original = amx.conv_grads
    monkeypatch.setattr(amx, "conv_grads", lambda *a, **kw: calls.append(
        (kw["packed"] is not None, kw["bits"] is not None)) or original(*a, **kw))
    x, weight, scores = spikes(T, N, C_in, H, W, seed=7), randn(C_out, C_in, k, k, seed=8), \
        randn(C_out, C_in, k, k, seed=9)
    kw = dict(stride=1, padding=p, batch_norm=True) if epilogue == "batch_norm" else \
        dict(stride=1, padding=p, scale=randn(C_out, seed=10, scale=0.2) + 1.0, shift=randn(C_out, seed=11))
    got = run_layer("binw_conv2d_lif", "torch", x, weight, scores, 0.4, **kw)
    want = run_layer("binw_conv2d_lif", "reference", x, weight, scores, 0.4, **kw)
    assert calls == [(True, True)]  # both gradients, in one pass
    assert torch.equal(got[0], want[0])
    assert_close_grads(got[1], want[1])


def test_fp32_forced_and_ineligible_layers_do_not_take_it(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "fp32")
    assert not amx.available()
    assert not amx.eligible((4, 4, 3, 3), (2, 2), (1, 1))  # stride 2
    assert not amx.eligible((4, 4, 3, 1), (1, 1), (1, 0))  # not square
    assert not amx.eligible((4, 4, 3, 3), (1, 1), (3, 3))  # padding >= kernel
    assert amx.eligible((4, 4, 3, 3), (1, 1), (1, 1))


@needs_amx
def test_packed_weight_kept_with_the_cached_subnet(monkeypatch):
    """The grad-input GEMM's packed weight is made once per cached subnet: a second backward with the same scores
    reuses it, new scores make a new one."""
    from binwslt.nn import BinWConv2dLIF
    packs = []
    original = amx.pack_weight
    monkeypatch.setattr(amx, "pack_weight", lambda tern: packs.append(tern.shape) or original(tern))
    layer = BinWConv2dLIF(5, 7, 3, padding=1, backend="torch")
    x = spikes(2, 3, 5, 6, 6, seed=20).requires_grad_()
    for _ in range(2):
        layer(x).sum().backward()
    assert len(packs) == 1 and x.grad is not None
    with torch.no_grad():
        layer.scores.mul_(-1.5)
    layer(x).sum().backward()
    assert len(packs) == 2
