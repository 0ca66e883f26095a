"""The Distiller protocol (DESIGN.md sec. 3): a method is losses only; the loop owns everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..core.denoiser import Cond, Denoiser, GuidedDenoiser
from ..core.schedule import NoiseSchedule


@dataclass
class Batch:
    """One micro-batch: encoded prompts, their unconditional twin, and real latents when the method wants data."""

    cond: Cond
    uncond: Cond
    prompts: list[str]
    latent_shape: tuple[int, ...]  # (B, C, h, w) of the student's samples
    latents: torch.Tensor | None = None  # real VAE latents (GAN head, regression), when configured

    @property
    def size(self) -> int:
        return len(self.prompts)


@dataclass
class Nets:
    """The networks a method asked for; all share one frozen base UNet (adapters by name)."""

    unet: torch.nn.Module
    schedule: NoiseSchedule
    teacher: GuidedDenoiser  # base, adapters disabled, with CFG at the method's guidance scale
    student: Denoiser  # adapter "student"
    fake_score: Denoiser | None = None  # adapter "fake_score"
    target: Denoiser | None = None  # adapter "target" (EMA / node / stop-grad target)
    extra: dict[str, Any] = field(default_factory=dict)  # method-owned modules (e.g. a GAN head)
    device: torch.device = torch.device("cpu")


@dataclass
class LossOut:
    """Per-sample loss (shape [B]) plus scalar logs; `samples` are detached student outputs for the critic."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    samples: torch.Tensor | None = None


class Distiller(Protocol):
    # Adapters the builder must create on the shared base, besides "student" (e.g. ("fake_score",)).
    extra_adapters: ClassVar[tuple[str, ...]]
    # Which adapter each optimizer trains: {"student": ["student"], "critic": ["fake_score"]}.
    trainable: ClassVar[dict[str, tuple[str, ...]]]

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut: ...

    def critic_loss(self, nets: Nets, batch: Batch, samples: torch.Tensor | None) -> LossOut | None: ...

    def after_step(self, nets: Nets, step: int) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
