"""binwslt.activations: the classifier-input representation and Fig. 1 style maps."""
import pytest
import torch

from binwslt import models
from binwslt.activations import capture_representation, plot_activation_maps

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _tiny(kind, T=4):
    torch.manual_seed(0)
    return models.build("conv4", kind, num_classes=5, in_channels=1, image_size=8, width=0.125, timesteps=T,
                        backend="torch")


def test_spiking_representation_is_the_firing_rate_of_the_last_hidden_layer():
    model = _tiny("binwslt", T=3)
    x = torch.rand(6, 1, 8, 8) * 3
    model.train()
    rep = capture_representation(model, x)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        spikes = model.head(model.features(x).flatten(2))  # [T, N, 32]
    assert spikes.shape == (3, 6, 32)
    assert torch.equal(rep, spikes.mean(0))
    assert set((rep * 3).round().unique().tolist()) <= {0.0, 1.0, 2.0, 3.0}


def test_ann_and_bnn_representations():
    x = torch.rand(5, 1, 8, 8)
    ann = capture_representation(_tiny("ann"), x)
    assert ann.shape == (5, 32) and (ann >= 0).all() and (ann > 0).any()
    bnn = capture_representation(_tiny("bnn-binact"), x)
    assert bnn.shape == (5, 32) and set(bnn.unique().tolist()) <= {-1.0, 1.0}


def test_plot_activation_maps(tmp_path):
    x = torch.rand(10, 1, 8, 8) * 2
    ms = {"ANN": _tiny("ann"), "BNN-BinAct": _tiny("bnn-binact"), "BinW-SLT": _tiny("binwslt")}
    path = tmp_path / "sub" / "act.png"
    maps = plot_activation_maps(ms, x, path, neurons=20, samples=7)
    assert list(maps) == ["ANN", "BNN-BinAct", "BinW-SLT"]
    assert all(m.shape == (7, 20) for m in maps.values())
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in path.parent.iterdir()) == ["act.png"]


def test_errors(tmp_path):
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match="non-empty dict"):
        plot_activation_maps({}, x, tmp_path / "a.png")
    with pytest.raises(TypeError, match=r"models\['m'\]"):
        plot_activation_maps({"m": "ann"}, x, tmp_path / "a.png")
    with pytest.raises(ValueError, match="neurons"):
        plot_activation_maps({"m": _tiny("ann")}, x, tmp_path / "a.png", neurons=0)
    with pytest.raises(TypeError, match="x must be"):
        capture_representation(_tiny("ann"), x.long())
    with pytest.raises(ValueError, match="neither a `classifier` nor any linear"):
        capture_representation(torch.nn.Sequential(torch.nn.ReLU()), x)


def test_every_colour_bar_is_labelled(tmp_path, monkeypatch):
    from matplotlib.figure import Figure
    bars = []
    real = Figure.colorbar

    def recording(self, *args, **kwargs):
        bars.append(real(self, *args, **kwargs))
        return bars[-1]
    monkeypatch.setattr(Figure, "colorbar", recording)
    ms = {"ANN": _tiny("ann"), "BNN-BinAct": _tiny("bnn-binact"), "BinW-SLT": _tiny("binwslt")}
    plot_activation_maps(ms, torch.rand(4, 1, 8, 8), tmp_path / "act.png", neurons=8, samples=4)
    labels = [bar.ax.get_ylabel() for bar in bars]
    assert labels == ["activation (after ReLU)", "binary activation (-1 / +1)", "firing rate (spikes per timestep)"]
