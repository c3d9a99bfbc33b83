"""Test setup. TRITON_INTERPRET must be set before any module decorated with @triton.jit is imported."""
import os

if os.environ.get("BINWSLT_GPU_TESTS") != "1":  # set BINWSLT_GPU_TESTS=1 on a GPU machine to compile for real
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

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
    """Run the torch backend with its compiled CPU scan and with the eager fallback scan."""
    from binwslt import _cpu_ext, torch_backend
    if request.param == "eager":
        monkeypatch.setattr(torch_backend, "_fused_scan_ext", lambda current: None)
    elif _cpu_ext.load() is None:
        pytest.skip("the CPU scan extension did not build here")
    return request.param
