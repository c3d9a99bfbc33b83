"""Test setup: where Triton runs, the GPU tests, NaN-filled fresh tensors.

GPU switch (decided here, before any module decorated with @triton.jit is imported):
- a machine where torch sees CUDA: Triton compiles for the GPU, the tests marked ``gpu`` run, TF32 is off in
  every torch oracle (cuDNN convolutions and matmuls), and a test that hands CPU tensors to a compiled Triton
  kernel is skipped at that launch ("interpreter-only"): the interpreter never sees a CUDA tensor. The
  comparisons of tests/helpers.py run triton on the GPU against the reference on the CPU, so they run there.
- anywhere else, or with ``BINWSLT_INTERPRET=1``: TRITON_INTERPRET=1 (Triton's CPU interpreter), ``gpu`` tests
  skipped.
"""
import os

import pytest
import torch

GPU = torch.cuda.is_available() and os.environ.get("BINWSLT_INTERPRET") != "1"
if GPU:
    os.environ.pop("TRITON_INTERPRET", None)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
else:
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs Triton compiled on a CUDA GPU (runs by default where torch sees "
                                       "CUDA; skipped under the interpreter)")


def pytest_collection_modifyitems(config, items):
    if GPU:
        return
    why = ("needs a CUDA GPU with compiled Triton" if not torch.cuda.is_available() else
           "BINWSLT_INTERPRET=1: Triton runs in the interpreter, which must not get CUDA tensors")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=why))


def _cpu_tensor_args(args, kwargs):
    return [i for i, a in enumerate(list(args) + list(kwargs.values()))
            if isinstance(a, torch.Tensor) and a.device.type == "cpu"]


@pytest.fixture(autouse=True)
def compiled_triton_gets_no_cpu_tensors(monkeypatch):
    """On a GPU machine, a launch with CPU tensor arguments is an interpreter-only test: skip it there, naming
    the kernel (it runs where Triton interprets: a CPU machine, or BINWSLT_INTERPRET=1)."""
    if not GPU:
        yield
        return
    try:
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    run = JITFunction.run

    def guarded(self, *args, **kwargs):
        cpu = _cpu_tensor_args(args, kwargs)
        if cpu:
            pytest.skip(f"interpreter-only: CPU tensors (arguments {cpu}) reach the compiled kernel "
                        f"{getattr(self, '__name__', self)}; run with BINWSLT_INTERPRET=1")
        return run(self, *args, **kwargs)

    monkeypatch.setattr(JITFunction, "run", guarded)
    yield

_torch_empty = torch.empty
_torch_empty_like = torch.empty_like


def _nan_filled(t):
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


def _empty_nan(*args, **kwargs):
    return _nan_filled(_torch_empty(*args, **kwargs))


def _empty_like_nan(*args, **kwargs):
    return _nan_filled(_torch_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def nan_filled_empty(monkeypatch):
    """Fresh torch.empty outputs are NaN, so a kernel or loop that forgets a store fails its test."""
    monkeypatch.setattr(torch, "empty", _empty_nan)
    monkeypatch.setattr(torch, "empty_like", _empty_like_nan)
    yield


@pytest.fixture(params=["compiled", "eager"])
def scan_impl(request, monkeypatch):
    """Run the torch backend with its compiled CPU extension (fused epilogue, scans, bit packing) and with the
    eager fallback ops."""
    from binwslt import _cpu_ext, torch_backend
    if request.param == "eager":
        monkeypatch.setattr(torch_backend, "_ext_for", lambda *args: None)
    elif _cpu_ext.load() is None:
        pytest.skip("the CPU scan extension did not build here")
    return request.param
