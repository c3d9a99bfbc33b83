"""Run a model once to observe it: eval mode, ``no_grad``, hooks removed and every module's mode restored after."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def run_observed(model: nn.Module, x: torch.Tensor, handles: Iterable[RemovableHandle]) -> None:
    """``model(x)`` in eval mode under ``torch.no_grad``, for hooks the caller registered (``handles``).

    The hooks are removed and each module's ``training`` flag is restored afterwards, also when the forward raises.
    """
    handles = list(handles)
    was_training = {name: m.training for name, m in model.named_modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        for name, m in model.named_modules():
            m.training = was_training.get(name, m.training)
