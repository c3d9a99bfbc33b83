"""Modelled roofline of one VGG-11 training step on an H200: binwslt's Triton kernels as written vs SpikingJelly.

Usage:
    python benchmarks/roofline.py [--timesteps 4] [--batch 128] [--out benchmarks/results/roofline-vgg11-h200.md]

Nothing here is measured: for every fused layer of VGG-11 (shapes read off the model by benchmarks/shapes.py) and
every kernel a training step with training BatchNorm launches (forward and backward), the script counts the
tensor-core operations (2 per multiply-accumulate, times the number of bf16 terms the split-precision GEMMs run,
kernels/gemm.py) and the compulsory HBM bytes (each tensor the kernel reads or writes, once: re-reads of im2col
rows and weight tiles are assumed to hit L2; the forward kernels' packing of their input spikes to bits for
backward re-reads the input and writes the bits, the backward kernels read the bits: there is no separate pack or
unpack pass), and predicts ``max(ops / peak, bytes / bandwidth)`` against the
H200's datasheet ceilings; a Triton kernel whose grid (from the launchers' tile policy, kernels/tiles.py, with the
H200's 132 SMs) has fewer programs than SMs runs on that fraction of the chip, so its time is divided by
``programs / 132`` (grid fill), and the conv grad-weight's split pixel reduction adds its fp32 partial results
(written by the kernel, read by the host's sum). SpikingJelly's step is modelled the same way (cuDNN in TF32, BatchNorm and its LIF as
fp32 elementwise passes, what its multi-step layers read and write). The result is a lower bound for each side
(perfect overlap, no launch overhead, 100 % of peak): it says where each kernel sits (compute or memory bound)
and how the two designs compare, not what a GPU will measure.

The table is written atomically to ``--out`` (Markdown) and next to it as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
from dataclasses import asdict, dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# H200 SXM datasheet ceilings (dense), the ones memory="auto" decides with.
from binwslt.kernels import tiles  # noqa: E402
from binwslt.kernels.memory import CEILINGS, HBM_BYTES_PER_S  # noqa: E402
H200_SMS = 132
SPLIT_TERMS = 3  # grad_precision="split": the fp32 operand as three bf16 terms (kernels/gemm.py)
BOTH_SPLIT_TERMS = 3  # both operands fp32 (direct first layer's grad-weight): tf32x3, three TF32 dots
# Spikes between layers: fp32 0/1 as a fused layer (or the max-pool after it) returns them, channels-last; the
# next forward kernel reads them as they are and converts each tile to int8 in registers (no cast pass).
SPIKE_BYTES = 4
# Bytes per input spike of the forward kernels' own bit packing for backward (kernels/spike_bits.py
# pack_bits_rows): the input read once more (after the program's GEMM, by rows other than its tile's, so not
# assumed to hit L2) and one bit written. The backward kernels read those bits (1/8 byte), unpacked in their loads.
PACK_BYTES = SPIKE_BYTES + 1 / 8


@dataclass
class KernelCost:
    layer: str
    side: str  # "binwslt" or "spikingjelly"
    kernel: str
    ops: float
    bytes: float
    unit: str  # which ceiling the ops run at
    programs: int = 0  # the Triton kernel's grid (0: not modelled, the whole chip)

    @property
    def fill(self) -> float:
        """Fraction of the H200's SMs the grid occupies (1 when it has at least one program per SM)."""
        return min(1.0, self.programs / H200_SMS) if self.programs else 1.0

    @property
    def seconds(self) -> float:
        compute = self.ops / CEILINGS[self.unit] if self.ops else 0.0
        return max(compute, self.bytes / HBM_BYTES_PER_S) / self.fill

    @property
    def bound(self) -> str:
        compute = self.ops / CEILINGS[self.unit] if self.ops else 0.0
        return self.unit if compute >= self.bytes / HBM_BYTES_PER_S else "HBM"


def _conv_sizes(shape, T, N):
    oh, ow = shape.out_hw
    frames = N if shape.direct else T * N
    return dict(frames=frames, x=frames * shape.height * shape.width * shape.in_channels,
                out=T * N * oh * ow * shape.out_channels, y=frames * oh * ow * shape.out_channels,
                w=shape.kernel * shape.kernel * shape.in_channels * shape.out_channels,
                macs=frames * shape.macs_per_frame())


def binwslt_costs(shape, T, N):
    """The kernels a training step (training BatchNorm, grad_precision="split", memory="save") launches for one
    fused layer, as written: what each reads and writes (dtypes of today's launchers) and its tensor-core ops."""
    s = _conv_sizes(shape, T, N)
    name, out = shape.label, []

    def add(kernel, ops, nbytes, unit, programs=0):
        out.append(KernelCost(name, "binwslt", kernel, ops, nbytes, unit, programs))

    oh, ow = shape.out_hw
    c_in, c_out, k = shape.in_channels, shape.out_channels, shape.kernel
    m = N * oh * ow  # output pixels per frame set: the forward's and the scans' grid rows
    fwd = tiles.forward_config(not shape.direct, c_in, c_out, m, interpret=False, sms=H200_SMS)
    scan = tiles.scan_config(c_out, m, interpret=False)
    scan_programs = _grid(m, c_out, scan)
    y_bytes = 4 if shape.direct else 2  # y: fp32 for analog input, int16 for spikes
    if shape.direct:
        fwd_ops, fwd_unit, x_bytes = 2 * s["macs"] * SPLIT_TERMS, "bf16", 4  # fp32 image split into bf16 terms
    else:
        fwd_ops, fwd_unit, x_bytes = 2 * s["macs"], "int8", SPIKE_BYTES
    # spikes: the forward kernel also packs its input to bits for backward (kernels/spike_bits.py)
    pack = s["x"] * PACK_BYTES if not shape.direct else 0
    add("fwd: int8 conv + y + BN tile sums + input bits" if not shape.direct else "fwd: split conv + y + BN tile sums",
        fwd_ops, s["x"] * x_bytes + s["w"] + s["y"] * y_bytes + pack, fwd_unit, _grid(m, c_out, fwd))
    add("fwd: BN-folded LIF scan (spikes fp32)", 0, s["y"] * y_bytes + s["out"] * 4, "fp32", scan_programs)
    # backward scan: y read twice (recompute, then dL/dI*y), dL/dspikes read, U parked in g and read back, g written
    add("bwd: LIF scan (recompute + BPTT)", 0, s["y"] * y_bytes * 2 + s["out"] * (4 + 4 + 4 + 4), "fp32",
        scan_programs)
    g_elems = s["y"]  # direct: T gradients summed in the scan, one slot
    add("bwd: BN grad fold", 0, g_elems * (4 + y_bytes + 4), "fp32")
    if not shape.direct:  # the image needs no gradient
        pixels = s["frames"] * shape.height * shape.width
        gi = tiles.grad_input_config(c_in, c_out, pixels, interpret=False)
        add("bwd: grad-input GEMM (3 bf16 terms)", 2 * s["macs"] * SPLIT_TERMS, g_elems * 4 + s["x"] * 4 + s["w"],
            "bf16", _grid(pixels, c_in, gi))
    terms, unit = (BOTH_SPLIT_TERMS, "tf32") if shape.direct else (SPLIT_TERMS, "bf16")
    # reads g and x (spikes: the saved bits, unpacked in its loads; the image: fp32), the fp32 weight and scores of
    # the straight-through epilogue; writes the fp32 score gradient, as one fp32 partial per split of the pixel
    # reduction, which the host's sum reads back
    x_saved = 4 if shape.direct else 1 / 8
    p = g_elems // c_out
    gw = tiles.grad_weight_config(c_in, c_out, p, interpret=False, arch=90)
    gw_tiles = k * k * _grid(c_in, c_out, gw)
    split = tiles.grad_weight_split(gw_tiles, p, gw["BLOCK_K"], H200_SMS)
    add(f"bwd: grad-weight GEMM ({terms} {unit} dots, {split} split{'s' if split > 1 else ''})", 2 * s["macs"] * terms,
        g_elems * 4 + s["x"] * x_saved + s["w"] * 4 * (3 + 2 * split), unit, gw_tiles * split)
    return out


def binwslt_linear_costs(shape, T, N):
    rows = T * N
    name, out = shape.label, []
    x, yb, w = rows * shape.in_channels, rows * shape.out_channels, shape.in_channels * shape.out_channels
    macs = rows * w
    k, c = shape.in_channels, shape.out_channels
    fwd = _grid(N, c, tiles.linear_forward_config(True, False, N, c, interpret=False, sms=H200_SMS))
    scan = _grid(N, c, tiles.linear_scan_config(N, c, interpret=False, sms=H200_SMS))
    gi = _grid(rows, k, tiles.linear_gemm_config(rows, k, interpret=False, sms=H200_SMS))
    gw = _grid(c, k, tiles.linear_gemm_config(c, k, interpret=False, sms=H200_SMS))
    out.append(KernelCost(name, "binwslt", "fwd: int8 GEMM + y + BN sums + input bits", 2 * macs,
                          x * SPIKE_BYTES + w + yb * 2 + x * PACK_BYTES, "int8", fwd))
    out.append(KernelCost(name, "binwslt", "fwd: LIF scan", 0, yb * (2 + 4), "fp32", scan))
    out.append(KernelCost(name, "binwslt", "bwd: LIF scan (recompute + BPTT)", 0, yb * (2 * 2 + 4 * 4), "fp32", scan))
    out.append(KernelCost(name, "binwslt", "bwd: BN grad fold", 0, yb * (4 + 2 + 4), "fp32"))
    out.append(KernelCost(name, "binwslt", "bwd: grad-input GEMM", 2 * macs * SPLIT_TERMS, yb * 4 + x * 4, "bf16",
                          gi))
    out.append(KernelCost(name, "binwslt", "bwd: grad-weight GEMM", 2 * macs * SPLIT_TERMS, yb * 4 + x / 8 + w * 8,
                          "bf16", gw))  # x: the saved bits, unpacked in its loads
    return out


def _grid(rows, cols, cfg):
    """Programs of a 2-D launch of ``cfg``'s tiles over ``rows`` x ``cols``."""
    return -(-rows // cfg["BLOCK_M"]) * -(-cols // cfg["BLOCK_N"])


def spikingjelly_costs(shape, T, N):
    """SpikingJelly multi-step Conv2d/Linear (cuDNN, TF32) + BatchNorm + LIFNode, fp32 activations (the peer in
    benchmarks/peers.py: a direct layer convolved once and repeated over T)."""
    if shape.kind == "conv":
        s = _conv_sizes(shape, T, N)
    else:
        rows = T * N
        s = dict(frames=rows, x=rows * shape.in_channels, out=rows * shape.out_channels,
                 y=rows * shape.out_channels, w=shape.in_channels * shape.out_channels,
                 macs=rows * shape.in_channels * shape.out_channels)
    name, out = shape.label, []

    def add(kernel, ops, nbytes, unit):
        out.append(KernelCost(name, "spikingjelly", kernel, ops, nbytes, unit))

    add("fwd: cuDNN conv/GEMM (TF32)", 2 * s["macs"], s["x"] * 4 + s["w"] * 4 + s["y"] * 4, "tf32")
    if shape.kind == "conv" and shape.direct:
        add("fwd: repeat over T", 0, s["y"] * 4 + s["out"] * 4, "fp32")
    add("fwd: BatchNorm (stats + normalise)", 0, s["out"] * (4 + 4 + 4), "fp32")
    add("fwd: LIF (spikes + saved membrane)", 0, s["out"] * (4 + 4 + 4), "fp32")
    add("bwd: LIF", 0, s["out"] * (4 + 4 + 4), "fp32")
    add("bwd: BatchNorm", 0, s["out"] * (4 + 4 + 4 + 4), "fp32")
    if not (shape.kind == "conv" and shape.direct):
        add("bwd: grad-input (TF32)", 2 * s["macs"], s["y"] * 4 + s["x"] * 4 + s["w"] * 4, "tf32")
    add("bwd: grad-weight (TF32)", 2 * s["macs"], s["y"] * 4 + s["x"] * 4 + s["w"] * 4, "tf32")
    return out


def model_costs(T, N):
    from benchmarks.shapes import model_layer_shapes

    rows = []
    for shape in model_layer_shapes("vgg11"):
        rows += binwslt_costs(shape, T, N) if shape.kind == "conv" else binwslt_linear_costs(shape, T, N)
        rows += spikingjelly_costs(shape, T, N)
    return rows


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(rows, T, N, command):
    layers = list(dict.fromkeys(r.layer for r in rows))
    lines = [f"# Modelled roofline: VGG-11 training step, T={T}, N={N}, H200 (not measured)", "",
             f"Generated by `{command}` at commit {_commit()} on {datetime.date.today().isoformat()}. Ceilings: "
             + ", ".join(f"{k} {v / 1e12:.0f} TOP/s" for k, v in CEILINGS.items())
             + f", HBM {HBM_BYTES_PER_S / 1e12:.1f} TB/s. Time = max(ops / ceiling, bytes / HBM) per kernel, "
             "summed: a lower bound (see the script's docstring for what is counted).", "",
             "## Per layer", "", "| layer | binwslt (µs) | SpikingJelly (µs) | binwslt / SJ |", "|---|---:|---:|---:|"]
    totals = {"binwslt": 0.0, "spikingjelly": 0.0}
    for layer in layers:
        t = {side: sum(r.seconds for r in rows if r.layer == layer and r.side == side) for side in totals}
        for side in totals:
            totals[side] += t[side]
        lines.append(f"| {layer} | {t['binwslt'] * 1e6:.1f} | {t['spikingjelly'] * 1e6:.1f} | "
                     f"{t['binwslt'] / t['spikingjelly']:.2f} |")
    lines.append(f"| **total** | **{totals['binwslt'] * 1e6:.0f}** | **{totals['spikingjelly'] * 1e6:.0f}** | "
                 f"**{totals['binwslt'] / totals['spikingjelly']:.2f}** |")
    lines += ["", "## Per kernel", "", "Programs: the Triton kernel's grid from the tile policy (grid fill below 1 when "
              f"under the H200's {H200_SMS} SMs; `-`: not modelled, the whole chip).", "",
              "| layer | side | kernel | GOP | MB | programs | fill | bound | µs |",
              "|---|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r.layer} | {r.side} | {r.kernel} | {r.ops / 1e9:.2f} | {r.bytes / 1e6:.1f} | "
                     f"{r.programs or '-'} | {r.fill:.2f} | {r.bound} | {r.seconds * 1e6:.1f} |")
    return "\n".join(lines) + "\n", totals


def _write_atomic(path, text):
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".part")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timesteps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "roofline-vgg11-h200.md"))
    args = parser.parse_args(argv)
    if args.timesteps < 1 or args.batch < 1:
        parser.error(f"--timesteps and --batch must be >= 1, got {args.timesteps}, {args.batch}")
    rows = model_costs(args.timesteps, args.batch)
    command = "python benchmarks/roofline.py" + ("" if argv is None else " " + " ".join(argv))
    text, totals = render(rows, args.timesteps, args.batch, command)
    _write_atomic(args.out, text)
    payload = {"timesteps": args.timesteps, "batch": args.batch, "ceilings": CEILINGS,
               "hbm_bytes_per_s": HBM_BYTES_PER_S, "totals_s": totals,
               "rows": [dict(asdict(r), seconds=r.seconds, bound=r.bound, fill=r.fill) for r in rows]}
    _write_atomic(pathlib.Path(args.out).with_suffix(".json"), json.dumps(payload, indent=1))
    print(text.split("## Per kernel")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
