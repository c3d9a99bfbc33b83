"""The peers a user would pick instead of binwslt, built to compute the same layer: SpikingJelly 2.0 and snnTorch.

Both are optional. `peer_status()` says for each whether it imports, with the reason and the install line when it
does not; the suite skips a missing peer with that message. Install (no dependencies, so pip keeps the torch you
have; loguru is the one small package SpikingJelly's import needs):

    pip install --no-deps spikingjelly==2.0.0 snntorch==1.0.0 loguru

- SpikingJelly: ``layer.Conv2d`` (or ``layer.Linear``) + ``layer.BatchNorm2d`` (``BatchNorm1d``) +
  ``neuron.LIFNode`` in multi-step mode (``step_mode="m"``, ``[T, N, ...]``), the LIF running on whatever kernel
  SpikingJelly picks for the device (its Triton/CUDA kernels on a GPU). ``LIFNode(tau=1/(1-λ))`` computes
  exactly binwslt's neuron (checked in tests/test_benchmarks.py). Weights are dense float and trained.
- snnTorch: ``nn.Conv2d`` + ``nn.BatchNorm2d`` + ``snn.Leaky`` in its per-step Python loop (the snnTorch idiom:
  each step convolves its own input, a direct-encoded image is convolved again at every step, BatchNorm sees one
  step at a time). ``snn.Leaky`` resets from the previous step's membrane (``reset_delay``), so its spikes are not
  expected to equal binwslt's; it is a timing and memory peer only.
"""
from __future__ import annotations

import importlib
from typing import Dict, Optional

import torch
from torch import nn

from binwslt.config import LIFConfig

PEERS = ("spikingjelly", "snntorch")
INSTALL = "pip install --no-deps spikingjelly==2.0.0 snntorch==1.0.0 loguru"
_IMPORTS = {"spikingjelly": "spikingjelly.activation_based.neuron", "snntorch": "snntorch"}


def peer_status() -> Dict[str, Optional[str]]:
    """``{peer: None}`` when the peer imports, else ``{peer: "why not, and how to install"}``."""
    status = {}
    for peer, module in _IMPORTS.items():
        try:
            importlib.import_module(module)
            status[peer] = None
        except Exception as exc:  # an ImportError, or a dependency failing at import time
            status[peer] = f"{peer} is not importable ({type(exc).__name__}: {exc}); install with: {INSTALL}"
    return status


def peer_version(peer: str) -> Optional[str]:
    """Installed version of ``peer``, or None."""
    try:
        from importlib.metadata import version
        return version(peer)
    except Exception:
        return None


def _sj_surrogate(neuron: LIFConfig):
    from spikingjelly.activation_based import surrogate
    if neuron.surrogate == "atan":
        return surrogate.ATan(alpha=neuron.alpha)
    if neuron.surrogate == "sigmoid":
        return surrogate.Sigmoid(alpha=neuron.alpha)
    raise ValueError(f"SpikingJelly peer: surrogate {neuron.surrogate!r} has no SpikingJelly twin (atan, sigmoid)")


def spikingjelly_lif(neuron: LIFConfig) -> nn.Module:
    """SpikingJelly's multi-step ``LIFNode`` computing ``neuron`` (``[T, N, ...]`` currents -> spikes)."""
    from spikingjelly.activation_based import neuron as sj_neuron
    if not 0.0 < neuron.decay < 1.0:
        raise ValueError(f"SpikingJelly peer: decay must be in (0, 1) (tau = 1/(1-decay) > 1), got {neuron.decay}")
    return sj_neuron.LIFNode(tau=1.0 / (1.0 - neuron.decay), decay_input=neuron.decay_input,
                             v_threshold=neuron.threshold, v_reset=neuron.v_reset,
                             surrogate_function=_sj_surrogate(neuron), detach_reset=neuron.detach_reset,
                             step_mode="m")


def reset_spikingjelly(module: nn.Module) -> None:
    """Clear every SpikingJelly neuron's membrane (they keep state across calls)."""
    from spikingjelly.activation_based import functional
    functional.reset_net(module)


class SpikingJellyLayer(nn.Module):
    """Conv2d/Linear + BatchNorm + LIFNode, multi-step. ``forward(x, residual=None)``: ``x`` ``[T, N, C, H, W]`` /
    ``[T, N, F]`` spikes, or the analog ``[N, C, H, W]`` image when ``timesteps`` is given (convolved once, repeated
    over T, as SpikingJelly users encode directly) -> spikes ``[T, N, C_out, H', W']`` / ``[T, N, out]``."""

    def __init__(self, shape, neuron: LIFConfig, timesteps: Optional[int]):
        super().__init__()
        from spikingjelly.activation_based import layer
        self.timesteps = timesteps
        step = "s" if timesteps is not None else "m"
        if shape.kind == "conv":
            self.conv = layer.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, stride=shape.stride,
                                     padding=shape.padding, bias=False, step_mode=step)
            self.bn = layer.BatchNorm2d(shape.out_channels, step_mode="m")
        else:
            self.conv = layer.Linear(shape.in_channels, shape.out_channels, bias=False, step_mode=step)
            self.bn = layer.BatchNorm1d(shape.out_channels, step_mode="m")
        self.lif = spikingjelly_lif(neuron)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        reset_spikingjelly(self)
        y = self.conv(x)
        if self.timesteps is not None:
            y = y.unsqueeze(0).repeat((self.timesteps,) + (1,) * y.dim())
        y = self.bn(y)
        if residual is not None:
            y = y + residual
        return self.lif(y)


class SnnTorchLayer(nn.Module):
    """nn.Conv2d/Linear + BatchNorm + ``snn.Leaky`` in snnTorch's per-step loop; same call as `SpikingJellyLayer`."""

    def __init__(self, shape, neuron: LIFConfig, timesteps: Optional[int]):
        super().__init__()
        import snntorch as snn
        from snntorch import surrogate
        if neuron.surrogate != "atan" or neuron.decay_input or neuron.v_reset not in (0.0, None):
            raise ValueError("snnTorch peer: only the atan surrogate, decay_input=False and v_reset 0/None map "
                             f"onto snn.Leaky, got {neuron}")
        self.timesteps = timesteps
        if shape.kind == "conv":
            self.conv = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, stride=shape.stride,
                                  padding=shape.padding, bias=False)
            self.bn = nn.BatchNorm2d(shape.out_channels)
        else:
            self.conv = nn.Linear(shape.in_channels, shape.out_channels, bias=False)
            self.bn = nn.BatchNorm1d(shape.out_channels)
        self.lif = snn.Leaky(beta=neuron.decay, threshold=neuron.threshold,
                             spike_grad=surrogate.atan(alpha=neuron.alpha),
                             reset_mechanism="zero" if neuron.v_reset is not None else "subtract")

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        steps = self.timesteps if self.timesteps is not None else x.shape[0]
        mem = self.lif.init_leaky()
        out = []
        for t in range(steps):
            cur = self.bn(self.conv(x if self.timesteps is not None else x[t]))
            if residual is not None:
                cur = cur + residual[t]
            spk, mem = self.lif(cur, mem)
            out.append(spk)
        return torch.stack(out)


def spikingjelly_model(model: nn.Module) -> nn.Module:
    """Swap every binwslt `LIF` of a dense ``snn`` model (binwslt.models) for SpikingJelly's ``LIFNode``, in place.

    The ``snn`` kind's layers are dense ``nn.Conv2d``/``nn.Linear`` over the T·N frames and BatchNorm over
    (T, N, ...), which is what SpikingJelly's multi-step ``layer.Conv2d`` / ``layer.BatchNorm2d`` compute, so the
    result is the SpikingJelly model of the same network. Call `reset_spikingjelly` before each forward.
    """
    from binwslt.nn import LIF
    for name, child in list(model.named_children()):
        if isinstance(child, LIF):
            setattr(model, name, spikingjelly_lif(child.neuron))
        else:
            spikingjelly_model(child)
    return model
