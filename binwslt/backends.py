"""Backend choice: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("auto", "reference", "torch", "triton")
_MODULES = {"reference": "binwslt.reference", "torch": "binwslt.torch_backend", "triton": "binwslt.kernels.ops"}


def triton_available() -> bool:
    """True when Triton imports (it is a Linux-only dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> str:
    """Name of the backend that runs: ``"auto"`` is triton for CUDA tensors when Triton imports, else torch.

    The one float64 policy: the Triton kernels compute in fp32, so a float64 input (``dtype``) runs on the torch
    backend, which keeps double precision, whether ``backend`` is "auto" or "triton" (never a silent downcast).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton" and dtype == torch.float64:
        return "torch"
    return backend


def backend_module(name: str) -> ModuleType:
    """The module implementing ``lif``, ``binw_conv2d_lif`` and ``binw_linear_lif`` for backend ``name``."""
    if name == "triton" and not triton_available():
        raise RuntimeError("backend='triton' needs the triton package (Linux); use backend='torch' or 'auto'")
    return importlib.import_module(_MODULES[name])
