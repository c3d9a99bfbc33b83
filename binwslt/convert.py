"""Turn a SpikingJelly, snnTorch or plain PyTorch model into a binary-subnet model, fusing the layers it can.

:func:`convert` walks the model once. Inside every ``nn.Sequential`` (SpikingJelly's containers included) it
replaces each run of

* SpikingJelly multi-step: ``layer.Conv2d -> [layer.BatchNorm2d] -> LIFNode/IFNode`` (step mode ``'m'``),
  ``SeqToANNContainer(Conv2d[, BatchNorm2d]) -> LIFNode/IFNode``, ``Linear -> [layer.BatchNorm1d] -> LIFNode/IFNode``;
* snnTorch: ``Conv2d -> [BatchNorm2d] -> snn.Leaky(init_hidden=True)`` and ``Linear -> [BatchNorm1d] -> snn.Leaky``;
* binwslt: ``Conv2d/Linear -> [BatchNorm] -> binwslt.nn.LIF``

by one fused `BinWConv2dLIF` / `BinWLinearLIF` at the conv's index (the BatchNorm's and neuron's indices become
``nn.Identity``, so module paths stay those of the original). Every other ``Conv2d`` / ``Linear`` becomes an
unfused `BinWConv2d` / `BinWLinear`; pools, flatten, dropout and the rest stay as they are. Each layer's current
weight becomes the frozen random weight, BatchNorm state and the neuron's parameters carry over exactly, and the
new layers take the old ones' device, dtype and train/eval mode.

Neuron mapping (design.md §2): SpikingJelly ``LIFNode(tau, decay_input, v_threshold, v_reset, detach_reset,
surrogate_function)`` is ``LIFConfig(decay=1 - 1/tau, ...)`` for ``v_reset`` 0 or None (soft reset); ``IFNode`` is
``decay=1``; surrogates ``ATan(alpha)`` -> "atan", ``Sigmoid(alpha)`` -> "sigmoid", ``PiecewiseQuadratic(alpha)`` ->
"triangle". snnTorch ``Leaky(beta, threshold, reset_mechanism="zero")`` is ``LIFConfig(decay=beta, v_reset=0,
detach_reset=True)`` (snnTorch detaches its reset and resets the next step, which is the same neuron);
``reset_mechanism="subtract"`` is expressible only for ``beta=1`` (snnTorch subtracts the threshold after the
leak); surrogates ``atan(alpha)`` and ``sigmoid(slope)``. snnTorch fires on ``mem > threshold``, binwslt on
``>=``: the two differ only where the membrane equals the threshold exactly.

A converted snnTorch ``nn.Sequential`` is multi-step: call it once on ``[T, N, ...]`` instead of looping over the
steps (modules between its layers are wrapped in ``binwslt.models.MultiStep``); its BatchNorm then normalises
over (T, N, H, W) in training (equal in eval mode). snnTorch models whose ``forward`` loops over time by hand
cannot be rewritten by pattern: convert the ``nn.Sequential`` they step instead.

What cannot be expressed exactly (another neuron model, a surrogate binwslt lacks, a grouped or dilated conv, a
Conv1d, a single-step SpikingJelly neuron after a layer) raises :class:`ConversionError` naming the layer, before
anything is changed; with ``strict=False`` such layers stay as they are and one warning lists them all.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from .backends import BACKENDS
from .config import LIFConfig
from .nn import LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF
from .subnet import check_prune_rate

__all__ = ["ConversionError", "convert", "fused_layers", "score_parameters", "finetune_parameters",
           "find_parameters"]

BINARY_LAYERS = (BinWConv2d, BinWLinear, BinWConv2dLIF, BinWLinearLIF)
FUSED_LAYERS = (BinWConv2dLIF, BinWLinearLIF)


class ConversionError(ValueError):
    """A layer of the model cannot be converted exactly; the message names it."""


@dataclass(frozen=True)
class _Unsupported:
    """A layer left unconverted: its module path, class and why."""

    path: str
    cls: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.cls}): {self.reason}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _module_of(obj) -> str:
    return type(obj).__module__ or ""


def _sj_class(module_name: str, cls: str):
    """A SpikingJelly class if SpikingJelly is already imported (a model holding its modules imported it)."""
    mod = sys.modules.get(module_name)
    return getattr(mod, cls, None) if mod is not None else None


def _is_spikingjelly(m) -> bool:
    return _module_of(m).startswith("spikingjelly.")


def _is_snntorch_neuron(m) -> bool:
    base = _sj_class("snntorch._neurons.neurons", "SpikingNeuron")
    return base is not None and isinstance(m, base)


def _step_mode(m) -> Optional[str]:
    return getattr(m, "step_mode", None)


# ----------------------------------------------------------------------------------------------- neurons


def _spikingjelly_surrogate(fn) -> Tuple[Optional[str], Optional[float], Optional[str]]:
    names = {"ATan": "atan", "Sigmoid": "sigmoid", "PiecewiseQuadratic": "triangle"}
    cls = type(fn).__name__
    if not _module_of(fn).startswith("spikingjelly.") or cls not in names:
        return None, None, (f"surrogate {cls} has no binwslt equivalent (binwslt has ATan -> atan, Sigmoid -> "
                            "sigmoid, PiecewiseQuadratic -> triangle)")
    if not getattr(fn, "spiking", True):
        return None, None, f"surrogate {cls} has spiking=False (it outputs its primitive, not spikes)"
    return names[cls], float(fn.alpha), None


def _snntorch_surrogate(fn) -> Tuple[Optional[str], Optional[float], Optional[str]]:
    qualname = getattr(fn, "__qualname__", type(fn).__name__)
    names = {"atan.<locals>.inner": ("atan", "alpha"), "sigmoid.<locals>.inner": ("sigmoid", "slope")}
    if getattr(fn, "__module__", "") != "snntorch.surrogate" or qualname not in names:
        return None, None, (f"spike_grad {qualname} has no binwslt equivalent (binwslt has snntorch's "
                            "surrogate.atan(alpha) and surrogate.sigmoid(slope))")
    surrogate, arg = names[qualname]
    value = inspect.getclosurevars(fn).nonlocals.get(arg)
    return surrogate, float(value), None


def _scalar(value, what: str) -> Tuple[Optional[float], Optional[str]]:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None, f"{what} has {value.numel()} values (per-neuron); binwslt has one per layer"
        return float(value.reshape(())), None
    return float(value), None


def _spikingjelly_neuron(m) -> Tuple[Optional[LIFConfig], Optional[str]]:
    lif_cls = _sj_class("spikingjelly.activation_based.neuron", "LIFNode")
    if_cls = _sj_class("spikingjelly.activation_based.neuron", "IFNode")
    if type(m) not in (lif_cls, if_cls) or lif_cls is None:
        return None, (f"SpikingJelly neuron {type(m).__name__} is not one binwslt expresses "
                      "(LIFNode and IFNode are)")
    if _step_mode(m) != "m":
        return None, (f"step_mode={_step_mode(m)!r}: the fused layers run all T steps in one call; set "
                      "spikingjelly.activation_based.functional.set_step_mode(model, 'm') before converting")
    v_reset = m.v_reset
    if v_reset is not None and float(v_reset) != 0.0:
        return None, (f"v_reset={v_reset!r}: binwslt starts the membrane at 0 and leaks towards 0, so only "
                      "v_reset 0 (hard) or None (soft) carry over exactly")
    surrogate, alpha, why = _spikingjelly_surrogate(m.surrogate_function)
    if why:
        return None, why
    if type(m) is if_cls:
        decay, decay_input = 1.0, False
    else:
        tau = float(m.tau)
        if not tau > 1.0:
            return None, f"tau={tau!r}: LIFNode needs tau > 1"
        decay, decay_input = 1.0 - 1.0 / tau, bool(m.decay_input)
    try:
        return LIFConfig(decay=decay, threshold=float(m.v_threshold),
                         v_reset=None if v_reset is None else 0.0, decay_input=decay_input, surrogate=surrogate,
                         alpha=alpha, detach_reset=bool(m.detach_reset)), None
    except (ValueError, TypeError) as exc:
        return None, str(exc)


def _snntorch_neuron(m) -> Tuple[Optional[LIFConfig], Optional[str]]:
    leaky = _sj_class("snntorch._neurons.leaky", "Leaky")
    if leaky is None or type(m) is not leaky:
        return None, f"snnTorch neuron {type(m).__name__} is not one binwslt expresses (Leaky is)"
    checks = (
        (not m.init_hidden, "init_hidden=False: the neuron's state lives outside the module; use "
                            "init_hidden=True"),
        (m.output, "output=True returns the membrane too; binwslt layers return spikes only"),
        (m.inhibition, "inhibition=True has no binwslt equivalent"),
        (bool(m.state_quant), "state_quant has no binwslt equivalent"),
        (isinstance(m.beta, nn.Parameter) and m.beta.requires_grad, "learn_beta=True: binwslt's decay is fixed"),
        (isinstance(m.threshold, nn.Parameter) and m.threshold.requires_grad,
         "learn_threshold=True: binwslt's threshold is fixed"),
        (float(m.graded_spikes_factor) != 1.0, "graded_spikes_factor != 1: binwslt spikes are 0/1"),
        (m.surrogate_disable, "surrogate_disable=True has no binwslt equivalent"),
        (not m.reset_delay, "reset_delay=False resets differently from binwslt's LIF"),
    )
    for failed, why in checks:
        if failed:
            return None, why
    beta, why = _scalar(m.beta, "beta")
    if why:
        return None, why
    threshold, why = _scalar(m.threshold, "threshold")
    if why:
        return None, why
    decay = min(max(beta, 0.0), 1.0)  # snnTorch clamps beta to [0, 1]
    surrogate, alpha, why = _snntorch_surrogate(m.spike_grad)
    if why:
        return None, why
    mechanism = m.reset_mechanism
    if mechanism == "zero":
        v_reset = 0.0
    elif mechanism == "subtract" and decay == 1.0:
        v_reset = None
    elif mechanism == "subtract":
        return None, (f"reset_mechanism='subtract' with beta={beta:.6g}: snnTorch subtracts the threshold after the "
                      "leak, binwslt before it; only beta=1 or reset_mechanism='zero' carry over exactly")
    else:
        return None, f"reset_mechanism={mechanism!r}: binwslt's LIF always resets"
    try:
        return LIFConfig(decay=decay, threshold=threshold, v_reset=v_reset, surrogate=surrogate, alpha=alpha,
                         detach_reset=True), None
    except (ValueError, TypeError) as exc:
        return None, str(exc)


def _neuron_config(m) -> Tuple[Optional[LIFConfig], Optional[str]]:
    """(config, None) for a neuron binwslt expresses exactly, (None, why) for one it does not, (None, None) for
    a module that is no neuron."""
    if isinstance(m, LIF):
        return m.neuron, None
    base = _sj_class("spikingjelly.activation_based.neuron", "BaseNode")
    if base is not None and isinstance(m, base) or _is_spikingjelly(m) and "neuron" in _module_of(m):
        return _spikingjelly_neuron(m)
    if _is_snntorch_neuron(m):
        return _snntorch_neuron(m)
    return None, None


# ------------------------------------------------------------------------------------------------ layers


def _conv_problem(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot become a binary-subnet convolution, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"binwslt has binary-subnet Conv2d and Linear only, not {type(conv).__name__}"
    if conv.groups != 1:
        return f"groups={conv.groups}: binary-subnet convolutions are ungrouped"
    if tuple(conv.dilation) != (1, 1):
        return f"dilation={tuple(conv.dilation)}: binary-subnet convolutions are undilated"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}: binary-subnet convolutions zero-pad"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}: give the padding as numbers"
    return None


def _padding(conv: nn.Conv2d):
    return (0, 0) if conv.padding == "valid" else tuple(conv.padding)


def _like(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` on ``old``'s device and dtype, in its train/eval mode."""
    new = new.to(device=old.weight.device, dtype=old.weight.dtype)
    return new.train(old.training)


def _binary_unfused(layer: nn.Module, prune_rate: float) -> nn.Module:
    """`BinWConv2d` / `BinWLinear` holding ``layer``'s weight (frozen) and bias."""
    if isinstance(layer, nn.Conv2d):
        new = BinWConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, tuple(layer.stride),
                         _padding(layer), prune_rate, bias=layer.bias is not None)
    else:
        new = BinWLinear(layer.in_features, layer.out_features, prune_rate, bias=layer.bias is not None)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if layer.bias is not None:
            new.bias.copy_(layer.bias)
    return _like(new, layer)


def _copy_batch_norm(bn: nn.Module, cls, bias: Optional[torch.Tensor]) -> nn.Module:
    """A plain ``cls`` BatchNorm with ``bn``'s settings and state; a preceding layer's ``bias`` folded into the
    running mean (BN(y + b) with mean m equals BN(y) with mean m - b, and the running update keeps that)."""
    new = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
              track_running_stats=bn.track_running_stats)
    state = list(bn.parameters()) + list(bn.buffers())
    if state:
        new = new.to(device=state[0].device)
    new.load_state_dict(bn.state_dict())
    if bias is not None and new.running_mean is not None:
        with torch.no_grad():
            new.running_mean.sub_(bias.detach().to(new.running_mean.dtype))
    return new.train(bn.training)


def _fused(layer: nn.Module, bn: Optional[nn.Module], neuron: LIFConfig, prune_rate: float,
           backend: str) -> nn.Module:
    """The fused layer computing ``layer -> bn -> LIF(neuron)`` (``bn`` may be None when ``layer`` has no bias)."""
    if isinstance(layer, nn.Conv2d):
        new = BinWConv2dLIF(layer.in_channels, layer.out_channels, layer.kernel_size, tuple(layer.stride),
                            _padding(layer), prune_rate, batch_norm=False, neuron=neuron, backend=backend)
        bn_cls = nn.BatchNorm2d
    else:
        new = BinWLinearLIF(layer.in_features, layer.out_features, prune_rate, batch_norm=False, neuron=neuron,
                            backend=backend)
        bn_cls = nn.BatchNorm1d
    with torch.no_grad():
        new.weight.copy_(layer.weight)
    new = _like(new, layer)
    if bn is not None:
        new.bn = _copy_batch_norm(bn, bn_cls, layer.bias).to(dtype=layer.weight.dtype)
    return new


def _is_batch_norm(m, dims: int, snntorch: bool, inside_container: bool) -> bool:
    plain = nn.BatchNorm2d if dims == 2 else nn.BatchNorm1d
    if type(m) is plain:
        return snntorch or inside_container
    sj = _sj_class("spikingjelly.activation_based.layer", "BatchNorm2d" if dims == 2 else "BatchNorm1d")
    return sj is not None and type(m) is sj and _step_mode(m) == "m"


def _is_time_major_layer(m, snntorch: bool) -> bool:
    """A conv/linear that sees ``[T, N, ...]`` in the original: SpikingJelly's in step mode 'm', any Linear, or
    (in an snnTorch Sequential, which becomes multi-step) a plain Conv2d."""
    if isinstance(m, BINARY_LAYERS) or not isinstance(m, (nn.Conv2d, nn.Linear)):
        return False
    if isinstance(m, nn.Linear) or snntorch:
        return True
    return _is_spikingjelly(m) and _step_mode(m) == "m"


class _Plan:
    """What convert will do: replacements (parent, child name, new module) and the layers it cannot convert."""

    def __init__(self, prune_rate: float, fuse: bool, backend: str):
        self.prune_rate, self.fuse, self.backend = prune_rate, fuse, backend
        self.replacements: List[Tuple[nn.Module, str, nn.Module]] = []
        self.problems: Dict[str, _Unsupported] = {}

    def problem(self, path: str, module: nn.Module, reason: str) -> None:
        self.problems.setdefault(path, _Unsupported(path, type(module).__name__, reason))

    def replace(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.replacements.append((parent, name, new))

    def visit(self, module: nn.Module, prefix: str) -> None:
        children = list(module.named_children())
        sequential = isinstance(module, nn.Sequential)
        snntorch = sequential and any(_is_snntorch_neuron(c) for _, c in children)
        i = 0
        while i < len(children):
            if sequential and self.fuse:
                used = self.try_fuse(module, prefix, children, i, snntorch)
                if used:
                    i += used
                    continue
            name, child = children[i]
            self.visit_child(module, prefix, name, child, snntorch)
            i += 1

    def visit_child(self, parent: nn.Module, prefix: str, name: str, child: nn.Module, snntorch: bool) -> None:
        path = _join(prefix, name)
        if isinstance(child, BINARY_LAYERS):
            return
        if isinstance(child, nn.Linear) or isinstance(child, nn.modules.conv._ConvNd):
            why = None if isinstance(child, nn.Linear) else _conv_problem(child)
            if why:
                self.problem(path, child, why)
            else:
                self.replace(parent, name, _binary_unfused(child, self.prune_rate))
            return
        if snntorch:
            config, why = _neuron_config(child)
            if why:  # a stateful per-step neuron cannot stay in a Sequential that becomes multi-step
                self.problem(path, child, why)
            elif config is not None:
                self.replace(parent, name, LIF(config, backend=self.backend).train(child.training))
            else:
                self.visit(child, path)
                from .models import MultiStep  # the one per-step -> [T, N, ...] wrapper

                self.replace(parent, name, MultiStep(child).train(child.training))
            return
        self.visit(child, path)

    def try_fuse(self, parent: nn.Module, prefix: str, children, i: int, snntorch: bool) -> int:
        """Fuse the pattern starting at child ``i``; the number of children used, 0 if there is none."""
        name, first = children[i]
        container = _sj_class("spikingjelly.activation_based.layer", "SeqToANNContainer")
        bn = None
        if container is not None and type(first) is container:
            inner = list(first.children())
            if not inner or len(inner) > 2 or not isinstance(inner[0], (nn.Conv2d, nn.Linear)):
                return 0
            layer = inner[0]
            if len(inner) == 2:
                if not _is_batch_norm(inner[1], 2 if isinstance(layer, nn.Conv2d) else 1, snntorch, True):
                    return 0
                bn = inner[1]
            j = i + 1
        elif _is_time_major_layer(first, snntorch):
            layer, j = first, i + 1
            if j < len(children) and _is_batch_norm(children[j][1], 2 if isinstance(layer, nn.Conv2d) else 1,
                                                    snntorch, False):
                bn, j = children[j][1], j + 1
        else:
            return 0
        if j >= len(children):
            return 0
        neuron_name, neuron = children[j]
        config, why = _neuron_config(neuron)
        if config is None:
            if why:
                self.problem(_join(prefix, neuron_name), neuron, why)
            return 0
        if isinstance(layer, nn.Conv2d) and _conv_problem(layer):
            return 0  # the layer is reported (and left) by visit_child
        if layer.bias is not None and bn is None:
            return 0  # no BatchNorm to fold the bias into: an unfused binary layer, the neuron kept
        self.replace(parent, name, _fused(layer, bn, config, self.prune_rate, self.backend))
        for k in range(i + 1, j + 1):
            self.replace(parent, children[k][0], nn.Identity().train(children[k][1].training))
        return j + 1 - i


def convert(model: nn.Module, prune_rate: float = 0.4, fuse: bool = True, strict: bool = True, *,
            backend: str = "auto") -> nn.Module:
    """Convert ``model`` in place into binary-subnet layers, fusing conv/linear -> BatchNorm -> LIF runs.

    Args:
        model: a SpikingJelly (multi-step), snnTorch (``nn.Sequential`` with ``Leaky(init_hidden=True)``) or plain
            PyTorch model; the patterns are listed in this module's docstring.
        prune_rate: fraction of weights each binary layer removes, in [0, 1).
        fuse: False keeps the neurons and makes every Conv2d/Linear an unfused `BinWConv2d`/`BinWLinear`.
        strict: True raises :class:`ConversionError` naming every layer that cannot be converted exactly (the
            model is then unchanged); False leaves those layers as they are and warns once, listing them.
        backend: the fused layers' backend ("auto", "torch", "triton", "reference").
    Returns:
        ``model`` itself. Each new layer holds the old layer's weight as its frozen random weight (``.weight``,
        ``requires_grad=False``) and fresh trainable ``.scores``; device, dtype and train/eval mode are kept.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    prune_rate = check_prune_rate(prune_rate)
    for flag, value in (("fuse", fuse), ("strict", strict)):
        if not isinstance(value, bool):
            raise TypeError(f"{flag} must be a bool, got {value!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    plan = _Plan(prune_rate, fuse, backend)
    if isinstance(model, (nn.Conv2d, nn.Linear)) and not isinstance(model, BINARY_LAYERS):
        why = _conv_problem(model) if isinstance(model, nn.Conv2d) else None
        if why:
            raise ConversionError(f"convert: {_Unsupported('', type(model).__name__, why)}")
        return _binary_unfused(model, prune_rate)
    plan.visit(model, "")
    problems = list(plan.problems.values())
    if problems:
        listing = "; ".join(str(p) for p in problems)
        if strict:
            raise ConversionError(f"convert: {len(problems)} layer(s) cannot be converted exactly, model left "
                                  f"unchanged: {listing} (strict=False leaves them unconverted)")
        warnings.warn(f"convert: {len(problems)} layer(s) left unconverted: {listing}", stacklevel=2)
    for parent, name, new in plan.replacements:
        setattr(parent, name, new)
    return model


def fused_layers(model: nn.Module) -> List[nn.Module]:
    """The fused `BinWConv2dLIF` / `BinWLinearLIF` layers of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, FUSED_LAYERS)]


def score_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What Algorithm 1 trains: the pruning scores ``s`` of every binary-subnet layer, in module order.

    The frozen weights (and with them sign(w)) never change; α and the masks follow from the scores. (The
    ``binwslt find`` command also trains the BatchNorm affine parameters and biases beside them.)
    """
    return [m.scores for m in model.modules() if isinstance(m, BINARY_LAYERS)]


def finetune_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What fine-tuning a ticket trains: the binary layers' latent weights (through sign, straight-through) and
    every parameter that is not a binary layer's weight or scores (BatchNorm affine, biases, dense layers).

    The scores, and so the masks, stay the ticket's.
    """
    return _parameters_by_role(model, lambda role: role != "scores")


def find_parameters(model: nn.Module) -> List[nn.Parameter]:
    """What ``binwslt find`` trains: :func:`score_parameters` and every parameter that is not a binary layer's
    weight or scores (BatchNorm affine, biases, dense layers), in module order; the frozen weights never."""
    return _parameters_by_role(model, lambda role: role != "weight")


def _parameters_by_role(model: nn.Module, keep) -> List[nn.Parameter]:
    """Parameters in module order whose role passes ``keep``: "weight"/"scores" of a binary layer, else None."""
    binary = {id(m) for m in model.modules() if isinstance(m, BINARY_LAYERS)}
    out = []
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            role = pname if id(module) in binary and pname in ("weight", "scores") else None
            if keep(role):
                out.append(p)
    return out
