"""Bit packing of boolean tensors (spikes saved for backward, ticket masks and signs)."""
from __future__ import annotations

import torch

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Pack any-shaped bool (or 0/1) tensor into a 1-D uint8 tensor of ceil(numel/8) bytes, little-endian bits."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape`` from a 1-D uint8 tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"packed must be a 1-D uint8 tensor, got dtype={packed.dtype} shape={tuple(packed.shape)}")
    numel = 1
    for size in shape:
        numel *= int(size)
    if packed.numel() * 8 < numel:
        raise ValueError(f"packed holds {packed.numel() * 8} bits, shape {tuple(shape)} needs {numel}")
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS.to(packed.device)) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def pack_ternary(tern: torch.Tensor):
    """int8 ternary weight (-1, 0, 1) -> ``(mask_bits, sign_bits)``, two packed uint8 tensors: 2 bits per weight."""
    return pack_bits(tern != 0), pack_bits(tern > 0)


def unpack_ternary(mask_bits: torch.Tensor, sign_bits: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: the int8 ternary weight of ``shape``."""
    mask = unpack_bits(mask_bits, shape).to(torch.int8)
    sign = unpack_bits(sign_bits, shape).to(torch.int8) * 2 - 1
    return mask * sign
