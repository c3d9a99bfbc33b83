"""Modules: drop-in layers, BatchNorm train/eval semantics, convert(), torch.compile."""
import pytest
import torch
from torch import nn

from binwslt import LIFConfig
from binwslt import functional as Fn
from binwslt.nn import LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF, convert

from helpers import spikes


def test_weight_and_scores_live_where_conv_keeps_its_weight():
    layer = BinWConv2dLIF(3, 8, 3, padding=1)
    assert layer.weight.shape == layer.scores.shape == (8, 3, 3, 3)
    assert not layer.weight.requires_grad and layer.scores.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"scores", "bn.weight", "bn.bias"}
    assert 0.55 < layer.mask().float().mean().item() < 0.65


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_conv_lif_module_matches_seq_to_ann_batchnorm(backend):
    """Training mode: BN over (T, N, H, W) as SpikingJelly's SeqToANNContainer(conv, bn); eval: running stats."""
    torch.manual_seed(0)
    layer = BinWConv2dLIF(3, 5, 3, padding=1, neuron=LIFConfig(decay=0.5, threshold=0.5), backend=backend)
    bn = nn.BatchNorm2d(5)
    x = spikes(4, 2, 3, 7, 7)
    for mode in ("train", "eval"):
        layer.train(mode == "train")
        bn.train(mode == "train")
        conv = torch.nn.functional.conv2d(x.flatten(0, 1), layer.effective_weight().detach(), padding=1)
        current = bn(conv).view(4, 2, 5, 7, 7)
        want = Fn.lif(current, layer.neuron, backend="reference")
        got = layer(x)
        assert (got != want).float().mean() < 1e-3, mode
        torch.testing.assert_close(layer.bn.running_mean, bn.running_mean)
        torch.testing.assert_close(layer.bn.running_var, bn.running_var)


def test_direct_encoding_module():
    layer = BinWConv2dLIF(1, 4, 3, padding=1, timesteps=3, backend="torch")
    out = layer(torch.randn(2, 1, 8, 8))
    assert out.shape == (3, 2, 4, 8, 8)
    assert layer(spikes(3, 2, 1, 8, 8)).shape == (3, 2, 4, 8, 8)


def test_linear_lif_module_and_residual():
    layer = BinWLinearLIF(10, 6, backend="torch")
    x = spikes(3, 4, 10)
    out = layer(x, residual=torch.ones(3, 4, 6) * 5.0)
    assert out.shape == (3, 4, 6) and out[0].eq(1).all()


def test_binw_conv2d_and_linear_accept_time_major_and_plain():
    conv, lin = BinWConv2d(3, 4, 3, padding=1), BinWLinear(6, 2, bias=True)
    x = spikes(2, 5, 3, 6, 6)
    torch.testing.assert_close(conv(x)[1], conv(x[1]))
    y = spikes(2, 5, 6)
    torch.testing.assert_close(lin(y)[0], lin(y[0]))


def test_convert_swaps_layers_and_keeps_weights():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.ReLU(),
                          nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 10)))
    w0, l0 = model[0].weight.detach().clone(), model[2][1].weight.detach().clone()
    convert(model, prune_rate=0.5)
    assert isinstance(model[0], BinWConv2d) and isinstance(model[2][1], BinWLinear)
    assert torch.equal(model[0].weight, w0) and torch.equal(model[2][1].weight, l0)
    assert model[0].prune_rate == 0.5
    out = model(torch.randn(2, 3, 6, 6))
    out.sum().backward()
    assert model[0].scores.grad is not None and model[0].weight.grad is None
    with pytest.raises(ValueError, match="groups"):
        convert(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)))


def test_convert_spikingjelly_style_multistep_conv():
    class MultiStepConv(nn.Conv2d):  # what SpikingJelly's layer.Conv2d(step_mode="m") does
        def forward(self, x):
            return super().forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])

    model = nn.Sequential(MultiStepConv(2, 3, 3), LIF(LIFConfig(decay=0.5), backend="torch"))
    convert(model)
    assert isinstance(model[0], BinWConv2d)
    assert model(spikes(4, 2, 2, 5, 5)).shape == (4, 2, 3, 3, 3)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="prune_rate"):
        BinWConv2dLIF(3, 4, 3, prune_rate=1.2)
    with pytest.raises(ValueError, match="backend"):
        BinWLinearLIF(3, 4, backend="cuda")
    with pytest.raises(TypeError, match="neuron"):
        BinWLinearLIF(3, 4, neuron=0.5)


class _TinySNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = BinWConv2dLIF(1, 4, 3, padding=1, timesteps=2, backend="torch")
        self.conv2 = BinWConv2dLIF(4, 4, 3, stride=2, padding=1, backend="torch")
        self.fc = BinWLinearLIF(4 * 4 * 4, 8, backend="torch")
        self.head = BinWLinear(8, 3)

    def forward(self, x):
        s = self.conv2(self.conv1(x))
        return self.head(self.fc(s.flatten(2))).mean(0)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = _TinySNN()
    x = torch.randn(2, 1, 8, 8)
    want = model(x)
    want.square().sum().backward()
    want_grad = model.conv1.scores.grad.clone()
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    got = compiled(x)
    torch.testing.assert_close(got, want)
    got.square().sum().backward()
    assert want_grad.abs().sum() > 0
    torch.testing.assert_close(model.conv1.scores.grad, want_grad)
