"""Exponential moving average of trainable parameters."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], source: list[torch.Tensor], decay: float) -> None:
    """theta_target <- decay theta_target + (1 - decay) theta_source, in place (e.g. an EMA target adapter)."""
    for t, s in zip(target, source, strict=True):
        t.lerp_(s.detach().to(t.dtype), 1.0 - decay)
