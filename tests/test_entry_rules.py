"""One rule on every backend, checked once at the entry in binwslt.functional (issue #13 findings).

T = 0 and empty batches are one ValueError on every backend (and leave BatchNorm's running statistics alone);
bf16/fp16 weights and scores work on every backend with the same spikes; the output dtype is
``spike_output_dtype(x.dtype)`` whatever the scale/shift/residual dtypes; ``backend="triton"`` on CPU tensors
outside the interpreter says it needs CUDA tensors.
"""
import pytest
import torch

from binwslt import functional as BF
from binwslt.spikes import spike_output_dtype

BACKENDS = ("reference", "torch", "triton")  # triton runs under TRITON_INTERPRET=1 (tests/conftest.py)


def _conv_args(T=2, N=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(T, N, 3, 6, 6, generator=g) > 0.5).to(dtype)
    return x, torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g)


def _linear_args(T=2, N=3):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(T, N, 6, generator=g) > 0.5).float()
    return x, torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_timesteps_is_one_error(backend):
    x, w, s = _conv_args(T=0)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend=backend)
    x, w, s = _linear_args(T=0)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.binw_linear_lif(x, w, s, 0.4, backend=backend)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.lif(torch.zeros(0, 3), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["conv", "linear", "conv-direct"])
def test_empty_batch_is_refused_and_running_stats_untouched(backend, op):
    running_mean, running_var = torch.zeros(5 if op == "linear" else 4), torch.ones(5 if op == "linear" else 4)
    bn = dict(batch_norm=True, running_mean=running_mean, running_var=running_var)
    with pytest.raises(ValueError, match=r"empty batch \(N = 0\)"):
        if op == "linear":
            x, w, s = _linear_args(N=0)
            BF.binw_linear_lif(x, w, s, 0.4, backend=backend, **bn)
        elif op == "conv":
            x, w, s = _conv_args(N=0)
            BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend=backend, **bn)
        else:
            _, w, s = _conv_args()
            BF.binw_conv2d_lif(torch.zeros(0, 3, 6, 6), w, s, 0.4, padding=1, timesteps=2, backend=backend, **bn)
    assert torch.equal(running_mean, torch.zeros_like(running_mean))
    assert torch.equal(running_var, torch.ones_like(running_var))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_and_scores_give_the_same_spikes_on_every_backend(dtype):
    x, w, s = _conv_args()
    w, s = w.to(dtype), s.to(dtype).requires_grad_(True)
    outs = {}
    for backend in BACKENDS:
        outs[backend] = BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend=backend)
        assert outs[backend].dtype == torch.float32
    # the fp32 oracle on the same (exactly representable) values
    want = BF.binw_conv2d_lif(x, w.float(), s.detach().float(), 0.4, padding=1, backend="reference")
    for backend, out in outs.items():
        assert torch.equal(out, want), backend
    outs["torch"].sum().backward()
    assert s.grad is not None and s.grad.dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_is_one_rule(backend):
    x, w, s = _conv_args()
    f64 = torch.float64
    cases = [
        (x, dict(scale=torch.ones(4, dtype=f64))),
        (x, dict(shift=torch.zeros(4, dtype=f64))),
        (x, dict(residual=torch.zeros(2, 2, 4, 6, 6, dtype=f64))),
        (x.bool(), dict(scale=torch.ones(4, dtype=f64))),
        (x.to(torch.uint8), {}),
        (x.half(), dict(scale=torch.ones(4))),
        (x.double(), {}),
    ]
    for xi, kw in cases:
        out = BF.binw_conv2d_lif(xi, w, s, 0.4, padding=1, backend=backend, **kw)
        assert out.dtype == spike_output_dtype(xi.dtype), (xi.dtype, list(kw), out.dtype)
    xl, wl, sl = _linear_args()
    out = BF.binw_linear_lif(xl, wl, sl, 0.4, scale=torch.ones(5, dtype=f64), backend=backend)
    assert out.dtype == torch.float32


def test_triton_on_cpu_tensors_says_it_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, s = _conv_args()
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        BF.lif(torch.zeros(2, 3), backend="triton")
