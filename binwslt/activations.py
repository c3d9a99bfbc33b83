"""Activation maps of the last hidden layer, as the paper's Fig. 1 (ANN, BNN-BinAct and BinW-SLT side by side).

The representation of a model is the input of its classifier: ReLU outputs for an ANN, ±1 for BNN-BinAct, and
for the spiking kinds the spikes averaged over the T steps (each unit's firing rate, in [0, 1]).
"""
from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch import nn

from .probe import run_observed


def _classifier(model: nn.Module) -> nn.Module:
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Module):
        return classifier
    last = None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            last = module
    if last is None:
        raise ValueError(f"model {type(model).__name__} has neither a `classifier` nor any linear layer")
    return last


def capture_representation(model: nn.Module, x: torch.Tensor, layer: Optional[nn.Module] = None) -> torch.Tensor:
    """The input of ``layer`` (default ``model.classifier``) when ``model`` runs on ``x``, as float32 ``[N, F]``.

    ``x``: the model's input batch (float ``[N, C, H, W]``). A time-major ``[T, N, F]`` input of the layer is
    averaged over T (firing rates for spikes). The model runs in eval mode under ``no_grad``; its mode is
    restored afterwards.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}")
    layer = _classifier(model) if layer is None else layer
    captured = []

    def hook(module, args):
        captured.append(args[0].detach())

    run_observed(model, x, [layer.register_forward_pre_hook(hook)])
    if not captured:
        raise ValueError(f"layer {type(layer).__name__} was not called when the model ran")
    rep = captured[-1].float()
    if rep.dim() == 3:
        rep = rep.mean(0)
    return rep.reshape(rep.shape[0], -1).cpu()


def colorbar_label(kind: Optional[str]) -> str:
    """What an activation map's colour encodes for a model of ``kind`` (None: unknown, a plain activation)."""
    if kind in ("snn", "binwslt"):
        return "firing rate (spikes per timestep)"
    if kind == "bnn-binact":
        return "binary activation (-1 / +1)"
    return "activation (after ReLU)" if kind == "ann" else "activation"


def plot_activation_maps(models: Dict[str, nn.Module], x: torch.Tensor, path, *, neurons: int = 128,
                         samples: int = 16) -> Dict[str, torch.Tensor]:
    """Draw the Fig. 1 style activation maps of ``models`` on ``x`` into the PNG ``path``; return the maps.

    ``models``: title -> model, drawn left to right (e.g. {"ANN": ann, "BNN-BinAct": bnn, "BinW-SLT": slt}); every
    model takes ``x`` (float ``[N, C, H, W]``). Each panel shows the first ``neurons`` units of the classifier's
    input (columns) for the first ``samples`` images (rows), firing rates of spiking models on a [0, 1] scale; the
    title gives the fraction of active (> 0) units.
    Returns title -> float32 tensor ``[min(N, samples), min(F, neurons)]`` of what was drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(models, dict) or not models:
        raise ValueError("models must be a non-empty dict of title -> model")
    for name, model in models.items():
        if not isinstance(model, nn.Module):
            raise TypeError(f"models[{name!r}] must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    for arg, value in (("neurons", neurons), ("samples", samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be an int >= 1, got {value!r}")
    maps = {name: capture_representation(model, x)[:samples, :neurons] for name, model in models.items()}

    fig, axes = plt.subplots(1, len(maps), figsize=(3.4 * len(maps), 2.6), dpi=120, squeeze=False)
    for index, (ax, (name, rep)) in enumerate(zip(axes[0], maps.items())):
        config = getattr(models[name], "config", None)
        spiking = isinstance(config, dict) and config.get("kind") in ("snn", "binwslt")
        low = min(0.0, float(rep.min()))
        high = 1.0 if spiking or float(rep.max()) <= 0 else float(rep.max())  # firing rates live in [0, 1]
        image = ax.imshow(rep.numpy(), aspect="auto", cmap="viridis", vmin=low, vmax=high, interpolation="nearest")
        active = float((rep > 0).float().mean())
        ax.set_title(f"({chr(ord('a') + index)}) {name}\nactive {100 * active:.0f}%", fontsize=9)
        ax.set_xlabel(f"neuron (first {rep.shape[1]})", fontsize=8)
        ax.set_ylabel("image", fontsize=8)
        ax.tick_params(labelsize=7)
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(colorbar_label(config.get("kind") if isinstance(config, dict) else None), fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return maps
