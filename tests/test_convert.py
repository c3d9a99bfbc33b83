"""binwslt.convert: SpikingJelly / snnTorch / plain models -> fused binary-subnet layers, spikes equal the original's."""
import copy
import warnings

import pytest
import torch
from torch import nn

from binwslt import LIFConfig
from binwslt.nn import (LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF, ConversionError, convert,
                        finetune_parameters, find_parameters, fused_layers, score_parameters)

sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional as sjf  # noqa: E402
from spikingjelly.activation_based import layer, neuron, surrogate  # noqa: E402


def csnn(C=4, classes=5, **lif):
    """SpikingJelly's tutorial CSNN (conv_fashion_mnist), small: IF and LIF neurons, pools, flatten, linears."""
    lif = dict(dict(tau=2.0, surrogate_function=surrogate.ATan(), v_threshold=0.5), **lif)
    net = nn.Sequential(
        layer.Conv2d(1, C, 3, padding=1, bias=False), layer.BatchNorm2d(C),
        neuron.IFNode(surrogate_function=surrogate.ATan(), v_threshold=0.5), layer.MaxPool2d(2, 2),
        layer.Conv2d(C, C, 3, padding=1, bias=False), layer.BatchNorm2d(C), neuron.LIFNode(**lif),
        layer.MaxPool2d(2, 2), layer.Flatten(),
        layer.Linear(C * 2 * 2, 8, bias=False), neuron.LIFNode(**lif),
        layer.Linear(8, classes, bias=False), neuron.LIFNode(**lif))
    sjf.set_step_mode(net, "m")
    with torch.no_grad():  # the linears have no BatchNorm: larger weights keep them firing
        net[9].weight.mul_(8.0)
        net[11].weight.mul_(8.0)
    return net


def vgg_style(C=4):
    """SpikingJelly VGG style: SeqToANNContainer(conv, bn) + LIFNode, a biased conv, Linear -> BN1d -> LIF."""
    def block(cin, cout, bias=False, **kw):
        return [layer.SeqToANNContainer(nn.Conv2d(cin, cout, 3, padding=1, bias=bias), nn.BatchNorm2d(cout)),
                neuron.LIFNode(tau=1.5, decay_input=False, v_reset=None, detach_reset=True,
                               surrogate_function=surrogate.Sigmoid(alpha=3.0), **kw)]
    net = nn.Sequential(*block(2, C), *block(C, C, bias=True, v_threshold=0.75), layer.SeqToANNContainer(nn.AvgPool2d(2)),
                        *block(C, C), layer.Flatten(), layer.Dropout(0.5),
                        layer.Linear(C * 4 * 4, 16, bias=False), layer.BatchNorm1d(16),
                        neuron.LIFNode(tau=3.0, decay_input=False, v_threshold=0.5,
                                       surrogate_function=surrogate.PiecewiseQuadratic(alpha=1.5)))
    sjf.set_step_mode(net, "m")
    return net


def _batch_norms(net):
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _randomise_bn(net, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for bn in _batch_norms(net):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.3)


def _converted_pair(make, backend, seed=0):
    """(original with weights set to the ticket's α·M⊙sign(w), its conversion)."""
    torch.manual_seed(seed)
    original = make()
    _randomise_bn(original, seed)
    converted = convert(copy.deepcopy(original), 0.4, backend=backend)
    binary = {name: m for name, m in converted.named_modules() if hasattr(m, "effective_weight")}
    with torch.no_grad():
        for name, m in original.named_modules():
            target = name if name in binary else name.rsplit(".", 1)[0]  # SeqToANNContainer(conv, bn): "i.0" -> "i"
            if isinstance(m, (nn.Conv2d, nn.Linear)) and target in binary:
                m.weight.copy_(binary[target].effective_weight())
    return original, converted


def _calibrate(original, converted, x):
    """Running statistics = one batch's (so eval mode fires), the same in both models."""
    for bn in _batch_norms(original):
        bn.momentum = 1.0
    original.train()
    sjf.reset_net(original)
    with torch.no_grad():
        original(x)
    originals = iter(_batch_norms(original))
    for m in converted.modules():
        if isinstance(m, (BinWConv2dLIF, BinWLinearLIF)) and m.bn is not None:
            src = next(originals)
            m.bn.load_state_dict(src.state_dict())
    # the biased conv's bias was folded into its running mean at conversion: do the same after calibrating
    for name, m in original.named_modules():
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            fused = converted.get_submodule(name.rsplit(".", 1)[0])
            fused.bn.running_mean.sub_(m.bias.detach())


def _spike_outputs(seq, x, neuron_indices):
    """Outputs of ``seq`` after each index in ``neuron_indices`` (the original's neurons)."""
    outs = []
    for i, m in enumerate(seq):
        x = m(x)
        if i in neuron_indices:
            outs.append(x)
    return outs


def _neuron_indices(original):
    return {i for i, m in enumerate(original) if isinstance(m, sj.neuron.BaseNode)}


def _compare(original, converted, x, exact):
    sjf.reset_net(original)
    idx = _neuron_indices(original)
    with torch.no_grad():
        want, got = _spike_outputs(original, x, idx), _spike_outputs(converted, x, idx)
    assert len(want) == len(got) == len(idx)
    for w, g in zip(want, got):
        assert w.shape == g.shape
        assert 0.0 < float(w.mean()) < 1.0, "the comparison needs neurons that fire and neurons that do not"
        if exact:
            assert torch.equal(w, g)
        else:
            assert float((w != g).float().mean()) <= 1e-3
    return want


def _direct(x_image, T):
    return x_image.unsqueeze(0).repeat(T, 1, 1, 1, 1)  # the tutorial's direct encoding: image repeated over T


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spikingjelly_csnn_converts_to_fused_layers_with_equal_spikes(backend):
    original, converted = _converted_pair(csnn, backend)
    assert [type(m) for m in fused_layers(converted)] == [BinWConv2dLIF, BinWConv2dLIF, BinWLinearLIF, BinWLinearLIF]
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[3], layer.MaxPool2d)
    assert converted[0].neuron == LIFConfig(decay=1.0, threshold=0.5, v_reset=0.0, surrogate="atan", alpha=2.0)
    assert converted[4].neuron == LIFConfig(decay=0.5, threshold=0.5, v_reset=0.0, decay_input=True,
                                            surrogate="atan", alpha=2.0)
    g = torch.Generator().manual_seed(1)
    x = _direct(torch.rand(3, 1, 8, 8, generator=g) * 2, T=3)
    _calibrate(original, converted, x)
    for mode in ("eval", "train"):  # eval: folded running statistics; train: the same batch statistics
        getattr(original, mode)()
        getattr(converted, mode)()
        _compare(original, converted, x, exact=False)
    out = converted(x)
    out.sum().backward()
    assert all(m.scores.grad is not None for m in fused_layers(converted))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_spikingjelly_vgg_style_converts_with_equal_spikes(backend):
    original, converted = _converted_pair(vgg_style, backend, seed=3)
    assert [type(m) for m in fused_layers(converted)] == [BinWConv2dLIF] * 3 + [BinWLinearLIF]
    assert converted[2].neuron == LIFConfig(decay=1 - 1 / 1.5, threshold=0.75, v_reset=None, surrogate="sigmoid",
                                            alpha=3.0, detach_reset=True)
    assert converted[-3].neuron.surrogate == "triangle" and converted[-3].neuron.alpha == 1.5
    assert isinstance(converted[8], layer.Dropout) and isinstance(converted[4], layer.SeqToANNContainer)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 2, 8, 8, generator=g) * 2
    _calibrate(original, converted, x)
    original.eval()
    converted.eval()
    _compare(original, converted, x, exact=False)
    original.train()
    converted.train()
    for m in original.modules():
        if isinstance(m, layer.Dropout):
            m.p = 0.0  # the same batch statistics; dropout's random mask is not part of the equivalence
    converted[8].p = 0.0
    _compare(original, converted, x, exact=False)


def _dyadic_csnn():
    net = csnn()
    with torch.no_grad():
        for bn in _batch_norms(net):  # var + eps == 1 exactly: the folded scale is gamma, every value dyadic
            bn.eps = 2.0 ** -10
            bn.running_var.fill_(1.0 - 2.0 ** -10)
            bn.running_mean.copy_(torch.randint(-4, 5, (bn.num_features,)) / 8.0)
            bn.weight.copy_(torch.randint(4, 12, (bn.num_features,)) / 8.0)
            bn.bias.copy_(torch.randint(-2, 3, (bn.num_features,)) / 8.0)
    return net


def test_dyadic_inputs_give_identical_spikes():
    torch.manual_seed(5)
    original = _dyadic_csnn()
    with torch.no_grad():
        for m in original.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):  # |w| = 1/4 (1 for the linears): α is that exactly
                magnitude = 1.0 if isinstance(m, nn.Linear) else 0.25
                m.weight.copy_(torch.where(torch.rand_like(m.weight) < 0.5, magnitude, -magnitude))
    converted = convert(copy.deepcopy(original), 0.4, backend="torch")
    binary = {name: m for name, m in converted.named_modules() if hasattr(m, "effective_weight")}
    with torch.no_grad():
        for name, m in original.named_modules():
            if name in binary:
                m.weight.copy_(binary[name].effective_weight())
    original.eval()
    converted.eval()
    g = torch.Generator().manual_seed(6)
    x = _direct(torch.randint(0, 17, (3, 1, 8, 8), generator=g) / 8.0, T=4)
    _compare(original, converted, x, exact=True)


def test_float64_model_keeps_dtype_and_device():
    torch.manual_seed(0)
    model = csnn().double()
    convert(model, 0.4, backend="torch")
    for m in fused_layers(model):
        assert m.weight.dtype == m.scores.dtype == m.bn.running_mean.dtype == torch.float64 if m.bn is not None \
            else m.weight.dtype == torch.float64
    out = model(_direct(torch.rand(2, 1, 8, 8, dtype=torch.float64), 2))
    assert out.dtype == torch.float64


def test_mode_and_requires_grad_after_conversion():
    model = csnn()
    model.eval()
    convert(model, 0.3, backend="torch")
    assert all(not m.training for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, (BinWConv2dLIF, BinWLinearLIF))]
    assert all(m.prune_rate == 0.3 and not m.weight.requires_grad for m in layers)
    scores = score_parameters(model)
    assert [id(p) for p in scores] == [id(m.scores) for m in layers]
    tuned = {id(p) for p in finetune_parameters(model)}
    assert {id(m.weight) for m in layers} <= tuned and not tuned & {id(p) for p in scores}
    bn_params = {id(p) for m in layers if m.bn is not None for p in m.bn.parameters()}
    assert bn_params and bn_params <= tuned
    assert len(tuned) + len(scores) == len(list(model.parameters()))
    found = {id(p) for p in find_parameters(model)}
    assert {id(p) for p in scores} <= found and bn_params <= found and not found & {id(m.weight) for m in layers}
    assert len(found) + len(layers) == len(list(model.parameters()))
    from binwslt.train import trainable_parameters
    for command, chosen in (("find", found), ("finetune", tuned)):
        assert {id(p) for p in trainable_parameters(model, command)} == chosen
        assert {id(p) for p in model.parameters() if p.requires_grad} == chosen


def test_unfused_and_plain_models():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 3 * 3, 5))
    pool, flat, drop = plain[3], plain[4], plain[5]
    convert(plain, 0.5)
    assert isinstance(plain[0], BinWConv2d) and isinstance(plain[6], BinWLinear) and plain[0].bias is not None
    assert plain[3] is pool and plain[4] is flat and plain[5] is drop and not fused_layers(plain)
    assert plain(torch.randn(2, 3, 6, 6)).shape == (2, 5)
    net = convert(csnn(), 0.4, fuse=False)
    assert not fused_layers(net) and isinstance(net[0], BinWConv2d) and isinstance(net[2], neuron.IFNode)


def test_biased_linear_without_bn_stays_unfused():
    seq = nn.Sequential(layer.Linear(6, 5, bias=True), neuron.LIFNode(tau=2.0, surrogate_function=surrogate.ATan()))
    sjf.set_step_mode(seq, "m")
    convert(seq, 0.4, backend="torch")
    assert isinstance(seq[0], BinWLinear) and seq[0].bias is not None and isinstance(seq[1], neuron.LIFNode)


def test_what_cannot_be_expressed_is_named():
    def model():
        net = nn.Sequential(layer.Conv2d(1, 4, 3, bias=False), layer.BatchNorm2d(4),
                            neuron.ParametricLIFNode(surrogate_function=surrogate.ATan()),
                            nn.Sequential(nn.Conv1d(4, 4, 3), nn.Conv2d(4, 4, 3, groups=2)),
                            layer.Conv2d(4, 4, 3), neuron.LIFNode(surrogate_function=surrogate.Erf()),
                            layer.Linear(4, 4), neuron.LIFNode(v_reset=-0.5))
        sjf.set_step_mode(net, "m")
        return net

    net = model()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ConversionError) as info:
        convert(net, 0.4)
    message = str(info.value)
    for name in ("2 (ParametricLIFNode)", "3.0 (Conv1d)", "3.1 (Conv2d): groups=2", "5 (LIFNode): surrogate Erf",
                 "7 (LIFNode): v_reset=-0.5"):
        assert name in message
    assert "\n" not in message and isinstance(net[0], layer.Conv2d)  # nothing changed
    assert net.state_dict().keys() == before.keys()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(net, 0.4, strict=False)
    assert len(caught) == 1 and "5 layer(s) left unconverted" in str(caught[0].message)
    assert isinstance(net[0], BinWConv2d) and isinstance(net[3][0], nn.Conv1d) and isinstance(net[2],
                                                                                              neuron.ParametricLIFNode)
    single = convert(nn.Sequential(layer.Conv2d(1, 2, 3), neuron.LIFNode()))  # step mode 's': stepped by hand
    assert isinstance(single[0], BinWConv2d) and isinstance(single[1], neuron.LIFNode) and not fused_layers(single)
    multi = nn.Sequential(layer.Conv2d(1, 2, 3, step_mode="m"), neuron.LIFNode())  # a single-step neuron after it
    with pytest.raises(ConversionError, match="step_mode='s'"):
        convert(multi)
    with pytest.raises(TypeError, match="strict"):
        convert(csnn(), 0.4, strict="yes")
    with pytest.raises(ValueError, match="prune_rate"):
        convert(csnn(), 1.0)


snn = pytest.importorskip("snntorch")
from snntorch import surrogate as snn_surrogate  # noqa: E402
from snntorch import utils as snn_utils  # noqa: E402


def test_snntorch_sequential_converts_with_equal_spikes():
    torch.manual_seed(7)
    grad = snn_surrogate.atan(alpha=3.0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4),
                        snn.Leaky(beta=0.75, threshold=0.5, init_hidden=True, reset_mechanism="zero", spike_grad=grad),
                        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 6, bias=False),
                        snn.Leaky(beta=1.0, threshold=0.5, init_hidden=True, spike_grad=grad))
    _randomise_bn(net)
    converted = convert(copy.deepcopy(net), 0.4, backend="torch")
    assert [type(m) for m in fused_layers(converted)] == [BinWConv2dLIF, BinWLinearLIF]
    assert converted[0].neuron == LIFConfig(decay=0.75, threshold=0.5, v_reset=0.0, surrogate="atan", alpha=3.0,
                                            detach_reset=True)
    assert converted[6 - 1].neuron.v_reset is None  # subtract with beta = 1: soft reset
    with torch.no_grad():
        net[0].weight.copy_(converted[0].effective_weight())
        net[5].weight.copy_(converted[5].effective_weight())
        net[1].running_var.fill_(0.05)
        converted[0].bn.running_var.fill_(0.05)
    net.eval()
    converted.eval()
    g = torch.Generator().manual_seed(8)
    x = torch.rand(4, 3, 1, 8, 8, generator=g) * 2
    snn_utils.reset(net)
    with torch.no_grad():
        want = torch.stack([net(x[t]) for t in range(4)])  # snnTorch's per-step loop
        got = converted(x)  # the converted Sequential runs all T steps at once
    assert want.shape == got.shape and 0 < float(want.mean()) < 1
    assert float((want != got).float().mean()) <= 1e-3


def test_snntorch_neurons_that_differ_are_named():
    net = nn.Sequential(nn.Linear(4, 4), snn.Leaky(beta=0.9, init_hidden=True),
                        nn.Linear(4, 4), snn.Leaky(beta=0.9, init_hidden=True, reset_mechanism="zero",
                                                   spike_grad=snn_surrogate.fast_sigmoid()))
    with pytest.raises(ConversionError) as info:
        convert(net)
    assert "1 (Leaky): reset_mechanism='subtract' with beta=0.9" in str(info.value)
    assert "3 (Leaky): spike_grad fast_sigmoid" in str(info.value)


def test_snntorch_tutorial_layout_converts_unfused_with_equal_spikes():
    """snnTorch's tutorial CSNN puts the pool between conv and neuron: binary conv, pool per step, binwslt LIF."""
    torch.manual_seed(9)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2),
                        snn.Leaky(beta=0.5, threshold=0.25, init_hidden=True, reset_mechanism="zero"))
    converted = convert(copy.deepcopy(net), 0.4, backend="torch")
    assert isinstance(converted[0], BinWConv2d) and isinstance(converted[2], LIF) and not fused_layers(converted)
    assert type(converted[1]).__name__ == "MultiStep" and isinstance(converted[1].module, nn.MaxPool2d)
    with torch.no_grad():
        net[0].weight.copy_(converted[0].effective_weight())
    x = torch.rand(3, 2, 1, 8, 8) * 2
    snn_utils.reset(net)
    with torch.no_grad():
        want = torch.stack([net(x[t]) for t in range(3)])
        got = converted(x)
    assert 0 < float(want.mean()) < 1 and float((want != got).float().mean()) <= 1e-3
