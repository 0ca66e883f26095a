"""Exponential moving average of trainable parameters (a shadow copy, a few MB for a LoRA)."""

from __future__ import annotations

import torch


class EMA:
    """theta_ema <- decay theta_ema + (1 - decay) theta, over a fixed, named set of parameters."""

    def __init__(self, named_params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = named_params
        self.shadow = {k: p.detach().clone().float() for k, p in named_params.items()}

    @torch.no_grad()
    def update(self):
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, target: dict[str, torch.nn.Parameter]):
        """Write the averages into another parameter set with the same names (e.g. the target adapter)."""
        for k, v in self.shadow.items():
            target[k].copy_(v.to(target[k].dtype))

    def state_dict(self):
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay = state["decay"]
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
