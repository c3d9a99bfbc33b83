"""Layer shapes of the paper's four models, and the benchmark suites (which shapes, T, N per device and mode).

A fused layer's shape is read off a real model (``binwslt.models.build``) by forward pre-hooks on its
`BinWConv2dLIF` / `BinWLinearLIF` layers, so the table cannot drift from the models. The classifier and the
ResNet projection shortcuts have no neuron and are not fused layers; they are not listed.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import torch

MODEL_NAMES = ("conv4", "vgg9", "vgg11", "resnet19")


@dataclass(frozen=True)
class LayerShape:
    """One fused layer: ``kind`` "conv" (input ``[T, N, in_channels, height, width]``, or the analog image
    ``[N, in_channels, height, width]`` when ``direct``) or "linear" (input ``[T, N, in_channels]``; height = width
    = kernel = 1). ``residual``: the layer adds an output-shaped residual before its neuron (ResNet)."""

    model: str
    index: int
    kind: str
    in_channels: int
    out_channels: int
    height: int = 1
    width: int = 1
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    direct: bool = False
    residual: bool = False

    @property
    def out_hw(self) -> Tuple[int, int]:
        """(H', W') of the output (1, 1 for a linear layer)."""
        if self.kind == "linear":
            return 1, 1
        return ((self.height + 2 * self.padding - self.kernel) // self.stride + 1,
                (self.width + 2 * self.padding - self.kernel) // self.stride + 1)

    @property
    def geometry(self) -> tuple:
        """Everything but the model and index: two layers with the same geometry cost the same."""
        return (self.kind, self.in_channels, self.out_channels, self.height, self.width, self.kernel, self.stride,
                self.padding, self.direct, self.residual)

    @property
    def label(self) -> str:
        if self.kind == "linear":
            return f"{self.model}.{self.index} fc {self.in_channels}->{self.out_channels}"
        tags = "".join([" direct" if self.direct else "", " +res" if self.residual else ""])
        s = f"/s{self.stride}" if self.stride != 1 else ""
        return (f"{self.model}.{self.index} conv{self.kernel} {self.in_channels}->{self.out_channels} "
                f"@{self.height}x{self.width}{s}{tags}")

    def macs_per_frame(self) -> int:
        """Dense multiply-accumulates of one frame (one image at one timestep)."""
        oh, ow = self.out_hw
        return self.kernel * self.kernel * self.in_channels * self.out_channels * oh * ow

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=None)
def model_layer_shapes(name: str, image_size: int = 32, in_channels: int = 3) -> Tuple[LayerShape, ...]:
    """The fused layers of model ``name`` (one of MODEL_NAMES) at full width, in forward order."""
    from binwslt import models
    from binwslt.nn import BinWConv2dLIF, BinWLinearLIF

    if name not in MODEL_NAMES:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    torch.manual_seed(0)
    model = models.build(name, "binwslt", in_channels=in_channels, image_size=image_size, timesteps=1,
                         backend="torch")
    found: List[LayerShape] = []

    def hook(module, args, kwargs):
        x = args[0]
        residual = kwargs.get("residual", args[1] if len(args) > 1 else None) is not None
        if isinstance(module, BinWConv2dLIF):
            stride = module.stride if isinstance(module.stride, int) else module.stride[0]
            padding = module.padding if isinstance(module.padding, int) else module.padding[0]
            direct = x.dim() == 4
            h, w = x.shape[-2:]
            found.append(LayerShape(name, len(found), "conv", module.in_channels, module.out_channels, int(h), int(w),
                                    module.kernel_size[0], stride, padding, direct, residual))
        else:
            found.append(LayerShape(name, len(found), "linear", module.in_features, module.out_features,
                                    direct=x.dim() == 2, residual=residual))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()
               if isinstance(m, (BinWConv2dLIF, BinWLinearLIF))]
    try:
        with torch.no_grad():
            model(torch.rand(1, in_channels, image_size, image_size))
    finally:
        for h in handles:
            h.remove()
    return tuple(found)


def distinct(shapes) -> List[LayerShape]:
    """Keep the first layer of each geometry (order kept)."""
    seen, out = set(), []
    for s in shapes:
        if s.geometry not in seen:
            seen.add(s.geometry)
            out.append(s)
    return out


@dataclass(frozen=True)
class LayerCase:
    """A layer shape run at ``timesteps`` T and batch ``batch`` N."""
    shape: LayerShape
    timesteps: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.shape.label} T={self.timesteps} N={self.batch}"


@dataclass(frozen=True)
class ModelCase:
    """A whole model's training step: ``name`` at ``width`` (1.0 = the paper's), ``image_size``, T, N."""
    name: str
    timesteps: int
    batch: int
    width: float = 1.0
    image_size: int = 32

    @property
    def label(self) -> str:
        w = "" if self.width == 1.0 else f" width={self.width:g}"
        return f"{self.name}{w} {self.image_size}x{self.image_size} T={self.timesteps} N={self.batch}"


# Quick mode (CI): tiny hand-made shapes covering direct encoding, stride, residual and linear layers.
QUICK_LAYERS = (
    LayerShape("quick", 0, "conv", 3, 8, 8, 8, 3, 1, 1, direct=True),
    LayerShape("quick", 1, "conv", 8, 16, 8, 8, 3, 2, 1),
    LayerShape("quick", 2, "conv", 16, 16, 4, 4, 3, 1, 1, residual=True),
    LayerShape("quick", 3, "linear", 64, 32),
)
# The one shape the triton backend runs on a CPU (under TRITON_INTERPRET=1): checked to run, never timed.
INTERPRETER_LAYER = LayerShape("tiny", 0, "conv", 4, 16, 4, 4, 3, 1, 1)


def suite(device: str, quick: bool) -> Dict[str, list]:
    """What to run: ``{"layers": [LayerCase], "models": [ModelCase]}`` for ``device`` "cpu" or "cuda".

    CPU full: the Conv-4 layers at the target's T=4, N=32 and four other layers (VGG-11's 256- and 512-channel
    convs, ResNet-19's residual and stride-2 convs) at N=8 (a 2-core budget), the whole Conv-4 step at T=4, N=32 (the issue's CPU target). CUDA full: VGG-11 layers at
    T=4, N=128 (the GPU target), ResNet-19's distinct layers at N=64, and every model's step.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    if quick:
        return {"layers": [LayerCase(s, 2, 2) for s in QUICK_LAYERS],
                "models": [ModelCase("conv4", 2, 2, width=0.125, image_size=8)]}
    if device == "cpu":
        conv4 = distinct(model_layer_shapes("conv4"))
        known = {s.geometry for s in conv4}
        pick = {("vgg11", 5), ("vgg11", 7), ("resnet19", 2), ("resnet19", 7)}  # deep, narrow-spatial, +res, s2
        others = [s for s in model_layer_shapes("vgg11") + model_layer_shapes("resnet19")
                  if (s.model, s.index) in pick and s.geometry not in known]
        return {"layers": [LayerCase(s, 4, 32) for s in conv4] + [LayerCase(s, 4, 8) for s in others],
                "models": [ModelCase("conv4", 4, 32)]}
    vgg11 = distinct(model_layer_shapes("vgg11"))
    known = {s.geometry for s in vgg11}
    resnet = [s for s in distinct(model_layer_shapes("resnet19")) if s.geometry not in known]
    return {"layers": [LayerCase(s, 4, 128) for s in vgg11] + [LayerCase(s, 4, 64) for s in resnet],
            "models": [ModelCase("conv4", 4, 128), ModelCase("vgg11", 4, 128), ModelCase("resnet19", 4, 64)]}


def interpreter_case() -> Optional[LayerCase]:
    """The tiny layer the triton backend runs under the interpreter on a CPU."""
    return LayerCase(INTERPRETER_LAYER, 2, 1)
