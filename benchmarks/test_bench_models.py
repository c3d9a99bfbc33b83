"""Whole-model training step (forward, cross-entropy, backward) of every implementation."""
import pytest

from benchmarks import cases


def test_model_train_step(benchmark, model_case, impl, device, rounds, memory_log):
    if impl == "triton" and device == "cpu":
        pytest.skip("triton on a CPU runs only under the interpreter: never timed")
    try:
        runner = cases.model_runner(impl, model_case, device)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    runner.train_step()
    saved = runner.saved_bytes()
    memory_log.append((model_case.label, impl, saved))
    benchmark.group = f"model train {model_case.label}"
    benchmark.extra_info["saved_bytes"] = saved
    benchmark.pedantic(runner.train_step, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)
