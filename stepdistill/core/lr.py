"""The learning rate's schedule (warm-up, then constant or cosine), shared by the distillation loop and the toy-teacher
trainer."""
from __future__ import annotations

import math

from ..errors import ConfigError

LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(kind: str, final: float, prefix: str = "") -> None:
    """Refuse a schedule that cannot run or a final rate with no effect; `prefix` names the keys ("optim.")."""
    if kind not in LR_SCHEDULES:
        raise ConfigError(f"{prefix}lr_schedule must be one of {list(LR_SCHEDULES)} (got {kind!r})")
    if not 0.0 <= final <= 1.0:
        raise ConfigError(f"{prefix}lr_final={final} is a fraction of the peak rate: use a value in [0, 1]")
    if kind == "constant" and final:
        raise ConfigError(f"{prefix}lr_final={final} has no effect with a constant learning rate: drop it or use "
                          "cosine")


def lr_factor(kind: str, steps: int, warmup: int = 0, final: float = 0.0):
    """The learning rate's multiplier at each step: linear warmup over `warmup` steps, then constant or a cosine decay
    to `final` (a fraction of the peak rate) at step `steps`.

    constant: a run stopped at step N equals a run of N steps, so any snapshot of a long run is reproduced exactly by a
    run of N steps. cosine (Loshchilov & Hutter 2017, without restarts) anneals the rate over the whole run, which lets
    the weights settle where a constant rate keeps them bouncing; a snapshot before the end is not a shorter run."""
    check_lr_schedule(kind, final)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup else 1.0
        if kind == "constant":
            return warm
        return warm * (final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, step / max(1, steps)))))

    return factor
