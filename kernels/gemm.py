"""Tensor-core dots with an fp32 operand: the split-precision rule every float GEMM of the kernels follows.

The backward GEMMs multiply the fp32 gradient ``g`` by an operand that is exact in bf16 (the ternary weight
-1/0/+1, the 0/1 input spikes). ``g`` is split into three bf16 terms, ``t1 = bf16(g)``, ``t2 = bf16(g - t1)``,
``t3 = bf16(g - t1 - t2)`` (round to nearest even; the remainders are exact in fp32), and ``g @ B`` is computed as
``t1 @ B + t2 @ B + t3 @ B`` on bf16 tensor cores with an fp32 accumulator. bf16 keeps 8 significant bits, so
``|g - t1 - t2 - t3| <= 2^-24 |g|``: the operand is represented to fp32 precision, and the products of bf16 values
with -1/0/+1 are exact in fp32, so the result is as accurate as an fp32 (ieee) GEMM (the tests keep rtol 1e-4
against the float64-accurate reference). Two terms were measured not to be enough: ``2^-16`` per element lost
5e-4 relative on a cancelling 27-term score gradient (tests/test_triton_conv.py::test_conv_lif_random_general).
When both operands are fp32 (an analog input's grad-weight, the direct-encoded first layer's) the split is
Triton's ``tf32x3`` (TF32 tensor cores, ~2^-22 relative; see ``split_dot_both``).
``SPLIT=False`` is the one-term opt-in (``grad_precision="bf16"``: ``t1`` alone, bf16 accuracy, a third of the
tensor-core work), the precision autocast training runs at.

bf16 rather than fp16: bf16 has fp32's exponent range, so gradients of any magnitude split without underflow
or overflow (the low terms of an fp16 split would be subnormal or zero for gradients below ~1e-1).

Under the Triton interpreter (``TRITON_INTERPRET=1``) a bf16 ``tl.dot`` is wrong (relative error ~1e9 on a 16x16
test, Triton 3.6) and even ``x.to(tl.bfloat16)`` rounds wrongly (errors ~2^-6 on standard-normal values). So the
interpreter computes the same split with integer round-to-nearest-even on the fp32 bit pattern (``bf16_round``:
the value a bf16 conversion gives, held in fp32) and runs the dots in fp32 (``input_precision="ieee"``): the
products of these bf16-valued operands are exact in fp32, as on tensor cores, so the interpreter tests the split
and its accumulation exactly; what it cannot test is the bf16 MMA instruction itself, which the compile report
checks is emitted (HGMMA on sm_90, HMMA on sm_80). ``EMULATE`` is that switch, fixed at import like Triton's
own interpreter choice.
"""
import os

import triton
import triton.language as tl

EMULATE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))

# The launchers' map from the grad_precision keyword (binwslt.functional.GRAD_PRECISIONS, validated there) to SPLIT.
SPLIT_BY_PRECISION = {"split": True, "bf16": False}


@triton.jit
def bf16_round(x):
    """fp32 ``x`` rounded to the nearest bf16 value (ties to even), returned as fp32 (NaN/inf preserved)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def split_hi(x):
    """High term of the split: bf16 on a GPU, its fp32 value under the interpreter (see module docstring)."""
    if EMULATE:
        return bf16_round(x.to(tl.float32))
    else:
        return x.to(tl.float32).to(tl.bfloat16)


@triton.jit
def split_next(r, term):
    """``(term', r')``: the next term ``bf16(r - term)`` of the split and the fp32 remainder it leaves, from the
    remainder ``r`` (fp32) the previous ``term`` was taken from."""
    r = r.to(tl.float32) - term.to(tl.float32)
    return split_hi(r), r


@triton.jit
def exact_operand(b):
    """An operand exact in bf16 (int8 ternary weight, 0/1 spikes) in the dot dtype: bf16, fp32 emulating."""
    if EMULATE:
        return b.to(tl.float32)
    else:
        return b.to(tl.bfloat16)


@triton.jit
def mma(a, b, acc):
    """``acc + a @ b`` for operands from ``split_hi``/``split_next``/``exact_operand``: a bf16 tensor-core dot
    with fp32 accumulation; under the interpreter an fp32 dot of the same (bf16-valued) numbers."""
    if EMULATE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def split_dot_exact_b(a, b, acc, SPLIT: tl.constexpr):
    """``acc + a @ b`` with ``a`` fp32 (split into three bf16 terms when SPLIT, the first alone otherwise) and
    ``b`` exact in bf16 (integer -1/0/+1 or 0/1)."""
    bb = exact_operand(b)
    t1 = split_hi(a)
    acc = mma(t1, bb, acc)
    if SPLIT:
        t2, r = split_next(a, t1)
        acc = mma(t2, bb, acc)
        t3, r = split_next(r, t2)
        acc = mma(t3, bb, acc)
    return acc


@triton.jit
def split_dot_exact_a(a, b, acc, SPLIT: tl.constexpr):
    """``acc + a @ b`` with ``a`` exact in bf16 and ``b`` fp32 (split into three terms when SPLIT)."""
    aa = exact_operand(a)
    t1 = split_hi(b)
    acc = mma(aa, t1, acc)
    if SPLIT:
        t2, r = split_next(b, t1)
        acc = mma(aa, t2, acc)
        t3, r = split_next(r, t2)
        acc = mma(aa, t3, acc)
    return acc


@triton.jit
def split_dot_both(a, b, acc, SPLIT: tl.constexpr):
    """``acc + a @ b`` with both operands fp32 (an analog input's grad-weight, the direct first layer's).
    SPLIT: Triton's ``tf32x3`` (each operand as TF32 high + low, three TF32 tensor-core dots, ~2^-22 relative):
    six bf16 dots of three-term splits were tried and spilled on sm_80 (Triton 3.6 or 3.9, depending on the order
    of the dots); under the interpreter an fp32 dot. Not SPLIT: ``a_1 b_1``, one bf16 dot."""
    if SPLIT:
        if EMULATE:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="tf32x3")
    else:
        return mma(split_hi(a), split_hi(b), acc)


@triton.jit
def bf16_round_kernel(x_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """Test hook: the three split terms of a flat fp32 ``x`` as fp32 ``out`` ``[3, numel]``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok, other=0.0)
    t1 = split_hi(x)
    t2, r = split_next(x, t1)
    t3, r = split_next(r, t2)
    tl.store(out_ptr + offs, t1.to(tl.float32), mask=ok)
    tl.store(out_ptr + numel + offs, t2.to(tl.float32), mask=ok)
    tl.store(out_ptr + 2 * numel + offs, t3.to(tl.float32), mask=ok)
