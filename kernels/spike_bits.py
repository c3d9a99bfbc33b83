"""Spikes saved for backward as bits, packed and unpacked inside the kernels (no host pass).

Layout: a channels-last spike tensor ``[rows, C]`` (rows = frames x pixels, or the linear layer's rows) is kept as
uint8 ``[rows, cdiv(C, 8)]``: channel ``c`` of a row is bit ``c % 8`` of byte ``c // 8`` (little-endian within a
byte, like binwslt.bits.pack_bits; a row's last byte is zero-padded, so a channel count that is not a multiple of 8
costs up to 7 padding bits per row). A kernel reading an x pointer of dtype uint8 reads it in this layout.

``pack_bits_rows`` runs inside the forward kernel that reads the spikes (for the input its programs of the first
output-channel tile share the words out between them; for the conv's spiking residual ``[T*M, C_out]`` all its
programs do); ``load_bits`` unpacks inside the loads of the kernels that read the saved tensor (the grad-weight GEMM,
the recompute of ``memory="recompute"``, the backward scan's residual), so the bits never become int8 or float in
memory.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def pack_bits_rows(x_ptr, words_ptr, rows, C, pid, num_programs, BLOCK_W: tl.constexpr):
    """Pack the 0/1 int8 rows ``x [rows, C]`` (C contiguous) into the bit layout above, written as int32 words:
    word ``w`` holds the flat bytes ``4w .. 4w+3`` of ``[rows, cdiv(C, 8)]`` (little-endian, so the words' memory
    is that byte layout; ``words`` has ``cdiv(rows * cdiv(C, 8), 4)`` of them, the last one zero-padded). Program
    ``pid`` of ``num_programs`` packs its contiguous share of the words. Words rather than bytes: storing uint8
    values went through shared memory byte by byte (a layout change of the byte tile), which the int8 forward must
    not do (benchmarks/compile_report.py gates STS.U8 there)."""
    cb = (C + 7) // 8
    n_words = tl.cdiv(rows * cb, 4)
    share = tl.cdiv(n_words, num_programs)
    w_begin = pid * share
    w_end = tl.minimum(w_begin + share, n_words)
    bit = tl.arange(0, 32)
    for w0 in range(w_begin, w_end, BLOCK_W):
        w = w0 + tl.arange(0, BLOCK_W)
        w_ok = w < w_end
        byte = w[:, None] * 4 + (bit // 8)[None, :]  # flat byte of each bit
        row = byte // cb
        c = (byte - row * cb) * 8 + (bit % 8)[None, :]
        x = tl.load(x_ptr + row * C + c, mask=w_ok[:, None] & (row < rows) & (c < C), other=0)
        word = tl.sum((x != 0).to(tl.int32) << bit[None, :], axis=1)
        tl.store(words_ptr + w, word, mask=w_ok)


@triton.jit
def load_bits(bits_ptr, row, c, C, mask):
    """The 0/1 spikes (int8) at rows ``row`` and channels ``c`` (broadcastable index tensors) of packed ``bits``
    ``[rows, cdiv(C, 8)]``; 0 where ``mask`` is False."""
    byte = tl.load(bits_ptr + row * ((C + 7) // 8) + c // 8, mask=mask, other=0)
    return ((byte.to(tl.int32) >> (c % 8)) & 1).to(tl.int8)


def unpack_rows(bits: torch.Tensor, rows: int, C: int) -> torch.Tensor:
    """Host unpack of the layout above (``bits``: uint8, at least ``rows * cdiv(C, 8)`` bytes) to int8 ``[rows, C]``.
    Used only where an int8 operand must be staged for a tensor-core GEMM that gates byte stores (the forward
    kernel rebuilding y for ``memory="recompute"`` with BatchNorm) and by tests."""
    cb = triton.cdiv(C, 8)
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    unpacked = (bits[: rows * cb].view(rows, cb, 1) >> shifts) & 1
    return unpacked.view(rows, cb * 8)[:, :C].to(torch.int8).contiguous()
