"""The Distiller protocol (DESIGN.md sec. 3): a method is losses only; the loop owns everything else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from ..core.denoiser import Cond, Denoiser, GuidedDenoiser
from ..core.schedule import NoiseSchedule


class NoiseSource:
    """Random draws for the global batch, sliced to this process's rows.

    W processes with batch B draw exactly what one process with batch W*B would (rows rank::W, the same rows the
    data order gives this process), so multi-process training matches single-process training sample for sample.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world: int = 1, device=None):
        self.generator, self.rank, self.world, self.device = generator, rank, world, device

    def _rows(self, x):
        return x[self.rank :: self.world].to(self.device)

    def randn(self, n: int, *shape) -> torch.Tensor:
        return self._rows(torch.randn((n * self.world, *shape), generator=self.generator))

    def rand(self, n: int, *shape) -> torch.Tensor:
        return self._rows(torch.rand((n * self.world, *shape), generator=self.generator))

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return self._rows(torch.randint(low, high, (n * self.world,), generator=self.generator))


@dataclass
class Batch:
    """One micro-batch: encoded prompts, their unconditional twin, and real latents when the method wants data."""

    cond: Cond
    uncond: Cond
    prompts: list[str]
    latent_shape: tuple[int, ...]  # (B, C, h, w) of the student's samples
    latents: torch.Tensor | None = None  # real VAE latents (GAN head, regression), when configured
    noise: NoiseSource | None = None  # set by the loop; methods draw ALL randomness through the helpers below

    @property
    def size(self) -> int:
        return len(self.prompts)

    def _source(self, device):
        return self.noise or NoiseSource(torch.default_generator, device=device)

    def randn(self, *shape, device=None) -> torch.Tensor:
        """Standard normal [B, *shape] (per-sample rows of the global batch)."""
        return self._source(device).randn(self.size, *shape).to(device)

    def rand(self, device=None) -> torch.Tensor:
        """Uniform [0, 1) per sample, shape [B]."""
        return self._source(device).rand(self.size).to(device)

    def randint(self, low: int, high: int, device=None) -> torch.Tensor:
        """Integers in [low, high) per sample, shape [B]."""
        return self._source(device).randint(low, high, self.size).to(device)


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


class CriticHeadState:
    """For distillers with an optional trainable head in the critic phase (dmd's GAN head, tscd's discriminator):
    the head's parameters join the critic optimizer and its weights the checkpoint, under `head_state_key`."""

    head: torch.nn.Module | None = None
    head_state_key: ClassVar[str]

    def parameters(self, phase: str):
        return list(self.head.parameters()) if phase == "critic" and self.head is not None else []

    def state_dict(self):
        return {self.head_state_key: self.head.state_dict()} if self.head is not None else {}

    def load_state_dict(self, state):
        if self.head is not None:
            self.head.load_state_dict(state[self.head_state_key])
