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
