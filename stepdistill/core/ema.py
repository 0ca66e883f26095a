"""Exponential moving average of trainable parameters."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_(target: list[torch.Tensor], source: list[torch.Tensor], decay: float) -> None:
    """theta_target <- decay theta_target + (1 - decay) theta_source, in place (e.g. an EMA target adapter).

    One foreach lerp over every tensor (a kernel per group, not one per tensor: an SDXL adapter holds ~1,600)."""
    if len(target) != len(source):
        raise ValueError(f"EMA of {len(source)} tensors into {len(target)}: the two lists must pair up")
    if not target:
        return
    # Under no_grad no detach is needed (it was an op per tensor, ~1,600 on SDXL); .to() of the same dtype is no op.
    source = [s.to(t.dtype) for t, s in zip(target, source)]
    torch._foreach_lerp_(list(target), source, 1.0 - decay)


def ramped_decay(decay: float, updates: int) -> float:
    """min(decay, (1 + n) / (10 + n)) after n updates: the average forgets the untrained start within ~10 updates
    instead of 1 / (1 - decay) of them (a 0.95 EMA would still hold 46 % of the step-0 LoRA after 15 updates)."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


class StudentEMA:
    """An exponential moving average of the student adapter's LoRA factors, in float32: what the run exports.

    A one-step student's last iterate moves with every update at the learning rates distillation needs; averaging
    the last ~1 / (1 - decay) iterates removes that noise from the exported LoRA. The average is taken over the
    factors A and B, not over their product BA: docs/tscd.md measured the two 2-5 % apart."""

    def __init__(self, live: dict[str, torch.Tensor], decay: float):
        self.decay, self.updates = decay, 0
        self.live = live
        self.shadow = {k: p.detach().float().clone() for k, p in live.items()}

    @torch.no_grad()
    def update(self) -> None:
        keys = list(self.shadow)
        ema_update_([self.shadow[k] for k in keys], [self.live[k] for k in keys], ramped_decay(self.decay, self.updates))
        self.updates += 1

    def state_dict(self) -> dict:
        return {"updates": self.updates, "shadow": {k: v.cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"the checkpoint's student EMA lacks {len(missing)} adapter tensors of this model")
        self.updates = int(state["updates"])
        for k, v in self.shadow.items():
            v.copy_(state["shadow"][k])
