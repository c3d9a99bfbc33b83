"""What the CPU offers the torch backend, detected once per process and overridable (docs/design.md §9).

The forward GEMM of a fused layer over spikes is exact in low precision (0/1 spikes times a -1/0/+1 weight,
integer sums): it runs as an int8 oneDNN convolution / linear with an fp32 output where the CPU has int8 dot
instructions (AVX512-VNNI, AVX-VNNI or AMX-INT8) and PyTorch has oneDNN; in fp32 channels-last elsewhere.
``BINWSLT_CPU_MATMUL`` overrides the choice: ``auto`` (default), ``int8`` or ``fp32``. A bf16 channels-last
forward is exact only while every |y| < 256 (a bf16 output); with that check and the cast back to fp32 it measured
slower than int8 on every Conv-4 layer (benchmarks/cpu_gemm.py), so it is not offered.

The backward GEMMs (`backward_gemm`): on a CPU with AMX-BF16 the stride-1 convolutions over spikes run as
AMX implicit GEMMs with g split in three bf16 terms and an fp32 output (`binwslt.amx`: fp32 accuracy); everything
else (linear layers, strided convolutions, the direct-encoded first layer, CPUs without AMX, and
``BINWSLT_CPU_MATMUL=fp32``) runs fp32 channels-last. PyTorch's own CPU bf16 convolutions round their output to bf16
(no fp32-output bf16 convolution or matmul is exposed), so a split through them cannot be exact, and the exact int8
split through oneDNN (benchmarks/cpu_gemm.py: g per frame as three 8-bit digit planes) costs more than fp32 once g
is split and recombined.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

MATMUL_MODES = ("auto", "int8", "fp32")
ENV_VAR = "BINWSLT_CPU_MATMUL"
_FLAGS = ("amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _read_flags() -> frozenset:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return frozenset(f for f in _FLAGS if f in present)
    return frozenset()


_CPU_FLAGS = _read_flags()  # read once at import (also keeps /proc out of torch.compile's traces)
_INT8_OK = bool(_CPU_FLAGS & {"avx512_vnni", "avx_vnni", "amx_int8"}) and torch.backends.mkldnn.is_available() \
    and hasattr(torch.ops.onednn, "qconv2d_pointwise") and hasattr(torch.ops.onednn, "qlinear_pointwise")


def cpu_flags() -> frozenset:
    """The CPU feature flags of interest that /proc/cpuinfo lists (empty where it cannot be read)."""
    return _CPU_FLAGS


def _int8_supported() -> bool:
    return _INT8_OK


def matmul_mode() -> str:
    """The forward GEMM mode over spikes on CPU: ``"int8"`` or ``"fp32"``.

    ``BINWSLT_CPU_MATMUL=fp32`` forces fp32; ``int8`` asks for it (an error if this CPU/PyTorch cannot run it);
    unset or ``auto`` picks int8 where the CPU has VNNI/AMX int8 dot products and PyTorch has oneDNN.
    """
    mode = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if mode not in MATMUL_MODES:
        raise ValueError(f"{ENV_VAR} must be one of {list(MATMUL_MODES)}, got {mode!r}")
    if mode == "int8" and not _int8_supported():
        raise RuntimeError(f"{ENV_VAR}=int8 but this CPU/PyTorch has no oneDNN int8 dot products "
                           f"(flags: {sorted(cpu_flags())}, mkldnn: {torch.backends.mkldnn.is_available()})")
    if mode == "auto":
        mode = "int8" if _int8_supported() else "fp32"
    return mode


def backward_gemm() -> str:
    """The backward GEMMs of ``grad_precision="split"`` conv layers over spikes now: ``"amx-bf16x3"`` (stride-1
    convolutions on AMX, g in three bf16 terms; the rest fp32) or ``"fp32"``."""
    from . import amx  # amx builds on this module

    return "amx-bf16x3" if amx.available() else "fp32"


def cpu_info() -> dict:
    """A summary for version lines and benchmark JSON: ``{"capability", "flags", "matmul", "backward",
    "threads"}``.

    capability: torch's ATen CPU kernel level (e.g. "AVX512"); flags: the detected feature flags of interest;
    matmul: the forward mode `matmul_mode` picks now; backward: `backward_gemm`; threads: torch's intra-op
    thread count.
    """
    return {"capability": torch.backends.cpu.get_cpu_capability(), "flags": sorted(cpu_flags()),
            "matmul": matmul_mode(), "backward": backward_gemm(), "threads": torch.get_num_threads()}


def cpu_info_line() -> str:
    """`cpu_info` as one line, e.g. ``cpu: AVX512 (avx512_bf16 avx512_vnni), forward GEMM int8, backward fp32,
    2 threads``."""
    info = cpu_info()
    return (f"cpu: {info['capability']} ({' '.join(info['flags']) or 'no flags read'}), "
            f"forward GEMM {info['matmul']}, backward {info['backward']}, {info['threads']} threads")


def version_line() -> str:
    """``binwslt --version``: the package and torch versions and `cpu_info_line`."""
    from . import __version__
    return f"binwslt {__version__}, torch {torch.__version__}; {cpu_info_line()}"
