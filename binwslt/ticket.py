"""Lottery tickets on disk: 2 bits per binary weight, in safetensors (no pickle, safe to open from a stranger).

A ticket holds, for every binary-subnet layer (a module with ``weight``, ``scores`` and ``prune_rate``):

* ``<layer>.sign``: the packed bits ``w > 0`` (1 bit per weight, ``binwslt.bits.pack_bits``);
* ``<layer>.mask``: the packed mask bits M (1 bit per weight);
* ``<layer>.alpha``: the gain α = Σ|w|·M / ΣM as one float32;
* ``<layer>.kept_zeros`` (only when there are any): flat indices of kept weights that are exactly 0;

plus every other state tensor of the model unchanged under ``state.<key>`` (BatchNorm affine and running
statistics, biases, dense layers of a dense model) and, in the safetensors metadata, the model's
``config`` (the keyword arguments of ``binwslt.models.build``) and each binary layer's shape and prune rate.

``load`` rebuilds the model with ``binwslt.models.build_from_config(config)`` and gives each binary layer a
weight with the stored signs and magnitudes close to α, and the scores ``M`` (1 kept, 0 pruned: the
``n_pruned`` zeros are exactly the pruned set). The kept magnitudes are chosen so that Σ|w|·M / ΣM is α bit
for bit in any summation order, so the effective weights α·M·sign(w), and with them the outputs, are
bit-identical. (The original magnitudes are not in a ticket; they matter only to fine-tuning, never to the
ticket's outputs.)
"""
from __future__ import annotations

import json
import math
import os
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .bits import pack_bits, unpack_bits
from .subnet import n_pruned, subnet_mask, ternary_subnet

FORMAT_NAME = "binwslt-ticket"
FORMAT_VERSION = "1"
_STATE_PREFIX = "state."


def _safetensors():
    try:
        from safetensors.torch import load_file, save_file
    except ImportError as exc:  # pragma: no cover - safetensors is an install requirement
        raise ImportError("binwslt tickets need the safetensors package: pip install safetensors") from exc
    return save_file, load_file


def binary_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The binary-subnet layers of ``model`` by qualified name: modules with ``weight``, ``scores``, ``prune_rate``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor)
            and isinstance(getattr(m, "scores", None), torch.Tensor) and hasattr(m, "prune_rate")}


def _key(prefix: str, leaf: str) -> str:
    return f"{prefix}.{leaf}" if prefix else leaf


def _config_of(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    if not isinstance(config, dict):
        raise ValueError(f"model {type(model).__name__} has no `config` dict (models from binwslt.models.build "
                         "record one); a ticket needs it to rebuild the model")
    out = dict(config)
    neuron = out.get("neuron")
    if neuron is not None and hasattr(neuron, "to_dict"):
        out["neuron"] = neuron.to_dict()
    try:
        json.dumps(out)
    except TypeError as exc:
        raise ValueError(f"model.config must be JSON-serialisable, got {config!r}") from exc
    return out


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the same model stored dense in fp32: every state tensor except scores, at 4 bytes an element."""
    skip = {_key(name, "scores") for name in binary_layers(model)}
    return sum(4 * t.numel() for key, t in model.state_dict().items()
               if key not in skip and t.is_floating_point())


def save(model: nn.Module, path) -> int:
    """Write ``model``'s ticket to ``path`` (safetensors, written to a temp file then renamed); return its bytes.

    ``model`` needs a JSON-serialisable ``model.config`` (as ``binwslt.models.build`` sets); TypeError for a
    non-module or a bad path, ValueError for a missing config.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    save_file, _ = _safetensors()
    config = _config_of(model)
    layers = binary_layers(model)
    tensors: Dict[str, torch.Tensor] = {}
    layer_meta = {}
    skip = set()
    for name, layer in layers.items():
        weight = layer.weight.detach().cpu()
        scores = layer.scores.detach().cpu()
        prune_rate = float(layer.prune_rate)
        mask = subnet_mask(scores, prune_rate)
        _, alpha = ternary_subnet(weight, scores, prune_rate)
        tensors[_key(name, "sign")] = pack_bits(weight > 0)
        tensors[_key(name, "mask")] = pack_bits(mask)
        tensors[_key(name, "alpha")] = alpha.reshape(1).to(torch.float32)
        # sign(0) = 0: a kept weight that is exactly 0 (float32 Kaiming init gives one in ~10M) is a third
        # state the two bits cannot hold; such weights are listed by flat index.
        zeros = torch.nonzero(((weight == 0) & mask).reshape(-1)).reshape(-1)
        if zeros.numel():
            tensors[_key(name, "kept_zeros")] = zeros.to(torch.int64)
        layer_meta[name] = {"shape": list(weight.shape), "prune_rate": prune_rate}
        skip.update({_key(name, "weight"), _key(name, "scores")})
    for key, value in model.state_dict().items():
        if key not in skip:
            tensors[_STATE_PREFIX + key] = value.detach().cpu().contiguous()
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": json.dumps(config),
                "binary_layers": json.dumps(layer_meta)}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return os.path.getsize(path)


def _sum_for_alpha(alpha: float, kept: int) -> Optional[float]:
    """A float32 S with fl32(S / kept) == alpha, or None (the original fp32 Σ|w|·M is one; search near α·kept)."""
    n = torch.tensor(float(kept), dtype=torch.float32)
    start = torch.tensor(alpha, dtype=torch.float32) * n
    up, down = start.clone(), start.clone()
    for _ in range(64):
        for candidate in (up, down):
            if float(candidate / n) == alpha:
                return float(candidate)
        up = torch.nextafter(up, torch.tensor(float("inf")))
        down = torch.nextafter(down, torch.tensor(0.0))
    return None


def _exact_sum_magnitudes(mask: torch.Tensor, carriers: torch.Tensor, alpha: float) -> Optional[torch.Tensor]:
    """Float32 magnitudes (flat) that are 0 outside ``carriers`` (kept, nonzero weights) and whose kept ones add
    up, exactly in float32 and in any order, to an S with fl32(S / ΣM) == α; None when there is none.

    The carried magnitudes are integer multiples k_i·q of q = ulp(S) with Σk_i·q = S and Σk_i < 2^24, so every
    partial sum is exact in float32 whatever order a reduction adds them in (a GPU's included); each magnitude
    is within q (about ΣM float32 steps of α) of α.
    """
    kept, n_carriers = int(mask.sum()), int(carriers.sum())
    if kept > 1 << 23:
        return None
    total = _sum_for_alpha(alpha, kept)
    if total is None:
        return None
    mantissa, exponent = math.frexp(total)  # total = mantissa·2^exponent, mantissa in [0.5, 1)
    quantum = math.ldexp(1.0, exponent - 24)
    units = int(mantissa * (1 << 24))  # total = units·quantum exactly, units < 2^24
    if n_carriers == 0:
        return torch.zeros(mask.numel(), dtype=torch.float32, device=mask.device) if units == 0 else None
    if units < n_carriers:
        return None
    base, extra = divmod(units, n_carriers)
    flat = carriers.reshape(-1)
    rank = torch.cumsum(flat.to(torch.int64), 0) - 1  # index of each weight among the carriers
    k = torch.full_like(rank, base) + (rank < extra).to(torch.int64)
    return torch.where(flat, k.to(torch.float64) * quantum, 0.0).to(torch.float32)


def _weight_for_alpha(sign: torch.Tensor, mask: torch.Tensor, zero: torch.Tensor, alpha: float,
                      prune_rate: float, layer: str) -> torch.Tensor:
    """A float32 weight with the given signs, 0 where ``zero``, whose gain under ``ternary_subnet`` is ``alpha``
    bit for bit.

    First choice: the exact-sum magnitudes of :func:`_exact_sum_magnitudes` (the gain then comes out the same
    in any summation order and precision); fallback: one magnitude α·ΣM/#carriers for every kept nonzero weight
    (exact when the gain is summed in float64 and no kept weight is 0). Pruned weights get magnitude α. The
    result is checked against ``ternary_subnet``; ValueError when neither gives α back.
    """
    scores = mask.to(torch.float32)
    carriers = mask & ~zero
    flat_carriers = carriers.reshape(-1)
    signs = torch.where(sign.reshape(-1), 1.0, -1.0).to(torch.float32)
    uniform = float(torch.tensor(alpha * int(mask.sum()) / max(int(carriers.sum()), 1), dtype=torch.float32))
    candidates = (lambda: _exact_sum_magnitudes(mask, carriers, alpha),
                  lambda: torch.where(flat_carriers, uniform, 0.0).to(torch.float32))
    pruned = ~mask.reshape(-1)
    for make in candidates:
        magnitude = make()
        if magnitude is None:
            continue
        magnitude = torch.where(pruned, torch.tensor(alpha, dtype=torch.float32, device=pruned.device), magnitude)
        weight = (signs * magnitude).view(sign.shape)
        if float(ternary_subnet(weight, scores, prune_rate)[1]) == alpha:
            return weight
    raise ValueError(f"layer {layer!r}: no weight with the ticket's signs gives back alpha={alpha!r} exactly; "
                     "the ticket is corrupt or was written by an incompatible binwslt")


def _read(path) -> Tuple[Dict[str, torch.Tensor], dict, dict]:
    _, load_file = _safetensors()
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ticket file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise ValueError(f"{path} is not a readable safetensors ticket: {exc}") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not a binwslt ticket (metadata format={metadata.get('format')!r})")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path} has ticket version {metadata.get('version')!r}; this binwslt reads "
                         f"version {FORMAT_VERSION}")
    return tensors, json.loads(metadata["config"]), json.loads(metadata["binary_layers"])


def read_config(path) -> dict:
    """The model config stored in the ticket at ``path`` (the keyword arguments of ``binwslt.models.build``)."""
    return _read(path)[1]


def load(path, *, backend: Optional[str] = None, device=None) -> nn.Module:
    """Rebuild the model saved by :func:`save` at ``path``; its outputs are bit-identical to the saved model's.

    ``backend`` overrides the stored ``config["backend"]`` (e.g. a ticket found on a GPU with "triton", loaded
    on a CPU with "torch"); ``device`` (default CPU) is where the model is built. The model is returned in eval
    mode.
    """
    from . import models

    tensors, config, layer_meta = _read(path)
    if backend is not None:
        config["backend"] = backend
    model = models.build_from_config(config)
    device = torch.device("cpu") if device is None else torch.device(device)
    model.to(device)
    layers = binary_layers(model)
    if set(layers) != set(layer_meta):
        raise ValueError(f"{path}: ticket layers {sorted(layer_meta)} do not match the rebuilt model's binary "
                         f"layers {sorted(layers)}")
    state = {key[len(_STATE_PREFIX):]: value for key, value in tensors.items() if key.startswith(_STATE_PREFIX)}
    for name, meta in layer_meta.items():
        layer = layers[name]
        shape = tuple(meta["shape"])
        if tuple(layer.weight.shape) != shape:
            raise ValueError(f"{path}: layer {name!r} has shape {shape} in the ticket but "
                             f"{tuple(layer.weight.shape)} in the rebuilt model")
        if float(layer.prune_rate) != float(meta["prune_rate"]):
            raise ValueError(f"{path}: layer {name!r} has prune_rate {meta['prune_rate']} in the ticket but "
                             f"{layer.prune_rate} in the rebuilt model")
        sign = unpack_bits(tensors[_key(name, "sign")], shape).to(device)
        mask = unpack_bits(tensors[_key(name, "mask")], shape).to(device)
        if int((~mask).sum()) != n_pruned(mask.numel(), meta["prune_rate"]):
            raise ValueError(f"{path}: layer {name!r} mask prunes {int((~mask).sum())} weights, prune_rate "
                             f"{meta['prune_rate']} prunes {n_pruned(mask.numel(), meta['prune_rate'])}")
        zero = torch.zeros(mask.numel(), dtype=torch.bool, device=device)
        zeros = tensors.get(_key(name, "kept_zeros"))
        if zeros is not None:
            if zeros.dtype != torch.int64 or zeros.dim() != 1 or bool((zeros < 0).any()) \
                    or bool((zeros >= mask.numel()).any()) or not bool(mask.reshape(-1)[zeros.to(device)].all()):
                raise ValueError(f"{path}: layer {name!r} has kept_zeros that are not indices of kept weights")
            zero[zeros.to(device)] = True
        zero = zero.view(shape)
        scores = mask.to(torch.float32)
        weight = _weight_for_alpha(sign, mask, zero, float(tensors[_key(name, "alpha")][0]), meta["prune_rate"],
                                   name)
        state[_key(name, "weight")] = weight.to(layer.weight.dtype)
        state[_key(name, "scores")] = scores.to(layer.scores.dtype)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model
