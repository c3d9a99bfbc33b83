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
    with pytest.raises(ValueError, match="config"):
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
