"""binwslt.models: the paper's parameter counts, shapes for every name x kind x backend, gradients, errors."""
import importlib

import pytest
import torch
from torch import nn

from binwslt import models
from binwslt.config import LIFConfig
from binwslt.nn import LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF

# design.md §5 / the paper's Table 1: conv+linear weights at 32x32, 10 classes.
PAPER_WEIGHTS = {"conv4": 2_425_024, "vgg9": 2_261_184, "vgg11": 5_275_840}


def tiny(name, kind, backend="torch", **kw):
    """A small model on 1-channel images, 8x8 (16x16 for vgg11, which pools four times)."""
    size = 16 if name == "vgg11" else 8
    kw.setdefault("width", 0.125)
    return models.build(name, kind, num_classes=5, in_channels=1, image_size=size, backend=backend, **kw)


@pytest.mark.parametrize("kind", models.KINDS)
@pytest.mark.parametrize("name", sorted(PAPER_WEIGHTS))
def test_vgg_weight_counts_match_paper(name, kind):
    assert models.weight_count(models.build(name, kind)) == PAPER_WEIGHTS[name]


@pytest.mark.parametrize("kind", ["ann", "binwslt"])
def test_resnet19_parameter_count_is_12_63m(kind):
    model = models.build("resnet19", kind)
    # convs + fc weights; BN affine and the classifier bias bring the dense model to 12.63M
    assert models.weight_count(model) == 12_619_968
    if kind == "ann":
        assert models.parameter_count(model) == 12_631_114
        assert round(models.parameter_count(model) / 1e6, 2) == 12.63


def test_classifier_input_follows_image_size():
    for size, expected in ((32, 128 * 8 * 8), (16, 128 * 4 * 4), (8, 128 * 2 * 2)):
        model = models.build("conv4", "binwslt", image_size=size, in_channels=1)
        assert model.head[0].in_features == expected
    model = models.build("vgg9", "ann", image_size=16)
    assert model.head[0].layer.in_features == 256 * 2 * 2


def test_width_scales_channels():
    model = models.build("conv4", "ann", width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert model.head[0].layer.out_features == 128


@pytest.mark.parametrize("kind", models.KINDS)
@pytest.mark.parametrize("name", models.NAMES)
def test_forward_backward_shapes_and_gradients(name, kind):
    torch.manual_seed(0)
    model = tiny(name, kind)
    size = model.config["image_size"]
    x = torch.randn(4, 1, size, size)
    logits = model(x)
    assert logits.shape == (4, 5) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.pow(2).sum().backward()
    layers = models.subnet_layers(model)
    if kind in models.BINARY_KINDS:
        assert layers, "binary kinds are built from subnet layers"
        assert not any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        for layer in layers:
            assert layer.weight.grad is None
            assert layer.scores.grad is not None
        assert any(layer.scores.grad.abs().sum() > 0 for layer in layers)
    else:
        assert not layers
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all(w.grad is not None for w in weights)
        assert weights[0].grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (4, 5)


@pytest.mark.parametrize("name", models.NAMES)
def test_binwslt_kind_uses_fused_layers_and_direct_encoding(name):
    model = tiny(name, "binwslt", timesteps=3)
    fused = [m for m in model.modules() if isinstance(m, (BinWConv2dLIF, BinWLinearLIF))]
    first = fused[0]
    assert isinstance(first, BinWConv2dLIF) and first.timesteps == 3
    assert all(m.timesteps is None for m in fused[1:])
    assert isinstance(model.classifier, BinWLinear)
    seen = {}
    model.classifier.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    size = model.config["image_size"]
    logits = model(torch.randn(2, 1, size, size))
    assert seen["out"].shape == (3, 2, 5)
    torch.testing.assert_close(logits, seen["out"].mean(0))


@pytest.mark.parametrize("name", ["conv4", "resnet19"])
def test_snn_kind_spikes_and_averages_over_time(name):
    model = tiny(name, "snn", timesteps=3)
    spikes = []
    for m in model.modules():
        if isinstance(m, LIF):
            m.register_forward_hook(lambda mod, inp, out: spikes.append(out))
    seen = {}
    model.classifier.register_forward_hook(lambda mod, inp, out: seen.setdefault("out", out))
    logits = model(torch.randn(2, 1, 8, 8))
    assert spikes and all(s.shape[:2] == (3, 2) for s in spikes)
    assert all(bool(((s == 0) | (s == 1)).all()) for s in spikes)
    torch.testing.assert_close(logits, seen["out"].mean(0))


def test_bnn_binact_activations_are_signs():
    model = tiny("conv4", "bnn-binact")
    acts = []
    for m in model.modules():
        if isinstance(m, models.SignSTE):
            m.register_forward_hook(lambda mod, inp, out: acts.append(out))
    model(torch.randn(3, 1, 8, 8))
    assert len(acts) == 6  # 4 convs + 2 hidden fc
    assert all(bool((a.abs() == 1).all()) for a in acts)


def test_bireal_sign_gradient():
    x = torch.tensor([-1.5, -0.5, 0.0, 0.25, 1.0, 2.0], requires_grad=True)
    y = models.BiRealSign.apply(x)
    assert y.tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, 1.0]
    y.backward(torch.ones_like(x))
    assert x.grad.tolist() == [0.0, 1.0, 2.0, 1.5, 0.0, 0.0]


@pytest.mark.parametrize("kind", models.BINARY_KINDS)
def test_backends_agree(kind):
    torch.manual_seed(1)
    ref = tiny("conv4", kind, backend="reference")
    fast = tiny("conv4", kind, backend="torch")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fast(x), ref(x))
    ref.eval()
    fast.eval()
    torch.testing.assert_close(fast(x), ref(x))


def test_torch_backend_conv4_matches_reference(monkeypatch):
    """Conv-4 on the torch backend (channels-last spikes from the stem on, the uint8 copies of the spikes between
    int8 layers, the max-pools on those bytes) against the reference on a dyadic image: the same logits and every
    gradient within rtol 1e-4 in training, the same logits in eval."""
    pooled = []
    spike_pool = models._spike_pool
    monkeypatch.setattr(models, "_spike_pool", lambda *a: pooled.append(a[0].shape) or spike_pool(*a))
    torch.manual_seed(2)
    ref = tiny("conv4", "binwslt", backend="reference", width=0.5)
    fast = tiny("conv4", "binwslt", backend="torch", width=0.5)
    fast.load_state_dict(ref.state_dict())
    x = torch.randint(-16, 17, (3, 1, 8, 8), generator=torch.Generator().manual_seed(3)).float() / 16
    for model in (ref, fast):
        model(x).pow(2).sum().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        if p_ref.grad is not None:
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x))
    from binwslt import _cpu_ext, cpu
    assert len(pooled) == (4 if _cpu_ext.load() is not None and cpu.matmul_mode() == "int8" else 0)


@pytest.mark.parametrize("shape", [(3, 5, 8, 6), (2, 67, 7, 5), (1, 1, 3, 2), (4, 64, 2, 4)], ids=str)
def test_spike_pool_equals_max_pool2d(shape):
    """`models._SpikePool` (on the uint8 copy) against max_pool2d on the float spikes: the same pooled values and
    the same input gradient (argmax ties go to the first maximum; odd rows/columns get none); windows with
    none, one and several spikes."""
    from binwslt import _cpu_ext

    if _cpu_ext.load() is None:
        pytest.skip("the CPU extension did not build here")
    g = torch.Generator().manual_seed(4)
    frames = (torch.rand(shape, generator=g) < 0.3).float().contiguous(memory_format=torch.channels_last)
    leaf = frames.clone().requires_grad_()
    want = nn.functional.max_pool2d(leaf, 2)
    got_leaf = frames.clone().requires_grad_()
    got, p8 = models._spike_pool(got_leaf, frames.to(torch.uint8, memory_format=torch.channels_last))
    assert torch.equal(got, want) and torch.equal(p8.float(), want) and p8.dtype == torch.uint8
    assert got.is_contiguous(memory_format=torch.channels_last)
    proj = torch.randn(want.shape, generator=g)
    (want * proj).sum().backward()
    (got * proj).sum().backward()
    assert torch.equal(got_leaf.grad, leaf.grad)
    assert models._is_2x2(nn.MaxPool2d(2)) and not models._is_2x2(nn.MaxPool2d(3, 2)) and \
        not models._is_2x2(nn.MaxPool2d(2, ceil_mode=True))


def test_triton_backend_runs_tiny_binwslt():
    pytest.importorskip("triton")
    try:
        importlib.import_module("binwslt.kernels.ops")
    except ImportError as exc:
        pytest.skip(f"binwslt.kernels not installed: {exc}")
    torch.manual_seed(2)
    ref = models.build("conv4", "binwslt", num_classes=3, in_channels=1, image_size=4, width=1 / 16,
                       timesteps=2, backend="torch")
    tri = models.build("conv4", "binwslt", num_classes=3, in_channels=1, image_size=4, width=1 / 16,
                       timesteps=2, backend="triton")
    tri.load_state_dict(ref.state_dict())
    ref.eval()
    tri.eval()
    x = torch.randn(2, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(tri(x), ref(x))


def test_config_records_arguments_and_rebuilds():
    neuron = LIFConfig(decay=0.5, v_reset=None)
    model = models.build("vgg9", "binwslt", num_classes=7, in_channels=1, image_size=8, prune_rate=0.6,
                         timesteps=2, neuron=neuron, backend="torch", width=0.25)
    cfg = model.config
    assert cfg == {"name": "vgg9", "kind": "binwslt", "num_classes": 7, "in_channels": 1, "image_size": 8,
                   "prune_rate": 0.6, "timesteps": 2, "neuron": neuron.to_dict(), "backend": "torch",
                   "width": 0.25}
    again = models.build_from_config(dict(cfg))
    assert again.config == cfg
    assert [tuple(p.shape) for p in again.state_dict().values()] == \
        [tuple(p.shape) for p in model.state_dict().values()]
    again.load_state_dict(model.state_dict())
    model.eval()
    again.eval()
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(again(x), model(x))
    assert all(layer.prune_rate == 0.6 for layer in models.subnet_layers(model))
    assert models.build("conv4", "ann", prune_rate=0.7).config["prune_rate"] == 0.0


def test_sparsity_follows_prune_rate():
    model = models.build("conv4", "binwslt", in_channels=1, image_size=8, prune_rate=0.4)
    assert models.sparsity(model) == pytest.approx(0.4, abs=1e-4)
    assert models.sparsity(models.build("conv4", "snn", in_channels=1, image_size=8)) == 0.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="conv5", kind="ann"), "model name must be one of"),
    (dict(name="conv4", kind="spiking"), "kind must be one of"),
    (dict(name="vgg11", kind="ann", image_size=8), "image_size=8 is too small for vgg11"),
    (dict(name="conv4", kind="binwslt", prune_rate=1.0), "prune_rate must be"),
    (dict(name="conv4", kind="binwslt", timesteps=0), "timesteps must be"),
    (dict(name="conv4", kind="binwslt", num_classes=1), "num_classes must be"),
    (dict(name="conv4", kind="binwslt", width=0), "width must be"),
    (dict(name="conv4", kind="binwslt", backend="cuda"), "backend must be one of"),
])
def test_build_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build(**kwargs)


def test_build_rejects_bad_neuron_and_config():
    with pytest.raises(TypeError, match="neuron must be"):
        models.build("conv4", "snn", neuron=0.99)
    with pytest.raises(ValueError, match="unknown keys"):
        models.build_from_config({"name": "conv4", "kind": "ann", "depth": 3})


def test_forward_rejects_wrong_input():
    model = tiny("conv4", "ann")
    with pytest.raises(ValueError, match=r"x must have shape \[N, 1, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_shortcut_projection_only_where_shape_changes():
    model = models.build("resnet19", "binwslt", in_channels=1, image_size=8, width=0.125, backend="torch")
    blocks = [m for m in model.features if isinstance(m, models.BasicBlock)]
    assert len(blocks) == 8
    assert [b.shortcut is not None for b in blocks] == [True, False, False, True, False, False, True, False]
    assert all(isinstance(b.shortcut.conv, BinWConv2d) for b in blocks if b.shortcut is not None)
