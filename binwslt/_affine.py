"""Per-channel epilogue shared by the PyTorch backends: scale/shift or training-mode BatchNorm, then residual."""
from __future__ import annotations

import torch


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


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """In-place exponential update of BatchNorm running statistics (unbiased variance, as F.batch_norm does)."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var * (count / max(count - 1, 1))
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
