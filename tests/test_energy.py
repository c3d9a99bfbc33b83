"""binwslt.energy: FLOP/SOP counting and energy by design.md §6 and the paper's Table 2."""
import json

import pytest
import torch
from torch import nn

from binwslt import models
from binwslt.energy import E_MAC_PJ, E_SOP_PJ, estimate
from binwslt.nn import BinWConv2d
from binwslt.subnet import n_pruned


def test_ann_vgg11_matches_paper_table2():
    # convs: 3->64 at 32x32, 64->64 at 32x32, then pairs at 16,8,4 (k²·C_in·C_out·H·W) = 209,387,520;
    # fc 2048·256 + 256·256 + 256·10 = 592,384.
    model = models.build("vgg11", "ann")
    report = estimate(model, torch.rand(1, 3, 32, 32))
    assert sum(layer.flops for layer in report.layers) == 209_979_904
    assert 0.209 <= report.ops_g < 0.2105  # the paper prints 0.209
    assert round(report.energy_mj, 3) == 0.966
    assert report.ops_g_pruned == report.ops_g  # a dense model prunes nothing


def test_ann_resnet19_matches_paper_table2():
    model = models.build("resnet19", "ann")
    report = estimate(model, torch.rand(1, 3, 32, 32))
    assert sum(layer.flops for layer in report.layers) == 2_216_495_616
    assert round(report.ops_g, 2) == 2.22 and abs(report.ops_g / 2.223 - 1) < 0.005
    assert round(report.energy_mj, 1) == 10.2 and abs(report.energy_mj / 10.225 - 1) < 0.005
    shortcuts = [layer for layer in report.layers if "shortcut" in layer.name]
    assert [layer.flops for layer in shortcuts] == [64 * 128 * 32 * 32, 128 * 256 * 16 * 16, 256 * 512 * 8 * 8]


class ToySNN(nn.Module):
    """conv1 (analog, once) -> spikes repeated over T -> conv2 over T·N -> spikes -> linear; known firing rates.

    conv1 is the identity on channel 0 and 1 (centre tap), so its spikes are the binary input: firing rate 1/4.
    conv2 has zero weights and bias +1, +1, -1, -1, so half its output channels fire at every position.
    """

    def __init__(self, T=3, conv2=None, kind="snn"):
        super().__init__()
        self.T = T
        self.conv1 = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.conv2 = conv2 if conv2 is not None else nn.Conv2d(2, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.config = {"kind": kind}
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.weight[:, 0, 1, 1] = 1.0
            if conv2 is None:
                self.conv2.weight.zero_()
                self.conv2.bias.copy_(torch.tensor([1.0, 1.0, -1.0, -1.0]))

    def forward(self, x):
        n = x.shape[0]
        s1 = (self.conv1(x) >= 0.5).float().unsqueeze(0).expand(self.T, -1, -1, -1, -1)
        y2 = self.conv2(s1.reshape(self.T * n, 2, 4, 4))
        if y2.dim() == 5:  # a BinWConv2d keeps the time dim
            y2 = y2.flatten(0, 1)
        s2 = (y2 >= 0).float()
        return self.fc(s2.reshape(self.T, n, -1)).mean(0)


def _quarter_ones(n=2):
    x = torch.zeros(n, 1, 4, 4)
    x[:, :, ::2, ::2] = 1.0
    return x


def test_snn_accounting_by_hand():
    report = estimate(ToySNN(T=3), _quarter_ones())
    first, conv2, fc = report.layers
    assert report.spiking
    assert (first.flops, conv2.flops, fc.flops) == (9 * 1 * 2 * 16, 9 * 2 * 4 * 16, 64 * 3)
    assert first.op_type == "mac" and first.ops == 288 and first.timesteps == 1  # direct encoding: computed once
    assert conv2.op_type == "sop" and conv2.input_firing_rate == 0.25 and conv2.input_binary
    assert conv2.timesteps == 3 and conv2.ops == 0.25 * 3 * 1152
    assert fc.input_firing_rate == 0.5 and fc.ops == fc.sops == 0.5 * 3 * 192 and first.sops == 0
    assert report.ops_g == pytest.approx((288 + 864 + 288) / 1e9, rel=1e-12)
    expected_mj = (288 * E_MAC_PJ + (864 + 288) * E_SOP_PJ) * 1e-9
    assert report.energy_mj == pytest.approx(expected_mj, rel=1e-12)


def test_ann_accounting_counts_every_evaluation_as_mac():
    report = estimate(ToySNN(T=3), _quarter_ones(), spiking=False)
    assert not report.spiking
    assert [layer.op_type for layer in report.layers] == ["mac"] * 3
    assert report.ops_g == pytest.approx((288 + 3 * 1152 + 3 * 192) / 1e9, rel=1e-12)
    assert report.energy_mj == pytest.approx((288 + 3 * 1152 + 3 * 192) * E_MAC_PJ * 1e-9, rel=1e-12)


def test_pruned_synapses_skipped():
    torch.manual_seed(0)
    conv2 = BinWConv2d(2, 4, 3, padding=1, prune_rate=0.7)
    report = estimate(ToySNN(T=2, conv2=conv2), _quarter_ones())
    layer = report.layers[1]
    density = 1 - n_pruned(72, 0.7) / 72
    assert layer.density == pytest.approx(density)
    assert layer.ops_pruned == pytest.approx(layer.ops * density)
    assert report.ops_g_pruned < report.ops_g
    dense_rest = sum(l.ops for l in report.layers if l is not layer)
    assert report.ops_g_pruned * 1e9 == pytest.approx(dense_rest + layer.ops * density)


def test_energy_constants_are_parameters():
    report = estimate(ToySNN(T=3), _quarter_ones(), e_mac_pj=1.0, e_sop_pj=0.0)
    assert report.energy_mj == pytest.approx(288 * 1e-9)


@pytest.mark.parametrize("kind", ["binwslt", "snn"])
def test_spiking_models_count_sops_on_binary_inputs(kind):
    torch.manual_seed(0)
    model = models.build("conv4", kind, in_channels=1, image_size=8, width=0.125, backend="torch")
    model.train()
    report = estimate(model, torch.rand(3, 1, 8, 8))
    assert model.training and all(m.training for m in model.modules())  # the mode is restored
    assert report.spiking and len(report.layers) == 7
    first, rest = report.layers[0], report.layers[1:]
    assert first.op_type == "mac" and first.ops == first.flops == 9 * 1 * 8 * 64 and first.timesteps == 1
    for layer in rest:
        assert layer.op_type == "sop" and layer.input_binary and layer.timesteps == 4
        assert 0.0 <= layer.input_firing_rate <= 1.0
        assert layer.ops == pytest.approx(layer.input_firing_rate * 4 * layer.flops)
    expected = (first.ops * E_MAC_PJ + sum(l.ops for l in rest) * E_SOP_PJ) * 1e-9
    assert report.energy_mj == pytest.approx(expected)
    json.dumps(report.to_dict())
    assert "total" in report.table()


def test_bnn_binact_is_counted_like_the_ann_of_the_same_shape():
    torch.manual_seed(0)
    kw = dict(in_channels=1, image_size=8, width=0.125)
    x = torch.rand(2, 1, 8, 8)
    ann = estimate(models.build("conv4", "ann", **kw), x)
    bnn = estimate(models.build("conv4", "bnn-binact", prune_rate=0.5, **kw), x)
    assert not bnn.spiking and bnn.ops_g == ann.ops_g and bnn.energy_mj == ann.energy_mj
    assert bnn.ops_g_pruned == pytest.approx(0.5 * bnn.ops_g, rel=0.01)


def test_batchnorm_statistics_untouched():
    torch.manual_seed(0)
    model = models.build("conv4", "ann", in_channels=1, image_size=8, width=0.125)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    estimate(model, torch.rand(2, 1, 8, 8))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_errors():
    model = ToySNN()
    with pytest.raises(TypeError, match="model"):
        estimate("vgg11", _quarter_ones())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        estimate(model, torch.zeros(2, 1, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be"):
        estimate(model, torch.zeros(4))
    with pytest.raises(ValueError, match="e_sop_pj"):
        estimate(model, _quarter_ones(), e_sop_pj=-1.0)
    model.config = {}
    with pytest.raises(ValueError, match="spiking=True or False"):
        estimate(model, _quarter_ones())
    with pytest.raises(TypeError, match="spiking"):
        estimate(model, _quarter_ones(), spiking="yes")
    with pytest.raises(ValueError, match="no conv or linear"):
        estimate(nn.Sequential(nn.ReLU()), _quarter_ones(), spiking=False)


def test_run_observed_restores_modes_and_hooks_when_the_forward_raises():
    from binwslt.probe import run_observed

    class Boom(torch.nn.Module):
        def forward(self, x):
            assert not self.training and not torch.is_grad_enabled()
            raise RuntimeError("boom")

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), Boom())
    model[0].eval()  # a mixed mode must come back as it was
    calls = []
    handle = model[0].register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(RuntimeError, match="boom"):
        run_observed(model, torch.zeros(2, 3), [handle])
    assert model.training and not model[0].training and model[1].training
    model[0](torch.zeros(2, 3))
    assert calls == [1]  # called once inside run_observed, the hook is gone after it
