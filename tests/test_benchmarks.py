"""The benchmark code itself: traffic formulas by hand, the saved-bytes helper, timing, shapes, peers, report."""
import json
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks import cases, memory, report, shapes, timing  # noqa: E402
from benchmarks.peers import peer_status  # noqa: E402

from binwslt import LIFConfig  # noqa: E402
from binwslt import reference  # noqa: E402


# ------------------------------------------------------------------------------------------------ peak memory
@pytest.mark.skipif(not pathlib.Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_step_peak_bytes_sees_a_transient_buffer():
    mib = 1 << 20

    def touch_and_free(n):
        buf = torch.ones(n * mib, dtype=torch.uint8)  # written, so resident; freed before the call returns
        return int(buf[-1])

    big = memory.step_peak_bytes(lambda: touch_and_free(64))
    # the peak outlives the buffer; Linux updates its RSS counters in per-thread batches, so a reading can trail
    # by some hundreds of KiB (a CI run read 63.8 MiB for this 64 MiB buffer)
    assert big >= 56 * mib
    small = memory.step_peak_bytes(lambda: touch_and_free(1))
    assert small < 32 * mib  # the high-water mark was reset: the earlier 64 MiB is not counted again


# ------------------------------------------------------------------------------------------------ traffic
def test_fused_traffic_by_hand():
    # conv 8->16, 3x3, 10x10, stride 1, pad 1: H' = W' = 10; T=2, N=3.
    s = shapes.LayerShape("m", 0, "conv", 8, 16, 10, 10, 3, 1, 1)
    x = 2 * 3 * 8 * 100 * 4      # fp32 spikes as a fused layer returns them, read as they are
    w = 16 * 8 * 9               # int8 ternary weight
    affine = 2 * 16 * 4          # fp32 scale and shift
    out = 2 * 3 * 16 * 100 * 4   # fp32 spikes out
    y = 2 * 2 * 3 * 16 * 100 * 2  # BN two-pass: int16 y (fan-in 72) written and read back
    pack = x + 2 * 3 * 100 * 1   # training: the input read again by the kernel's packing, 1 byte of bits per row
    int8 = x // 4                # spike_in_bytes=1: int8 spikes
    assert memory.fused_traffic(s, 2, 3, batch_norm=False, training=False) == x + w + affine + out
    assert memory.fused_traffic(s, 2, 3, training=False) == x + w + affine + out + y
    assert memory.fused_traffic(s, 2, 3) == x + w + affine + out + y + pack
    assert memory.fused_traffic(s, 2, 3, y_bytes=4) == x + w + affine + out + 2 * y + pack
    assert memory.fused_traffic(s, 2, 3, spike_in_bytes=1) == int8 + w + affine + out + y + int8 + 2 * 3 * 100


def test_eager_traffic_by_hand():
    s = shapes.LayerShape("m", 0, "conv", 8, 16, 10, 10, 3, 2, 1)  # stride 2: H' = W' = 5
    T, N = 2, 3
    E = T * N * 16 * 25
    conv = (T * N * 8 * 100 + 16 * 8 * 9 + E) * 4
    bn = 3 * E * 4 + 2 * 16 * 4
    lif = 4 * E * 4
    assert memory.eager_traffic(s, T, N) == conv + bn + lif
    assert memory.eager_traffic(s, T, N, batch_norm=False) == conv + 2 * E * 4 + 2 * 16 * 4 + lif


def test_traffic_direct_and_residual_by_hand():
    s = shapes.LayerShape("m", 0, "conv", 3, 4, 6, 6, 3, 1, 1, direct=True, residual=True)
    T, N = 4, 2
    E, frames_out = T * N * 4 * 36, N * 4 * 36
    # fp32 image, fp32 y; the image is saved as it is (no packing)
    fused = N * 3 * 36 * 4 + 4 * 3 * 9 + 2 * 4 * 4 + E * 4 + E * 4 + 2 * E * 4
    assert memory.fused_traffic(s, T, N) == fused
    eager = (N * 3 * 36 + 4 * 3 * 9 + frames_out) * 4 + (frames_out + E) * 4 + 3 * E * 4 + 2 * 4 * 4 \
        + 3 * E * 4 + 4 * E * 4
    assert memory.eager_traffic(s, T, N) == eager


def test_linear_traffic_by_hand():
    s = shapes.LayerShape("m", 0, "linear", 33, 8)  # K = 33: 5 bytes of bits per row, 10 rows = 50 -> 52
    base = 2 * 5 * 33 * 4 + 8 * 33 + 2 * 8 * 4 + 2 * 5 * 8 * 4
    assert memory.fused_traffic(s, 2, 5, batch_norm=False, training=False) == base
    assert memory.fused_traffic(s, 2, 5, batch_norm=False) == base + 2 * 5 * 33 * 4 + 52


# ------------------------------------------------------------------------------------------ saved bytes
def test_saved_bytes_counts_distinct_storages_and_excludes():
    w = torch.randn(5, 7, requires_grad=True)
    x = torch.randn(3, 5, requires_grad=True)
    # x @ w saves x and w; exp saves its output (3x7); mul by a view of x saves the view (same storage as x).
    fn = lambda: ((x @ w).exp() * x[:, :1]).sum()  # noqa: E731
    # storages: x (60 B), w (140 B), exp's output (84 B); mul saves exp's output and a view of x: nothing new.
    assert memory.saved_bytes(fn) == 60 + 140 + 84
    assert memory.saved_bytes(fn, exclude=(w,)) == 60 + 84


def test_saved_bytes_of_a_custom_function():
    class Keep(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            ctx.save_for_backward(a.to(torch.int16), a.to(torch.int16))
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return 2 * g

    a = torch.randn(10, requires_grad=True)
    assert memory.saved_bytes(lambda: Keep.apply(a)) == 2 * 10 * 2  # two distinct int16 storages


def test_runner_saved_bytes_excludes_parameters():
    case = shapes.LayerCase(shapes.LayerShape("m", 0, "conv", 4, 4, 5, 5, 3, 1, 1), 2, 1)
    runner = cases.layer_runner("floor", case, "cpu")
    # the bare conv saves its input (the weight is a parameter): T*N*C*H*W floats
    assert runner.saved_bytes() == 2 * 1 * 4 * 25 * 4


# ----------------------------------------------------------------------------------------------- timing
def test_interleaved_rotates_and_counts():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    times = timing.interleaved(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_interleaved_budget_stops_after_min_rounds():
    times = timing.interleaved({"a": lambda: None}, rounds=50, warmup=0, budget_s=0.0, min_rounds=4)
    assert len(times["a"]) == 4
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved({"a": lambda: None}, rounds=0)


def test_summary():
    assert timing.summary([0.003, 0.001, 0.002]) == {"median_ms": 2.0, "min_ms": 1.0, "max_ms": 3.0, "rounds": 3}
    assert timing.summary([])["rounds"] == 0


# ----------------------------------------------------------------------------------------------- shapes
def test_conv4_shapes_reproduce_the_paper_macs():
    layers = shapes.model_layer_shapes("conv4")
    assert [(s.kind, s.in_channels, s.out_channels) for s in layers] == [
        ("conv", 3, 64), ("conv", 64, 64), ("conv", 64, 128), ("conv", 128, 128), ("linear", 8192, 256),
        ("linear", 256, 256)]
    assert layers[0].direct and not any(s.direct for s in layers[1:])
    macs = sum(s.macs_per_frame() for s in layers) + 256 * 10  # + the classifier
    assert abs(macs - 98.3e6) / 98.3e6 < 1e-3


def test_resnet19_shapes_mark_residual_and_stride():
    layers = shapes.model_layer_shapes("resnet19")
    assert sum(s.residual for s in layers) == 8  # the second conv of each of the 8 blocks
    assert [s.stride for s in layers if s.kind == "conv" and s.stride != 1] == [2, 2]
    assert layers[7].out_hw == (16, 16)


def test_suites():
    quick = shapes.suite("cpu", True)
    assert len(quick["layers"]) == 4 and len(quick["models"]) == 1
    with pytest.raises(ValueError, match="device"):
        shapes.suite("tpu", False)


# ------------------------------------------------------------------------------------------------ peers
def test_layer_runners_agree_on_shapes():
    case = shapes.LayerCase(shapes.QUICK_LAYERS[1], 2, 2)
    out = cases.layer_runner("torch", case, "cpu").infer()
    assert out.shape == (2, 2, 16, 4, 4)
    with pytest.raises(ValueError, match="impl"):
        cases.availability("nope", "cpu")


@pytest.mark.skipif(peer_status()["spikingjelly"] is not None, reason=str(peer_status()["spikingjelly"]))
@pytest.mark.parametrize("direct", [False, True])
def test_spikingjelly_layer_computes_binwslt_neuron(direct):
    """The SpikingJelly peer computes conv -> BN (batch stats over T, N) -> binwslt's LIF, exactly."""
    shape = shapes.LayerShape("m", 0, "conv", 3, 6, 6, 6, 3, 1, 1, direct=direct)
    T, N = 3, 4
    layer = cases.layer_module("spikingjelly", shape, T)
    x, _ = cases.layer_inputs(shape, T, N, "cpu", seed=2)
    x = x.detach() * (3.0 if not direct else 1.0)
    got = layer(x)
    y = torch.nn.functional.conv2d(x if direct else x.flatten(0, 1), layer.conv.weight, padding=1)
    y = y.unsqueeze(0).expand(T, *y.shape) if direct else y.view(T, N, *y.shape[1:])
    z = torch.nn.functional.batch_norm(y.reshape(T * N, *y.shape[2:]), None, None, training=True)
    want = reference.lif(z.view_as(y), LIFConfig())
    assert 0 < want.mean() < 1
    assert torch.equal(got, want)
    assert torch.equal(layer(x), want), "state must be reset between calls"


@pytest.mark.skipif(peer_status()["spikingjelly"] is not None, reason=str(peer_status()["spikingjelly"]))
def test_spikingjelly_model_replaces_every_lif():
    from binwslt.nn import LIF
    model = cases.model_module("spikingjelly", shapes.ModelCase("conv4", 2, 2, width=0.125, image_size=8))
    assert not any(isinstance(m, LIF) for m in model.modules())
    assert sum(type(m).__name__ == "LIFNode" for m in model.modules()) == 6


def test_floor_model_has_no_neuron_nor_bn():
    from binwslt.nn import LIF
    model = cases.model_module("floor", shapes.ModelCase("conv4", 2, 2, width=0.125, image_size=8))
    assert not any(isinstance(m, (LIF, torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)) for m in model.modules())


# ----------------------------------------------------------------------------------------------- report
def _fake_result(device="cpu", ref=300.0, tor=100.0, sj=110.0, floor=90.0, s_t=10, s_sj=50):
    def res(ms, saved):
        return {"status": "ok", "train": {"median_ms": ms}, "forward": {"median_ms": ms / 3}, "saved_bytes": saved}
    entry = {"label": "conv4 32x32 T=4 N=32", "timesteps": 4, "batch": 32,
             "model": {"name": "conv4", "width": 1.0, "image_size": 32},
             "impls": {"reference": res(ref, 200), "torch": res(tor, s_t), "spikingjelly": res(sj, s_sj),
                       "snntorch": {"status": "skipped", "reason": "per layer only"}, "floor": res(floor, 5)}}
    from benchmarks.run import add_ratios
    add_ratios(entry)
    return {"meta": {"device": device, "quick": False, "command": "python benchmarks/run.py --device cpu",
                     "date_utc": "2026-11-25T00:00:00Z", "torch": "2", "dtype": "float32", "cpu_count": 2,
                     "torch_threads": 2},
            "layers": [], "models": [entry], "interpreter_check": None}


def test_add_ratios():
    entry = _fake_result()["models"][0]["impls"]
    assert entry["torch"]["ratios"]["train_speedup_vs_reference"] == pytest.approx(3.0)
    assert entry["torch"]["ratios"]["train_over_floor"] == pytest.approx(100 / 90)
    assert entry["torch"]["ratios"]["saved_vs_spikingjelly"] == pytest.approx(0.2)
    assert "ratios" not in entry["snntorch"] or entry["snntorch"]["ratios"]["train_over_floor"] is None


def test_cpu_targets_met_and_missed():
    met = {c["target"].split(": ")[1]: c["met"] for c in report.targets(_fake_result())}
    assert met == {"torch >= 3x faster than reference": True, "torch at least as fast as SpikingJelly": True,
                   "torch within 1.2x of the bare convolutions": True,
                   "torch saved bytes <= 1/4 of SpikingJelly's": True}
    missed = report.targets(_fake_result(ref=200.0, tor=130.0, sj=120.0, floor=100.0, s_t=20, s_sj=50))
    assert [c["met"] for c in missed] == [False, False, False, False]
    assert report.targets({**_fake_result(), "meta": {**_fake_result()["meta"], "quick": True}}) == []


def test_write_report(tmp_path):
    (tmp_path / "cpu-test.json").write_text(json.dumps(_fake_result()))
    (tmp_path / "notes.md").write_text("## Analysis\nwhy")
    (tmp_path / "compile-report.json").write_text(json.dumps([{"kernel": "k"}]))  # other scripts' JSON: passed over
    (tmp_path / "cpu-step.json").write_text(json.dumps({"command": "x", "train": {}}))
    out = report.write_report(tmp_path)
    text = out.read_text()
    assert "### cpu-test.json" in text and "**met**" in text and "## Analysis" in text
    assert "3.00x ref" in text
    assert (tmp_path / "performance.png").stat().st_size > 1000


def test_gpu_targets_sum_the_vgg11_layers():
    def res(train, fwd, saved):
        return {"status": "ok", "train": {"median_ms": train}, "forward": {"median_ms": fwd}, "saved_bytes": saved}
    layers = []
    for i, (tri, sj) in enumerate([(1.0, 2.0), (2.0, 2.0)]):  # summed: triton 3, SpikingJelly 4 -> 1.33x, missed
        layers.append({"label": f"l{i}", "timesteps": 4, "batch": 128, "shape": {"model": "vgg11"},
                       "impls": {"reference": res(5.0, 2.0, 80), "triton": res(tri, 0.5, 1),
                                 "spikingjelly": res(sj, 1.0, 10), "floor": res(0.5, 0.5, 5)}})
    layers.append({"label": "other", "timesteps": 4, "batch": 64, "shape": {"model": "resnet19"},
                   "impls": {"reference": res(1e9, 1e9, 1)}})
    result = {"meta": {"device": "cuda", "quick": False}, "layers": layers, "models": []}
    checks = report.targets(result)
    assert [c["met"] for c in checks] == [True, False, True, True]
    assert checks[0]["value"] == pytest.approx(10.0 / 3.0)
    assert checks[1]["value"] == pytest.approx(4.0 / 3.0)
    assert checks[3]["value"] == pytest.approx(2 / 20)


def test_floor_bf16_two_term_backward_matches_fp32():
    """The bf16 floor's two-term backward gives the fp32 gradients up to bf16 rounding (spike input, exact)."""
    import torch.nn.functional as F

    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    layer = cases._TwoTermLayer(conv)
    x = (torch.rand(5, 4, 7, 7, generator=torch.Generator().manual_seed(0)) < 0.3).float().requires_grad_()
    g = torch.randn(5, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    layer(x).float().backward(g)
    gx, gw = x.grad.clone(), conv.weight.grad.clone()
    x.grad, conv.weight.grad = None, None
    F.conv2d(x, conv.weight.to(torch.bfloat16).float(), padding=1).backward(g)
    torch.testing.assert_close(gx, x.grad, rtol=2e-2, atol=2e-2)
    # its bf16 output rounds a sum of ~250 terms: within 2^-7 of the largest entry
    torch.testing.assert_close(gw, conv.weight.grad, rtol=2e-2, atol=conv.weight.grad.abs().max().item() / 128)
    assert {"spikingjelly-bf16", "floor-bf16"} <= set(cases.IMPLS)


def test_layer_inputs_are_marked_spikes():
    """Benchmark spike inputs carry the fused layers' mark, so the triton/torch layers take their spike path."""
    from binwslt.spikes import is_spikes
    for kind, direct in (("conv", False), ("linear", False), ("conv", True)):
        shape = shapes.LayerShape("m", 0, kind, 3, 6, 6, 6, 3, 1, 1, direct=direct)
        x, _ = cases.layer_inputs(shape, 2, 2, "cpu")
        assert is_spikes(x) is not direct, (kind, direct)


@pytest.mark.parametrize("case", [(3, 5, 7, 9, 3, 1), (2, 19, 3, 5, 3, 0), (4, 6, 9, 7, 1, 0), (2, 3, 6, 8, 5, 2)],
                         ids=str)
def test_int8_split_gemms_match_float64(case):
    """benchmarks/cpu_gemm.py's exact int8 split (the candidate measured against fp32): grad-input and grad-weight
    of a stride-1 conv against float64 on odd shapes, with g badly scaled (frames and channels decades apart):
    within 1e-5 (a tenth of the gradient tests' rtol) of the largest |result| of each frame (grad-input) or output
    channel (grad-weight); a per-tensor scale would leave the small frames and channels at ~1e9 times that."""
    from benchmarks import cpu_gemm

    frames, C_in, C_out, H, k, padding = case
    gen = torch.Generator().manual_seed(sum(case))
    x = (torch.rand(frames, C_in, H, H + 1, generator=gen) < 0.3).float()
    tern = torch.randint(-1, 2, (C_out, C_in, k, k), generator=gen).to(torch.int8)
    Ho, Wo = H + 2 * padding - k + 1, H + 1 + 2 * padding - k + 1
    scale = torch.logspace(-6, 3, frames).view(-1, 1, 1, 1) * torch.logspace(0, -4, C_out).view(1, -1, 1, 1)
    g = torch.randn(frames, C_out, Ho, Wo, generator=gen) * scale
    gd, xd, wd = g.double(), x.double(), tern.double()
    got_x = cpu_gemm.split_grad_input(g.contiguous(memory_format=torch.channels_last), tern, padding)
    want_x = torch.nn.grad.conv2d_input(x.shape, wd, gd, padding=padding)
    err_x = (got_x.double() - want_x).abs().amax((1, 2, 3)) / want_x.abs().amax((1, 2, 3))
    assert err_x.max() < 1e-5, err_x
    got_w = cpu_gemm.split_grad_weight(x, g, k, padding)
    want_w = torch.nn.grad.conv2d_weight(xd, wd.shape, gd, padding=padding)
    err_w = (got_w.double() - want_w).abs().amax((1, 2, 3)) / want_w.abs().amax((1, 2, 3))
    assert err_w.max() < 1e-5, err_w


def test_cpu_gemm_quick_run_records_every_form(tmp_path):
    from benchmarks import cpu_gemm

    assert cpu_gemm.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "g.json")]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    (case,) = result["cases"]
    assert {"forward int8", "grad-input int8 split", "grad-weight int8 split"} <= set(case["times"])
    assert all(err < 1e-5 for name, err in case["max_error_relative_to_max"].items() if "bf16" not in name)
    assert "| grad-weight fp32 |" in (tmp_path / "g.md").read_text()
