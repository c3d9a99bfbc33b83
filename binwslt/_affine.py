"""Per-channel epilogue shared by the PyTorch backends: scale/shift or training-mode BatchNorm, then residual."""
from __future__ import annotations

import torch

from .batchnorm import update_running_stats  # noqa: F401  (defined once there; the torch backend imports it here)


def channel_view(v: torch.Tensor, like: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Reshape a per-channel vector ``[C]`` to broadcast against ``like`` along ``channel_dim``."""
    shape = [1] * like.dim()
    shape[channel_dim] = -1
    return v.reshape(shape)


def batch_stats(y: torch.Tensor, channel_dim: int):
    """Per-channel mean and biased variance of ``y`` over every dim but ``channel_dim``; fp32 ``[C]`` each."""
    dims = [d for d in range(y.dim()) if d != channel_dim]
    var, mean = torch.var_mean(y, dim=dims, correction=0)
    return mean, var
