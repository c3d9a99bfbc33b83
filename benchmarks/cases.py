"""Runnable benchmark cases: one layer or one model, built for one implementation, with fixed inputs.

Implementations (``IMPLS``):
- ``reference``, ``torch``, ``triton``: binwslt's fused layer (`BinWConv2dLIF` / `BinWLinearLIF`, training-mode
  BatchNorm) or model (``binwslt.models.build(kind="binwslt")``) on that backend;
- ``spikingjelly``, ``snntorch``: the peers of `peers.py` (snnTorch per layer only);
- ``floor``: the bare convolutions (or linear layers) alone, dense float weights, no BatchNorm, no neuron, no
  binarisation, over the same frames (T·N, or N for a direct-encoded first layer): the layer cannot beat them.
- ``spikingjelly-bf16``: the SpikingJelly peer with its forward under ``torch.autocast(device, torch.bfloat16)``
  (the low-precision mode a SpikingJelly user would reach for; not exact).
- ``floor-bf16``: the floor in bf16, channels-last, with a two-term backward (every conv/linear's backward run
  for the bf16 high and low parts of its output gradient): what an exact-weight bf16 split costs at best.

A training step is: clear grads, forward, backward of a fixed random output gradient (layers) or of the
cross-entropy on fixed labels (models). Gradients flow to the input (except a direct-encoded image), the
residual, the scores (binwslt) or weights (peers, floor) and the BatchNorm affine. Forward-only runs under
``torch.no_grad()`` with BatchNorm still in training mode (batch statistics).
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from binwslt.config import LIFConfig
from binwslt.spikes import mark_spikes

from .memory import saved_bytes
from .peers import SnnTorchLayer, SpikingJellyLayer, peer_status, reset_spikingjelly, spikingjelly_model

IMPLS = ("reference", "torch", "triton", "spikingjelly", "spikingjelly-bf16", "snntorch", "floor", "floor-bf16")
BACKENDS = ("reference", "torch", "triton")
PRUNE_RATE = 0.4
SPIKE_RATE = 0.2  # firing rate of the input spikes of a non-first layer


class Unavailable(Exception):
    """The implementation cannot run here (missing package, backend absent); the message says why."""


def triton_status(device: str) -> Optional[str]:
    """None when backend="triton" can run on ``device``, else the reason."""
    try:
        import binwslt.kernels.ops  # noqa: F401
    except Exception as exc:
        return f"backend 'triton' not importable ({type(exc).__name__}: {exc})"
    if device == "cpu" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        return "backend 'triton' on a CPU needs TRITON_INTERPRET=1 set before binwslt.kernels is imported"
    return None


def availability(impl: str, device: str) -> Optional[str]:
    """None when ``impl`` can run on ``device``, else a clear reason."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl in ("spikingjelly", "spikingjelly-bf16", "snntorch"):
        return peer_status()[impl.split("-")[0]]
    if impl == "triton":
        return triton_status(device)
    return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """One implementation of one case: ``train_step()``, ``infer()``, ``saved_bytes()``; all synchronise CUDA."""

    def __init__(self, impl: str, device: str, module: nn.Module, forward: Callable[[], torch.Tensor],
                 backward: Callable[[torch.Tensor], None], reset: Optional[Callable[[], None]] = None):
        self.impl, self.device, self.module = impl, device, module
        self._forward, self._backward, self._reset = forward, backward, reset

    def _grads(self) -> List[torch.Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def forward(self) -> torch.Tensor:
        if self._reset is not None:
            self._reset()
        return self._forward()

    def train_step(self) -> None:
        for p in self._grads():
            p.grad = None
        self._backward(self.forward())
        _sync(self.device)

    def infer(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.forward()
        _sync(self.device)
        return out

    def saved_bytes(self) -> int:
        """Bytes saved for backward by one forward, the module's parameters and buffers excluded."""
        exclude = list(self.module.parameters()) + list(self.module.buffers())
        return saved_bytes(self.forward, exclude=exclude)


def _autocast(impl: str, device: str):
    """bf16 autocast for the ``spikingjelly-bf16`` peer, a no-op context for everything else."""
    return torch.autocast(device, torch.bfloat16, enabled=impl == "spikingjelly-bf16")


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


class _Floor(nn.Module):
    """The bare conv/linear of a layer over its frames: ``[T, N, ...]`` -> ``[T·N, ...]`` (or ``[N, ...]`` direct)."""

    def __init__(self, shape):
        super().__init__()
        if shape.kind == "conv":
            self.op = nn.Conv2d(shape.in_channels, shape.out_channels, shape.kernel, stride=shape.stride,
                                padding=shape.padding, bias=False)
        else:
            self.op = nn.Linear(shape.in_channels, shape.out_channels, bias=False)
        self.direct = shape.direct

    def forward(self, x, residual=None):
        return self.op(x if self.direct else x.flatten(0, 1))


class _TwoTermBF16(torch.autograd.Function):
    """conv2d/linear in bf16 whose backward runs twice: for bf16(g) and for bf16(g - bf16(g))."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.geo = (stride, padding)
        if weight.dim() == 4:
            return F.conv2d(x, weight, stride=stride, padding=padding)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.geo
        g32 = grad.float()
        hi = g32.to(torch.bfloat16)
        terms = (hi, (g32 - hi.float()).to(torch.bfloat16))
        gx = gw = None
        for g in terms:
            if weight.dim() == 4:
                a, b, _ = torch.ops.aten.convolution_backward(
                    g.contiguous(memory_format=torch.channels_last), x, weight, None, stride, padding, [1, 1],
                    False, [0, 0], 1, [ctx.needs_input_grad[0], True, False])
            else:
                a = g @ weight if ctx.needs_input_grad[0] else None
                b = g.flatten(0, -2).t() @ x.flatten(0, -2)
            gx = a if gx is None else (gx if a is None else gx + a)
            gw = b if gw is None else gw + b
        return gx, gw, None, None


class _TwoTermLayer(nn.Module):
    """Wraps one nn.Conv2d / nn.Linear of the floor model: bf16 channels-last forward, `_TwoTermBF16` backward."""

    def __init__(self, op: nn.Module):
        super().__init__()
        self.op = op

    def forward(self, x):
        w = self.op.weight.to(torch.bfloat16)  # the fp32 master weight gets the gradient through the cast
        if w.dim() == 4:
            x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
            return _TwoTermBF16.apply(x.to(torch.bfloat16), w, list(self.op.stride), list(self.op.padding))
        return _TwoTermBF16.apply(x.to(torch.bfloat16), w, None, None)


def _bf16_two_term(model: nn.Module) -> nn.Module:
    """The floor model with every conv/linear as a `_TwoTermLayer` (bf16 channels-last), in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, (nn.Conv2d, nn.Linear)):
            setattr(model, name, _TwoTermLayer(child))
        else:
            _bf16_two_term(child)
    return model


def layer_module(impl: str, shape, timesteps: int, neuron: LIFConfig = LIFConfig()) -> nn.Module:
    """The module of ``impl`` for ``shape``: ``forward(x, residual=None)``."""
    from binwslt.nn import BinWConv2dLIF, BinWLinearLIF
    direct_t = timesteps if shape.direct else None
    if impl in BACKENDS:
        if shape.kind == "conv":
            return BinWConv2dLIF(shape.in_channels, shape.out_channels, shape.kernel, stride=shape.stride,
                                 padding=shape.padding, prune_rate=PRUNE_RATE, batch_norm=True, neuron=neuron,
                                 timesteps=direct_t, backend=impl)
        return BinWLinearLIF(shape.in_channels, shape.out_channels, prune_rate=PRUNE_RATE, batch_norm=True,
                             neuron=neuron, timesteps=direct_t, backend=impl)
    if impl in ("spikingjelly", "spikingjelly-bf16"):
        return SpikingJellyLayer(shape, neuron, direct_t)
    if impl == "snntorch":
        return SnnTorchLayer(shape, neuron, direct_t)
    if impl == "floor":
        return _Floor(shape)
    if impl == "floor-bf16":
        return _bf16_two_term(_Floor(shape))
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def layer_inputs(shape, timesteps: int, batch: int, device: str, dtype=torch.float32, seed: int = 0):
    """(x, residual or None) for a layer case: spikes at rate SPIKE_RATE (requires grad), or the analog image."""
    g = _generator(seed)
    if shape.direct:
        x = torch.randn((batch, shape.in_channels, shape.height, shape.width), generator=g)
    elif shape.kind == "conv":
        x = (torch.rand((timesteps, batch, shape.in_channels, shape.height, shape.width), generator=g)
             < SPIKE_RATE).float()
    else:
        x = (torch.rand((timesteps, batch, shape.in_channels), generator=g) < SPIKE_RATE).float()
    x = x.to(device=device, dtype=dtype).requires_grad_(not shape.direct)
    if not shape.direct:
        mark_spikes(x)  # a fused layer's output is marked; without the mark the layer would take the analog path
    residual = None
    if shape.residual:
        oh, ow = shape.out_hw
        residual = (0.5 * torch.randn((timesteps, batch, shape.out_channels, oh, ow), generator=g))
        residual = residual.to(device=device, dtype=dtype).requires_grad_()
    return x, residual


def layer_runner(impl: str, case, device: str, dtype=torch.float32, seed: int = 0) -> Runner:
    """A `Runner` of ``impl`` on a `shapes.LayerCase`; raises `Unavailable` when ``impl`` cannot run here."""
    reason = availability(impl, device)
    if reason is not None:
        raise Unavailable(reason)
    shape, T, N = case.shape, case.timesteps, case.batch
    torch.manual_seed(seed)
    module = layer_module(impl, shape, T).to(device=device, dtype=dtype)
    x, residual = layer_inputs(shape, T, N, device, dtype, seed)
    grad_out = {}

    def forward():
        with _autocast(impl, device):
            return module(x, residual=residual)

    def backward(out):
        if "g" not in grad_out or grad_out["g"].shape != out.shape:
            grad_out["g"] = torch.randn(out.shape, generator=_generator(seed + 1)).to(device=device, dtype=out.dtype)
        out.backward(grad_out["g"])

    reset = (lambda: reset_spikingjelly(module)) if impl.startswith("spikingjelly") else None
    return Runner(impl, device, module, forward, backward, reset)


# ---------------------------------------------------------------------------------------------------- models
def _strip_to_floor(model: nn.Module) -> nn.Module:
    """Replace every LIF and BatchNorm of a dense ``snn`` model by Identity, in place: the bare convs and linears."""
    from binwslt.nn import LIF
    for name, child in list(model.named_children()):
        if isinstance(child, (LIF, nn.BatchNorm1d, nn.BatchNorm2d)):
            setattr(model, name, nn.Identity())
        else:
            _strip_to_floor(child)
    return model


def model_module(impl: str, case) -> nn.Module:
    """The whole model of ``impl`` for a `shapes.ModelCase` (``[N, 3, S, S]`` image -> logits ``[N, 10]``)."""
    from binwslt import models
    kw = dict(num_classes=10, in_channels=3, image_size=case.image_size, timesteps=case.timesteps,
              width=case.width)
    if impl in BACKENDS:
        return models.build(case.name, "binwslt", prune_rate=PRUNE_RATE, backend=impl, **kw)
    if impl in ("spikingjelly", "spikingjelly-bf16"):
        return spikingjelly_model(models.build(case.name, "snn", backend="torch", **kw))
    if impl == "floor":
        return _strip_to_floor(models.build(case.name, "snn", backend="torch", **kw))
    if impl == "floor-bf16":
        return _bf16_two_term(_strip_to_floor(models.build(case.name, "snn", backend="torch", **kw)))
    raise Unavailable(f"{impl} has no whole-model case (snnTorch is benchmarked per layer only)")


def model_runner(impl: str, case, device: str, dtype=torch.float32, seed: int = 0) -> Runner:
    """A `Runner` of one training step of a whole model; raises `Unavailable` when ``impl`` cannot run here."""
    reason = availability(impl, device)
    if reason is not None:
        raise Unavailable(reason)
    torch.manual_seed(seed)
    module = model_module(impl, case).to(device=device, dtype=dtype).train()
    g = _generator(seed)
    x = torch.rand((case.batch, 3, case.image_size, case.image_size), generator=g).to(device=device, dtype=dtype)
    labels = torch.randint(0, 10, (case.batch,), generator=g).to(device)

    def backward(logits):
        F.cross_entropy(logits.float(), labels).backward()

    reset = (lambda: reset_spikingjelly(module)) if impl.startswith("spikingjelly") else None

    def forward():
        with _autocast(impl, device):
            return module(x)

    return Runner(impl, device, module, forward, backward, reset)
