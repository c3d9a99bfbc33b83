"""memory="recompute" | "save" | "auto" of the Triton conv + LIF and linear + LIF (kernels/memory.py): the backward rebuilds the
exact integer y with the forward's GEMM, so every gradient matches the reference as with y saved, and the bytes
kept for backward shrink to the input bits, the 2-bit ternary weight and per-channel vectors."""
import pytest
import torch
from helpers import bits_rows, randn, run_layer, saved_bytes, spikes

from binwslt import functional as Fn
from binwslt.config import LIFConfig
from binwslt.spikes import mark_spikes

pytest.importorskip("triton")

from binwslt.kernels.memory import choose_memory  # noqa: E402


@pytest.mark.parametrize("kind,bn", [("spike", False), ("spike", True), ("direct", False), ("analog", False),
                                     ("spike-noscale", False)])
def test_recompute_gradients_match_reference(kind, bn, monkeypatch):
    """Without BatchNorm the backward scan rebuilds y itself (RECOMPUTE: the forward's GEMM inside the scan, once
    per step and again in the reverse sweep for the scale gradient; "spike-noscale" skips the second); with it, y is
    rebuilt by one forward-kernel launch before the scan. "analog": an fp32 input (dyadic values, exact in the
    split GEMM) with a residual and stride 2."""
    T, N, C_in, C_out, H = 3, 1, 5, 19, 7
    if kind == "direct":
        x = randn(N, C_in, H, H, seed=31)
    elif kind == "analog":
        x = torch.randint(-4, 5, (T, N, C_in, H, H), generator=torch.Generator().manual_seed(31)).float() / 4
    else:
        x = spikes(T, N, C_in, H, H, seed=31)
    weight, scores = randn(C_out, C_in, 3, 3, seed=32, scale=0.3), randn(C_out, C_in, 3, 3, seed=33)
    stride = (2, 2) if kind == "analog" else (1, 1)
    kw = dict(stride=stride, padding=(1, 1), timesteps=T if kind == "direct" else None, batch_norm=bn,
              scale=randn(C_out, seed=34, scale=0.2) + 1.0, shift=randn(C_out, seed=35, scale=0.2) + 0.25,
              neuron=LIFConfig(decay=0.75))
    if kind == "spike-noscale":
        kw.pop("scale")
    if kind == "analog":
        out = (H + 2 - 3) // 2 + 1
        kw["residual"] = randn(T, N, C_out, out, out, seed=36, scale=0.5)
    if bn:
        kw.update(running_mean=torch.zeros(C_out), running_var=torch.ones(C_out))
    else:  # y is rebuilt inside the backward scan: the separate GEMM launch must not run
        from binwslt.kernels import conv_lif
        monkeypatch.setattr(conv_lif, "_gemm_y", lambda *args: pytest.fail("y rebuilt outside the scan"))
    s_ref, g_ref, _ = run_layer("binw_conv2d_lif", "reference", x, weight, scores, 0.4, **dict(kw))
    s_rec, g_rec, _ = run_layer("binw_conv2d_lif", "triton", x, weight, scores, 0.4, memory="recompute",
                                **dict(kw))
    s_sav, g_sav, _ = run_layer("binw_conv2d_lif", "triton", x, weight, scores, 0.4, memory="save", **dict(kw))
    assert torch.equal(s_rec, s_sav)
    assert g_rec.keys() == g_sav.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_rec[name], g_sav[name], rtol=0, atol=0)  # the same exact y, the same math
    assert torch.equal(s_rec, s_ref)
    for name in g_ref:
        torch.testing.assert_close(g_rec[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_recompute_saved_bytes_at_most_an_eighth_of_reference():
    """Issue 9's case: no BatchNorm, T=4, N=4, 32->64 channels, 16x16, 3x3, padding 1."""
    T, N, C_in, C_out, H = 4, 4, 32, 64, 16
    x = spikes(T, N, C_in, H, H, seed=41)
    weight, scores = randn(C_out, C_in, 3, 3, seed=42, scale=0.3), randn(C_out, C_in, 3, 3, seed=43)
    kw = dict(stride=(1, 1), padding=(1, 1), scale=randn(C_out, seed=44, scale=0.2) + 1.0)

    def saved(backend, **extra):
        xs, sc = mark_spikes(x.clone()).requires_grad_(True), scores.clone().requires_grad_(True)  # clones: no mark
        return saved_bytes(lambda: Fn.binw_conv2d_lif(xs, weight, sc, 0.4, backend=backend, **kw, **extra),
                           exclude=(weight, sc))

    reference = saved("reference")
    recompute = saved("triton", memory="recompute")
    save = saved("triton", memory="save")
    print(f"saved bytes: reference {reference}, triton save {save}, recompute {recompute}")
    assert recompute <= reference / 8, (recompute, reference)
    assert save > 4 * recompute  # y (int16, 2 bytes per output element) is most of what "save" keeps


@pytest.mark.parametrize("c_in,kernel,stride,bn", [(5, 3, 1, False), (13, 1, 2, True), (16, 3, 2, False)])
def test_forward_kernel_packs_the_saved_spikes(c_in, kernel, stride, bn):
    """The forward kernel writes the saved input bits itself (kernels/spike_bits.py: per pixel, channel c at bit
    c % 8 of byte c // 8); every input pixel, also those a 1x1 stride-2 conv never reads; BatchNorm's pass 1 too."""
    from binwslt.kernels.conv_lif import conv_lif_forward

    T, N, H, W, C_out = 2, 1, 7, 5, 6
    x = spikes(T, N, c_in, H, W, seed=61)
    stats = dict(running_mean=torch.zeros(C_out), running_var=torch.ones(C_out)) if bn else \
        dict(running_mean=None, running_var=None)
    w, sc = randn(C_out, c_in, kernel, kernel, seed=62), randn(C_out, c_in, kernel, kernel, seed=63)
    _, state = conv_lif_forward(x, w, sc, 0.4, stride=(stride, stride), padding=(kernel // 2,) * 2, scale=None,
                                shift=None, residual=None, neuron=LIFConfig(), timesteps=None, batch_norm=bn,
                                momentum=0.1, eps=1e-5, need_y=True, **stats)
    want = bits_rows(x.permute(0, 1, 3, 4, 2).reshape(-1, c_in))
    assert state.saved_x.dtype == torch.uint8 and state.saved_x.numel() == -(-want.numel() // 4) * 4
    assert torch.equal(state.saved_x[:want.numel()].view(want.shape), want)


@pytest.mark.parametrize("kind,c_out,bn", [("spike", 19, False), ("spike", 21, True), ("direct", 5, False)])
def test_forward_kernel_packs_the_spiking_residual(kind, c_out, bn, monkeypatch):
    """A spiking residual saved for backward: its bits are written by the kernel whose LIF epilogue reads it (the
    fused forward, BatchNorm's scan pass, a direct-encoded layer), rows ``T*N*OH*OW`` of cdiv(C_out, 8) bytes
    (kernels/spike_bits.py) in whole int32 words; odd C_out (padding bits), OH*OW = 25 and T = 3. Fresh int32
    buffers are filled with 0xA5A5A5A5 here, so a word the kernel does not write fails."""
    from binwslt.kernels.conv_lif import conv_lif_forward

    empty = torch.empty

    def garbage_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(-0x5A5A5A5B) if t.dtype == torch.int32 else t

    monkeypatch.setattr(torch, "empty", garbage_empty)
    T, N, C_in, H = 3, 1, 6, 5
    x = randn(N, C_in, H, H, seed=81) if kind == "direct" else spikes(T, N, C_in, H, H, seed=81)
    res = spikes(T, N, c_out, H, H, p=0.5, seed=82)
    stats = dict(running_mean=torch.zeros(c_out), running_var=torch.ones(c_out)) if bn else \
        dict(running_mean=None, running_var=None)
    w, sc = randn(c_out, C_in, 3, 3, seed=83), randn(c_out, C_in, 3, 3, seed=84)
    _, state = conv_lif_forward(x, w, sc, 0.4, stride=(1, 1), padding=(1, 1), scale=None, shift=None, residual=res,
                                neuron=LIFConfig(), timesteps=T if kind == "direct" else None, batch_norm=bn,
                                momentum=0.1, eps=1e-5, need_y=True, **stats)
    want = bits_rows(res.permute(0, 1, 3, 4, 2).reshape(-1, c_out))
    assert state.res_bits and state.res_cl.dtype == torch.uint8 and state.res_cl.numel() == -(-want.numel() // 4) * 4
    assert torch.equal(state.res_cl[:want.numel()].view(want.shape), want)
    _, state = conv_lif_forward(x, w, sc, 0.4, stride=(1, 1), padding=(1, 1), scale=None, shift=None,
                                residual=res.clone(), neuron=LIFConfig(), timesteps=T if kind == "direct" else None,
                                batch_norm=bn, momentum=0.1, eps=1e-5, need_y=True, **stats)
    assert not state.res_bits and state.res_cl is None  # a float residual without the spike mark: analog


def test_auto_chooses_from_the_modelled_costs_and_says_why():
    small = choose_memory("auto", is_spike=True, fan_in=32 * 9, y_bytes=2)
    deep = choose_memory("auto", is_spike=True, fan_in=512 * 9, y_bytes=2)
    assert small.recompute and not deep.recompute
    assert small.recompute_s < small.save_s and deep.recompute_s > deep.save_s
    assert "fan-in 288" in small.reason and "recompute" in small.reason and "save" in deep.reason
    assert choose_memory("save", is_spike=True, fan_in=9, y_bytes=2).recompute is False
    # the second GEMM of the reverse sweep (the scale gradient's sums of dL/dI * y) moves the break-even point
    for fan_in, gy, recompute in ((618, True, True), (619, True, False), (824, False, True), (825, False, False)):
        assert choose_memory("auto", is_spike=True, fan_in=fan_in, y_bytes=2, gy=gy).recompute is recompute
    # BatchNorm: y is rebuilt before the scan and then read like a saved y, so recomputing never saves time
    bn = choose_memory("auto", is_spike=True, fan_in=9, y_bytes=2, batch_norm=True)
    assert not bn.recompute and bn.recompute_s > bn.save_s and "BatchNorm" in bn.reason


def test_memory_keyword_errors():
    x = spikes(2, 1, 3, 5, 5)
    w = randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="memory"):
        Fn.binw_conv2d_lif(x, w, w, 0.4, memory="bits", backend="triton")
    with pytest.raises(ValueError, match="memory"):
        Fn.binw_linear_lif(spikes(2, 1, 8), randn(4, 8), randn(4, 8), 0.4, memory="bits", backend="triton")


def test_module_memory_keyword():
    from binwslt.nn import BinWConv2dLIF

    with pytest.raises(ValueError, match="memory"):
        BinWConv2dLIF(3, 4, 3, memory="none")
    torch.manual_seed(0)
    layers = [BinWConv2dLIF(3, 8, 3, padding=1, backend="triton", memory=m) for m in ("save", "recompute")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = spikes(2, 1, 3, 6, 6, seed=51)
    grads = []
    for layer in layers:
        layer(x).sum().backward()
        grads.append(layer.scores.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


def test_linear_module_memory_keyword():
    from binwslt.nn import BinWLinearLIF

    torch.manual_seed(0)
    layers = [BinWLinearLIF(24, 9, batch_norm=False, backend="triton", memory=m) for m in ("save", "recompute")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = spikes(3, 4, 24, seed=52)
    grads = []
    for layer in layers:
        layer(x).sum().backward()
        grads.append(layer.scores.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("k_in,bn", [(5, False), (13, True), (16, False)])
def test_linear_forward_kernel_packs_the_saved_spikes(k_in, bn):
    """The linear forward kernel writes the saved input bits itself (rows of cdiv(K, 8) bytes, feature k at bit
    k % 8 of byte k // 8), BatchNorm's pass 1 too; no host pass."""
    from binwslt.kernels.linear_lif import linear_lif_forward

    T, N, C = 3, 5, 7
    x = spikes(T, N, k_in, seed=71)
    stats = dict(running_mean=torch.zeros(C), running_var=torch.ones(C)) if bn else \
        dict(running_mean=None, running_var=None)
    w, sc = randn(C, k_in, seed=72), randn(C, k_in, seed=73)
    _, state = linear_lif_forward(x, w, sc, 0.4, scale=None, shift=None, residual=None, neuron=LIFConfig(),
                                  timesteps=None, batch_norm=bn, momentum=0.1, eps=1e-5, need_state=True, **stats)
    want = bits_rows(x.reshape(-1, k_in))
    assert state.saved_x.dtype == torch.uint8 and state.saved_x.numel() == -(-want.numel() // 4) * 4
    assert torch.equal(state.saved_x[:want.numel()].view(want.shape), want)


@pytest.mark.parametrize("kind,bn", [("spike", False), ("spike", True), ("direct", False), ("direct", True),
                                     ("analog", False), ("spike-noscale", False)])
def test_linear_recompute_gradients_match_reference(kind, bn, monkeypatch):
    """The linear layer's memory="recompute": without BatchNorm the backward scan rebuilds y from the saved input
    bits with the forward's GEMM (once per step, again in the reverse sweep for the scale gradient; "spike-noscale"
    skips that); with it, one forward-kernel launch rebuilds y before the scan. Odd T, N over two row tiles, K over
    two K blocks, C over two channel tiles (the interpreter's 16x16x32 tile); "analog": fp32 dyadic x with a
    residual."""
    T, N, K, C = 3, 17, 37, 19
    if kind == "direct":
        x = randn(N, K, seed=91)
    elif kind == "analog":
        x = torch.randint(-4, 5, (T, N, K), generator=torch.Generator().manual_seed(91)).float() / 4
    else:
        x = spikes(T, N, K, seed=91)
    weight, scores = randn(C, K, seed=92, scale=0.5), randn(C, K, seed=93)
    kw = dict(timesteps=T if kind == "direct" else None, batch_norm=bn,
              scale=randn(C, seed=94, scale=0.2) + 1.0, shift=randn(C, seed=95, scale=0.2) + 0.25,
              neuron=LIFConfig(decay=0.75))
    if kind == "spike-noscale":
        kw.pop("scale")
    if kind == "analog":
        kw["residual"] = randn(T, N, C, seed=96, scale=0.5)
    if bn:
        kw.update(running_mean=torch.zeros(C), running_var=torch.ones(C))
    else:  # y is rebuilt inside the backward scan: the separate GEMM launch must not run
        from binwslt.kernels import linear_lif
        monkeypatch.setattr(linear_lif, "_gemm_y", lambda *args: pytest.fail("y rebuilt outside the scan"))
    s_ref, g_ref, _ = run_layer("binw_linear_lif", "reference", x, weight, scores, 0.4, **dict(kw))
    assert 0.05 < s_ref.mean() < 0.95, f"degenerate test input: firing rate {s_ref.mean():.3f}"
    s_rec, g_rec, _ = run_layer("binw_linear_lif", "triton", x, weight, scores, 0.4, memory="recompute",
                                **dict(kw))
    s_sav, g_sav, _ = run_layer("binw_linear_lif", "triton", x, weight, scores, 0.4, memory="save", **dict(kw))
    assert torch.equal(s_rec, s_sav) and torch.equal(s_rec, s_ref)
    assert g_rec.keys() == g_sav.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_rec[name], g_sav[name], rtol=0, atol=0)  # the same exact y, the same math
        torch.testing.assert_close(g_rec[name], g_ref[name], rtol=1e-4, atol=1e-5)


def test_linear_recompute_saved_bytes():
    """memory="recompute" keeps exactly the int16 y ``[T, N, C]`` less than "save" (the input bits, the 2-bit
    weight and per-channel vectors stay), and at most 1/8 of the reference backend's bytes for a hidden layer."""
    T, N, K, C = 4, 8, 256, 256
    x = spikes(T, N, K, seed=97)
    weight, scores = randn(C, K, seed=98, scale=0.3), randn(C, K, seed=99)
    scale = randn(C, seed=100, scale=0.2) + 1.0

    def saved(backend, **extra):
        xs, sc = mark_spikes(x.clone()).requires_grad_(True), scores.clone().requires_grad_(True)
        return saved_bytes(lambda: Fn.binw_linear_lif(xs, weight, sc, 0.4, scale=scale, backend=backend, **extra),
                           exclude=(weight, sc))

    reference = saved("reference")
    recompute = saved("triton", memory="recompute")
    save = saved("triton", memory="save")
    print(f"linear saved bytes: reference {reference}, triton save {save}, recompute {recompute}")
    assert save - recompute == T * N * C * 2
    assert recompute <= reference / 8, (recompute, reference)


@pytest.mark.parametrize("k,bn,recompute", [(256, False, True), (2048, False, False), (256, True, False)])
def test_linear_auto_chooses_per_shape(k, bn, recompute):
    """memory="auto" on the linear layer: kernels/memory.py's rule with fan-in K (the fc 256->256 of VGG-11
    recomputes without BatchNorm, its fc 2048->256 saves; BatchNorm always saves)."""
    from binwslt.kernels.linear_lif import linear_lif_forward

    T, N, C = 2, 3, 5
    stats = dict(running_mean=torch.zeros(C), running_var=torch.ones(C)) if bn else \
        dict(running_mean=None, running_var=None)
    _, state = linear_lif_forward(spikes(T, N, k, seed=101), randn(C, k, seed=102), randn(C, k, seed=103), 0.4,
                                  scale=None, shift=None, residual=None, neuron=LIFConfig(), timesteps=None,
                                  batch_norm=bn, momentum=0.1, eps=1e-5, need_state=True, **stats)
    assert state.memory.recompute is recompute and (state.y is None) is recompute
    assert f"fan-in {k}" in state.memory.reason
