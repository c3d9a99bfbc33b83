"""Fallback import hook of benchmarks/gpu_check.sh, copied as ``sitecustomize.py`` onto PYTHONPATH when
``pip install --no-deps --no-build-isolation -e .`` fails: ``binwslt`` imports from the working tree (PYTHONPATH)
and ``binwslt.kernels`` from its ``kernels/`` folder, as setup.py's package_dir maps it. Set BINWSLT_ROOT."""
import importlib.abc
import importlib.util
import os
import pathlib
import sys


class _KernelsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "binwslt.kernels" and not name.startswith("binwslt.kernels."):
            return None
        root = pathlib.Path(os.environ["BINWSLT_ROOT"]) / "kernels"
        parts = name.split(".")[2:]
        if not parts:
            return importlib.util.spec_from_file_location(name, root / "__init__.py",
                                                          submodule_search_locations=[str(root)])
        return importlib.util.spec_from_file_location(name, root.joinpath(*parts[:-1], parts[-1] + ".py"))


if os.environ.get("BINWSLT_ROOT"):
    sys.meta_path.insert(0, _KernelsFinder())
