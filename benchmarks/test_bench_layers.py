"""Per-layer training step and forward pass of every implementation (pytest-benchmark groups them by case)."""
import pytest
import torch

from benchmarks import cases, memory, shapes


def _runner(impl, case, device):
    if impl == "triton" and device == "cpu":
        pytest.skip("triton on a CPU runs only under the interpreter: checked by test_triton_runs_interpreted, "
                    "never timed")
    try:
        return cases.layer_runner(impl, case, device)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))


def test_layer_train_step(benchmark, layer_case, impl, device, rounds, memory_log):
    runner = _runner(impl, layer_case, device)
    runner.train_step()  # warm: lazy initialisation, compilation
    saved = runner.saved_bytes()
    memory_log.append((layer_case.label, impl, saved))
    benchmark.group = f"train {layer_case.label}"
    benchmark.extra_info.update(saved_bytes=saved, fused_traffic=memory.fused_traffic(
        layer_case.shape, layer_case.timesteps, layer_case.batch), eager_traffic=memory.eager_traffic(
        layer_case.shape, layer_case.timesteps, layer_case.batch))
    benchmark.pedantic(runner.train_step, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)


def test_layer_forward(benchmark, layer_case, impl, device, rounds):
    runner = _runner(impl, layer_case, device)
    out = runner.infer()
    oh, ow = layer_case.shape.out_hw
    if not impl.startswith("floor"):  # the floors output the bare conv/linear, not spikes
        want = (layer_case.timesteps, layer_case.batch, layer_case.shape.out_channels)
        assert tuple(out.shape[:3]) == want
        assert bool(((out == 0) | (out == 1)).all()), f"{impl} output is not spikes"
    benchmark.group = f"forward {layer_case.label}"
    benchmark.pedantic(runner.infer, rounds=rounds[0], warmup_rounds=rounds[1], iterations=1)


def test_triton_runs_interpreted(device, memory_log):
    """On a CPU: the triton backend runs one tiny layer (forward and backward) under TRITON_INTERPRET=1."""
    if device != "cpu":
        pytest.skip("on a GPU the triton backend is timed by test_layer_train_step")
    case = shapes.interpreter_case()
    try:
        runner = cases.layer_runner("triton", case, "cpu")
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    runner.train_step()
    out = runner.infer()
    oh, ow = case.shape.out_hw
    assert tuple(out.shape) == (case.timesteps, case.batch, case.shape.out_channels, oh, ow)
    assert bool(((out == 0) | (out == 1)).all())
    grads = [p.grad for p in runner.module.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    memory_log.append((case.label, "triton", runner.saved_bytes()))
