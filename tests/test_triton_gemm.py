"""Split-precision tensor-core GEMMs (kernels/gemm.py) against float64.

Triton 3.6's interpreter computes bf16 ``tl.dot`` wrongly (relative error ~1e9 on a 16x16 test) and rounds
``x.to(tl.bfloat16)`` wrongly, so these tests run the kernels' interpreter form of the split: the same three-term
split computed by integer round-to-nearest-even on the fp32 bits (``bf16_round``), and fp32 dots of those
bf16-valued terms, which are exact products as on tensor cores. What the interpreter cannot run, the bf16 MMA
instruction itself, is checked by benchmarks/compile_report.py (HGMMA/HMMA counts). The same split is also
written in PyTorch (real bf16 conversion) to show the rounding the interpreter emulates is torch's bf16.
"""
import pytest
import torch
from helpers import randn

pytest.importorskip("triton")

import triton  # noqa: E402

from binwslt.kernels import gemm  # noqa: E402
from binwslt.kernels.conv_lif_bwd import conv_grad_input_kernel, conv_grad_weight_kernel  # noqa: E402


def _torch_split(x):
    """The three bf16 terms in PyTorch (real bf16 rounding), as float32."""
    t1 = x.to(torch.bfloat16).float()
    r = x - t1
    t2 = r.to(torch.bfloat16).float()
    r = r - t2
    return t1, t2, r.to(torch.bfloat16).float()


def _relative(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


def test_split_terms_are_torch_bf16_rounding_and_fp32_accurate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) * torch.exp(torch.randn(3000, generator=g) * 8)  # magnitudes 1e-15..1e15
    x[:3] = torch.tensor([0.0, 1.0 + 2 ** -23, -(2 ** -130)])  # zero, last-bit, subnormal
    out = torch.empty(3 * x.numel())
    gemm.bf16_round_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    terms = out.view(3, -1)
    for got, want in zip(terms, _torch_split(x)):
        assert torch.equal(got, want)
    total = terms.double().sum(0)
    nz = x != 0
    rel = ((total - x.double()).abs()[nz] / x.double().abs()[nz]).max().item()
    assert rel <= 2 ** -24
    one_term = ((terms[0].double() - x.double()).abs()[nz] / x.double().abs()[nz]).max().item()
    assert 2 ** -10 < one_term <= 2 ** -8  # one bf16 term: 8 significant bits


def test_torch_split_gemm_matches_float64_where_one_term_does_not():
    """The algorithm in PyTorch: a cancelling fp32 x ternary GEMM, three-term split vs one term vs float64."""
    a = randn(64, 512, seed=1)
    b = torch.randint(-1, 2, (512, 48), generator=torch.Generator().manual_seed(2)).float()
    want = a.double() @ b.double()
    split = sum(t @ b for t in _torch_split(a))
    fp32 = a @ b
    assert _relative(split, want) <= 2 * _relative(fp32, want) + 1e-7
    assert _relative(_torch_split(a)[0] @ b, want) > 100 * _relative(split, want)


def _conv_grad_input(g_cl, tern, split, *, H, W, stride, pad, block=16):
    """Run conv_grad_input_kernel on channels-last g ``[F, OH, OW, C_out]`` and ternary ``[C_out, C_in, K, K]``."""
    F, OH, OW, C_out = g_cl.shape
    C_in, K = tern.shape[1], tern.shape[2]
    wt = tern.permute(2, 3, 0, 1).contiguous().to(torch.int8)  # [KH, KW, C_out, C_in]
    alpha = torch.tensor([0.75])
    P = F * H * W
    dx = torch.empty((F, H, W, C_in))
    even_k, even_n = C_out % block == 0, C_in % block == 0
    conv_grad_input_kernel[(triton.cdiv(P, 128), triton.cdiv(C_in, block))](
        g_cl, wt, alpha, dx, P, C_in, C_out, H, W, OH, OW, stride, stride, pad, pad, KH=K, KW=K,
        EVEN_K=even_k, EVEN_N=even_n, BLOCK_M=128, BLOCK_N=block, BLOCK_K=block, SPLIT=split)
    return dx


@pytest.mark.parametrize("c_in,c_out", [(16, 32), (5, 19)])
def test_conv_grad_input_kernel_split_vs_float64(c_in, c_out):
    F, H, W, K, stride, pad = 2, 6, 5, 3, 1, 1
    OH, OW = H, W
    g_cl = randn(F, OH, OW, c_out, seed=3)
    tern = torch.randint(-1, 2, (c_out, c_in, K, K), generator=torch.Generator().manual_seed(4)).float()
    want = 0.75 * torch.nn.grad.conv2d_input((F, c_in, H, W), tern.double(), g_cl.permute(0, 3, 1, 2).double(),
                                             stride=stride, padding=pad).permute(0, 2, 3, 1)
    got = _conv_grad_input(g_cl, tern, True, H=H, W=W, stride=stride, pad=pad)
    got_bf16 = _conv_grad_input(g_cl, tern, False, H=H, W=W, stride=stride, pad=pad)
    assert _relative(got, want) < 1e-6
    assert 1e-4 < _relative(got_bf16, want) < 1e-2  # the one-term opt-in: bf16 accuracy, and visibly so


@pytest.mark.parametrize("analog", [False, True])
def test_conv_grad_weight_kernel_split_vs_float64(analog):
    F, H, W, C_in, C_out, K = 2, 5, 6, 5, 19, 3
    OH, OW = H, W
    gen = torch.Generator().manual_seed(5)
    if analog:
        x = randn(F, H, W, C_in, seed=6)
    else:
        x = (torch.rand((F, H, W, C_in), generator=gen) < 0.4).to(torch.int8)
    g_cl = randn(F, OH * OW, C_out, seed=7)
    shape = (C_out, C_in, K, K)
    weight = randn(*shape, seed=8)
    scores = randn(*shape, seed=9)
    tern = torch.zeros(shape, dtype=torch.int8)
    alpha = torch.tensor([1.0])
    want = torch.nn.grad.conv2d_weight(x.permute(0, 3, 1, 2).double(), shape,
                                       g_cl.view(F, OH, OW, C_out).permute(0, 3, 1, 2).double(), padding=1)
    want = want * weight.double() * torch.sign(scores.double())
    results = []
    for split in (True, False):
        gs = torch.empty((1,) + shape)
        P = F * OH * OW
        conv_grad_weight_kernel[(K * K * triton.cdiv(C_in, 16), triton.cdiv(C_out, 16), 1)](
            x, g_cl, weight, scores, tern, alpha, gs, None, P, C_in, C_out, H, W, OH, OW, P, 1, 1, 1, 1,
            KH=K, KW=K, EVEN_M=False, EVEN_N=False,
            BLOCK_M=16, BLOCK_N=16, BLOCK_K=128, SPLIT=split)
        results.append(_relative(gs[0], want))
    assert results[0] < 1e-6
    assert 1e-4 < results[1] < 1e-2


def test_conv_lif_grad_precision_bf16_is_the_one_term_opt_in():
    """Through binwslt.functional: the default split matches the reference at rtol 1e-4 (the conv tests), the
    "bf16" opt-in gives gradients within bf16 accuracy of it and measurably different (so the keyword reaches the
    kernels); the spikes do not depend on it (backward only)."""
    from helpers import run_layer, spikes

    x = spikes(2, 1, 16, 6, 6, seed=11)
    weight, scores = randn(32, 16, 3, 3, seed=12, scale=0.3), randn(32, 16, 3, 3, seed=13)
    kw = dict(stride=(1, 1), padding=(1, 1), timesteps=None, batch_norm=False, scale=randn(32, seed=14) + 1.0)
    s_ref, g_ref, _ = run_layer("binw_conv2d_lif", "reference", x, weight, scores, 0.5, **dict(kw))
    s_split, g_split, _ = run_layer("binw_conv2d_lif", "triton", x, weight, scores, 0.5, **dict(kw))
    s_bf16, g_bf16, _ = run_layer("binw_conv2d_lif", "triton", x, weight, scores, 0.5, grad_precision="bf16",
                                  **dict(kw))
    assert torch.equal(s_split, s_bf16) and torch.equal(s_split, s_ref)
    for name in ("x", "scores"):
        want = g_ref[name].double()
        assert _relative(g_split[name], want) < 1e-5
        assert 1e-4 < _relative(g_bf16[name], want) < 3e-2


@pytest.mark.parametrize("analog", [False, True])
def test_linear_lif_grad_precision(analog):
    """The linear kernels follow the same rule: split gradients at fp32 accuracy vs the reference, the "bf16"
    opt-in at bf16 accuracy (spike input: exact x; analog input: both GEMM operands split)."""
    from helpers import run_layer, spikes

    x = randn(3, 5, 40, seed=21).relu() if analog else spikes(3, 5, 40, seed=21)
    weight, scores = randn(24, 40, seed=22, scale=0.3), randn(24, 40, seed=23)
    kw = dict(timesteps=None, batch_norm=False, scale=randn(24, seed=24) + 1.0)
    s_ref, g_ref, _ = run_layer("binw_linear_lif", "reference", x, weight, scores, 0.5, **dict(kw))
    s_split, g_split, _ = run_layer("binw_linear_lif", "triton", x, weight, scores, 0.5, **dict(kw))
    s_bf16, g_bf16, _ = run_layer("binw_linear_lif", "triton", x, weight, scores, 0.5, grad_precision="bf16",
                                  **dict(kw))
    assert torch.equal(s_split, s_ref) and torch.equal(s_bf16, s_ref)
    for name in ("x", "scores"):
        want = g_ref[name].double()
        assert _relative(g_split[name], want) < 1e-5
        assert 1e-4 < _relative(g_bf16[name], want) < 3e-2
