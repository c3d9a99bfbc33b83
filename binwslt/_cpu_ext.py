"""The fused CPU LIF scans (binwslt/csrc/lif_scan.cpp), compiled on first use with torch's cpp_extension.

``load()`` returns the extension module, or None where it cannot be built (no compiler, or
``BINWSLT_NO_CPP_EXT=1``); the torch backend then runs the same scans as eager PyTorch ops.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

SURROGATE_CODES = {"atan": 0, "sigmoid": 1, "triangle": 2}
_SOURCE = Path(__file__).parent / "csrc" / "lif_scan.cpp"
_state = {}


def load():
    """The compiled extension module (cached per process), or None when it is disabled or fails to build."""
    if "module" in _state:
        return _state["module"]
    module = None
    if os.environ.get("BINWSLT_NO_CPP_EXT") != "1":
        try:
            from torch.utils.cpp_extension import load as load_extension

            module = load_extension(name="binwslt_lif_scan_cpu", sources=[str(_SOURCE)],
                                    extra_cflags=["-O3", "-ffp-contract=off", "-fopenmp"],
                                    extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as err:  # no compiler or headers: the eager scans are correct, only slower
            warnings.warn(f"binwslt: the fused CPU LIF scan did not build ({err!s:.200}); using eager PyTorch ops. "
                          "Set BINWSLT_NO_CPP_EXT=1 to skip the build.", RuntimeWarning)
    _state["module"] = module
    return module
