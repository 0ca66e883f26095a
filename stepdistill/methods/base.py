"""The Distiller contract (DESIGN.md sec. 3): a method is losses only; the loop owns everything else.

`Distiller` declares everything train/build.py and train/loop.py use, with defaults, so a method overrides only what
it needs (a method with a single loss implements `student_loss` alone). Run facts reach a method through the typed
`RunContext`; side effects it wants from the loop (a stage export) it asks for by returning events from `after_step`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..core.denoiser import Cond, Denoiser, GuidedDenoiser
from ..core.dist import Dist
from ..core.samplers import recipe_sample
from ..core.schedule import NoiseSchedule

if TYPE_CHECKING:
    from ..data.prompts import PromptData


class NoiseSource:
    """Random draws for the global batch, sliced to this process's rows.

    W processes with batch B draw exactly what one process with batch W*B would (rows rank::W, the same rows the
    data order gives this process), so multi-process training matches single-process training sample for sample.
    """

    def __init__(self, generator: torch.Generator, rank: int = 0, world: int = 1, device=None):
        self.generator, self.rank, self.world, self.device = generator, rank, world, device

    def _rows(self, x):
        return x[self.rank :: self.world].to(self.device)

    # Drawn on the generator's own device (the loop's is on the training device: no host draw and copy per call).
    def randn(self, n: int, *shape) -> torch.Tensor:
        return self._rows(torch.randn((n * self.world, *shape), generator=self.generator, device=self.generator.device))

    def rand(self, n: int, *shape) -> torch.Tensor:
        return self._rows(torch.rand((n * self.world, *shape), generator=self.generator, device=self.generator.device))

    def randint(self, low: int, high: int, n: int) -> torch.Tensor:
        return self._rows(torch.randint(low, high, (n * self.world,), generator=self.generator,
                                        device=self.generator.device))


@dataclass
class Batch:
    """One micro-batch: encoded prompts, their unconditional twin, and real latents when the method wants data."""

    cond: Cond
    uncond: Cond
    prompts: list[str]
    latent_shape: tuple[int, ...]  # (B, C, h, w) of the student's samples
    latents: torch.Tensor | None = None  # real VAE latents (GAN head, regression), when configured
    noise: NoiseSource | None = None  # set by the loop; methods draw ALL randomness through the helpers below
    # cond for the rows of `latents`: each real image's own size conditioning (SDXL time_ids,
    # FamilyModel.with_image_sizes); None = cond. Samples the student or teacher generates keep `cond`.
    real_cond: Cond | None = None

    @property
    def size(self) -> int:
        return len(self.prompts)

    @property
    def data_cond(self) -> Cond:
        """The conditioning of every network call on (noised) real latents: real_cond, else cond."""
        return self.real_cond if self.real_cond is not None else self.cond

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
    """The networks a method asked for; all share one frozen base network, a UNet or a transformer (adapters by
    name): `denoiser`."""

    denoiser: torch.nn.Module
    schedule: NoiseSchedule
    teacher: GuidedDenoiser  # base, adapters disabled, with CFG at the method's guidance scale
    student: Denoiser  # adapter "student"
    fake_score: Denoiser | None = None  # adapter "fake_score"
    target: Denoiser | None = None  # adapter "target" (EMA / node / stop-grad target)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def unet(self) -> torch.nn.Module:
        """The former name of `denoiser` (it holds SD3 / FLUX transformers too), kept for scripts that read it."""
        return self.denoiser


@dataclass
class RunContext:
    """The run's facts a method may read: train/build.py fills the model's and data's, the loop the run's."""

    latent_shape: tuple[int, ...] = ()  # (C, h, w) of one student sample
    uncond: Cond | None = None  # the empty prompt, encoded (batch of 1)
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None  # VAE latents -> images in [-1, 1]
    family: Any = None  # the FamilyModel (models/base.py): per-family method defaults through defaults_for()
    prompt_data: PromptData | None = None  # every encoded prompt, for work a method does once (dmd's ODE pairs)
    run_dir: Path | None = None  # the run folder, for artifacts a method keeps beside the run (DisBack's nodes)
    max_steps: int | None = None  # loop.max_steps (stage schedules)
    dist: Dist = field(default_factory=Dist)  # the process group, for decisions every process must share
    models: dict[str, Any] = field(default_factory=dict)  # what models_to_load named, loaded by train/build.py


@dataclass
class LossOut:
    """Per-sample loss (shape [B]) plus scalar logs. `samples` are the detached student outputs; `critic_inputs` is
    what the first critic update of the same micro-batch receives (the loop hands it to critic_loss unchanged)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)
    samples: torch.Tensor | None = None
    critic_inputs: Any = None


@dataclass(frozen=True)
class ExportStage:
    """Event: export the student now as RUN/<name>/, its recipe updated with `recipe_overrides` (a stage's LoRA)."""

    name: str
    recipe_overrides: dict | None = None


@dataclass(frozen=True)
class ResetOptimizer:
    """Event: forget `phase`'s optimizer state (Adam's moments and step count), as a run started here would.

    For a stage whose loss has another scale: Adam's second moment (beta2 0.999) remembers the old gradients for
    about a thousand updates, so gradients far larger than it holds move each weight by many times the learning rate
    (up to lr / sqrt(n (1 - beta2)) at the new loss's n-th update) where a fresh optimizer moves it by about lr.
    """

    phase: str


Event = ExportStage | ResetOptimizer  # what after_step may return; the loop carries each out in order


def trailing_ddim_recipe(steps: int) -> dict:
    """Sampler fields of a recipe: trailing DDIM at `steps` steps, guidance 0 (the student has CFG baked in)."""
    return {
        "scheduler_class": "DDIMScheduler",
        "scheduler_config": {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False},
        "timesteps": None, "num_inference_steps": steps, "guidance_scale": 0.0, "eta": 0.0,
    }


def flow_euler_recipe(schedule, timesteps, family=None) -> dict:
    """Sampler fields of a recipe for a flow teacher: FlowMatchEulerDiscreteScheduler (deterministic Euler) handed the
    unshifted sigmas of the student's timesteps, so the pipeline's shift lands on exactly the trained sigmas; guidance
    is the family's (0: CFG baked in; FLUX-dev: its embedded guidance value)."""
    return {
        "scheduler_class": "FlowMatchEulerDiscreteScheduler", **schedule.pipeline_sampling(timesteps), "timesteps": None,
        "guidance_scale": family.recipe_guidance_scale() if family is not None else 0.0, "eta": 0.0,
    }


def is_flow(schedule) -> bool:
    """A rectified-flow teacher (alpha = 1 - sigma, velocity prediction)."""
    return schedule.prediction_type == "flow"


class Distiller:
    """Base class of every method: what the builder and the loop use, with defaults.

    The builder creates the adapters `extra_adapters` besides "student" (ranks by `adapter_ranks`), constructs the
    distiller with (method config, schedule), calls `setup(nets, ctx)`, sets the teacher's default CFG scale to
    `guidance_scale`, and gives each optimizer phase the adapters in `trainable` plus `parameters(phase)`. Each
    iteration the loop calls `student_loss` per micro-batch, then `critic_loss` per critic update (the first with
    each micro-batch's `LossOut.critic_inputs`, later ones with None and a fresh batch; `critic_updates` of them),
    then `after_step` once, and carries out the events it returns. Each optimizer step runs at the phase's rate
    (warm-up included) times `lr_scale(phase)`. Models besides the teacher come from `models_to_load` (the builder
    loads them into `RunContext.models`). Exports take `recipe(family)`; preview images
    `sample(...)`; checkpoints `state_dict()` / `load_state_dict()`.
    """

    # Adapters the builder must create on the shared base, besides "student" (e.g. ("fake_score",)).
    extra_adapters: ClassVar[tuple[str, ...]] = ()
    # Which adapters each optimizer phase trains: {"student": ("student",), "critic": ("fake_score",)}.
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {"student": ("student",)}
    # Rank of each extra adapter: "student" (lora.rank) or "critic" (lora.critic_rank); unlisted ones are critics.
    # A target mirrors the student by default (EMA / stop-grad copies).
    adapter_ranks: ClassVar[dict[str, str]] = {"target": "student"}
    # The teacher's default CFG scale (diffusers' convention, 1 = none); read by the builder after setup().
    guidance_scale: float = 1.0
    # Critic updates per student update (DMD2's two-time-scale rule); the loop runs that many critic phases.
    critic_updates: int = 1
    # Teacher parameterisations the method can distil: DDPM eps / v / x0 and, where declared, rectified flow ("flow").
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    @classmethod
    def models_to_load(cls, cfg) -> dict[str, Callable]:
        """Models beyond the teacher the method uses (a reward model): name -> loader(device). A method never loads a
        model itself; train/build.py calls each loader and hands the result in `RunContext.models[name]`."""
        return {}

    @classmethod
    def check_parameterisation(cls, cfg, parameterisation: str, families_with=None) -> None:
        """Raise ConfigError (one line) when this method, so configured, cannot distil a `parameterisation` teacher.

        families_with(parameterisations) names the families it can run on, for the message."""
        if parameterisation not in cls.parameterisations:
            cls._refuse(cfg, parameterisation, cls.parameterisations, families_with)

    @classmethod
    def _refuse(cls, cfg, parameterisation, supported, families_with, why: str = "") -> None:
        from ..errors import ConfigError

        names = families_with(supported) if families_with else list(supported)
        raise ConfigError(f"method {cfg.name!r}{why} cannot distil a {parameterisation!r} teacher: it supports the "
                          f"families {', '.join(names)} ({'/'.join(supported)} parameterisation)")

    def __init__(self, cfg, schedule: NoiseSchedule):
        self.cfg, self.schedule = cfg, schedule
        self.T = schedule.num_train_timesteps
        self.ctx = RunContext()

    def setup(self, nets: Nets, ctx: RunContext) -> None:
        """Once, after the adapters exist: load initial weights, build method-owned modules. Keeps `ctx`, whose run
        facts (run_dir, max_steps, dist, prompt_data) the builder and the loop fill in before the first step."""
        self.ctx = ctx

    def cfg_scales(self) -> dict[str, float]:
        """The teacher CFG scales this run will use, by setting name (after setup: defaults resolved)."""
        return {}

    def check_cfg(self, family) -> None:
        """A guidance-distilled teacher (FLUX.1-dev: the guidance scale is an input of the network) takes no real CFG
        on top: refuse a scale above 1 in one line naming the setting. Each method defaults to 1 on such a teacher."""
        from ..config import ConfigError

        if not getattr(family, "guidance_distilled", False):
            return
        for key, w in self.cfg_scales().items():
            if w is not None and w > 1:
                raise ConfigError(f"{key}={w:g}: the {family.name} teacher is guidance-distilled (its guidance "
                                  f"embedding already gets {family.recipe_guidance_scale():g}), so real CFG on top "
                                  f"of it is refused; set {key}=1 (its default on this teacher)")

    def parameters(self, phase: str) -> list[torch.nn.Parameter]:
        """Trainable tensors of phase `phase` besides the adapters in `trainable` (a GAN head)."""
        return []

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut | None:
        """Per-sample loss of the student update; None freezes the student this step."""
        raise NotImplementedError(f"{type(self).__name__} must implement student_loss")

    def critic_loss(self, nets: Nets, batch: Batch, inputs: Any) -> LossOut | None:
        """Per-sample loss of one critic update (fake score, discriminator); None: no critic update this step."""
        return None

    def after_step(self, nets: Nets, step: int) -> list[Event]:
        """After iteration `step`'s updates (EMA target, node switch); returns what the loop should do now."""
        return []

    def lr_scale(self, phase: str) -> float:
        """Factor on optimizer phase `phase`'s learning rate (after warm-up) for the update now being made; the loop
        asks before every optimizer step, so a scale that follows the method's state survives a resume with it."""
        return 1.0

    def recipe(self, family) -> dict:
        """Sampler fields of the exported recipe: scheduler_class, scheduler_config, timesteps, num_inference_steps,
        guidance_scale, eta (the loop adds the run's own)."""
        return trailing_ddim_recipe(1)

    def sample(self, nets: Nets, cond, x_T, generator=None, steps: int | None = None) -> torch.Tensor:
        """The student's latents from x_T, exactly as the recipe's diffusers scheduler runs it."""
        return recipe_sample(nets.student, x_T, cond, self.schedule, self.recipe(None), generator, steps)

    def state_dict(self) -> dict:
        """What a checkpoint must keep beyond the adapters and optimizers."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CriticHeadState(Distiller):
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
