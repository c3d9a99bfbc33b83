"""What a fused layer keeps for backward: ``memory="save"`` (the exact pre-activation ``y``) or ``"recompute"``
(only the input, spikes as bits, and ``y`` rebuilt in the backward by the forward's own GEMM), and the rule
``memory="auto"`` applies per layer shape.

The rule compares two modelled costs per element of ``y`` (the roofline of benchmarks/roofline.py, H200 datasheet
ceilings, the same constants): saving writes ``y`` in the forward and reads it back in the backward
(``2 * y_bytes`` of HBM traffic); recomputing runs the GEMM once more (``2 * fan_in`` int8 operations for spikes,
``3 * 2 * fan_in`` bf16 operations for an fp32 input split into three terms). "auto" recomputes when that is the
cheaper of the two, i.e. for spikes with int16 ``y`` when ``fan_in < 824``: the 3x3 layers up to 91 input
channels; the deeper layers save. Recomputing always saves the memory (``y`` is 2-4 bytes per output element,
the input bits 1/8 byte per input element).
"""
from dataclasses import dataclass

# H200 SXM datasheet, dense: INT8 1979 TOPS, BF16 989 TFLOPS, TF32 495 TFLOPS, FP32 67 TFLOPS; HBM3e 4.8 TB/s.
CEILINGS = {"int8": 1979e12, "bf16": 989e12, "tf32": 495e12, "fp32": 67e12}
HBM_BYTES_PER_S = 4.8e12


@dataclass(frozen=True)
class MemoryChoice:
    """The resolved policy of one call: ``recompute`` and the modelled per-element costs behind it (seconds per
    element of y: ``save_s`` the HBM traffic of keeping y, ``recompute_s`` the extra GEMM), ``reason`` in words."""
    recompute: bool
    save_s: float
    recompute_s: float
    reason: str


def choose_memory(memory: str, *, is_spike: bool, fan_in: int, y_bytes: int) -> MemoryChoice:
    """Resolve ``memory`` ("auto" | "save" | "recompute") for a layer with GEMM reduction length ``fan_in``
    (C_in * KH * KW) whose ``y`` has ``y_bytes`` per element; see the module docstring for the "auto" rule.
    ``memory`` is validated at the entry (binwslt.functional.MEMORY_MODES)."""
    save_s = 2 * y_bytes / HBM_BYTES_PER_S
    if is_spike:
        recompute_s = 2 * fan_in / CEILINGS["int8"]
    else:
        recompute_s = 3 * 2 * fan_in / CEILINGS["bf16"]
    if memory != "auto":
        return MemoryChoice(memory == "recompute", save_s, recompute_s, f"memory={memory!r} asked for")
    recompute = recompute_s < save_s
    kind = "int8" if is_spike else "3-term bf16"
    reason = (f"auto: recomputing y costs {recompute_s * 1e15:.2f} fs per element ({kind} GEMM, fan-in {fan_in}), "
              f"saving it {save_s * 1e15:.2f} fs ({y_bytes}-byte y written and read back): "
              f"{'recompute' if recompute else 'save'}")
    return MemoryChoice(recompute, save_s, recompute_s, reason)
