"""Bad input gets a clear error naming the argument and the value."""
import pytest
import torch

from binwslt import LIFConfig
from binwslt import functional as Fn

W = torch.randn(4, 3, 3, 3)
S = torch.randn(4, 3, 3, 3)
X = torch.zeros(2, 1, 3, 6, 6)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=torch.zeros(1, 3, 6)), ValueError, "rank"),
    (dict(x=torch.zeros(1, 3, 6, 6)), ValueError, "timesteps"),
    (dict(x=torch.zeros(1, 3, 6, 6), timesteps=0), ValueError, "timesteps"),
    (dict(timesteps=4), ValueError, "timesteps"),
    (dict(x=torch.zeros(2, 1, 5, 6, 6)), ValueError, "input channels"),
    (dict(x=torch.zeros(2, 1, 3, 6, 6, dtype=torch.int64)), TypeError, "dtype"),
    (dict(scores=torch.randn(4, 3, 1, 1)), ValueError, "scores shape"),
    (dict(weight=torch.randn(4, 3, 3)), ValueError, "weight must have rank 4"),
    (dict(prune_rate=1.0), ValueError, "prune_rate"),
    (dict(prune_rate=-0.5), ValueError, "prune_rate"),
    (dict(stride=0), ValueError, "stride"),
    (dict(padding=(1, 2, 3)), ValueError, "padding"),
    (dict(scale=torch.ones(5)), ValueError, "scale"),
    (dict(shift=torch.ones(4, 1)), ValueError, "shift"),
    (dict(residual=torch.ones(2, 1, 4, 3, 3)), ValueError, "residual"),
    (dict(backend="gpu"), ValueError, "backend"),
    (dict(neuron=LIFConfig), TypeError, "neuron"),
    (dict(x=torch.zeros(2, 1, 3, 2, 2)), ValueError, "smaller than the kernel"),
    (dict(batch_norm=True, running_mean=torch.zeros(3)), ValueError, "running_mean"),
    (dict(batch_norm=True, eps=0.0), ValueError, "eps"),
])
def test_conv_errors(kwargs, exc, match):
    args = dict(x=X, weight=W, scores=S, prune_rate=0.4)
    args.update(kwargs)
    x, w, s, p = args.pop("x"), args.pop("weight"), args.pop("scores"), args.pop("prune_rate")
    with pytest.raises(exc, match=match):
        Fn.binw_conv2d_lif(x, w, s, p, backend=args.pop("backend", "reference"), **args)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(x=torch.zeros(2, 3, 7)), ValueError, "features"),
    (dict(x=torch.zeros(3, 6)), ValueError, "timesteps"),
    (dict(x=torch.zeros(2, 3, 6), timesteps=2), ValueError, "timesteps"),
    (dict(scale=torch.ones(6)), ValueError, "scale"),
    (dict(residual=torch.ones(2, 3, 6)), ValueError, "residual"),
])
def test_linear_errors(kwargs, exc, match):
    x = kwargs.pop("x", torch.zeros(2, 3, 6))
    with pytest.raises(exc, match=match):
        Fn.binw_linear_lif(x, torch.randn(5, 6), torch.randn(5, 6), 0.4, backend="reference", **kwargs)


def test_device_mismatch_is_reported():
    meta = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="scale is on meta"):
        Fn.binw_conv2d_lif(X, W, S, 0.4, scale=meta, backend="reference")
