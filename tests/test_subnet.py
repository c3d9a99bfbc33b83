"""The MPT-1/32 subnetwork rule against hand-computed values (design.md §3)."""
import pytest
import torch

from binwslt import functional as Fn
from binwslt.bits import pack_bits, unpack_bits
from binwslt.subnet import n_pruned, subnet_mask, subnet_weight, ternary_subnet


def test_n_pruned_is_floor():
    assert n_pruned(10, 0.4) == 4
    assert n_pruned(7, 0.5) == 3
    assert n_pruned(9, 0.0) == 0
    with pytest.raises(ValueError, match="prune_rate"):
        n_pruned(10, 1.0)
    with pytest.raises(ValueError, match="prune_rate"):
        n_pruned(10, -0.1)


def test_mask_alpha_and_ternary_by_hand():
    weight = torch.tensor([[0.5, -2.0, 1.0], [-0.25, 3.0, -1.5]])
    scores = torch.tensor([[0.1, -0.9, 0.3], [0.05, -0.2, 0.7]])
    # prune 40% of 6 -> 2 smallest |s|: 0.05 (idx 3) and 0.1 (idx 0)
    mask = subnet_mask(scores, 0.4)
    assert mask.tolist() == [[False, True, True], [False, True, True]]
    tern, alpha = ternary_subnet(weight, scores, 0.4)
    assert tern.dtype == torch.int8
    assert tern.tolist() == [[0, -1, 1], [0, 1, -1]]
    assert alpha.item() == pytest.approx((2.0 + 1.0 + 3.0 + 1.5) / 4)
    w_eff = Fn.subnet_weight(weight, scores, 0.4)
    torch.testing.assert_close(w_eff, alpha * tern.float())


def test_ties_prune_lower_index_first():
    scores = torch.tensor([0.5, -0.5, 0.5, 1.0])
    assert subnet_mask(scores, 0.5).tolist() == [False, False, True, True]


def test_straight_through_gradient_by_hand():
    weight = torch.tensor([0.5, -2.0, 1.0, -0.25])
    scores = torch.tensor([0.1, -0.9, 0.3, 0.05], requires_grad=True)
    upstream = torch.tensor([1.0, 2.0, -3.0, 4.0])
    (Fn.subnet_weight(weight, scores, 0.5) * upstream).sum().backward()
    # dL/ds = g * w * sign(s), pruned weights included (straight through), no gradient via alpha
    assert scores.grad.tolist() == pytest.approx([1.0 * 0.5, 2.0 * -2.0 * -1, -3.0 * 1.0, 4.0 * -0.25])


def test_weight_gets_straight_through_gradient_only_when_asked():
    weight = torch.tensor([0.5, -2.0, 1.0, -0.25], requires_grad=True)
    scores = torch.tensor([0.1, -0.9, 0.3, 0.05])
    (Fn.subnet_weight(weight, scores, 0.5) * torch.tensor([1.0, 2.0, 3.0, 4.0])).sum().backward()
    alpha = (2.0 + 1.0) / 2
    assert weight.grad.tolist() == pytest.approx([0.0, 2.0 * alpha, 3.0 * alpha, 0.0])


def test_subnet_weight_bad_input():
    w = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="scores shape"):
        Fn.subnet_weight(w, torch.zeros(2, 3), 0.4)
    with pytest.raises(ValueError, match="prune_rate"):
        Fn.subnet_weight(w, torch.zeros(3, 2), 1.5)
    with pytest.raises(TypeError, match="floating"):
        Fn.subnet_weight(w, torch.zeros(3, 2, dtype=torch.int64), 0.4)


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5, 7)])
def test_bits_round_trip(shape):
    bits = torch.rand(shape) < 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (bits.numel() + 7) // 8
    assert torch.equal(unpack_bits(packed, shape), bits)


def test_selection_equals_stable_sort_with_many_ties():
    g = torch.Generator().manual_seed(0)
    for n in (7, 64, 257):
        for p in (0.1, 0.4, 0.5, 0.93):
            scores = torch.randint(-3, 4, (n,), generator=g).float() * 0.5
            order = torch.sort(scores.abs(), stable=True).indices
            want = torch.ones(n, dtype=torch.bool)
            want[order[:n_pruned(n, p)]] = False
            assert torch.equal(subnet_mask(scores, p), want), (n, p)


def test_ternary_round_trip_in_two_bits():
    from binwslt.bits import pack_ternary, unpack_ternary
    tern = torch.randint(-1, 2, (5, 3, 3, 3), dtype=torch.int8)
    mask_bits, sign_bits = pack_ternary(tern)
    assert mask_bits.numel() + sign_bits.numel() == 2 * ((tern.numel() + 7) // 8)
    assert torch.equal(unpack_ternary(mask_bits, sign_bits, tern.shape), tern)


def test_subnet_cache_recomputes_only_when_inputs_change():
    from binwslt import torch_backend
    from binwslt.subnet import Subnet, SubnetCache

    weight, scores = torch.randn(6, 5), torch.randn(6, 5)
    cache = SubnetCache()
    first = cache.get(weight, scores, 0.4, "torch")
    assert isinstance(first, Subnet) and first.ternary.dtype == torch.int8 and first.alpha.dim() == 0
    assert cache.get(weight, scores, 0.4, "torch") is first
    fresh = torch_backend.make_subnet(weight, scores, 0.4)
    assert torch.equal(first.ternary, fresh.ternary) and torch.equal(first.alpha, fresh.alpha)
    assert cache.get(weight, scores, 0.5, "torch") is not first  # prune rate
    second = cache.get(weight, scores, 0.4, "torch")
    with torch.no_grad():
        scores.mul_(-1.0).add_(torch.randn(6, 5))  # in place: _version moves
    third = cache.get(weight, scores, 0.4, "torch")
    assert third is not second
    assert torch.equal(third.ternary, torch_backend.make_subnet(weight, scores, 0.4).ternary)
    assert cache.get(weight, scores.clone(), 0.4, "torch") is not third  # another tensor: data_ptr moves
    assert cache.get(weight, scores, 0.4, "reference") is None  # the oracle always recomputes


def test_cached_subnet_gives_the_same_outputs_and_score_gradients():
    from binwslt import nn as bnn

    torch.manual_seed(0)
    layer = bnn.BinWConv2dLIF(3, 4, 3, padding=1, prune_rate=0.4, backend="torch")
    x = (torch.rand(2, 2, 3, 6, 6) < 0.4).to(torch.uint8)
    grads = []
    for _ in range(2):  # the second call reuses the cached subnet
        out = layer(x)
        layer.scores.grad = None
        out.sum().backward()
        grads.append((out, layer.scores.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    layer.backend = "reference"
    ref = layer(x)
    layer.scores.grad = None
    ref.sum().backward()
    assert torch.equal(ref, grads[0][0])
    torch.testing.assert_close(layer.scores.grad, grads[0][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_subnet_weight_in_low_and_high_precision_scores(dtype):
    """subnet_weight takes scores of every float dtype (bf16 has no numpy twin); the mask is the float32 one's
    for scores exactly representable in float32, and the gradient reaches the scores in their dtype."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(6, 5, 3, 3, generator=g)
    s32 = torch.randn(6, 5, 3, 3, generator=g).to(dtype).float()
    s = s32.to(dtype).requires_grad_()
    got = subnet_weight(w, s, 0.4)
    assert torch.equal(got, subnet_weight(w, s32, 0.4))
    got.sum().backward()
    assert s.grad is not None and s.grad.dtype == dtype
