"""binwslt.ticket: 2-bit safetensors tickets that rebuild bit-identical models."""
import json
import math
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from binwslt import models, ticket
from binwslt.subnet import subnet_mask, ternary_subnet


def _tiny(name, kind, **kw):
    size = 16 if name == "vgg11" else 8
    return models.build(name, kind, num_classes=5, in_channels=1, image_size=size, width=0.125,
                        backend="torch", **kw)


def _as_if_trained(model, seed=0):
    """Random scores, BN affine and running statistics, so the ticket must carry all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point() or name.endswith(".weight") and tensor.dim() > 1:
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5 + (1.0 if name.endswith("weight") else 0))
    return model.eval()


def _contents(path):
    """Metadata and tensors (as bytes) of a safetensors file; its header's key order is not deterministic."""
    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: (f.get_tensor(k).dtype, f.get_tensor(k).numpy().tobytes()) for k in f.keys()}


@pytest.mark.parametrize("name,kind", [("conv4", "binwslt"), ("conv4", "bnn-binact"), ("resnet19", "binwslt"),
                                       ("resnet19", "bnn-binact"), ("vgg9", "snn"), ("conv4", "ann")])
def test_round_trip_is_bit_identical(tmp_path, name, kind):
    torch.manual_seed(1)
    model = _as_if_trained(_tiny(name, kind, prune_rate=0.6, timesteps=3))
    x = torch.rand(4, 1, 8, 8) * 2
    with torch.no_grad():
        expected = model(x)
    path = tmp_path / "t.safetensors"
    size = ticket.save(model, path)
    assert size == os.path.getsize(path) and os.listdir(tmp_path) == ["t.safetensors"]  # no temp file left
    loaded = ticket.load(path)
    assert not loaded.training and loaded.config == model.config
    with torch.no_grad():
        got = loaded(x)
    assert torch.equal(got, expected)
    ticket.save(loaded, tmp_path / "again.safetensors")  # a ticket of a loaded ticket holds the same
    assert _contents(tmp_path / "again.safetensors") == _contents(path)
    original, rebuilt = ticket.binary_layers(model), ticket.binary_layers(loaded)
    assert list(original) == list(rebuilt)
    assert bool(original) == (kind in models.BINARY_KINDS)
    for layer_name, layer in original.items():
        tern, alpha = ternary_subnet(layer.weight, layer.scores, layer.prune_rate)
        tern2, alpha2 = ternary_subnet(rebuilt[layer_name].weight, rebuilt[layer_name].scores, layer.prune_rate)
        assert torch.equal(tern, tern2) and torch.equal(alpha, alpha2)
        # the gain survives any summation order (a GPU reduction adds in another order)
        perm = torch.randperm(layer.weight.numel())
        w, s = rebuilt[layer_name].weight.reshape(-1)[perm], rebuilt[layer_name].scores.reshape(-1)[perm]
        assert torch.equal(ternary_subnet(w, s, layer.prune_rate)[1], alpha)


def test_file_holds_two_bits_per_binary_weight_and_no_dense_weights(tmp_path):
    model = models.build("conv4", "binwslt")  # the paper's Conv-4: 2,425,024 binary weights
    path = tmp_path / "conv4.safetensors"
    size = ticket.save(model, path)
    weights = models.weight_count(model)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
        packed = sum(f.get_tensor(k).numel() for k in keys if k.endswith((".sign", ".mask")))
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in keys if k.endswith((".sign", ".mask")))
    layers = json.loads(meta["binary_layers"])
    assert packed == sum(2 * math.ceil(math.prod(v["shape"]) / 8) for v in layers.values())
    assert packed <= weights / 4 + 2 * len(layers)
    assert not any(k.endswith((".scores", "features.0.weight")) for k in keys)
    dense = ticket.dense_fp32_bytes(model)
    assert dense >= 4 * weights
    assert size < dense / 15  # 2 bits instead of 32 per weight, plus BN state and the header
    assert json.loads(meta["config"]) == model.config


def test_ticket_keeps_the_found_subnetwork_not_the_init(tmp_path):
    torch.manual_seed(0)
    model = _as_if_trained(_tiny("conv4", "binwslt"), seed=3)
    path = tmp_path / "t.safetensors"
    ticket.save(model, path)
    torch.manual_seed(123)  # a different init in the rebuilt model must not matter
    loaded = ticket.load(path)
    for a, b in zip(models.subnet_layers(model), models.subnet_layers(loaded)):
        assert torch.equal(subnet_mask(a.scores, a.prune_rate), b.mask())
        assert torch.equal(torch.sign(a.weight), torch.sign(b.weight))


def test_backend_override(tmp_path):
    model = _tiny("conv4", "binwslt")
    path = tmp_path / "t.safetensors"
    ticket.save(model, path)
    assert ticket.read_config(path)["backend"] == "torch"
    loaded = ticket.load(path, backend="reference")
    assert loaded.config["backend"] == "reference"
    assert all(layer.backend == "reference" for layer in models.subnet_layers(loaded) if hasattr(layer, "backend"))


def test_save_errors(tmp_path):
    model = _tiny("conv4", "binwslt")
    with pytest.raises(TypeError, match="model"):
        ticket.save("conv4", tmp_path / "a")
    with pytest.raises(TypeError, match="path"):
        ticket.save(model, 3)
    bare = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="no binary-subnet layers and no `config`"):
        ticket.save(bare, tmp_path / "a")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("zeros_in_layer", [1, 3, "all"])
def test_kept_weights_that_are_exactly_zero(tmp_path, zeros_in_layer):
    """Float32 Kaiming init gives an exact 0 about once in 10M weights (ResNet-19 has one): sign(0) = 0 is kept."""
    torch.manual_seed(4)
    model = _as_if_trained(_tiny("conv4", "binwslt", prune_rate=0.5))
    layer = models.subnet_layers(model)[1]
    kept = layer.mask().view(-1).nonzero().view(-1)
    chosen = kept if zeros_in_layer == "all" else kept[:zeros_in_layer]
    with torch.no_grad():
        layer.weight.view(-1)[chosen] = 0.0
        layer.weight.view(-1)[(~layer.mask().view(-1)).nonzero()[0, 0]] = 0.0  # a pruned zero does not matter
    x = torch.rand(3, 1, 8, 8) * 2
    with torch.no_grad():
        expected = model(x)
    ticket.save(model, tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        assert f.get_tensor("features.1.kept_zeros").tolist() == chosen.tolist()
        assert "features.0.kept_zeros" not in f.keys()
    loaded = ticket.load(tmp_path / "t.safetensors")
    rebuilt = models.subnet_layers(loaded)[1]
    assert torch.equal(ternary_subnet(layer.weight, layer.scores, 0.5)[0],
                       ternary_subnet(rebuilt.weight, rebuilt.scores, 0.5)[0])
    assert torch.equal(ternary_subnet(layer.weight, layer.scores, 0.5)[1],
                       ternary_subnet(rebuilt.weight, rebuilt.scores, 0.5)[1])
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        ticket.load(tmp_path / "nothere.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        ticket.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not a binwslt ticket"):
        ticket.load(other)
    model = _tiny("conv4", "binwslt", prune_rate=0.5)
    good = tmp_path / "good.safetensors"
    ticket.save(model, good)
    # a ticket whose mask does not prune what its prune rate says is rejected, not silently rebuilt
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["features.0.mask"] = torch.full_like(tensors["features.0.mask"], 255)
    meta["sha256"] = ticket._digest(tensors, meta)  # a deliberate edit: the checks behind the checksum
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="mask prunes 0 weights"):
        ticket.load(bad)


def test_gain_rebuilt_exactly_under_a_float64_gain_definition(tmp_path, monkeypatch):
    """Should the gain be summed in float64 (as the Triton subnet kernel does), tickets still round-trip."""
    def ternary_subnet_fp64(weight, scores, prune_rate):
        mask = subnet_mask(scores, prune_rate)
        tern = (torch.sign(weight.detach()) * mask).to(torch.int8)
        total = (weight.detach().double().abs() * mask).sum()
        return tern, (total / mask.sum()).float()

    monkeypatch.setattr(ticket, "ternary_subnet", ternary_subnet_fp64)
    torch.manual_seed(2)
    model = _tiny("conv4", "binwslt", prune_rate=0.3)
    ticket.save(model, tmp_path / "t.safetensors")
    loaded = ticket.load(tmp_path / "t.safetensors")
    for a, b in zip(models.subnet_layers(model), models.subnet_layers(loaded)):
        assert torch.equal(ternary_subnet_fp64(a.weight, a.scores, a.prune_rate)[1],
                           ternary_subnet_fp64(b.weight, b.scores, b.prune_rate)[1])


def test_corrupt_gain_is_an_error(tmp_path):
    model = _tiny("conv4", "binwslt")
    good = tmp_path / "good.safetensors"
    ticket.save(model, good)
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["features.3.alpha"] = torch.tensor([float("nan")])
    meta["sha256"] = ticket._digest(tensors, meta)
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="features.3.*alpha=nan"):
        ticket.load(bad)


def test_rebuilt_gain_is_the_same_on_the_triton_subnet_kernel(tmp_path):
    """The kernel sums |w|·M in float32 blocks and float64 across them; exact sums make it agree with torch."""
    from binwslt.kernels.subnet import ternary_subnet as kernel_ternary_subnet

    torch.manual_seed(5)
    model = _as_if_trained(_tiny("conv4", "binwslt", prune_rate=0.45))
    ticket.save(model, tmp_path / "t.safetensors")
    loaded = ticket.load(tmp_path / "t.safetensors")
    for a, b in zip(models.subnet_layers(model), models.subnet_layers(loaded)):
        stored = ternary_subnet(a.weight, a.scores, a.prune_rate)
        tern, alpha = kernel_ternary_subnet(b.weight, b.scores, b.prune_rate)
        assert torch.equal(tern, stored[0]) and torch.equal(alpha.reshape(()), stored[1])


def _rewrite(src, dst, edit_tensors=None, edit_meta=None, resign=True):
    """Copy the ticket ``src`` to ``dst`` with edits; ``resign`` recomputes the header's SHA-256 (a deliberate
    edit), so the checks behind the checksum are what is tested."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if resign:
        meta["sha256"] = ticket._digest(tensors, meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _flip_first_sign(tensors):
    tensors["features.0.sign"][0] ^= 1


def test_checksum_catches_flipped_bits_and_changed_dtypes(tmp_path):
    good = tmp_path / "good.safetensors"
    ticket.save(_tiny("conv4", "binwslt"), good)
    flipped = _rewrite(good, tmp_path / "flipped.safetensors", _flip_first_sign, resign=False)
    with pytest.raises(ticket.TicketError, match="SHA-256 .* does not match"):
        ticket.load(flipped)
    raw = bytearray(good.read_bytes())  # the header's dtype of a BN tensor F32 -> I32, bytes unchanged
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + header_len])
    key = next(k for k in header if k.endswith("running_var"))
    header[key]["dtype"] = "I32"
    text = json.dumps(header, separators=(",", ":")).encode().ljust(header_len)
    assert len(text) == header_len
    retyped = tmp_path / "retyped.safetensors"
    retyped.write_bytes(bytes(raw[:8]) + text + bytes(raw[8 + header_len:]))
    with pytest.raises(ticket.TicketError, match="SHA-256"):
        ticket.load(retyped)


def test_metadata_that_does_not_fit_fails_before_allocating(tmp_path, monkeypatch):
    good = tmp_path / "good.safetensors"
    ticket.save(_tiny("conv4", "binwslt"), good)

    def huge(meta):
        config = json.loads(meta["config"])
        config["image_size"] = 512  # the real Conv-4 head would be 256 x 2M floats
        meta["config"] = json.dumps(config)

    bad = _rewrite(good, tmp_path / "bad.safetensors", edit_meta=huge)
    built_on = []
    real_build = models.build_from_config

    def spy(config):
        model = real_build(config)
        built_on.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(models, "build_from_config", spy)
    # torch.device("meta") knows the factories by identity (cached when first used): conftest's NaN-filling
    # torch.empty wrapper is not one of them, so put torch's own back for this test
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    torch.utils._device._device_constructors.cache_clear()
    with pytest.raises(ticket.TicketError, match="layer 'head.0' has shape .* in the ticket but"):
        ticket.load(bad)
    assert built_on == ["meta"]

    def wrong_shape(meta):
        layers = json.loads(meta["binary_layers"])
        layers["features.0"]["shape"] = [4096, 4096, 64, 64]
        meta["binary_layers"] = json.dumps(layers)

    bad2 = _rewrite(good, tmp_path / "bad2.safetensors", edit_meta=wrong_shape)
    with pytest.raises(ticket.TicketError, match="layer 'features.0': tensor 'sign'"):
        ticket.load(bad2)


def test_nan_is_refused_at_save_naming_the_layer(tmp_path):
    model = _tiny("conv4", "binwslt")
    with torch.no_grad():
        model.features[3].scores[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'features.3': scores holds 1 NaN/Inf"):
        ticket.save(model, tmp_path / "t.safetensors")
    model = _tiny("conv4", "binwslt")
    with torch.no_grad():
        model.head[0].bn.running_var[1] = float("inf")
    with pytest.raises(ValueError, match="layer 'head.0.bn': running_var"):
        ticket.save(model, tmp_path / "t.safetensors")
    assert not os.listdir(tmp_path)


def test_corrupt_and_foreign_files_give_one_line_in_the_cli(tmp_path, capsys):
    from binwslt import cli

    good = tmp_path / "good.safetensors"
    ticket.save(_tiny("conv4", "binwslt"), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    flipped = _rewrite(good, tmp_path / "flipped.safetensors", _flip_first_sign, resign=False)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    for path in (truncated, flipped, foreign):
        with pytest.raises(ticket.TicketError) as info:
            ticket.load(path)
        assert "\n" not in str(info.value)
        assert cli.main(["energy", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err and str(path) in err


def test_version_1_tickets_still_load(tmp_path):
    torch.manual_seed(3)
    model = _as_if_trained(_tiny("conv4", "binwslt"))
    good = tmp_path / "good.safetensors"
    ticket.save(model, good)

    def as_version_1(meta):  # what binwslt wrote before the checksum and the per-layer kind/neuron
        meta["version"] = "1"
        del meta["sha256"], meta["model_class"], meta["neurons"]
        meta["binary_layers"] = json.dumps({k: {"shape": v["shape"], "prune_rate": v["prune_rate"]}
                                            for k, v in json.loads(meta["binary_layers"]).items()})

    old = _rewrite(good, tmp_path / "old.safetensors", edit_meta=as_version_1, resign=False)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(ticket.load(old)(x), model(x))


def _converted_spikingjelly(seed):
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional as sjf
    from spikingjelly.activation_based import layer, neuron, surrogate

    from binwslt.nn import convert

    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        layer.Conv2d(1, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
        neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=0.3, surrogate_function=surrogate.ATan()),
        layer.MaxPool2d(2), layer.Flatten(),
        layer.Linear(4 * 4 * 4, 5, bias=False),
        neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=0.3, surrogate_function=surrogate.ATan()))
    sjf.set_step_mode(net, "m")
    with torch.no_grad():
        net[5].weight.mul_(8.0)  # no BatchNorm before it: larger weights keep it firing
    return convert(net, 0.5, backend="torch")


def test_any_converted_model_round_trips_and_mismatches_are_named(tmp_path):
    model = _converted_spikingjelly(0)
    with torch.no_grad():
        model[0].bn.running_mean.uniform_(-0.2, 0.2)
        model[0].scores.normal_()
    model.eval()
    path = tmp_path / "sj.safetensors"
    ticket.save(model, path)
    assert ticket.read_config(path) is None
    with pytest.raises(ticket.TicketError, match="pass it as ticket.load\\(path, model=...\\)"):
        ticket.load(path)
    fresh = _converted_spikingjelly(1)  # same structure, other random weights and scores
    loaded = ticket.load(path, model=fresh)
    assert loaded is fresh and not fresh.training
    x = torch.rand(3, 2, 1, 8, 8) * 3
    with torch.no_grad():
        want = model(x)
        assert 0 < float(want.mean()) < 1 and torch.equal(fresh(x), want)
    for name in ("0", "5"):
        a, b = model.get_submodule(name), fresh.get_submodule(name)
        assert torch.equal(a.effective_weight(), b.effective_weight())
    other = _converted_spikingjelly(2)
    other[5].prune_rate = 0.25
    with pytest.raises(ticket.TicketError, match="layer '5' has prune_rate 0.5 in the ticket but 0.25"):
        ticket.load(path, model=other)
    other = _converted_spikingjelly(2)
    other[0].neuron = type(other[0].neuron)(decay=0.25)
    with pytest.raises(ticket.TicketError, match="layer '0' has neuron"):
        ticket.load(path, model=other)
    with pytest.raises(ticket.TicketError, match="ticket layer '0' .* is not a binary-subnet layer"):
        ticket.load(path, model=torch.nn.Sequential(torch.nn.Identity()))


def test_stand_alone_lif_modules_must_match(tmp_path):
    from binwslt import LIFConfig
    from binwslt.nn import LIF, BinWLinear

    def make(decay):
        return torch.nn.Sequential(BinWLinear(6, 4, 0.5), LIF(LIFConfig(decay=decay), backend="torch"))

    path = tmp_path / "t.safetensors"
    ticket.save(make(0.5), path)
    ticket.load(path, model=make(0.5))
    with pytest.raises(ticket.TicketError, match="LIF '1' is .*'decay': 0.5.* in the ticket but .*'decay': 0.25"):
        ticket.load(path, model=make(0.25))
