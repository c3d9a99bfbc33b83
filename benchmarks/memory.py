"""Memory figures: bytes saved for backward and a step's peak memory (measured), and modelled memory traffic of one
fused layer.

`saved_bytes` is the one helper for "what autograd keeps between forward and backward" (tests use it too);
`step_peak_bytes` the resident memory a call adds at its peak.
`fused_traffic` / `eager_traffic` are the modelled DRAM bytes of one layer's forward, so the fused kernel's
advantage is visible without a GPU. Both count every tensor once, at its element size, with no cache reuse.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

FLOAT_BYTES = 4  # the eager sequence's tensors are float32


def saved_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs.

    A storage saved several times (or through several views) counts once, at its full size; the storages of
    ``exclude`` (the layer's parameters and buffers, which exist anyway) are not counted. Returns an int.
    """
    seen = {t.untyped_storage().data_ptr() for t in exclude}
    total = [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field!r} line")


def step_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory ``fn()`` adds to the process (Linux): the high-water mark is reset through
    ``/proc/self/clear_refs`` ("5") and read back as ``VmHWM`` after the call, less ``VmRSS`` before it. Run it in
    a fresh process whose malloc returns large blocks to the system (``MALLOC_MMAP_THRESHOLD_``, see
    benchmarks/cpu_step.py), after a warm-up call, so memory freed by earlier calls is not silently reused.
    Returns bytes (int)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024


def _sizes(shape, timesteps: int, batch: int):
    """(input elements, weight elements, output elements E, conv-output elements of the frames computed)."""
    oh, ow = shape.out_hw
    frames = batch if shape.direct else timesteps * batch
    x_elems = frames * shape.in_channels * shape.height * shape.width
    w_elems = shape.out_channels * shape.in_channels * shape.kernel * shape.kernel
    out_elems = timesteps * batch * shape.out_channels * oh * ow
    conv_elems = frames * shape.out_channels * oh * ow
    return x_elems, w_elems, out_elems, conv_elems


def fused_traffic(shape, timesteps: int, batch: int, *, batch_norm: bool = True, training: bool = True,
                  spike_in_bytes: int = FLOAT_BYTES, analog_in_bytes: int = FLOAT_BYTES, weight_bytes: int = 1,
                  out_bytes: int = FLOAT_BYTES, y_bytes: Optional[int] = None) -> int:
    """Modelled bytes one fused forward reads and writes for ``shape`` (a `shapes.LayerShape`) at T, N.

    Reads the input once (spikes: ``spike_in_bytes``, default fp32 as the previous fused layer returns them: the
    kernels read them as they are and convert to int8 in registers; a direct-encoded image: ``analog_in_bytes``), the
    ternary weight once (int8), the per-channel scale and shift (fp32), writes the output spikes once
    (``out_bytes``: the API returns spikes in x's float dtype), reads a residual once (fp32) if the layer has
    one. The membrane lives in registers. Training BatchNorm needs the batch statistics before any neuron
    fires, so the kernel's first pass writes the exact pre-activation y and the second pass reads it back:
    ``+ 2·E·y_bytes`` (``y_bytes`` default: what the kernels store, int16 for spikes up to a fan-in of 32767,
    int32 beyond, fp32 for a direct-encoded image; kernels/launch.py y_dtype). ``training``: the forward of a
    training step also packs its input spikes to bits for backward, in the forward kernel itself (kernels/
    spike_bits.py): it reads the input once more and writes one bit per element, ``+ X·spike_in_bytes`` and the
    bits, ``cdiv(C_in, 8)`` bytes per input row padded to whole int32 words; a direct-encoded image is saved as it
    is. A spiking residual's bits (packed by the kernel that reads it) are not counted: the shape does not say
    whether its residual is spikes.
    """
    x_elems, w_elems, out_elems, _ = _sizes(shape, timesteps, batch)
    in_bytes = analog_in_bytes if shape.direct else spike_in_bytes
    if y_bytes is None:
        fan_in = shape.in_channels * shape.kernel * shape.kernel  # a linear layer's kernel is 1
        y_bytes = FLOAT_BYTES if shape.direct else (2 if fan_in <= 32767 else 4)
    total = x_elems * in_bytes + w_elems * weight_bytes + 2 * shape.out_channels * FLOAT_BYTES
    total += out_elems * out_bytes
    if shape.residual:
        total += out_elems * FLOAT_BYTES
    if batch_norm:
        total += 2 * out_elems * y_bytes
    if training and not shape.direct:
        rows = x_elems // shape.in_channels  # bits: rows of cdiv(C_in, 8) bytes in whole int32 words
        total += x_elems * spike_in_bytes + -(-rows * -(-shape.in_channels // 8) // 4) * 4
    return total


def eager_traffic(shape, timesteps: int, batch: int, *, batch_norm: bool = True) -> int:
    """Modelled bytes of the eager sequence conv -> (BatchNorm) -> LIF, every tensor float32.

    conv: reads X and W, writes the conv output (over the frames it convolves: T·N, or N for a direct input,
    then repeated to T·N: read N·…, write E); BatchNorm (training): reads the conv output twice (statistics,
    normalise) and writes the current, reads the per-channel affine; without BatchNorm, scale and shift read and
    write it once; residual: read it, read and write the current; LIF: per neuron and step reads the current,
    reads the previous membrane, writes the membrane and writes the spike (4·E). E = T·N·C_out·H'·W'.
    """
    x_elems, w_elems, out_elems, conv_elems = _sizes(shape, timesteps, batch)
    f = FLOAT_BYTES
    total = (x_elems + w_elems + conv_elems) * f
    if shape.direct:
        total += (conv_elems + out_elems) * f
    total += (3 if batch_norm else 2) * out_elems * f + 2 * shape.out_channels * f
    if shape.residual:
        total += 3 * out_elems * f
    total += 4 * out_elems * f
    return total
