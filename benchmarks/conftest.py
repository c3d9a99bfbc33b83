"""pytest options and parametrisation of the benchmark suite (pytest-benchmark is the harness).

    python -m pytest benchmarks -q -p no:cacheprovider --quick     # CI: tiny shapes, two rounds each
    python -m pytest benchmarks --device cpu                        # the full CPU suite (benchmarks/shapes.py)

``--device`` defaults to cuda when torch sees a GPU. Without one, the triton backend can only run under
TRITON_INTERPRET=1 (set here, before any kernel module is imported): it is checked on one tiny layer, not timed.
The saved-for-backward bytes and modelled traffic of every case are printed at the end of the session.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# (rounds, warmup rounds) per pytest-benchmark pedantic run; every runner already ran one untimed step.
ROUNDS = {True: (2, 0), False: (3, 0)}


def pytest_addoption(parser):
    group = parser.getgroup("binwslt benchmarks")
    group.addoption("--quick", action="store_true", default=False,
                    help="binwslt benchmarks: tiny shapes and two rounds each (CI)")
    group.addoption("--device", default=None, choices=("cpu", "cuda"),
                    help="binwslt benchmarks: device (default: cuda when available, else cpu)")


def _device(config) -> str:
    device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device")
    return device


def pytest_generate_tests(metafunc):
    from benchmarks import cases, shapes
    names = metafunc.fixturenames
    if not ({"layer_case", "model_case", "impl"} & set(names)):
        return
    plan = shapes.suite(_device(metafunc.config), metafunc.config.getoption("--quick"))
    if "layer_case" in names:
        metafunc.parametrize("layer_case", plan["layers"], ids=[c.label for c in plan["layers"]])
    if "model_case" in names:
        metafunc.parametrize("model_case", plan["models"], ids=[c.label for c in plan["models"]])
    if "impl" in names:
        metafunc.parametrize("impl", cases.IMPLS)


@pytest.fixture(scope="session")
def device(request) -> str:
    return _device(request.config)


@pytest.fixture(scope="session")
def rounds(request):
    """(rounds, warmup_rounds) for benchmark.pedantic."""
    return ROUNDS[request.config.getoption("--quick")]


@pytest.fixture(scope="session")
def memory_log():
    """Rows ``(case label, impl, saved bytes)`` collected by the tests, printed in the terminal summary."""
    return _MEMORY_LOG


_MEMORY_LOG = []


def pytest_terminal_summary(terminalreporter):
    if not _MEMORY_LOG:
        return
    terminalreporter.section("bytes saved for backward (parameters excluded)")
    for label, impl, value in _MEMORY_LOG:
        terminalreporter.write_line(f"{label:60s} {impl:14s} {value:>14,d} B")
