"""binwslt.export: NIR graphs of binary-subnet models; round trip through nir.write/nir.read; SpikingJelly's
NIR importer runs the graph and its spikes equal binwslt's."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from binwslt import LIFConfig, cli, models, ticket
from binwslt.export import DEFAULT_DT, lif_to_nir, to_nir, write_nir
from binwslt.nn import convert

nir = pytest.importorskip("nir")
sj = pytest.importorskip("spikingjelly.activation_based")
from spikingjelly.activation_based import functional as sjf  # noqa: E402
from spikingjelly.activation_based import layer, neuron, surrogate  # noqa: E402


def _spikingjelly_avgpool_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1, bias=False), layer.BatchNorm2d(4),
                        neuron.LIFNode(tau=2.0, decay_input=False, v_threshold=0.3,
                                       surrogate_function=surrogate.ATan()),
                        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(4 * 4 * 4, 5, bias=False),
                        neuron.IFNode(v_threshold=0.3, surrogate_function=surrogate.ATan()))
    sjf.set_step_mode(net, "m")
    with torch.no_grad():
        net[5].weight.mul_(8.0)  # no BatchNorm before it: larger weights keep it firing
        net[1].running_mean.uniform_(-0.2, 0.2)
        net[1].running_var.uniform_(0.5, 1.5)
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.2, 0.2)
    return convert(net, 0.4, backend="torch").eval()


def _fields(node):
    return {f.name: getattr(node, f.name) for f in dataclasses.fields(node) if f.name != "metadata"}


def test_graph_holds_effective_weights_folded_bn_and_lif_parameters(tmp_path):
    model = _spikingjelly_avgpool_net()
    graph = to_nir(model, input_shape=(1, 8, 8))
    assert list(graph.nodes) == ["input", "0", "0_lif", "3", "4", "5", "5_lif", "output"]
    assert graph.edges == list(zip(list(graph.nodes)[:-1], list(graph.nodes)[1:]))
    conv, bn = model[0], model[0].bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()  # BN eval, written out here
    shift = (bn.bias - bn.running_mean * scale).detach()
    want = conv.effective_weight().detach() * scale.view(-1, 1, 1, 1)
    np.testing.assert_allclose(graph.nodes["0"].weight, want.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(graph.nodes["0"].bias, shift.numpy(), rtol=1e-6, atol=1e-7)
    assert tuple(graph.nodes["0"].stride) == (1, 1) and tuple(graph.nodes["0"].padding) == (1, 1)
    lif = graph.nodes["0_lif"]
    assert isinstance(lif, nir.LIF) and lif.tau.shape == (4, 8, 8)
    np.testing.assert_allclose(lif.tau, DEFAULT_DT / 0.5, rtol=1e-6)  # tau = dt / (1 - decay)
    np.testing.assert_allclose(lif.r, 2.0, rtol=1e-6)  # r = 1 / (1 - decay) without decay_input
    assert np.all(lif.v_leak == 0) and np.all(lif.v_reset == 0) and np.allclose(lif.v_threshold, 0.3)
    assert isinstance(graph.nodes["3"], nir.AvgPool2d) and isinstance(graph.nodes["4"], nir.Flatten)
    np.testing.assert_array_equal(graph.nodes["5"].weight, model[5].effective_weight().detach().numpy())
    assert isinstance(graph.nodes["5_lif"], nir.IF) and np.allclose(graph.nodes["5_lif"].r, 1 / DEFAULT_DT)
    path = tmp_path / "model.nir"
    write_nir(model, path, input_shape=(1, 8, 8))
    back = nir.read(str(path))
    assert set(back.nodes) == set(graph.nodes) and sorted(back.edges) == sorted(graph.edges)
    for name, node in graph.nodes.items():
        assert type(back.nodes[name]) is type(node)
        got, expected = _fields(back.nodes[name]), _fields(node)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, dict):
                assert {k: list(np.asarray(v)) for k, v in got[key].items()} == \
                    {k: list(np.asarray(v)) for k, v in value.items()}, (name, key)
            else:
                np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=f"{name}.{key}")
    assert float(back.metadata["dt"]) == DEFAULT_DT


def test_spikingjelly_nir_importer_runs_the_graph_with_equal_spikes(tmp_path):
    pytest.importorskip("nirtorch")
    from spikingjelly.activation_based.nir_exchange.from_nir import import_from_nir

    model = _spikingjelly_avgpool_net(seed=1)
    path = tmp_path / "model.nir"
    write_nir(model, path, input_shape=(1, 8, 8))
    imported = import_from_nir(str(path), dt=DEFAULT_DT, step_mode="m")
    g = torch.Generator().manual_seed(3)
    x = (torch.rand(4, 3, 1, 8, 8, generator=g) * 2)
    with torch.no_grad():
        want = model(x)
        got, _ = imported(x)
    assert got.shape == want.shape and 0 < float(want.mean()) < 1
    assert float((got != want).float().mean()) <= 1e-3


def test_lif_mapping_is_one_euler_step_of_the_binwslt_update():
    rng = np.random.default_rng(0)
    for neuron_cfg in (LIFConfig(decay=0.8), LIFConfig(decay=0.6, decay_input=True), LIFConfig(decay=1.0)):
        node = lif_to_nir(neuron_cfg, (5,))
        v, current = rng.normal(size=5), rng.normal(size=5)
        if isinstance(node, nir.IF):
            euler = v + DEFAULT_DT * node.r * current
        else:
            euler = v + DEFAULT_DT / node.tau * (node.v_leak - v + node.r * current)
        binwslt_u = neuron_cfg.decay * v + neuron_cfg.input_gain * current
        np.testing.assert_allclose(euler, binwslt_u, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="layer 'n': soft reset"):
        lif_to_nir(LIFConfig(v_reset=None), (2,), layer="n")


def _zoo(pool):
    return models.build("conv4", "binwslt", num_classes=3, in_channels=1, image_size=8, width=0.125,
                        timesteps=2, backend="torch", pool=pool)


def test_zoo_ticket_exports_from_the_cli(tmp_path, capsys):
    model = _zoo("avg")
    assert model.config["pool"] == "avg" and "pool" not in _zoo("max").config
    run = tmp_path / "run"
    run.mkdir()
    ticket.save(model, run / "ticket.safetensors")
    graph = to_nir(run)
    kinds = [type(n).__name__ for n in graph.nodes.values()]
    assert kinds.count("Conv2d") == 4 and kinds.count("AvgPool2d") == 2 and kinds.count("Affine") == 3
    assert graph.metadata["timesteps"] == 2
    out = tmp_path / "conv4.nir"
    assert cli.main(["export", str(run), "--nir", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out and len(nir.read(str(out)).nodes) == len(graph.nodes)
    ticket.save(models.build("resnet19", "binwslt", num_classes=3, in_channels=1, image_size=8, width=0.125,
                             backend="torch"), tmp_path / "resnet.safetensors")
    assert cli.main(["export", str(tmp_path / "resnet.safetensors"), "--nir", str(tmp_path / "x.nir")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "residual" in err and not (tmp_path / "x.nir").exists()


def test_what_nir_cannot_express_is_named():
    soft = nn.Sequential(layer.Linear(4, 3, bias=False),
                         neuron.LIFNode(tau=2.0, v_reset=None, surrogate_function=surrogate.ATan()))
    sjf.set_step_mode(soft, "m")
    convert(soft, 0.4, backend="torch")
    with pytest.raises(ValueError, match="layer '0': soft reset"):
        to_nir(soft, input_shape=(4,))
    with pytest.raises(ValueError, match="input_shape"):
        to_nir(soft)
    resnet = models.build("resnet19", "binwslt", num_classes=3, in_channels=1, image_size=8, width=0.125,
                          backend="torch")
    with pytest.raises(ValueError, match="residual"):
        to_nir(resnet)
    with pytest.raises(ValueError, match=r"layer '1' \(MaxPool2d\): NIR has no max pooling; .* input is not spikes"):
        to_nir(nn.Sequential(convert(nn.Conv2d(1, 2, 3)), nn.MaxPool2d(2)), input_shape=(1, 6, 6))
    with pytest.raises(ValueError, match=r"layer '1' \(ReLU\) has no NIR export"):
        to_nir(nn.Sequential(convert(nn.Linear(4, 3)), nn.ReLU()), input_shape=(4,))


def _run_nir(graph, x_seq):
    """A minimal NIR simulator (forward Euler, ``dt`` from the graph): runs the chain over ``x_seq`` [T, N, ...] and
    returns the outputs of every node over time, by node name."""
    import torch.nn.functional as F

    dt = float(graph.metadata["dt"])
    order = ["input"]
    nxt = dict(graph.edges)
    while order[-1] in nxt:
        order.append(nxt[order[-1]])
    state, outs = {}, {name: [] for name in order}
    t32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    for t in range(x_seq.shape[0]):
        h = x_seq[t]
        for name in order[1:-1]:
            node = graph.nodes[name]
            if isinstance(node, nir.Conv2d):
                h = F.conv2d(h, t32(node.weight), t32(node.bias), tuple(node.stride), tuple(node.padding))
            elif isinstance(node, nir.Affine):
                h = h @ t32(node.weight).T + t32(node.bias)
            elif isinstance(node, (nir.LIF, nir.IF)):
                v = state.get(name, torch.zeros_like(h))
                if isinstance(node, nir.LIF):
                    v = v + dt / t32(node.tau) * (t32(node.v_leak) - v + t32(node.r) * h)
                else:
                    v = v + dt * t32(node.r) * h
                h = (v > t32(node.v_threshold)).float()
                state[name] = torch.where(h.bool(), t32(node.v_reset), v)
            elif isinstance(node, nir.SumPool2d):
                k = tuple(int(v) for v in node.kernel_size)
                h = F.avg_pool2d(h, k, tuple(int(v) for v in node.stride)) * (k[0] * k[1])
            elif isinstance(node, nir.Threshold):
                h = (h > t32(node.threshold)).float()
            elif isinstance(node, nir.Flatten):
                h = h.flatten(1)
            else:
                raise AssertionError(f"the test simulator has no {type(node).__name__}")
            outs[name].append(h)
    return {name: torch.stack(v) for name, v in outs.items() if v}


def test_zoo_max_pool_model_exports_exactly_and_runs(tmp_path):
    torch.manual_seed(4)
    model = models.build("conv4", "binwslt", num_classes=3, in_channels=1, image_size=8, width=0.25, timesteps=3,
                         backend="torch", neuron=LIFConfig(decay=0.5, threshold=0.25)).eval()
    path = tmp_path / "conv4.safetensors"
    ticket.save(model, path)
    graph = to_nir(path)
    assert isinstance(graph.nodes["features_2_sum"], nir.SumPool2d)
    assert isinstance(graph.nodes["features_2_any"], nir.Threshold)
    spikes = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: spikes.__setitem__(name, out))
             for name, m in model.named_modules() if isinstance(m, (models.BinWConv2dLIF, models.BinWLinearLIF))]
    x = torch.rand(5, 1, 8, 8) * 2
    with torch.no_grad():
        logits = model(x)
    for h in hooks:
        h.remove()
    run = _run_nir(graph, x.unsqueeze(0).repeat(3, 1, 1, 1, 1))  # the image at every step (direct encoding)
    assert len(spikes) == 6
    for name, want in spikes.items():
        got = run[name.replace(".", "_") + "_lif"]
        assert got.shape == want.shape and 0 < float(want.mean()) < 1, name
        assert float((got != want).float().mean()) <= 1e-3, name
    torch.testing.assert_close(run["classifier"].mean(0), logits, rtol=1e-4, atol=1e-5)
    pooled = run["features_2_any"]  # max over the window of the spikes before it
    torch.testing.assert_close(pooled, torch.nn.functional.max_pool2d(run["features_1_lif"].flatten(0, 1), 2)
                               .view_as(pooled))
