"""The paper's networks (design.md §5) in four kinds: dense ANN, dense SNN, BNN-BinAct (MPT-1/1) and BinW-SLT.

Every model takes an analog image batch ``x`` float ``[N, C, H, W]`` (``H = W = image_size``) and returns
logits float ``[N, num_classes]``; the spiking kinds encode the image directly (the first convolution's output
drives its neurons at each of the ``T`` steps), run time-major ``[T, N, ...]`` inside and average the
classifier's logits over T. Layout, so hooks can find things: ``model.features`` (convolutional part),
``model.head`` (hidden fully connected units, each linear -> BN -> activation), ``model.classifier``.

| kind | conv/linear | activation | trained |
|---|---|---|---|
| ``ann`` | ``nn.Conv2d``/``nn.Linear`` | ReLU | weights, BN |
| ``snn`` | ``nn.Conv2d``/``nn.Linear`` over ``[T, N, ...]`` | LIF (surrogate BPTT) | weights, BN |
| ``bnn-binact`` | ``BinWConv2d``/``BinWLinear`` | sign, Bi-Real STE | scores, BN affine |
| ``binwslt`` | fused ``BinWConv2dLIF``/``BinWLinearLIF`` | LIF inside the fused op | scores, BN affine |
"""
from __future__ import annotations

import math
from typing import List, Optional, Union

import torch
from torch import nn

from binwslt import _cpu_ext
from binwslt.config import LIFConfig
from binwslt.spikes import attach_uint8, is_spikes, mark_spikes, uint8_spikes
from binwslt.nn import LIF, BinWConv2d, BinWConv2dLIF, BinWLinear, BinWLinearLIF

NAMES = ("conv4", "vgg9", "vgg11", "resnet19")
KINDS = ("ann", "snn", "bnn-binact", "binwslt")
SPIKING_KINDS = ("snn", "binwslt")
BINARY_KINDS = ("bnn-binact", "binwslt")

# design.md §5: conv plan ("M" = MaxPool2d(2)) and hidden fc widths; the classifier follows.
VGG_PLANS = {
    "conv4": ([64, 64, "M", 128, 128, "M"], [256, 256]),
    "vgg9": ([64, 64, "M", 128, 128, "M", 256, 256, "M"], [256, 256]),
    "vgg11": ([64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"], [256, 256]),
}
# ResNet-19: stem conv 3->64, then (channels, stride, blocks) per stage, avgpool, fc 512->256->classes.
RESNET19_STEM = 64
RESNET19_STAGES = ((128, 1, 3), (256, 2, 3), (512, 2, 2))
RESNET19_HIDDEN = (256,)


class BiRealSign(torch.autograd.Function):
    """sign(x) in {-1, +1} (0 maps to +1) with Bi-Real Net's gradient 2(1 - |clamp(x, -1, 1)|)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * 2.0 * (1.0 - x.clamp(-1.0, 1.0).abs())


class SignSTE(nn.Module):
    """Binary activation of BNN-BinAct: any float tensor -> same shape in {-1, +1}, Bi-Real STE backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return BiRealSign.apply(x)


class MultiStep(nn.Module):
    """Applies a per-sample module to a time-major ``[T, N, ...]`` tensor by merging T into the batch."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _multistep(self.module, x)


class DenseUnit(nn.Module):
    """conv or linear -> BN -> activation for the non-fused kinds (ann, snn, bnn-binact).

    ``ann``/``bnn-binact``: ``x [N, ...]`` -> ``[N, ...]``. ``snn``: ``x [T, N, ...]`` -> spikes ``[T, N, ...]``;
    with ``timesteps`` set, ``x`` is the analog image ``[N, ...]``, the layer is computed once and repeated T
    times (direct encoding). BN normalises over (T, N[, H, W]), as the fused layer does. ``residual`` (output
    shaped) is added after BN, before the activation.
    """

    def __init__(self, kind: str, layer: nn.Module, bn: nn.Module, act: nn.Module, timesteps: Optional[int] = None):
        super().__init__()
        self.kind = kind
        self.layer = layer
        self.bn = bn
        self.act = act
        self.timesteps = timesteps

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.kind != "snn":
            y = self.bn(self.layer(x))
        else:
            if self.timesteps is not None:
                y = self.layer(x)
                y = y.unsqueeze(0).expand(self.timesteps, *y.shape)
            else:
                y = _multistep(self.layer, x)
            t, n = y.shape[:2]
            y = self.bn(y.reshape(t * n, *y.shape[2:])).view(t, n, *y.shape[2:])
        if residual is not None:
            y = y + residual
        return self.act(y)


def _multistep(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module`` applied to ``x [T, N, ...]`` with T merged into the batch; returns ``[T, N, ...]``."""
    if isinstance(module, nn.MaxPool2d) and is_spikes(x):
        return _pool_spikes(module, x)
    t, n = x.shape[:2]
    y = module(x.flatten(0, 1))
    return y.view(t, n, *y.shape[1:])


def _pool_spikes(pool: nn.MaxPool2d, x: torch.Tensor) -> torch.Tensor:
    """Max-pooled spikes ``[T, N, C, H', W']``, marked (max-pooling spikes gives spikes: the next fused layer
    keeps its exact int8 path). A 2×2/2 pool of float32 channels-last spikes carrying their uint8 copy
    (`binwslt.spikes.attach_uint8`) runs on the bytes (`_SpikePool`) and passes the pooled bytes on as well."""
    t, n = x.shape[:2]
    u8 = uint8_spikes(x)
    frames = x.flatten(0, 1)
    if u8 is not None and _is_2x2(pool) and min(x.shape[-2:]) >= 2 and x.dtype == torch.float32 and \
            frames.is_contiguous(memory_format=torch.channels_last) and _cpu_ext.load() is not None:
        y, p8 = _spike_pool(frames, u8.flatten(0, 1))
        y = y.view(t, n, *y.shape[1:])
        return mark_spikes(attach_uint8(y, p8.view(y.shape)))
    y = pool(frames)
    if y.requires_grad and y.dim() == 4 and not y.is_contiguous() and \
            y.is_contiguous(memory_format=torch.channels_last):
        y = _GradChannelsLast.apply(y)
    return mark_spikes(y.view(t, n, *y.shape[1:]))


def _is_2x2(pool: nn.MaxPool2d) -> bool:
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return pair(pool.kernel_size) == (2, 2) and pair(pool.stride or pool.kernel_size) == (2, 2) and \
        pair(pool.padding) == (0, 0) and pair(pool.dilation) == (1, 1) and not pool.ceil_mode and \
        not pool.return_indices


def _spike_pool(frames: torch.Tensor, frames_u8: torch.Tensor):
    """`_SpikePool` of channels-last frames ``[F, C, H, W]`` (float32) and their uint8 copy: the pooled frames
    (float32, differentiable) and their uint8 copy, both ``[F, C, H/2, W/2]`` channels-last."""
    return _SpikePool.apply(frames, frames_u8)


class _SpikePool(torch.autograd.Function):
    """``max_pool2d(frames, 2)`` of channels-last spikes, computed on their uint8 copy by the CPU extension
    (binwslt/csrc/lif_scan.cpp ``spike_pool2x2``); it saves the argmax as one byte per output (max_pool2d's: the
    first spike in the window, the window's first position when none fired) and its backward writes every input
    gradient in one pass: max_pool2d's values and gradient, without its int64 indices and zero fill."""

    @staticmethod
    def forward(ctx, frames, frames_u8):
        pooled, code = _cpu_ext.load().spike_pool2x2(frames_u8.permute(0, 2, 3, 1))  # [F, H, W, C] in memory
        ctx.save_for_backward(code)
        ctx.hw = tuple(frames.shape[-2:])
        p8 = pooled.permute(0, 3, 1, 2)
        ctx.mark_non_differentiable(p8)
        return p8.to(frames.dtype), p8

    @staticmethod
    def backward(ctx, grad, _):
        (code,) = ctx.saved_tensors
        g = grad.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        return _cpu_ext.load().spike_pool2x2_backward(g, code, *ctx.hw).permute(0, 3, 1, 2), None


class _GradChannelsLast(torch.autograd.Function):
    """Identity on channels-last frames whose backward hands the gradient on channels-last too: max_pool2d's CPU
    backward runs several times slower when the gradient of channels-last frames arrives contiguous (as it does
    through the flatten before the head)."""

    @staticmethod
    def forward(ctx, y):
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


class Shortcut(nn.Module):
    """ResNet projection shortcut: 1x1 conv (stride s) + BN, no activation; multi-step for spiking kinds."""

    def __init__(self, conv: nn.Module, bn: nn.Module, multistep: bool):
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.multistep = multistep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.multistep:
            return self.bn(self.conv(x))
        y = self.conv(x) if isinstance(self.conv, BinWConv2d) else _multistep(self.conv, x)
        t, n = y.shape[:2]
        return self.bn(y.flatten(0, 1)).view(t, n, *y.shape[2:])


class BasicBlock(nn.Module):
    """ResNet basic block: unit(conv3x3, stride) -> unit(conv3x3) with the shortcut added before the second
    activation (for the spiking kinds: into the second layer's membrane current)."""

    def __init__(self, conv1: nn.Module, conv2: nn.Module, shortcut: Optional[nn.Module]):
        super().__init__()
        self.conv1 = conv1
        self.conv2 = conv2
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.conv2(self.conv1(x), residual=residual)


class _Factory:
    """Builds the units of one kind; keeps the shared settings in one place."""

    def __init__(self, kind, prune_rate, timesteps, neuron, backend, pool="max"):
        self.kind = kind
        self.pool_kind = pool
        self.prune_rate = prune_rate
        self.timesteps = timesteps
        self.neuron = neuron
        self.backend = backend

    @property
    def spiking(self) -> bool:
        return self.kind in SPIKING_KINDS

    def _act(self) -> nn.Module:
        if self.kind == "ann":
            return nn.ReLU()
        if self.kind == "bnn-binact":
            return SignSTE()
        return LIF(neuron=self.neuron, backend=self.backend)

    def conv(self, cin: int, cout: int, stride: int = 1, first: bool = False) -> nn.Module:
        timesteps = self.timesteps if first and self.spiking else None
        if self.kind == "binwslt":
            return BinWConv2dLIF(cin, cout, 3, stride=stride, padding=1, prune_rate=self.prune_rate,
                                 batch_norm=True, neuron=self.neuron, timesteps=timesteps, backend=self.backend)
        if self.kind == "bnn-binact":
            layer = BinWConv2d(cin, cout, 3, stride=stride, padding=1, prune_rate=self.prune_rate, bias=False)
        else:
            layer = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        return DenseUnit(self.kind, layer, nn.BatchNorm2d(cout), self._act(), timesteps)

    def linear(self, fin: int, fout: int) -> nn.Module:
        if self.kind == "binwslt":
            return BinWLinearLIF(fin, fout, prune_rate=self.prune_rate, batch_norm=True, neuron=self.neuron,
                                 backend=self.backend)
        if self.kind == "bnn-binact":
            layer = BinWLinear(fin, fout, prune_rate=self.prune_rate, bias=False)
        else:
            layer = nn.Linear(fin, fout, bias=False)
        return DenseUnit(self.kind, layer, nn.BatchNorm1d(fout), self._act())

    def classifier(self, fin: int, classes: int) -> nn.Module:
        if self.kind in BINARY_KINDS:
            return BinWLinear(fin, classes, prune_rate=self.prune_rate, bias=False)
        return nn.Linear(fin, classes, bias=True)

    def pool(self) -> nn.Module:
        pool = nn.MaxPool2d(2) if self.pool_kind == "max" else nn.AvgPool2d(2)
        return MultiStep(pool) if self.spiking else pool

    def shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        if self.kind in BINARY_KINDS:
            conv = BinWConv2d(cin, cout, 1, stride=stride, padding=0, prune_rate=self.prune_rate, bias=False)
        else:
            conv = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)
        return Shortcut(conv, nn.BatchNorm2d(cout), multistep=self.spiking)


class Network(nn.Module):
    """features -> flatten (or global average pool) -> head -> classifier; logits averaged over T if spiking.

    forward: ``x`` float ``[N, in_channels, image_size, image_size]`` -> logits float ``[N, num_classes]``.
    """

    def __init__(self, features: nn.Module, head: nn.Module, classifier: nn.Module, *, spiking: bool,
                 global_pool: bool, config: dict):
        super().__init__()
        self.features = features
        self.head = head
        self.classifier = classifier
        self.spiking = spiking
        self.global_pool = global_pool
        self.config = config

    def check_input(self, x: torch.Tensor) -> None:
        """Raise TypeError/ValueError unless ``x`` is a float ``[N, C, H, W]`` image batch this model takes."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or tuple(x.shape[1:]) != (c, s, s):
            raise ValueError(f"x must have shape [N, {c}, {s}, {s}] for this model, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.features(x)
        if self.global_pool:
            h = h.mean(dim=(-2, -1))
        else:
            flat = h.flatten(2 if self.spiking else 1)
            u8 = uint8_spikes(h)
            if u8 is not None:
                attach_uint8(flat, u8.flatten(2 if self.spiking else 1))
            h = mark_spikes(flat) if is_spikes(h) else flat  # flattened spikes are still spikes
        logits = self.classifier(self.head(h))
        return logits.mean(0) if self.spiking else logits


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def build(name: str, kind: str, num_classes: int = 10, in_channels: int = 3, image_size: int = 32,
          prune_rate: float = 0.4, timesteps: int = 4, neuron: Union[LIFConfig, dict, None] = None,
          backend: str = "auto", width: float = 1.0, pool: str = "max") -> Network:
    """Build ``name`` ("conv4", "vgg9", "vgg11", "resnet19") of ``kind`` ("ann", "snn", "bnn-binact", "binwslt").

    ``prune_rate`` (fraction of weights removed, binary kinds only), ``timesteps`` T and ``neuron`` (the LIF,
    spiking kinds only) and ``backend`` ("auto", "torch", "reference", "triton"; spiking kinds) configure the
    layers; ``width`` scales every channel count and hidden fc width (1.0 is the paper's model); ``pool="avg"``
    replaces the paper's 2x2 max pooling by average pooling (NIR, ``binwslt.export``, has no max pooling; the
    config records ``pool`` only when it is not "max", so older configs stay as they were). The returned
    model records its arguments in ``model.config`` (a JSON-serialisable dict; ``prune_rate`` is 0.0 for the
    dense kinds), from which :func:`build_from_config` rebuilds it.
    """
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"model name must be one of {', '.join(NAMES)}; got {name!r}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    _check_int("num_classes", num_classes, 2)
    _check_int("in_channels", in_channels, 1)
    _check_int("image_size", image_size, 1)
    _check_int("timesteps", timesteps, 1)
    if isinstance(prune_rate, bool) or not isinstance(prune_rate, (int, float)) or not 0.0 <= prune_rate < 1.0:
        raise ValueError(f"prune_rate must be a number in [0, 1), got {prune_rate!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive number, got {width!r}")
    if neuron is None:
        neuron = LIFConfig()
    elif isinstance(neuron, dict):
        neuron = LIFConfig(**neuron)
    elif not isinstance(neuron, LIFConfig):
        raise TypeError(f"neuron must be a LIFConfig or a dict of its fields, got {type(neuron).__name__}")
    if pool not in ("max", "avg"):
        raise ValueError(f"pool must be 'max' or 'avg', got {pool!r}")
    if backend not in ("auto", "torch", "reference", "triton"):
        raise ValueError(f"backend must be one of auto, torch, reference, triton; got {backend!r}")
    prune_rate = float(prune_rate) if kind in BINARY_KINDS else 0.0
    config = {"name": name, "kind": kind, "num_classes": num_classes, "in_channels": in_channels,
              "image_size": image_size, "prune_rate": prune_rate, "timesteps": timesteps,
              "neuron": neuron.to_dict(), "backend": backend, "width": float(width)}
    if pool != "max":
        config["pool"] = pool
    make = _Factory(kind, prune_rate, timesteps, neuron, backend, pool)
    if name == "resnet19":
        return _build_resnet19(make, num_classes, in_channels, width, config)
    return _build_vgg(make, VGG_PLANS[name], num_classes, in_channels, image_size, width, config)


def build_from_config(config: dict) -> Network:
    """Rebuild a model (fresh parameters) from its ``model.config`` dict."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    known = ("name", "kind", "num_classes", "in_channels", "image_size", "prune_rate", "timesteps", "neuron",
             "backend", "width", "pool")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise ValueError(f"config has unknown keys {unknown}; expected a subset of {list(known)}")
    return build(**config)


def _build_vgg(make: _Factory, plan, num_classes, in_channels, image_size, width, config) -> Network:
    conv_plan, hidden = plan
    layers: List[nn.Module] = []
    cin, size, first = in_channels, image_size, True
    for item in conv_plan:
        if item == "M":
            layers.append(make.pool())
            size //= 2
        else:
            cout = _scaled(item, width)
            layers.append(make.conv(cin, cout, first=first))
            cin, first = cout, False
    if size < 1:
        pools = conv_plan.count("M")
        raise ValueError(f"image_size={image_size} is too small for {config['name']}: its {pools} max-pools "
                         f"need image_size >= {2 ** pools}")
    fin = cin * size * size
    head = []
    for h in hidden:
        fout = _scaled(h, width)
        head.append(make.linear(fin, fout))
        fin = fout
    return Network(nn.Sequential(*layers), nn.Sequential(*head), make.classifier(fin, num_classes),
                   spiking=make.spiking, global_pool=False, config=config)


def _build_resnet19(make: _Factory, num_classes, in_channels, width, config) -> Network:
    cin = _scaled(RESNET19_STEM, width)
    layers: List[nn.Module] = [make.conv(in_channels, cin, first=True)]
    for channels, stride, blocks in RESNET19_STAGES:
        cout = _scaled(channels, width)
        for b in range(blocks):
            s = stride if b == 0 else 1
            shortcut = make.shortcut(cin, cout, s) if (s != 1 or cin != cout) else None
            layers.append(BasicBlock(make.conv(cin, cout, stride=s), make.conv(cout, cout), shortcut))
            cin = cout
    head, fin = [], cin
    for h in RESNET19_HIDDEN:
        fout = _scaled(h, width)
        head.append(make.linear(fin, fout))
        fin = fout
    return Network(nn.Sequential(*layers), nn.Sequential(*head), make.classifier(fin, num_classes),
                   spiking=make.spiking, global_pool=True, config=config)


def weight_count(model: nn.Module) -> int:
    """Number of conv/linear weights (the paper's parameter count: 2.43M, 2.26M, 5.27M for Conv-4/VGG-9/VGG-11)."""
    total = 0
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, BinWConv2d, BinWLinear, BinWConv2dLIF, BinWLinearLIF)):
            total += module.weight.numel()
    return total


def parameter_count(model: nn.Module) -> int:
    """Weights + BN affine + biases (the paper's 12.63M for ResNet-19); frozen weights and scores count once."""
    total = 0
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if pname == "scores":
                continue
            total += p.numel()
        if isinstance(module, (BinWConv2d, BinWLinear, BinWConv2dLIF, BinWLinearLIF)) \
                and "weight" not in dict(module.named_parameters(recurse=False)):
            total += module.weight.numel()
    return total


def subnet_layers(model: nn.Module) -> List[nn.Module]:
    """The binary-subnet layers (BinWConv2d, BinWLinear, BinWConv2dLIF, BinWLinearLIF) in module order."""
    return [m for m in model.modules() if isinstance(m, (BinWConv2d, BinWLinear, BinWConv2dLIF, BinWLinearLIF))]


def sparsity(model: nn.Module) -> float:
    """Fraction of conv/linear weights that are zero in the deployed network (pruned by the masks); 0 for dense."""
    total = weight_count(model)
    pruned = 0
    for layer in subnet_layers(model):
        pruned += int((~layer.mask()).sum()) if hasattr(layer, "mask") else 0
    return pruned / total if total else 0.0
