"""One rule on every backend, checked once at the entry in binwslt.functional (issue #13 findings).

T = 0 and empty batches are one ValueError on every backend (and leave BatchNorm's running statistics alone);
bf16/fp16 weights and scores work on every backend with the same spikes; the output dtype is
``spike_output_dtype(x.dtype)`` whatever the scale/shift/residual dtypes; ``backend="triton"`` on CPU tensors
outside the interpreter says it needs CUDA tensors.
"""
import pytest
import torch
from helpers import TRITON_DEVICE

from binwslt import functional as BF
from binwslt.spikes import spike_output_dtype

BACKENDS = ("reference", "torch", "triton")  # triton: interpreted on CPU tensors, or compiled on a GPU


def _on(backend, *tensors):
    """The tensors on the device ``backend`` runs on (the GPU for triton on a CUDA machine, else the CPU)."""
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    return tuple(t.to(device) for t in tensors)


def _conv_args(backend, T=2, N=2, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(T, N, 3, 6, 6, generator=g) > 0.5).to(dtype)
    return _on(backend, x, torch.randn(4, 3, 3, 3, generator=g), torch.randn(4, 3, 3, 3, generator=g))


def _linear_args(backend, T=2, N=3):
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(T, N, 6, generator=g) > 0.5).float()
    return _on(backend, x, torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_timesteps_is_one_error(backend):
    x, w, s = _conv_args(backend, T=0)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend=backend)
    x, w, s = _linear_args(backend, T=0)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.binw_linear_lif(x, w, s, 0.4, backend=backend)
    with pytest.raises(ValueError, match=r"no timesteps \(T = 0"):
        BF.lif(*_on(backend, torch.zeros(0, 3)), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["conv", "linear", "conv-direct"])
def test_empty_batch_is_refused_and_running_stats_untouched(backend, op):
    channels = 5 if op == "linear" else 4
    running_mean, running_var = _on(backend, torch.zeros(channels), torch.ones(channels))
    bn = dict(batch_norm=True, running_mean=running_mean, running_var=running_var)
    with pytest.raises(ValueError, match=r"empty batch \(N = 0\)"):
        if op == "linear":
            x, w, s = _linear_args(backend, N=0)
            BF.binw_linear_lif(x, w, s, 0.4, backend=backend, **bn)
        elif op == "conv":
            x, w, s = _conv_args(backend, N=0)
            BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend=backend, **bn)
        else:
            _, w, s = _conv_args(backend)
            (image,) = _on(backend, torch.zeros(0, 3, 6, 6))
            BF.binw_conv2d_lif(image, w, s, 0.4, padding=1, timesteps=2, backend=backend, **bn)
    assert torch.equal(running_mean.cpu(), torch.zeros(channels))
    assert torch.equal(running_var.cpu(), torch.ones(channels))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_and_scores_give_the_same_spikes_on_every_backend(dtype):
    x, w, s = _conv_args("reference")
    # the fp32 oracle on the same (exactly representable) values
    want = BF.binw_conv2d_lif(x, w.to(dtype).float(), s.to(dtype).float(), 0.4, padding=1, backend="reference")
    for backend in BACKENDS:
        xb, wb, sb = _on(backend, x, w.to(dtype), s.to(dtype))
        sb.requires_grad_(True)
        out = BF.binw_conv2d_lif(xb, wb, sb, 0.4, padding=1, backend=backend)
        assert out.dtype == torch.float32, backend
        assert torch.equal(out.cpu(), want), backend
        out.sum().backward()
        assert sb.grad is not None and sb.grad.dtype == dtype, backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_dtype_is_one_rule(backend):
    x, w, s = _conv_args(backend)
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
        kw = {k: _on(backend, v)[0] for k, v in kw.items()}
        out = BF.binw_conv2d_lif(xi, w, s, 0.4, padding=1, backend=backend, **kw)
        assert out.dtype == spike_output_dtype(xi.dtype), (xi.dtype, list(kw), out.dtype)
    xl, wl, sl = _linear_args(backend)
    (scale,) = _on(backend, torch.ones(5, dtype=f64))
    out = BF.binw_linear_lif(xl, wl, sl, 0.4, scale=scale, backend=backend)
    assert out.dtype == torch.float32


def test_triton_on_cpu_tensors_says_it_needs_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, s = _conv_args("reference")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        BF.binw_conv2d_lif(x, w, s, 0.4, padding=1, backend="triton")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        BF.lif(torch.zeros(2, 3), backend="triton")
