"""The CPU forms of the torch backend's convolutions, one GEMM at a time (issue 11): what each costs and how
close each backward candidate comes to float64, ratios from interleaved rounds in one process.

    python -m benchmarks.cpu_gemm --out benchmarks/results/cpu-gemm-<date>.json [--rounds 5] [--quick]

For each hidden convolution of Conv-4 at T=4, N=32 (128 frames of 0/1 spikes, a ternary weight):
- forward: fp32 channels-last; int8 oneDNN with an fp32 output (the torch backend's); bf16 channels-last with
  the exactness check (a bf16 output is exact only while every |y| < 256) and the cast back to fp32;
- grad-input: fp32 channels-last (the torch backend's); one bf16 term (``grad_precision="bf16"``); the exact
  int8 split of g (`split_grad_input`: three 8-bit planes per frame through one oneDNN int8 convolution),
  whole and its convolution alone;
- grad-weight: fp32 channels-last (the torch backend's); one bf16 term; the int8 split through ``torch._int_mm``
  (`split_grad_weight`).
Each backward candidate records its largest error relative to the largest |float64 result|. PyTorch's CPU
bf16 convolutions round their output to bf16 (and ``mm(..., out_dtype=float32)`` has no CPU kernel), so a bf16
high + low split cannot be exact there; the int8 split is, to 2^-21 of the largest |g| of a frame (grad-input)
or of a channel (grad-weight). Writes the JSON and a Markdown table beside it (``.md``).
"""
from __future__ import annotations

import datetime
import sys

import torch
import torch.nn.functional as F

from binwslt import cpu as binwslt_cpu

from .cpu_step import _load, arguments, save
from .timing import interleaved, summary

CL = torch.channels_last
# fp32 numbers in [2^23, 2^24) carry an integer in their low 23 bits: MAGIC + i (|i| < 2^21) holds the balanced
# base-256 digits of i as bytes 0x80 + d0, 0x80 + d1, 0x40 + d2 (and the exponent byte 0x4B)
MAGIC = float(0xC08080)
_EXPONENT_BYTE = 0x4B
SHAPES = ((128, 64, 64, 32), (128, 64, 128, 16), (128, 128, 128, 16))  # frames, C_in, C_out, H (=W), Conv-4
QUICK_SHAPES = ((6, 5, 7, 9),)


def _exponents(max_abs: torch.Tensor) -> torch.Tensor:
    """Per-block shift c with max|g|·2^c < 2^21 (int32), from the blocks' largest |g|."""
    return 21 - torch.frexp(max_abs)[1].clamp(min=-100)


def _pow2(c: torch.Tensor) -> torch.Tensor:
    return torch.ldexp(torch.ones(c.shape), c)


def split_grad_input(g: torch.Tensor, tern: torch.Tensor, padding: int, gemm_only=None) -> torch.Tensor:
    """dL/dx of a stride-1 conv from g ``[F, C_out, H', W']`` (fp32) and the ternary weight ``[C_out, C_in, k, k]``
    (int8): g per frame as s·(d2·2^16 + d1·2^8 + d0), the three digit planes through one exact int8 oneDNN
    convolution (3F frames) with the flipped, transposed weight, then recombined. ``gemm_only``: a dict to keep
    the convolution's inputs in (to time it alone)."""
    Fr, C, Ho, Wo = g.shape
    k = tern.shape[-1]
    q = k - 1 - padding
    c = _exponents(torch.linalg.vector_norm(g, float("inf"), dim=(1, 2, 3)))
    buf = torch.empty(Fr, Ho + 2 * q, Wo + 2 * q, C)
    if q:  # the transposed convolution's zero padding, as digit zero
        for border in (buf[:, :q], buf[:, q + Ho:], buf[:, q:q + Ho, :q], buf[:, q:q + Ho, q + Wo:]):
            border.fill_(MAGIC)
    torch.addcmul(torch.tensor(MAGIC), g, _pow2(c).view(Fr, 1, 1, 1),
                  out=buf[:, q:q + Ho, q:q + Wo].permute(0, 3, 1, 2))
    planes = buf.view(torch.uint8).view(-1, 4)[:, :3].t().contiguous()  # [3, F·Hp·Wp·C]: digits + offsets
    planes = planes.view(3 * Fr, Ho + 2 * q, Wo + 2 * q, C).permute(0, 3, 1, 2)
    wt = tern.flip(2, 3).transpose(0, 1).contiguous()  # [C_in, C_out, k, k]
    C_in = wt.shape[0]
    packed = torch.ops.onednn.qconv_prepack(wt, torch.ones(C_in), 1.0, 0, [1, 1], [0, 0], [1, 1], 1, None)
    if gemm_only is not None:
        gemm_only.update(planes=planes, packed=packed, C_in=C_in)
    o = _plane_conv(planes, packed, C_in).view(3, Fr, C_in, Ho + 2 * q - k + 1, Wo + 2 * q - k + 1)
    wsum = wt.sum((1, 2, 3), dtype=torch.int32).float().view(1, C_in, 1, 1)  # the byte offsets 128, 128, 64 out
    out = torch.add(o[0], o[1], alpha=256.0).sub_(wsum * (128 + 256 * 128))
    out.add_(o[2].sub_(wsum * 64), alpha=65536.0)
    return out.mul_(_pow2(-c).view(Fr, 1, 1, 1))


def _plane_conv(planes, packed, C_in):
    return torch.ops.onednn.qconv2d_pointwise(planes, 1.0, 0, packed, torch.ones(C_in),
                                              torch.zeros(C_in, dtype=torch.int64), None, [1, 1], [0, 0], [1, 1],
                                              1, 1.0, 0, torch.float32, "none", [], "")


def split_grad_weight(x: torch.Tensor, g: torch.Tensor, k: int, padding: int) -> torch.Tensor:
    """dL/dW ``[C_out, C_in, k, k]`` of a stride-1 conv from 0/1 spikes ``x`` ``[F, C_in, H, W]`` and g (fp32): g per
    channel as base-256 digits (one int32 view of the MAGIC-offset floats, the three digit bytes and the constant
    exponent byte that counts the spikes for the offsets), k² ``torch._int_mm`` calls on shifted rows of the padded
    spikes (no im2col)."""
    Fr, C, Ho, Wo = g.shape
    C_in, H, W = x.shape[1:]
    Hp, Wp = H + 2 * padding, W + 2 * padding
    rows = -(-Fr * Hp * Wp // 8) * 8
    tail = (k - 1) * (Wp + 1)
    c = _exponents(torch.linalg.vector_norm(g, float("inf"), dim=(0, 2, 3)))
    buf = torch.empty(rows, C)
    frames = buf[:Fr * Hp * Wp].view(Fr, Hp, Wp, C)
    for rest in (buf[Fr * Hp * Wp:], frames[:, Ho:], frames[:, :Ho, Wo:]):
        rest.fill_(MAGIC)
    torch.addcmul(torch.tensor(MAGIC), g, _pow2(c).view(1, C, 1, 1), out=frames[:, :Ho, :Wo].permute(0, 3, 1, 2))
    buf.view(torch.int32).bitwise_xor_(0x808080)  # digit bytes as int8: d0, d1, d2 - 64; exponent byte 0x4B
    cin8 = -(-C_in // 8) * 8
    xp = torch.zeros(rows + tail, cin8, dtype=torch.int8)
    xp[:Fr * Hp * Wp].view(Fr, Hp, Wp, cin8)[:, padding:padding + H, padding:padding + W, :C_in] = \
        x.permute(0, 2, 3, 1)
    a = buf.view(torch.int8).t()  # [4C, rows]
    r = torch.stack([torch._int_mm(a, xp[ky * Wp + kx:ky * Wp + kx + rows]) for ky in range(k) for kx in range(k)])
    r = r.view(k, k, C, 4, cin8)[..., :C_in].double()
    count = r[:, :, :, 3] / _EXPONENT_BYTE
    total = r[:, :, :, 0] + 256 * r[:, :, :, 1] + 65536 * (r[:, :, :, 2] + 64 * count)
    return (total * torch.ldexp(torch.ones(C, dtype=torch.float64), -c).view(1, 1, C, 1)).permute(2, 3, 0, 1).float()


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def conv_case(Fr: int, C_in: int, C_out: int, H: int, rounds: int, seed: int = 0) -> dict:
    """Timings and errors of every candidate for one 3×3, stride-1, padding-1 conv over ``Fr`` frames."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(Fr, C_in, H, H, generator=gen) < 0.2).float().contiguous(memory_format=CL)
    tern = torch.randint(-1, 2, (C_out, C_in, 3, 3), generator=gen).to(torch.int8)
    g = (torch.randn(Fr, C_out, H, H, generator=gen) * torch.logspace(-3, 2, Fr).view(Fr, 1, 1, 1)).contiguous(
        memory_format=CL)  # frames five decades apart, as BPTT gives
    w32, wb = tern.float().contiguous(memory_format=CL), tern.to(torch.bfloat16).contiguous(memory_format=CL)
    gb, xb = g.to(torch.bfloat16), x.to(torch.bfloat16)
    packed = torch.ops.onednn.qconv_prepack(tern, torch.ones(C_out), 1.0, 0, [1, 1], [1, 1], [1, 1], 1, None)
    geo = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1)

    def backward(gg, xx, ww, mask):
        return torch.ops.aten.convolution_backward(gg, xx, ww, None, *geo, mask)

    def int8_forward():
        return torch.ops.onednn.qconv2d_pointwise(
            x.to(torch.uint8, memory_format=CL), 1.0, 0, packed, torch.ones(C_out),
            torch.zeros(C_out, dtype=torch.int64), None, [1, 1], [1, 1], [1, 1], 1, 1.0, 0, torch.float32, "none",
            [], "")

    def bf16_forward():
        y = F.conv2d(x.to(torch.bfloat16), wb, padding=1)
        if y.abs().amax() >= 256:  # a rounded bf16 output: the caller would redo it in int8
            return int8_forward()
        return y.float()

    kept = {}
    split_grad_input(g, tern, 1, gemm_only=kept)
    fns = {
        "forward fp32": lambda: F.conv2d(x, w32, padding=1),
        "forward int8": int8_forward,
        "forward bf16+check": bf16_forward,
        "grad-input fp32": lambda: backward(g, x, w32, [True, False, False]),
        "grad-input bf16 one term": lambda: backward(gb, xb, wb, [True, False, False]),
        "grad-input int8 split": lambda: split_grad_input(g, tern, 1),
        "grad-input int8 split, convolution alone": lambda: _plane_conv(kept["planes"], kept["packed"],
                                                                        kept["C_in"]),
        "grad-weight fp32": lambda: backward(g, x, w32, [False, True, False]),
        "grad-weight bf16 one term": lambda: backward(gb, xb, wb, [False, True, False]),
        "grad-weight int8 split": lambda: split_grad_weight(x, g, 3, 1),
    }
    times = interleaved(fns, rounds=rounds, warmup=1)
    gd, xd, wd = g.double(), x.double(), tern.double()
    want_x = torch.nn.grad.conv2d_input(x.shape, wd, gd, padding=1)
    want_w = torch.nn.grad.conv2d_weight(xd, wd.shape, gd, padding=1)
    errors = {
        "grad-input fp32": _relative_error(fns["grad-input fp32"]()[0], want_x),
        "grad-input bf16 one term": _relative_error(fns["grad-input bf16 one term"]()[0], want_x),
        "grad-input int8 split": _relative_error(fns["grad-input int8 split"](), want_x),
        "grad-weight fp32": _relative_error(fns["grad-weight fp32"]()[1], want_w),
        "grad-weight bf16 one term": _relative_error(fns["grad-weight bf16 one term"]()[1], want_w),
        "grad-weight int8 split": _relative_error(fns["grad-weight int8 split"](), want_w),
    }
    return {"label": f"conv3 {C_in}->{C_out} @{H}x{H}, {Fr} frames",
            "times": {k: summary(v) for k, v in times.items()}, "max_error_relative_to_max": errors}


def run(rounds: int, quick: bool) -> dict:
    """Every case of the module docstring; returns the JSON-ready dict."""
    result = {"command": "python -m benchmarks.cpu_gemm " + " ".join(sys.argv[1:]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cpu": binwslt_cpu.cpu_info(), "torch": torch.__version__, "load_before": _load(), "cases": []}
    for shape in QUICK_SHAPES if quick else SHAPES:
        result["cases"].append(conv_case(*shape, rounds=rounds))
    result["load_after"] = _load()
    return result


def markdown(result: dict) -> str:
    """One table per shape: median ms, time relative to the torch backend's form, error."""
    lines = [f"`{result['command']}` — {result['date']}, torch {result['torch']}, {binwslt_cpu.cpu_info_line()}; "
             f"load before {result['load_before']}, after {result['load_after']}", ""]
    base = {"forward": "forward int8", "grad-input": "grad-input fp32", "grad-weight": "grad-weight fp32"}
    for case in result["cases"]:
        lines += [f"**{case['label']}**", "", "| form | median ms | / torch backend's | max error / max |",
                  "|---|---|---|---|"]
        for name, t in case["times"].items():
            ref = case["times"][base[name.split(" ")[0]]]["median_ms"]
            err = case["max_error_relative_to_max"].get(name)
            lines.append(f"| {name} | {t['median_ms']:.1f} | {t['median_ms'] / ref:.2f} | "
                         f"{'' if err is None else f'{err:.1e}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = arguments(__doc__)
    parser.add_argument("--quick", action="store_true", help="one tiny shape (CI)")
    args = parser.parse_args(argv)
    result = run(args.rounds, args.quick)
    save(args.out, result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
