"""Lottery tickets on disk: 2 bits per binary weight, in safetensors (no pickle, safe to open from a stranger).

A ticket holds, for every binary-subnet layer (a module with ``weight``, ``scores`` and ``prune_rate``):

* ``<layer>.sign``: the packed bits ``w > 0`` (1 bit per weight, ``binwslt.bits.pack_bits``);
* ``<layer>.mask``: the packed mask bits M (1 bit per weight);
* ``<layer>.alpha``: the gain α = Σ|w|·M / ΣM as one float32;
* ``<layer>.kept_zeros`` (only when there are any): flat indices of kept weights that are exactly 0;

plus every other state tensor of the model unchanged under ``state.<key>`` (BatchNorm affine and running
statistics, biases, dense layers of a dense model) and, in the safetensors metadata, the model's
``config`` (the keyword arguments of ``binwslt.models.build``; null for any other model), each binary layer's
class, shape, prune rate and LIF config and every stand-alone ``binwslt.nn.LIF``'s config (by module path), and
``sha256``: a SHA-256 over every tensor (name,
dtype, shape, bytes) and the rest of the metadata, checked on load (version 1 files, written before it, still
load).

``load`` rebuilds a zoo model with ``binwslt.models.build_from_config(config)`` (first on the meta device, so
that a header that does not fit its tensors fails before anything is allocated), or fills a model the caller
built (any model holding binary layers, e.g. a converted SpikingJelly one), and gives each binary layer a
weight with the stored signs and magnitudes close to α, and the scores ``M`` (1 kept, 0 pruned: the
``n_pruned`` zeros are exactly the pruned set). The kept magnitudes are chosen so that Σ|w|·M / ΣM is α bit
for bit in any summation order, so the effective weights α·M·sign(w), and with them the outputs, are
bit-identical. (The original magnitudes are not in a ticket; they matter only to fine-tuning, never to the
ticket's outputs.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .backends import resolve_backend
from .bits import pack_bits, unpack_bits
from .subnet import n_pruned, subnet_mask, ternary_subnet

FORMAT_NAME = "binwslt-ticket"
FORMAT_VERSION = "2"  # 2: SHA-256 in the header, any model with binary layers (1: zoo models, no checksum)
READABLE_VERSIONS = ("1", "2")
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


def dense_fp32_bytes(model: nn.Module) -> int:
    """Bytes of the same model stored dense in fp32: every state tensor except scores, at 4 bytes an element."""
    skip = {_key(name, "scores") for name in binary_layers(model)}
    return sum(4 * t.numel() for key, t in model.state_dict().items()
               if key not in skip and t.is_floating_point())


def _config_of(model: nn.Module) -> Optional[dict]:
    """``model.config`` as JSON-ready dict (a zoo model), or None (any other model)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        raise ValueError(f"model.config must be a dict (the arguments of binwslt.models.build), got "
                         f"{type(config).__name__}")
    out = dict(config)
    neuron = out.get("neuron")
    if neuron is not None and hasattr(neuron, "to_dict"):
        out["neuron"] = neuron.to_dict()
    try:
        json.dumps(out)
    except TypeError as exc:
        raise ValueError(f"model.config must be JSON-serialisable, got {config!r}") from exc
    return out


def _layer_meta(layer: nn.Module, prune_rate: float) -> dict:
    """What a binary layer must match on load: class, shape, prune rate and, for fused layers, the neuron."""
    meta = {"shape": list(layer.weight.shape), "prune_rate": prune_rate, "kind": type(layer).__name__}
    neuron = getattr(layer, "neuron", None)
    if neuron is not None and hasattr(neuron, "to_dict"):
        meta["neuron"] = neuron.to_dict()
    return meta


def _neurons(model: nn.Module) -> Dict[str, dict]:
    """The LIF config of every stand-alone ``binwslt.nn.LIF`` module, by module path (fused layers' are in their
    layer's metadata)."""
    from .nn import LIF

    return {name: m.neuron.to_dict() for name, m in model.named_modules() if isinstance(m, LIF)}


def _check_finite(name: str, what: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"layer {name!r}: {what} holds {bad} NaN/Inf value(s); a ticket of it could never be "
                         "loaded, so it is not saved")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _digest(tensors: Dict[str, torch.Tensor], metadata: Dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes, in name order) and the metadata (but the digest)."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(_tensor_bytes(t))
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def save(model: nn.Module, path) -> int:
    """Write ``model``'s ticket to ``path`` (safetensors, written to a temp file then renamed); return its bytes.

    ``model``: any module holding binary-subnet layers (a converted SpikingJelly/snnTorch/PyTorch model, saved by
    module path and loaded with ``load(path, model=fresh_model)``), or a ``binwslt.models.build`` model (its
    ``model.config`` is stored so that ``load(path)`` rebuilds it). The header holds a SHA-256 over tensors and
    metadata. TypeError for a non-module or a bad path; ValueError for a model with neither binary layers nor
    config, or for NaN/Inf in any layer (naming it).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    save_file, _ = _safetensors()
    config = _config_of(model)
    layers = binary_layers(model)
    if config is None and not layers:
        raise ValueError(f"model {type(model).__name__} has no binary-subnet layers and no `config` (models from "
                         "binwslt.models.build record one): there is no ticket to save; convert it first "
                         "(binwslt.nn.convert)")
    tensors: Dict[str, torch.Tensor] = {}
    layer_meta = {}
    skip = set()
    for name, layer in layers.items():
        weight = layer.weight.detach().cpu()
        scores = layer.scores.detach().cpu()
        _check_finite(name, "weight", weight)
        _check_finite(name, "scores", scores)
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
        layer_meta[name] = _layer_meta(layer, prune_rate)
        skip.update({_key(name, "weight"), _key(name, "scores")})
    for key, value in model.state_dict().items():
        if key not in skip:
            _check_finite(key.rsplit(".", 1)[0], key.rsplit(".", 1)[-1], value)
            tensors[_STATE_PREFIX + key] = value.detach().cpu().contiguous()
    metadata = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": json.dumps(config),
                "binary_layers": json.dumps(layer_meta), "neurons": json.dumps(_neurons(model)),
                "model_class": type(model).__name__}
    metadata["sha256"] = _digest(tensors, metadata)
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


class TicketError(ValueError):
    """A ticket file that is corrupt, modified, foreign, or does not fit the model; its message is one line."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


@dataclass(frozen=True)
class _Header:
    """What a ticket's safetensors header says, read without loading a tensor."""

    path: str
    version: str
    metadata: Dict[str, str]
    config: Optional[dict]
    layers: Dict[str, dict]
    shapes: Dict[str, Tuple[Tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)


def _json_field(path: str, metadata: Dict[str, str], field: str):
    try:
        return json.loads(metadata[field])
    except (KeyError, TypeError, ValueError) as exc:
        raise TicketError(f"{path}: ticket metadata {field!r} is missing or not JSON ({_one_line(exc)})") from None


def _read_header(path) -> _Header:
    """The header of the ticket at ``path``: format, version and metadata checked, every layer's declared shape
    checked against the stored tensors' shapes (so nothing is allocated from a corrupt or hostile header)."""
    from safetensors import safe_open

    _safetensors()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ticket file not found: {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {}
            for key in handle.keys():
                sl = handle.get_slice(key)
                shapes[key] = (tuple(int(d) for d in sl.get_shape()), sl.get_dtype())
    except Exception as exc:  # safetensors raises its own error types for a corrupt header
        raise TicketError(f"{path} is not a readable safetensors ticket: {_one_line(exc)}") from None
    if metadata.get("format") != FORMAT_NAME:
        raise TicketError(f"{path} is not a binwslt ticket (metadata format={metadata.get('format')!r})")
    version = metadata.get("version")
    if version not in READABLE_VERSIONS:
        raise TicketError(f"{path} has ticket version {version!r}; this binwslt reads versions "
                          f"{', '.join(READABLE_VERSIONS)}")
    config, layers = _json_field(path, metadata, "config"), _json_field(path, metadata, "binary_layers")
    if config is not None and not isinstance(config, dict) or not isinstance(layers, dict):
        raise TicketError(f"{path}: ticket metadata 'config'/'binary_layers' have the wrong type")
    for name, meta in layers.items():
        shape = meta.get("shape") if isinstance(meta, dict) else None
        if not isinstance(shape, list) or not 1 <= len(shape) <= 4 \
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
            raise TicketError(f"{path}: layer {name!r} has an invalid shape {shape!r} in the metadata")
        rate = meta.get("prune_rate")
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise TicketError(f"{path}: layer {name!r} has an invalid prune_rate {rate!r} in the metadata")
        packed = ((math.prod(shape) + 7) // 8,)
        expected = {"sign": (packed, "U8"), "mask": (packed, "U8"), "alpha": ((1,), "F32")}
        for leaf, want in expected.items():
            got = shapes.get(_key(name, leaf))
            if got != want:
                raise TicketError(f"{path}: layer {name!r}: tensor {leaf!r} is {got} but shape {shape} needs {want}")
    return _Header(path, version, metadata, config, layers, shapes)


def _load_tensors(header: _Header) -> Dict[str, torch.Tensor]:
    """The ticket's tensors (at most the file's size), checked against the header's SHA-256 (version >= 2)."""
    _, load_file = _safetensors()
    try:
        tensors = load_file(header.path)
    except Exception as exc:
        raise TicketError(f"{header.path} is not a readable safetensors ticket: {_one_line(exc)}") from None
    if header.version != "1":  # version 1 tickets predate the checksum
        if _digest(tensors, header.metadata) != header.metadata.get("sha256"):
            raise TicketError(f"{header.path}: SHA-256 of tensors and metadata does not match the header's: the file "
                              "is corrupt or was modified")
    return tensors


def read_config(path) -> Optional[dict]:
    """The model config stored in the ticket at ``path`` (the keyword arguments of ``binwslt.models.build``);
    None for a ticket of any other (converted) model."""
    return _read_header(path).config


def _check_fits(model: nn.Module, header: _Header) -> None:
    """TicketError naming the first binary layer or state tensor where ``model`` and the ticket differ."""
    layers = binary_layers(model)
    for name in list(layers) + [n for n in header.layers if n not in layers]:
        meta, layer = header.layers.get(name), layers.get(name)
        if meta is None:
            raise TicketError(f"{header.path}: layer {name!r} ({type(layer).__name__}) of the model is not in the "
                              "ticket")
        if layer is None:
            raise TicketError(f"{header.path}: ticket layer {name!r} ({meta.get('kind', 'binary layer')}) is not a "
                              "binary-subnet layer of the model")
        mine = _layer_meta(layer, float(layer.prune_rate))
        for field in ("kind", "shape", "prune_rate", "neuron"):
            if field in meta and meta[field] != mine.get(field):
                raise TicketError(f"{header.path}: layer {name!r} has {field} {meta[field]!r} in the ticket but "
                                  f"{mine.get(field)!r} in the model")
    if "neurons" in header.metadata:  # version 2: stand-alone LIF modules must match too
        stored, mine = _json_field(header.path, header.metadata, "neurons"), _neurons(model)
        for name in list(mine) + [n for n in stored if n not in mine]:
            if stored.get(name) != mine.get(name):
                raise TicketError(f"{header.path}: LIF {name!r} is {stored.get(name)!r} in the ticket but "
                                  f"{mine.get(name)!r} in the model")
    skip = {_key(name, leaf) for name in layers for leaf in ("weight", "scores")}
    want = {key: tuple(t.shape) for key, t in model.state_dict().items() if key not in skip}
    have = {key[len(_STATE_PREFIX):]: shape for key, (shape, _) in header.shapes.items()
            if key.startswith(_STATE_PREFIX)}
    for key in list(want) + [k for k in have if k not in want]:
        if key not in have:
            raise TicketError(f"{header.path}: state {key!r} of the model is not in the ticket")
        if key not in want:
            raise TicketError(f"{header.path}: ticket state {key!r} is not in the model")
        if have[key] != want[key]:
            raise TicketError(f"{header.path}: state {key!r} has shape {list(have[key])} in the ticket but "
                              f"{list(want[key])} in the model")


def _fill(model: nn.Module, tensors: Dict[str, torch.Tensor], header: _Header) -> None:
    """Give ``model`` (already checked by :func:`_check_fits`) the ticket's subnetworks and state."""
    path = header.path
    layers = binary_layers(model)
    state = {key[len(_STATE_PREFIX):]: value for key, value in tensors.items() if key.startswith(_STATE_PREFIX)}
    for name, meta in header.layers.items():
        layer = layers[name]
        device = layer.weight.device
        shape = tuple(meta["shape"])
        sign = unpack_bits(tensors[_key(name, "sign")], shape).to(device)
        mask = unpack_bits(tensors[_key(name, "mask")], shape).to(device)
        if int((~mask).sum()) != n_pruned(mask.numel(), meta["prune_rate"]):
            raise TicketError(f"{path}: layer {name!r} mask prunes {int((~mask).sum())} weights, prune_rate "
                              f"{meta['prune_rate']} prunes {n_pruned(mask.numel(), meta['prune_rate'])}")
        zero = torch.zeros(mask.numel(), dtype=torch.bool, device=device)
        zeros = tensors.get(_key(name, "kept_zeros"))
        if zeros is not None:
            if zeros.dtype != torch.int64 or zeros.dim() != 1 or bool((zeros < 0).any()) \
                    or bool((zeros >= mask.numel()).any()) or not bool(mask.reshape(-1)[zeros.to(device)].all()):
                raise TicketError(f"{path}: layer {name!r} has kept_zeros that are not indices of kept weights")
            zero[zeros.to(device)] = True
        zero = zero.view(shape)
        try:
            weight = _weight_for_alpha(sign, mask, zero, float(tensors[_key(name, "alpha")][0]),
                                       meta["prune_rate"], name)
        except ValueError as exc:
            raise TicketError(f"{path}: {_one_line(exc)}") from None
        state[_key(name, "weight")] = weight.to(layer.weight.dtype)
        state[_key(name, "scores")] = mask.to(layer.scores.dtype)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TicketError(f"{path}: {_one_line(exc)}") from None


def load(path, model: Optional[nn.Module] = None, *, backend: Optional[str] = None, device=None) -> nn.Module:
    """Load the ticket at ``path``; the model's outputs are bit-identical to the saved model's.

    ``model=None``: a zoo ticket (``binwslt.models.build``) is rebuilt from its stored config on ``device``
    (default CPU). ``model`` given: a freshly built model of the same structure (e.g. the same SpikingJelly model
    passed through the same ``convert``) receives the ticket in place; it is checked first, and the first binary
    layer or state tensor that differs is named in the :class:`TicketError`. ``backend`` overrides the fused
    layers' backend (e.g. a ticket found on a GPU with "triton", loaded on a CPU with "torch"). Every layer's
    shape is checked against the file before anything is allocated, and the SHA-256 in the header against the
    contents. Returns the model in eval mode. FileNotFoundError for a missing file; TicketError (a ValueError with
    a one-line message) for a corrupt, modified, foreign or mismatching file.
    """
    from . import models

    header = _read_header(path)
    if backend is not None:
        resolve_backend(backend, torch.device("cpu"))
    if model is None:
        if header.config is None:
            raise TicketError(f"{header.path} is a ticket of a {header.metadata.get('model_class', 'custom')} model, "
                              "not a binwslt.models one: build the same model, convert it, and pass it as "
                              "ticket.load(path, model=...)")
        config = dict(header.config)
        if backend is not None:
            config["backend"] = backend
        try:
            with torch.device("meta"):  # the structure the config describes, without allocating it
                skeleton = models.build_from_config(config)
        except (TypeError, ValueError) as exc:
            raise TicketError(f"{header.path}: the stored model config is invalid: {_one_line(exc)}") from None
        _check_fits(skeleton, header)
        tensors = _load_tensors(header)
        model = models.build_from_config(config)
        model.to(torch.device("cpu") if device is None else torch.device(device))
    else:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
        _check_fits(model, header)
        tensors = _load_tensors(header)
        if device is not None:
            model.to(torch.device(device))
        if backend is not None:
            for module in model.modules():
                if isinstance(getattr(module, "backend", None), str):
                    module.backend = backend
    _fill(model, tensors, header)
    model.eval()
    return model
