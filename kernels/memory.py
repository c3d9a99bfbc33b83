"""What a fused layer keeps for backward: ``memory="save"`` (the exact pre-activation ``y``) or ``"recompute"``
(only the input, spikes as bits, and ``y`` rebuilt in the backward by the forward's own GEMM), and the rule
``memory="auto"`` applies per layer shape.

The rule compares two modelled costs per element of ``y`` (the roofline of benchmarks/roofline.py, H200 datasheet
ceilings, the same constants). Saving moves ``y`` through HBM: written by the forward, read by the backward scan's
forward sweep, again by its reverse sweep when the partial sums of ``dL/dI * y`` are needed (a scale gradient, or
BatchNorm) and once more by BatchNorm's grad fold: ``(2 + gy + bn) * y_bytes``. Recomputing without BatchNorm runs
the forward's GEMM inside the backward scan (conv_lif_bwd_scan_kernel / linear_lif_bwd_scan_kernel with RECOMPUTE),
once per step in the forward sweep and once more in the reverse sweep when ``gy``, and ``y`` never reaches memory: ``(1 + gy) * 2 * fan_in`` int8
operations for spikes (``3 * 2 * fan_in`` bf16 ones per GEMM for an fp32 input split into three terms). With
BatchNorm the grad fold needs ``y`` at every element after a reduction over all tiles, so ``y`` is rebuilt by one
GEMM launch before the scan and then moves like saved ``y`` (minus the forward's write): recomputing is never the
faster there and "auto" saves. So "auto" recomputes spikes with int16 ``y`` without BatchNorm for ``fan_in < 619``
with a trained scale (3x3 layers up to 68 input channels, linear layers up to K = 618), ``< 825`` without one
(up to 91; K = 824). Recomputing always
saves the memory (``y`` is 2-4 bytes per output element, the input bits 1/8 byte per input element).
"""
from dataclasses import dataclass

# H200 SXM datasheet, dense: INT8 1979 TOPS, BF16 989 TFLOPS, TF32 495 TFLOPS, FP32 67 TFLOPS; HBM3e 4.8 TB/s.
CEILINGS = {"int8": 1979e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
HBM_BYTES_PER_S = 4.8e12


@dataclass(frozen=True)
class MemoryChoice:
    """The resolved policy of one call: ``recompute`` and the modelled per-element costs behind it (seconds per
    element of y: ``save_s`` the HBM traffic of keeping y, ``recompute_s`` the extra work of rebuilding it),
    ``reason`` in words."""
    recompute: bool
    save_s: float
    recompute_s: float
    reason: str


def choose_memory(memory: str, *, is_spike: bool, fan_in: int, y_bytes: int, batch_norm: bool = False,
                  gy: bool = True) -> MemoryChoice:
    """Resolve ``memory`` ("auto" | "save" | "recompute") for a layer with GEMM reduction length ``fan_in``
    (C_in * KH * KW) whose ``y`` has ``y_bytes`` per element; ``batch_norm``: training BatchNorm; ``gy``: the
    backward needs the sums of ``dL/dI * y`` (a scale that requires grad; implied by BatchNorm). See the module
    docstring for the "auto" rule. ``memory`` is validated at the entry (binwslt.functional.MEMORY_MODES)."""
    gy = gy or batch_norm
    save_s = (2 + gy + batch_norm) * y_bytes / HBM_BYTES_PER_S
    gemm_s = 2 * fan_in / CEILINGS["int8"] if is_spike else 3 * 2 * fan_in / CEILINGS["bf16"]
    if batch_norm:  # one GEMM launch before the scan, then y is read like a saved one
        recompute_s = gemm_s + save_s
    else:  # inside the scan: per step, and again in the reverse sweep for the sums of dL/dI * y
        recompute_s = (1 + gy) * gemm_s
    if memory != "auto":
        return MemoryChoice(memory == "recompute", save_s, recompute_s, f"memory={memory!r} asked for")
    recompute = recompute_s < save_s
    kind = "int8" if is_spike else "3-term bf16"
    where = "before the scan (BatchNorm)" if batch_norm else f"{1 + gy}x inside the backward scan"
    reason = (f"auto: recomputing y costs {recompute_s * 1e15:.2f} fs per element ({kind} GEMM, fan-in {fan_in}, "
              f"{where}), saving it {save_s * 1e15:.2f} fs ({y_bytes}-byte y through HBM "
              f"{2 + gy + batch_norm} times): {'recompute' if recompute else 'save'}")
    return MemoryChoice(recompute, save_s, recompute_s, reason)
