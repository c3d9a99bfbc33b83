"""Theoretical compute and energy of a model on 45 nm hardware (design.md §6, the paper's eqs. 6-7).

``estimate(model, x)`` runs the model once with forward hooks on every conv/linear layer and counts, per image:

* FLOPs(l): ``k_h·k_w·C_in·C_out·H_out·W_out`` for a conv, ``in·out`` for a linear layer (one evaluation);
* the firing rate ``fr_l`` of the layer's input (its mean value: the fraction of 1s for a spike tensor);
* for a spiking model (kinds ``snn`` and ``binwslt``): the first layer, fed the analog image, costs FLOPs(1)
  multiply-accumulates at 4.6 pJ (computed once under direct encoding); every other layer costs
  ``SOPs(l) = fr_l · T · FLOPs(l)`` accumulates at 0.9 pJ;
* for a non-spiking model (kinds ``ann`` and ``bnn-binact``, as the paper's Table 2 counts them): every layer
  costs FLOPs(l) multiply-accumulates at 4.6 pJ.

Totals are given dense-equivalent (the paper's convention: a pruned synapse still counts) and with pruned
synapses skipped (each layer's ops times the fraction of weights its mask keeps).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

import torch
from torch import nn

from .probe import run_observed

#: Energy per multiply-accumulate (FLOP) and per synaptic accumulate (SOP) at 45 nm, in picojoules.
E_MAC_PJ = 4.6
E_SOP_PJ = 0.9

SPIKING_KINDS = ("snn", "binwslt")
NON_SPIKING_KINDS = ("ann", "bnn-binact")


@dataclass
class LayerEnergy:
    """Compute of one conv/linear layer, per image.

    ``flops``: FLOPs(l) of one evaluation (int). ``timesteps``: evaluations counted per image (T for a spiking
    layer, 1 for an ANN layer or a direct-encoded first layer). ``input_firing_rate``: mean of the layer's input
    over the batch (the fraction of 1s for spikes). ``input_binary``: whether that input held only 0s and 1s.
    ``density``: fraction of the layer's weights that are kept (1 - sparsity). ``op_type``: "mac" (4.6 pJ) or
    "sop" (0.9 pJ). ``ops``/``energy_mj``: dense-equivalent; ``ops_pruned``/``energy_mj_pruned``: pruned
    synapses skipped. ``sops``: fr·T·FLOPs for a layer counted in SOPs, 0 for one counted in MACs.
    """

    name: str
    layer_type: str
    flops: int
    timesteps: float
    input_firing_rate: float
    input_binary: bool
    density: float
    op_type: str
    ops: float
    energy_mj: float
    ops_pruned: float
    energy_mj_pruned: float
    sops: float = 0.0


@dataclass
class EnergyReport:
    """Per-image totals of :func:`estimate` (floats) and the per-layer breakdown in execution order.

    ``ops_g``/``energy_mj``: dense-equivalent giga-operations and millijoules (the paper's Table 2 convention);
    ``ops_g_pruned``/``energy_mj_pruned``: the same with pruned synapses skipped. ``flops_g``: total FLOPs of
    one dense evaluation of every layer (the ANN MAC count). ``spiking``: whether SOP accounting was used.
    """

    layers: List[LayerEnergy] = field(default_factory=list)
    spiking: bool = False
    images: int = 0
    flops_g: float = 0.0
    ops_g: float = 0.0
    energy_mj: float = 0.0
    ops_g_pruned: float = 0.0
    energy_mj_pruned: float = 0.0

    def to_dict(self) -> dict:
        """JSON-serialisable dict with every total and a list of per-layer dicts."""
        return asdict(self)

    def table(self) -> str:
        """A human-readable per-layer table followed by the totals."""
        head = f"{'layer':<28}{'type':<8}{'FLOPs':>14}{'T':>6}{'fr':>8}{'dens':>7}{'op':>5}{'ops':>14}{'mJ':>10}"
        rows = [head, "-" * len(head)]
        for layer in self.layers:
            # the firing rate enters only SOP layers; an analog or ANN input's mean would read as a rate
            fr = f"{layer.input_firing_rate:>8.3f}" if layer.op_type == "sop" else f"{'-':>8}"
            rows.append(f"{layer.name:<28}{layer.layer_type:<8}{layer.flops:>14,}{layer.timesteps:>6.2g}"
                        f"{fr}{layer.density:>7.3f}{layer.op_type:>5}"
                        f"{layer.ops:>14,.0f}{layer.energy_mj:>10.3g}")
        rows.append(f"total ({'SNN' if self.spiking else 'ANN'} accounting, per image): ops {self.ops_g:.4g} G, "
                    f"energy {self.energy_mj:.4g} mJ; pruned skipped: ops {self.ops_g_pruned:.4g} G, "
                    f"energy {self.energy_mj_pruned:.4g} mJ")
        return "\n".join(rows)


def _is_weight_layer(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() in (2, 4) and not isinstance(module, nn.Embedding)


def _weight_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Outermost modules holding a 2-D or 4-D ``weight`` (a fused conv+LIF layer counts once, not its parts)."""
    chosen: Dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not _is_weight_layer(module):
            continue
        if any(name.startswith(parent + ".") for parent in chosen if parent):
            continue
        chosen[name] = module
    return chosen


def _density(module: nn.Module) -> float:
    """Fraction of the layer's weights kept by its mask (binary subnet layers); 1.0 for a dense layer."""
    mask_fn = getattr(module, "mask", None)
    if callable(mask_fn):
        return float(mask_fn().float().mean())
    return 1.0


class _LayerStats:
    __slots__ = ("module", "flops", "evaluations", "input_sum", "input_count", "input_binary", "calls")

    def __init__(self, module):
        self.module = module
        self.flops = 0
        self.evaluations = 0
        self.input_sum = 0.0
        self.input_count = 0
        self.input_binary = True
        self.calls = 0


def _first_tensor(args, kwargs) -> Optional[torch.Tensor]:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _record(stats: _LayerStats, inp: torch.Tensor, out: torch.Tensor) -> None:
    weight = stats.module.weight
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"energy.estimate: layer {type(stats.module).__name__} returned {type(out).__name__}, "
                        "expected a tensor")
    if weight.dim() == 4:
        # weight[1:] = C_in/groups·k_h·k_w, so grouped convs are counted right too.
        c_out, h_out, w_out = out.shape[-3], out.shape[-2], out.shape[-1]
        flops = int(weight[0].numel()) * c_out * h_out * w_out
        evaluations = out.numel() // (c_out * h_out * w_out)
    else:
        out_features = out.shape[-1]
        flops = int(weight[0].numel()) * out_features
        evaluations = out.numel() // out_features
    if stats.calls and flops != stats.flops:
        raise ValueError(f"energy.estimate: layer {type(stats.module).__name__} was called with different shapes")
    stats.flops = flops
    stats.evaluations += evaluations
    x = inp.detach()
    stats.input_sum += float(x.double().sum())
    stats.input_count += x.numel()
    stats.input_binary = stats.input_binary and bool(((x == 0) | (x == 1)).all())
    stats.calls += 1


def _is_spiking(model: nn.Module, spiking: Optional[bool]) -> bool:
    if spiking is not None:
        if not isinstance(spiking, bool):
            raise TypeError(f"spiking must be a bool or None, got {spiking!r}")
        return spiking
    config = getattr(model, "config", None)
    kind = config.get("kind") if isinstance(config, dict) else None
    if kind in SPIKING_KINDS:
        return True
    if kind in NON_SPIKING_KINDS:
        return False
    raise ValueError("energy.estimate cannot tell whether the model spikes: it has no model.config['kind'] in "
                     f"{SPIKING_KINDS + NON_SPIKING_KINDS} (got {kind!r}); pass spiking=True or False")


def estimate(model: nn.Module, x: torch.Tensor, *, spiking: Optional[bool] = None,
             e_mac_pj: float = E_MAC_PJ, e_sop_pj: float = E_SOP_PJ) -> EnergyReport:
    """Run ``model`` once on ``x`` and return the per-image compute and energy (design.md §6).

    ``x``: the model's input, an image batch ``[N, C, H, W]`` (or ``[N, F]``; a time-major ``[T, N, ...]`` input
    of rank 5 or 3 is also accepted), floating point. The model runs in eval mode under ``torch.no_grad`` and its
    training flag is restored afterwards. ``spiking``: SNN accounting (first layer MACs, SOPs elsewhere) or ANN
    accounting (MACs everywhere); by default taken from ``model.config["kind"]``. ``e_mac_pj``/``e_sop_pj``:
    energy per MAC and per SOP in picojoules. Figures are averaged over the N images of the batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if x.dim() not in (2, 3, 4, 5) or x.numel() == 0:
        raise ValueError(f"x must be a non-empty [N, C, H, W], [N, F], [T, N, C, H, W] or [T, N, F] tensor, "
                         f"got shape {tuple(x.shape)}")
    for name, value in (("e_mac_pj", e_mac_pj), ("e_sop_pj", e_sop_pj)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    is_spiking = _is_spiking(model, spiking)
    direct_encoded = x.dim() in (2, 4)
    images = x.shape[0] if direct_encoded else x.shape[1]

    layers = _weight_layers(model)
    if not layers:
        raise ValueError(f"model {type(model).__name__} has no conv or linear layer to count")
    stats: Dict[str, _LayerStats] = {name: _LayerStats(module) for name, module in layers.items()}
    order: List[str] = []

    def make_hook(name):
        def hook(module, args, kwargs, output):
            inp = _first_tensor(args, kwargs)
            if inp is None:
                raise TypeError(f"energy.estimate: layer {name!r} was called without a tensor input")
            if name not in order:
                order.append(name)
            _record(stats[name], inp, output)
        return hook

    run_observed(model, x, [module.register_forward_hook(make_hook(name), with_kwargs=True)
                            for name, module in layers.items()])

    report = EnergyReport(spiking=is_spiking, images=int(images))
    mj_per_pj = 1e-9
    for index, name in enumerate(order):
        s = stats[name]
        fr = s.input_sum / s.input_count
        steps = s.evaluations / images
        density = _density(s.module)
        if not is_spiking:
            op_type, ops, e_pj = "mac", s.flops * steps, e_mac_pj
        elif index == 0:
            # Direct encoding: the analog image is convolved once and the same current drives every step.
            if direct_encoded:
                steps = 1.0
            op_type, ops, e_pj = "mac", s.flops * steps, e_mac_pj
        else:
            op_type, ops, e_pj = "sop", fr * steps * s.flops, e_sop_pj
        layer_type = "conv" if s.module.weight.dim() == 4 else "linear"
        report.layers.append(LayerEnergy(
            name=name or type(s.module).__name__, layer_type=layer_type, flops=s.flops, timesteps=steps,
            input_firing_rate=fr, input_binary=s.input_binary, density=density, op_type=op_type,
            ops=ops, energy_mj=ops * e_pj * mj_per_pj, ops_pruned=ops * density,
            energy_mj_pruned=ops * density * e_pj * mj_per_pj, sops=ops if op_type == "sop" else 0.0))
    report.flops_g = sum(layer.flops for layer in report.layers) / 1e9
    report.ops_g = sum(layer.ops for layer in report.layers) / 1e9
    report.energy_mj = sum(layer.energy_mj for layer in report.layers)
    report.ops_g_pruned = sum(layer.ops_pruned for layer in report.layers) / 1e9
    report.energy_mj_pruned = sum(layer.energy_mj_pruned for layer in report.layers)
    return report
