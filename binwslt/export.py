"""Export a binary-subnet spiking model (or its ticket) to NIR, the Neuromorphic Intermediate Representation.

:func:`to_nir` writes a chain of NIR nodes, one per layer:

* a binary conv / linear (fused or not) becomes ``nir.Conv2d`` / ``nir.Affine`` with its effective weight
  α·M⊙sign(w); a fused layer's BatchNorm is folded in (eval mode: running statistics, the fold of
  ``binwslt.nn``), so the node's weight is ``scale[c]·α·M⊙sign(w)`` and its bias ``shift[c]``;
* the LIF neuron becomes ``nir.LIF`` (or ``nir.IF`` for ``decay=1``) in NIR's continuous-time form
  ``tau·dv/dt = (v_leak - v) + r·I``, discretised by forward Euler with step ``dt``:
  ``v[t] = (1 - dt/tau)·v[t-1] + (dt/tau)·r·I[t]``. binwslt's ``U[t] = decay·V[t-1] + g·I[t]`` (``g = 1``, or
  ``1 - decay`` with ``decay_input``) is that with ``tau = dt / (1 - decay)``, ``r = g / (1 - decay)`` (so ``r = 1``
  with ``decay_input``, ``r = tau/dt`` without), ``v_leak = 0``, ``v_threshold = threshold`` and
  ``v_reset`` = binwslt's hard ``v_reset``; ``nir.IF`` has ``r = 1/dt``. ``dt`` is recorded in the graph's
  metadata (default 1e-4 s, SpikingJelly's and most NIR importers' default). This is SpikingJelly's own NIR
  convention, so its importer reads the graph back as ``LIFNode(tau=1/(1-decay))``. NIR fires on
  ``v > v_threshold``, binwslt on ``>=``: they differ only where the membrane equals the threshold exactly;
* ``AvgPool2d`` -> ``nir.AvgPool2d``, flatten -> ``nir.Flatten``; Identity, Dropout (eval) are skipped;
* ``MaxPool2d`` of spikes (its input comes from a neuron, as in every ``binwslt.models`` network): NIR has no max
  pooling, but the max of 0/1 values is "any spike in the window", exactly ``nir.Threshold(0.5)`` of
  ``nir.SumPool2d`` (two nodes, ``<layer>_sum`` and ``<layer>_any``).

What NIR cannot express exactly is a ``ValueError`` naming the layer: max pooling of non-spike values (use
``AvgPool2d``, e.g. ``models.build(..., pool="avg")``), soft reset (``v_reset=None``: NIR's LIF resets to
``v_reset``), BatchNorm without running statistics, residual blocks and global pooling (the ResNet), other
modules. A zoo ``Network`` exports as features -> flatten -> head -> classifier; its logits are per step (the
model averages them over T, which the reader of the graph does). The surrogate and ``detach_reset`` only shape
training and are kept in the graph's metadata. A direct-encoded first layer takes the image at every step.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .config import LIFConfig
from .nn import LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF

__all__ = ["to_nir", "write_nir", "lif_to_nir", "DEFAULT_DT"]

DEFAULT_DT = 1e-4


def _nir():
    try:
        import nir
    except ImportError as exc:  # pragma: no cover - nir is an install requirement
        raise ImportError("NIR export needs the nir package: pip install nir") from exc
    return nir


def _f32(t) -> np.ndarray:
    return (t.detach().to(torch.float32).cpu().numpy() if isinstance(t, torch.Tensor)
            else np.asarray(t, dtype=np.float32))


def lif_to_nir(neuron: LIFConfig, shape: Sequence[int], dt: float = DEFAULT_DT, layer: str = "neuron"):
    """The NIR node of binwslt's LIF ``neuron`` for ``shape`` neurons (the mapping of this module's docstring).

    ValueError naming ``layer`` for what NIR's LIF cannot express (soft reset; ``decay_input`` with ``decay=1``).
    """
    nir = _nir()
    if neuron.v_reset is None:
        raise ValueError(f"layer {layer!r}: soft reset (v_reset=None) has no NIR equivalent (NIR's LIF resets to "
                         "v_reset); use a hard reset to export")
    full = lambda value: np.full(tuple(shape), value, dtype=np.float32)  # noqa: E731
    if neuron.decay == 1.0:
        if neuron.decay_input:
            raise ValueError(f"layer {layer!r}: decay=1 with decay_input=True never integrates its input; nothing "
                             "to export")
        return nir.IF(r=full(1.0 / dt), v_threshold=full(neuron.threshold), v_reset=full(neuron.v_reset))
    tau = dt / (1.0 - neuron.decay)
    r = 1.0 if neuron.decay_input else 1.0 / (1.0 - neuron.decay)
    return nir.LIF(tau=full(tau), r=full(r), v_leak=full(0.0), v_threshold=full(neuron.threshold),
                   v_reset=full(neuron.v_reset))


def _folded(module) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(scale, shift) of a fused layer's BatchNorm in eval mode (binwslt.nn's fold), or (None, None)."""
    if module.bn is None:
        return None, None
    if not module.bn.track_running_stats:
        raise ValueError("BatchNorm without running statistics normalises every batch by itself; it cannot be "
                         "folded into fixed NIR weights")
    was = module.training
    module.eval()
    try:
        kwargs = module._bn_kwargs()
    finally:
        module.train(was)
    return kwargs["scale"], kwargs["shift"]


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


class _Chain:
    """NIR nodes in order, with the per-sample shape after each (no T, no batch dims)."""

    def __init__(self, input_shape: Tuple[int, ...], dt: float):
        self.nir = _nir()
        self.dt = dt
        self.nodes: List[Tuple[str, object]] = []
        self.shape = tuple(int(d) for d in input_shape)
        self.neurons = {}
        self.spikes = False  # whether the values flowing out of the last node are 0/1 spikes

    def add(self, name: str, node, shape, spikes: bool = False) -> None:
        self.nodes.append((name.replace(".", "_") or "layer", node))
        self.shape = tuple(int(d) for d in shape)
        self.spikes = spikes

    def conv(self, path: str, weight: torch.Tensor, bias, stride, padding) -> None:
        if len(self.shape) != 3:
            raise ValueError(f"layer {path!r}: a convolution needs [C, H, W] input, the graph has {self.shape}")
        c_out, c_in, kh, kw = weight.shape
        if self.shape[0] != c_in:
            raise ValueError(f"layer {path!r} expects {c_in} input channels, the graph has shape {self.shape}")
        stride, padding = _pair(stride), _pair(padding)
        bias = np.zeros(c_out, dtype=np.float32) if bias is None else _f32(bias)
        node = self.nir.Conv2d(input_shape=self.shape[1:], weight=_f32(weight), stride=stride, padding=padding,
                               dilation=(1, 1), groups=1, bias=bias)
        self.add(path, node, (c_out, _conv_out(self.shape[1], kh, stride[0], padding[0]),
                              _conv_out(self.shape[2], kw, stride[1], padding[1])))

    def affine(self, path: str, weight: torch.Tensor, bias) -> None:
        if self.shape != (weight.shape[1],):
            raise ValueError(f"layer {path!r} expects {weight.shape[1]} features, the graph has shape {self.shape}")
        bias = np.zeros(weight.shape[0], dtype=np.float32) if bias is None else _f32(bias)
        self.add(path, self.nir.Affine(weight=_f32(weight), bias=bias), (weight.shape[0],))

    def neuron(self, path: str, neuron: LIFConfig) -> None:
        self.neurons[path] = neuron
        self.add(f"{path}.lif", lif_to_nir(neuron, self.shape, self.dt, path), self.shape, spikes=True)

    def flatten(self, path: str) -> None:
        node = self.nir.Flatten(input_type={"input": np.array(self.shape)}, start_dim=0, end_dim=-1)
        self.add(path, node, (math.prod(self.shape),), spikes=self.spikes)

    def maxpool_of_spikes(self, path: str, pool: nn.MaxPool2d) -> None:
        """Max over 0/1 spikes is "any spike in the window": ``Threshold(SumPool2d(x), 0.5)``, exact."""
        if not self.spikes:
            raise ValueError(f"layer {path!r} ({type(pool).__name__}): NIR has no max pooling; a max pool of spikes "
                             "exports (as sum pooling + threshold) but this one's input is not spikes; use AvgPool2d")
        if pool.ceil_mode or any(_pair(pool.padding)) or _pair(pool.dilation) != (1, 1) or pool.return_indices:
            raise ValueError(f"layer {path!r}: only an unpadded, undilated max pool without ceil_mode exports")
        k = _pair(pool.kernel_size)
        s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        shape = (self.shape[0], _conv_out(self.shape[1], k[0], s[0], 0), _conv_out(self.shape[2], k[1], s[1], 0))
        node = self.nir.SumPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array((0, 0)))
        self.add(f"{path}.sum", node, shape)
        self.add(f"{path}.any", self.nir.Threshold(threshold=np.full(shape, 0.5, dtype=np.float32)), shape,
                 spikes=True)

    def avgpool(self, path: str, pool: nn.AvgPool2d) -> None:
        if pool.ceil_mode or pool.divisor_override is not None or any(_pair(pool.padding)):
            raise ValueError(f"layer {path!r}: NIR's AvgPool2d has no ceil_mode, divisor_override or padding")
        k = _pair(pool.kernel_size)
        s = _pair(pool.stride if pool.stride is not None else pool.kernel_size)
        node = self.nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array((0, 0)))
        self.add(path, node, (self.shape[0], _conv_out(self.shape[1], k[0], s[0], 0),
                              _conv_out(self.shape[2], k[1], s[1], 0)))


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def _folded_weight(module, path: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A fused layer's effective weight with its BatchNorm scale folded into each output channel, and the shift."""
    try:
        scale, shift = _folded(module)
    except ValueError as exc:
        raise ValueError(f"layer {path!r}: {exc}") from None
    weight = module.effective_weight().detach().float()
    if scale is not None:
        weight = weight * scale.detach().float().view((-1,) + (1,) * (weight.dim() - 1))
    return weight, shift


def _visit(chain: _Chain, module: nn.Module, path: str) -> None:
    if isinstance(module, BinWConv2dLIF):
        weight, shift = _folded_weight(module, path)
        chain.conv(path, weight, shift, module.stride, module.padding)
        chain.neuron(path, module.neuron)
    elif isinstance(module, BinWLinearLIF):
        weight, shift = _folded_weight(module, path)
        chain.affine(path, weight, shift)
        chain.neuron(path, module.neuron)
    elif isinstance(module, BinWConv2d):
        chain.conv(path, module.effective_weight().detach().float(), module.bias, module.stride, module.padding)
    elif isinstance(module, BinWLinear):
        chain.affine(path, module.effective_weight().detach().float(), module.bias)
    elif isinstance(module, LIF):
        chain.neuron(path, module.neuron)
    elif isinstance(module, (nn.Identity, nn.Dropout)) or type(module).__name__ in ("Dropout", "Dropout2d") \
            and type(module).__module__.startswith("spikingjelly."):
        return  # identity in eval mode
    elif isinstance(module, nn.Flatten):
        if module.start_dim not in (1, -len(chain.shape)) or module.end_dim != -1:
            raise ValueError(f"layer {path!r}: only a flatten of every per-sample dim exports (start_dim=1)")
        chain.flatten(path)
    elif isinstance(module, nn.AvgPool2d):
        chain.avgpool(path, module)
    elif isinstance(module, nn.MaxPool2d):
        chain.maxpool_of_spikes(path, module)
    elif type(module).__name__ == "MultiStep" and hasattr(module, "module"):
        _visit(chain, module.module, path)
    elif isinstance(module, nn.Sequential):  # nn.Sequential and SpikingJelly's SeqToANNContainer
        for name, child in module.named_children():
            _visit(chain, child, f"{path}.{name}" if path else name)
    else:
        raise ValueError(f"layer {path!r} ({type(module).__name__}) has no NIR export (supported: binwslt's binary "
                         "and fused layers, LIF, AvgPool2d, Flatten, Dropout, Identity, nn.Sequential)")


def _as_model(model_or_ticket) -> nn.Module:
    if isinstance(model_or_ticket, nn.Module):
        return model_or_ticket
    if isinstance(model_or_ticket, (str, os.PathLike)):
        from . import ticket, train

        return ticket.load(train.resolve_ticket_path(os.fspath(model_or_ticket)), backend="torch")
    raise TypeError(f"model_or_ticket must be an nn.Module, a ticket file or a run folder, got "
                    f"{type(model_or_ticket).__name__}")


def to_nir(model_or_ticket, *, input_shape: Optional[Sequence[int]] = None, dt: float = DEFAULT_DT):
    """The NIR graph (``nir.NIRGraph``, a chain input -> layers -> output) of a binwslt model.

    Args:
        model_or_ticket: a model with binary-subnet layers (a ``binwslt.models`` network, or a converted
            ``nn.Sequential``), or the path of a zoo ticket / a ``binwslt find`` run folder.
        input_shape: the per-sample input shape, ``(C, H, W)`` or ``(F,)``; taken from ``model.config`` for a
            zoo model, required otherwise.
        dt: the Euler step (seconds) NIR's continuous-time LIF is discretised with (module docstring).
    Returns:
        ``nir.NIRGraph``; ValueError naming the first layer NIR cannot express exactly.
    """
    nir = _nir()
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be a positive number of seconds, got {dt!r}")
    model = _as_model(model_or_ticket)
    config = getattr(model, "config", None)
    if input_shape is None:
        if not isinstance(config, dict) or "in_channels" not in config:
            raise ValueError("to_nir needs input_shape=(C, H, W) or (F,) for a model without a binwslt config")
        input_shape = (config["in_channels"], config["image_size"], config["image_size"])
    shape = tuple(input_shape)
    if not 1 <= len(shape) <= 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"input_shape must be 1 to 3 positive ints, got {input_shape!r}")
    chain = _Chain(shape, float(dt))
    from .models import Network

    if isinstance(model, Network):
        if model.global_pool:
            raise ValueError(f"model {config.get('name', 'network')!r}: residual blocks and global average pooling "
                             "have no NIR export here")
        _visit(chain, model.features, "features")
        chain.flatten("flatten")
        _visit(chain, model.head, "head")
        _visit(chain, model.classifier, "classifier")
    else:
        _visit(chain, model, "")
    if not chain.nodes:
        raise ValueError(f"model {type(model).__name__} has no layer to export")
    nodes = {"input": nir.Input(input_type={"input": np.array(shape)})}
    names = ["input"]
    for name, node in chain.nodes:
        if name in nodes:
            raise ValueError(f"two layers map to the NIR node name {name!r}")
        nodes[name] = node
        names.append(name)
    nodes["output"] = nir.Output(output_type={"output": np.array(chain.shape)})
    names.append("output")
    metadata = {"producer": "binwslt", "dt": float(dt),
                "discretisation": "forward Euler: v[t] = (1 - dt/tau) v[t-1] + (dt/tau) r I[t]; binwslt fires on "
                                  "v >= v_threshold",
                "training": {path: {"surrogate": n.surrogate, "alpha": n.alpha, "detach_reset": n.detach_reset}
                             for path, n in chain.neurons.items()}}
    if isinstance(config, dict):
        metadata["logits"] = "per step; the binwslt model averages them over its timesteps"
        metadata["timesteps"] = int(config.get("timesteps", 0))
    return nir.NIRGraph(nodes=nodes, edges=list(zip(names[:-1], names[1:])), metadata=metadata)


def write_nir(model_or_ticket, path, **kwargs) -> int:
    """:func:`to_nir` written to ``path`` (NIR's HDF5 file, via a temp file and rename); returns its bytes."""
    nir = _nir()
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    graph = to_nir(model_or_ticket, **kwargs)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        nir.write(tmp, graph)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def add_parser(sub) -> None:
    """Register ``binwslt export RUN_DIR --nir FILE`` on the CLI's subparsers."""
    p = sub.add_parser("export", help="export a ticket (or a find run's folder) to NIR",
                       description="export a ticket (or a find run's folder) to NIR (docs: binwslt.export)")
    p.add_argument("path", help="ticket .safetensors or a find run's --out folder")
    p.add_argument("--nir", required=True, metavar="FILE", help="the NIR file to write (HDF5)")
    p.add_argument("--dt", type=float, default=DEFAULT_DT, help=f"Euler step in seconds (default {DEFAULT_DT})")


def export_command(args) -> dict:
    """The ``binwslt export`` command: write the NIR file, print one line, return the figures."""
    size = write_nir(args.path, args.nir, dt=args.dt)
    graph = _nir().read(args.nir)
    print(f"wrote {args.nir} ({size} bytes, {len(graph.nodes)} NIR nodes, dt={args.dt})", flush=True)
    return {"nir_path": args.nir, "nir_bytes": size, "nir_nodes": len(graph.nodes)}
