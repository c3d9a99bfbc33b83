"""Ternary subnet weight kernel (kernels/subnet.py) against binwslt.subnet.ternary_subnet."""
import pytest
import torch

from binwslt.subnet import n_pruned, ternary_subnet as torch_ternary_subnet

pytest.importorskip("triton")
from binwslt.kernels import subnet as triton_subnet  # noqa: E402


def _weights(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


@pytest.mark.parametrize("shape", [(5,), (19, 3), (7, 5, 3, 3), (33, 19, 1, 1), (3, 700)])
@pytest.mark.parametrize("prune_rate", [0.0, 0.1, 0.4, 0.5, 0.9, 0.999])
def test_ternary_subnet_matches_torch(shape, prune_rate):
    weight, scores = _weights(shape, seed=sum(shape))
    tern, alpha = triton_subnet.ternary_subnet(weight, scores, prune_rate)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, prune_rate)
    assert tern.dtype == torch.int8 and tern.shape == weight.shape
    assert alpha.dtype == torch.float32 and alpha.dim() == 0
    assert torch.equal(tern, want_tern)
    assert int((tern == 0).sum()) == n_pruned(weight.numel(), prune_rate)
    assert torch.equal(alpha, want_alpha)  # both sum in fp64: the same float32


def test_ternary_subnet_ties_fall_back_exactly():
    """Scores tied at the threshold: the flat-index tie-break of binwslt.subnet must hold."""
    weight, _ = _weights((6, 10), seed=1)
    scores = torch.round(torch.randn((6, 10), generator=torch.Generator().manual_seed(2)) * 2) / 2  # many ties
    for prune_rate in (0.3, 0.5, 0.75):
        tern, alpha = triton_subnet.ternary_subnet(weight, scores, prune_rate)
        want_tern, want_alpha = torch_ternary_subnet(weight, scores, prune_rate)
        assert torch.equal(tern, want_tern)
        assert torch.equal(alpha, want_alpha)


def test_ternary_subnet_zero_weight_and_negative_scores():
    """sign(0) = 0 stays pruned-looking but is counted as kept in alpha; |s| (not s) decides."""
    weight = torch.tensor([[0.0, -2.0, 3.0, -4.0]])
    scores = torch.tensor([[-5.0, 0.1, -0.2, 6.0]])
    tern, alpha = triton_subnet.ternary_subnet(weight, scores, 0.5)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, 0.5)
    assert torch.equal(tern, want_tern)
    assert torch.equal(tern, torch.tensor([[0, 0, 0, -1]], dtype=torch.int8))
    torch.testing.assert_close(alpha, want_alpha)


def test_ternary_subnet_fp16_inputs():
    weight, scores = _weights((9, 13), seed=4)
    weight, scores = weight.half(), scores.half()
    tern, alpha = triton_subnet.ternary_subnet(weight, scores, 0.4)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, 0.4)
    assert torch.equal(tern, want_tern)
    torch.testing.assert_close(alpha, want_alpha.float(), rtol=1e-3, atol=0)


def test_ternary_subnet_rejects_bad_input():
    weight, scores = _weights((4, 4), seed=0)
    with pytest.raises(ValueError, match="scores shape"):
        triton_subnet.ternary_subnet(weight, scores[:2], 0.5)
    with pytest.raises(TypeError, match="floating"):
        triton_subnet.ternary_subnet(weight, scores.long(), 0.5)
    with pytest.raises(ValueError, match="prune_rate"):
        triton_subnet.ternary_subnet(weight, scores, 1.5)


@pytest.mark.gpu
def test_ternary_subnet_gpu_large():
    g = torch.Generator(device="cuda").manual_seed(0)
    weight = torch.randn((512, 512, 3, 3), generator=g, device="cuda")
    scores = torch.randn((512, 512, 3, 3), generator=g, device="cuda")
    tern, alpha = triton_subnet.ternary_subnet(weight, scores, 0.4)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, 0.4)
    assert torch.equal(tern, want_tern)
    torch.testing.assert_close(alpha, want_alpha, rtol=1e-5, atol=0)


# ---------------------------------------------------------------------------------------------- radix selection
def _check_against_rule(weight, scores, prune_rate):
    tern, alpha = triton_subnet.ternary_subnet(weight, scores, prune_rate)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, prune_rate)
    assert torch.equal(tern, want_tern), (tuple(weight.shape), prune_rate)
    assert int((tern == 0).sum()) >= n_pruned(weight.numel(), prune_rate)
    assert torch.equal(alpha, want_alpha)


@pytest.mark.parametrize("numel", [1, 2, 1023, 1025, 3001])
@pytest.mark.parametrize("prune_rate", [0.0, 0.37, 0.9999])
def test_radix_select_odd_sizes_many_blocks(numel, prune_rate):
    """Sizes around the 1024-element block (one block, one element over, three blocks), rates 0 and near 1."""
    g = torch.Generator().manual_seed(numel)
    weight = torch.randn(numel, generator=g)
    weight[::7] = 0.0  # sign(0) = 0: kept but contributes nothing
    _check_against_rule(weight, torch.randn(numel, generator=g), prune_rate)


@pytest.mark.parametrize("prune_rate", [0.1, 0.5, 0.77, 0.999])
def test_radix_select_ties_across_blocks(prune_rate):
    """Few distinct |s| (and -0.0 / +0.0, and s vs -s): ties at the threshold span several blocks, so the flat-index
    tie rank needs the other blocks' tie counts. Must prune exactly as binwslt.subnet (lower index first)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(2900, generator=g)
    scores = torch.randint(-3, 4, (2900,), generator=g).to(torch.float32) / 2
    scores[scores == 0] = torch.tensor([-0.0, 0.0]).repeat(1500)[: int((scores == 0).sum())]
    _check_against_rule(weight, scores, prune_rate)
    _check_against_rule(weight, torch.full((2900,), 0.25), prune_rate)  # every score tied
    _check_against_rule(weight.view(29, 100), scores.view(29, 100).half(), prune_rate)


def test_radix_select_threshold_state():
    """select_threshold's device state: the k-th smallest |s| key and the number of ties among the k smallest."""
    scores = torch.tensor([5.0, -1.0, 2.0, 2.0, -2.0, 7.0, 2.0, 0.5])
    for k in range(1, 9):
        state = triton_subnet.select_threshold(scores, k)
        kth = torch.sort(scores.abs()).values[k - 1]
        assert state[0].item() == kth.view(torch.int32).item()
        assert state[1].item() == k - int((scores.abs() < kth).sum())


def test_ternary_subnet_makes_no_host_sync(monkeypatch):
    """No .item()/int()/float()/bool()/tolist() on a tensor inside the subnet selection (each would be a device
    sync on a GPU); under the interpreter the launches read tensors without any of them."""
    weight, scores = _weights((37, 61), seed=5)
    want_tern, want_alpha = torch_ternary_subnet(weight, scores, 0.6)
    calls = []

    def trap(name):
        def raise_sync(self, *args, **kwargs):
            calls.append(name)
            raise AssertionError(f"host sync: Tensor.{name}")
        return raise_sync

    for name in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, trap(name))
    subnet = triton_subnet.make_subnet(weight, scores, 0.6)
    with pytest.raises(AssertionError, match="host sync"):  # the trap itself works
        int(torch.ones(()))
    monkeypatch.undo()
    assert calls == ["__int__"]
    assert torch.equal(subnet.ternary, want_tern) and torch.equal(subnet.alpha, want_alpha)
