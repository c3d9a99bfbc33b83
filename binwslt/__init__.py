"""binwslt: fused Triton kernels and a PyTorch API for binary-weight spiking lottery tickets (BinW-SLT).

``binwslt.functional`` holds the ops, ``binwslt.nn`` the modules; backends ``reference`` (the oracle), ``torch``
(fast on CPU) and ``triton`` (the fused GPU kernels, in ``binwslt.kernels``), chosen by ``backend="auto"``.
"""
from . import functional, nn
from .config import LIFConfig
from .cpu import cpu_info

__version__ = "0.1.0"
__all__ = ["LIFConfig", "cpu_info", "functional", "nn", "__version__"]
