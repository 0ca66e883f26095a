"""Trajectory-segmented consistency distillation (Hyper-SD TSCD, arXiv 2404.13686 sec. 3.1), with LCM (Luo et al.
2023: one segment, LCM boundary scalings) and PCM (Wang et al. 2024: fixed k, segment edge) as configurations of
the same loss, and the one-step unified LoRA of Hyper-SD sec. 3.3 (`tscd_unified`: the same loss plus DMD's
distribution matching at t = 999, sampled with TCDScheduler at 1 to 8 steps).

For t on the skipping grid, the teacher solves one DDIM step with CFG from t to t' = max(t - delta, t_b), the
segment start; the student at t and the target at t' are both mapped by DDIM to the end point t_end in the
segment, and their distance is the loss. The network never sees t_end: the map is analytic (DDIM), so the
student stays an ordinary eps-prediction UNet that a plain diffusers scheduler can run.

Optional adversarial term (Hyper-SD's "MSE + adversarial" hybrid, discriminator as in PCM): both sides of the
consistency pair are noised forward into their segment on the teacher's path and judged by small heads on the frozen
teacher's features (a UNet's down and mid blocks, a transformer's blocks up to its middle: methods.gan); its weight is
set per stage, growing as k falls. Its real side is the consistency target (PCM) or, with adv_real=data, the batch's
real latents noised to the same timestep.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import ClassVar

import torch

from ..core.denoiser import DenoiserOut
from ..core.ema import ema_update_
from ..core.samplers import ddim_sample, recipe_sample, tcd_sample
from ..core.solvers import (
    ddim_step,
    lcm_boundary_scalings,
    lcm_origin_timesteps,
    noise_forward_path,
    segment_start,
    tcd_timesteps,
    trailing_timesteps,
)
from ..errors import ConfigError
from ..registry import register_method
from .base import (
    Batch,
    CriticHeadState,
    Event,
    ExportStage,
    LossOut,
    Nets,
    ResetOptimizer,
    RunContext,
    flow_euler_recipe,
    is_flow,
    trailing_ddim_recipe,
)
from .config import MethodConfig
from .dm import dm_loss, dm_timestep_bounds, fake_score_loss, through_frozen_nets
from .gan import FeatureHeads, feature_channels, hinge_discriminator_loss, hinge_generator_loss, teacher_features

log = logging.getLogger(__name__)


@dataclass
class TSCDConfig(MethodConfig):
    name: str = "tscd"
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # k per stage (Hyper-SD progressive)
    stage_steps: list[int] = field(default_factory=list)  # student updates per stage; empty = equal split
    num_ddim_timesteps: int = 40  # skipping grid N, delta = T / N; a multiple of every k puts segment edges on it
    end_point: str = "random"  # random: t_end ~ U[t_b, t'] (TSCD, Alg. 1) | edge: t_end = t_b (PCM, LCM)
    boundary: str = "ddim"  # ddim | lcm (LCM's c_skip/c_out when the end point is clean data)
    # Teacher CFG scale w ~ U[min, max] (diffusers convention), baked into the student; null = the default: the
    # class's DEFAULT_GUIDANCE, or 1 (no CFG) on a guidance-distilled teacher (FLUX.1-dev).
    guidance_min: float | None = None
    guidance_max: float | None = None
    target: str = "ema"  # ema (Hyper-SD) | online (stop-grad student: LCM-LoRA, PCM)
    ema_decay: float = 0.95
    loss: str = "huber"  # huber (pseudo-Huber, LCM/PCM) | mse (Hyper-SD)
    huber_c: float = 0.001
    consistency_weight: list[float] = field(default_factory=list)  # per stage; empty = 1 in every stage
    adv_weight: list[float] = field(default_factory=list)  # per stage; empty or all 0 = no adversarial term
    adv_head_channels: int = 64  # width of each discriminator head
    # The discriminator's real side: target (the consistency target noised into the segment, PCM) | data (the batch's
    # real latents noised to the same t_adv: judges the student against the data, not against its own EMA target).
    adv_real: str = "target"
    inference_steps: int = 0  # recipe steps for the final LoRA; 0 = k of the last stage (LCM preset: 4)
    init_lora: str = ""  # start the student (and target) from a stepdistill LoRA folder, e.g. a previous RUN/final

    def validate(self):
        if not self.segments or any(k < 1 or 1000 % k for k in self.segments):
            raise ConfigError(f"method.segments must be divisors of 1000 such as [8, 4, 2, 1] (got {self.segments})")
        if self.num_ddim_timesteps < 1 or 1000 % self.num_ddim_timesteps:
            raise ConfigError(f"method.num_ddim_timesteps must divide 1000, e.g. 40 or 50 (got {self.num_ddim_timesteps})")
        off_grid = [k for k in self.segments if self.num_ddim_timesteps % k]
        if off_grid:
            raise ConfigError(
                f"method.num_ddim_timesteps={self.num_ddim_timesteps} is not a multiple of k={off_grid}: segment edges "
                "would fall between grid points and off the k-step schedulers' timesteps; use e.g. 40 for [8, 4, 2, 1]"
            )
        for key in ("stage_steps", "consistency_weight", "adv_weight"):
            value = getattr(self, key)
            if value and len(value) != len(self.segments):
                raise ConfigError(f"method.{key} needs one entry per method.segments entry (or leave it empty)")
            if any(v < 0 for v in value):
                raise ConfigError(f"method.{key} entries must be >= 0 (got {value})")
        for key, value, allowed in (("end_point", self.end_point, ("random", "edge")),
                                    ("boundary", self.boundary, ("ddim", "lcm")),
                                    ("target", self.target, ("ema", "online")),
                                    ("loss", self.loss, ("huber", "mse")),
                                    ("adv_real", self.adv_real, ("target", "data"))):
            if value not in allowed:
                raise ConfigError(f"method.{key} must be one of {list(allowed)} (got {value!r})")
        if self.adv_real != "target" and not any(w > 0 for w in self.adv_weight):
            raise ConfigError(f"method.adv_real={self.adv_real!r} has no effect without the adversarial term: set "
                              "method.adv_weight (one weight per stage) or drop adv_real")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"method.ema_decay must be in [0, 1) (got {self.ema_decay})")
        lo, hi = self.default_guidance()
        if (hi if self.guidance_max is None else self.guidance_max) < (lo if self.guidance_min is None else self.guidance_min):
            raise ConfigError("method.guidance_min must be <= method.guidance_max")
        if self.init_lora and not Path(self.init_lora).is_dir():
            raise ConfigError(f"method.init_lora={self.init_lora!r} is not a folder: pass a LoRA folder stepdistill "
                              "exported, e.g. runs/tscd/final")

    DEFAULT_GUIDANCE: ClassVar[tuple[float, float]] = (3.0, 8.0)

    def default_guidance(self, guidance_distilled: bool = False) -> tuple[float, float]:
        """(guidance_min, guidance_max) when left null: 1 / 1 on a guidance-distilled teacher."""
        return (1.0, 1.0) if guidance_distilled else self.DEFAULT_GUIDANCE

    def resolve_guidance(self, guidance_distilled: bool) -> None:
        """Fill null guidance_min / guidance_max with the defaults for this teacher."""
        lo, hi = self.default_guidance(guidance_distilled)
        self.guidance_min = lo if self.guidance_min is None else self.guidance_min
        self.guidance_max = hi if self.guidance_max is None else self.guidance_max
        # (Above 1 on a guidance-distilled teacher, Distiller.check_cfg's refusal is the one to read.)
        if self.guidance_min > self.guidance_max and not (guidance_distilled and self.guidance_min > 1):
            raise ConfigError(f"method.guidance_min={self.guidance_min:g} is above method.guidance_max="
                              f"{self.guidance_max:g} (a null one takes {lo:g} / {hi:g} on this teacher): set both")


@dataclass
class LCMConfig(TSCDConfig):
    """LCM-LoRA: one segment ending at x0 with LCM's boundary scalings, online target, skipping grid of 50."""

    name: str = "lcm"
    segments: list[int] = field(default_factory=lambda: [1])
    num_ddim_timesteps: int = 50
    end_point: str = "edge"
    boundary: str = "lcm"
    target: str = "online"
    inference_steps: int = 4
    DEFAULT_GUIDANCE: ClassVar[tuple[float, float]] = (3.0, 13.0)


@dataclass
class UnifiedConfig(TSCDConfig):
    """Hyper-SD's one-step unified LoRA: TSCD at k = 1 (random end point, as TCD) plus DMD at t = 999; TCDScheduler."""

    name: str = "tscd_unified"
    segments: list[int] = field(default_factory=lambda: [1])
    # Weight of the distribution-matching term against the consistency term: one for every stage, or one per stage;
    # 0 in a stage leaves it consistency only, without fake-score updates (a DM stage after consistency stages). (ours)
    dm_weight: list[float] = field(default_factory=lambda: [1.0])
    # Factor on the student's optim.lr in a stage with the DM term (the critic keeps its own rate): a DM stage after
    # consistency stages moves the student off the data at the consistency stages' rate (docs/tscd.md). (ours)
    dm_lr_scale: float = 1.0
    dm_guidance_scale: float | None = None  # teacher CFG in the DM term; null = w ~ U[guidance_min, guidance_max]
    dm_t_min: float = 0.02  # DM term: t ~ U{dm_t_min T, ..., dm_t_max T} (DMD2's min/max_step_percent)
    dm_t_max: float = 0.98
    critic_updates_per_student_update: int = 1
    # Iterations at the start of each stage where the DM term turns on (dm_weight 0 -> > 0, or the run's start) in which
    # the student is frozen and only the fake score trains on the student's samples (critic_updates_per_student_update
    # updates each): without it the fake score starts as the teacher and the first DM updates are a CFG push, not
    # distribution matching (DMD2 keeps it fitted with several fake-score updates per student update). They count
    # towards the stage's steps. (ours)
    dm_critic_warmup: int = 0
    tcd_eta: float = 0.3  # recipe eta (gamma) of TCDScheduler; TCD's default; Hyper-SD's card shows 1.0
    inference_steps: int = 1
    # The DM term's sample: the student's dm_steps-step sample from pure noise on the recipe's timesteps (DDIM steps:
    # needs tcd_eta 0 above one step), the gradient through every step; 0 = the recipe's inference_steps. One step is
    # Hyper-SD's unified LoRA. (ours)
    dm_steps: int = 0

    def validate(self):
        super().validate()
        if not 0 <= self.dm_t_min < self.dm_t_max <= 1:
            raise ConfigError(f"need 0 <= method.dm_t_min < method.dm_t_max <= 1 (got {self.dm_t_min}, {self.dm_t_max})")
        if not 0 <= self.tcd_eta <= 1:
            raise ConfigError(f"method.tcd_eta must be in [0, 1] (got {self.tcd_eta})")
        if self.critic_updates_per_student_update < 1:
            raise ConfigError("method.critic_updates_per_student_update must be >= 1")
        if len(self.dm_weight) not in (1, len(self.segments)):
            raise ConfigError(f"method.dm_weight needs one weight, or one per method.segments entry "
                              f"({len(self.segments)}; got {self.dm_weight})")
        if any(w < 0 for w in self.dm_weight):
            raise ConfigError(f"method.dm_weight entries must be >= 0 (got {self.dm_weight})")
        if not any(w > 0 for w in self.dm_weight):
            raise ConfigError("method.dm_weight is 0 in every stage, so the run has no DM term: use method.name=tscd "
                              "(or lcm) for a consistency-only student")
        if not (self.dm_lr_scale > 0 and math.isfinite(self.dm_lr_scale)):
            raise ConfigError(f"method.dm_lr_scale must be a finite number > 0, 1 = optim.lr unchanged "
                              f"(got {self.dm_lr_scale})")
        w = self.dm_guidance_scale
        if w is not None and not (w >= 0 and math.isfinite(w)):
            raise ConfigError(f"method.dm_guidance_scale must be a finite number >= 0 (1 = no CFG), or null for the "
                              f"consistency term's U[guidance_min, guidance_max] (got {w})")
        if self.dm_critic_warmup < 0:
            raise ConfigError(f"method.dm_critic_warmup must be >= 0 critic-only iterations (got {self.dm_critic_warmup})")
        if self.stage_steps:
            short = [n for n, start in zip(self.stage_steps, self.dm_starts()) if start and n <= self.dm_critic_warmup]
            if short:
                raise ConfigError(f"method.dm_critic_warmup={self.dm_critic_warmup} leaves no student update in a DM "
                                  f"stage of {short[0]} steps: make it smaller than that stage's stage_steps")
        if not 0 <= self.dm_steps <= self.num_ddim_timesteps:
            raise ConfigError(f"method.dm_steps must be in [0, num_ddim_timesteps={self.num_ddim_timesteps}] "
                              f"(got {self.dm_steps}; 0 = inference_steps)")
        if self.dm_sample_steps > 1 and self.tcd_eta != 0:
            raise ConfigError(f"the DM term's {self.dm_sample_steps}-step sample takes deterministic DDIM steps, but the "
                              f"recipe's TCD eta is {self.tcd_eta}: set method.tcd_eta=0 (or method.dm_steps=1)")

    @property
    def dm_sample_steps(self) -> int:
        return self.dm_steps or self.inference_steps or 1

    def dm_weight_of(self, stage: int) -> float:
        return self.dm_weight[stage] if len(self.dm_weight) > 1 else self.dm_weight[0]

    def dm_starts(self) -> list[bool]:
        """Per stage: whether the DM term turns on there (its weight > 0, and 0 in the stage before or none before)."""
        return [self.dm_weight_of(i) > 0 and (i == 0 or self.dm_weight_of(i - 1) == 0)
                for i in range(len(self.segments))]


# ---- the maths ------------------------------------------------------------------------------------------------

def pseudo_huber(a, b, c: float):
    """sqrt(|a - b|^2 + c^2) - c per element (Song & Dhariwal 2023, eq. 6), averaged per sample."""
    return (((a - b) ** 2 + c**2).sqrt() - c).flatten(1).mean(1)


def mse(a, b):
    """|a - b|^2 averaged per sample."""
    return ((a - b) ** 2).flatten(1).mean(1)


def stage_bounds(segments, stage_steps, max_steps):
    """Cumulative end step of each stage."""
    steps = list(stage_steps) or [max_steps // len(segments)] * len(segments)
    if not stage_steps:
        steps[-1] += max_steps - sum(steps)
    ends, total = [], 0
    for s in steps:
        total += s
        ends.append(total)
    return ends


def _check_stage_budget(stage_steps, max_steps):
    """Warn when loop.max_steps and method.stage_steps disagree: the stages past max_steps do not run in this leg
    (running in legs is fine), or the last stage runs past its stated length."""
    planned = sum(stage_steps)
    if not stage_steps or max_steps is None or planned == max_steps:
        return
    if max_steps < planned:
        stage = next(i for i, end in enumerate(accumulate(stage_steps)) if max_steps < end) + 1
        log.warning("loop.max_steps=%d ends before method.stage_steps (sum %d) do: this run stops in stage %d; "
                    "set loop.max_steps=%d for the whole schedule", max_steps, planned, stage, planned)
    else:
        log.warning("loop.max_steps=%d runs past method.stage_steps (sum %d): the last stage gets %d more updates "
                    "than it states; set loop.max_steps=%d or lengthen its entry", max_steps, planned,
                    max_steps - planned, planned)


def _bcast(v, ndim):
    return v.reshape(-1, *([1] * (ndim - 1)))


# ---- starting from a previous LoRA ---------------------------------------------------------------------------

def start_from_lora(unet, folder, adapter: str = "student") -> None:
    """Load a stepdistill LoRA folder (diffusers file + alpha metadata) into `adapter`; rank and alpha must match."""
    from ..core.lora import adapter_config, load_adapter_state_dict
    from ..export import load_diffusers_lora

    state, rank, alpha = load_diffusers_lora(folder)
    want_rank, want_alpha, _ = adapter_config(unet, adapter)
    if (rank, float(alpha)) != (want_rank, float(want_alpha)):
        raise ConfigError(
            f"the LoRA in {folder} has rank {rank} and alpha {alpha:g}, but this run's adapter has rank {want_rank} and "
            f"alpha {want_alpha:g}: set lora.rank={rank} lora.alpha={alpha:g}"
        )
    load_adapter_state_dict(unet, adapter, state)


# ---- the method ----------------------------------------------------------------------------------------------

@dataclass
class CriticInputs:
    """What a student update leaves for the first critic update of its micro-batch (LossOut.critic_inputs)."""

    samples: torch.Tensor | None = None  # the student's detached one-step x0 (tscd_unified's fake score)
    adv: tuple | None = None  # (fake, real, t_adv): both sides of the consistency pair noised for the discriminator


class ConsistencyDistiller(CriticHeadState):
    """On a flow teacher (sd3, flux) the same loss runs unchanged: with alpha = 1 - sigma every DDIM step of the pair is
    an exact Euler step; the recipe is FlowMatchEulerDiscreteScheduler at the segment edges."""

    head_state_key = "adv_heads"
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "flow")
    extra_adapters: ClassVar[tuple[str, ...]] = ("target",)
    # The critic phase trains only the discriminator heads (parameters("critic")), when a stage has adv_weight > 0.
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {"student": ("student",), "critic": ()}

    def __init__(self, cfg: TSCDConfig, schedule):
        super().__init__(cfg, schedule)
        if any(self.T % k for k in cfg.segments) or self.T % cfg.num_ddim_timesteps:
            raise ConfigError(f"method.segments {cfg.segments} and method.num_ddim_timesteps must divide the "
                              f"teacher's {self.T} timesteps")
        if is_flow(schedule):
            # Every stage's export must be a recipe the family's stock pipeline runs (WanPipeline takes no sigmas: only
            # its own step-count grids, on which trailing segment edges of k > 1 do not lie).
            for k in dict.fromkeys([*cfg.segments, cfg.inference_steps or cfg.segments[-1]]):
                try:
                    schedule.pipeline_sampling(trailing_timesteps(k, self.T))
                except ValueError as err:
                    raise ConfigError(f"method.segments {list(cfg.segments)}: a {k}-segment student's trailing timesteps "
                                      f"are no recipe this family's pipeline runs ({err}); use segments [1]") from None
        self.grid = torch.tensor(lcm_origin_timesteps(cfg.num_ddim_timesteps, self.T))  # t_n, descending
        self.delta = self.T // cfg.num_ddim_timesteps
        # The configured scales (null = the teacher's default): resolved now for a plain teacher, again in setup()
        # once the family says whether it is guidance-distilled.
        self._guidance_set = (cfg.guidance_min, cfg.guidance_max)
        cfg.resolve_guidance(False)
        self.head = None
        self._stage = 0

    @classmethod
    def check_parameterisation(cls, cfg, parameterisation, families_with=None):
        super().check_parameterisation(cfg, parameterisation, families_with)
        if parameterisation != "flow":
            return
        ddpm = ("epsilon", "v_prediction", "sample")
        if cfg.boundary == "lcm":  # LCM's c_skip / c_out are defined on DDPM timesteps
            cls._refuse(cfg, parameterisation, ddpm, families_with, " with method.boundary=lcm (LCM's boundary scalings)")

    # ---- set-up and state ----
    def setup(self, nets: Nets, ctx: RunContext):
        from ..core.lora import copy_adapter

        super().setup(nets, ctx)
        self.cfg.guidance_min, self.cfg.guidance_max = self._guidance_set
        self.cfg.resolve_guidance(bool(getattr(ctx.family, "guidance_distilled", False)))
        self._budget_checked = False
        if self.cfg.init_lora:
            start_from_lora(nets.denoiser, self.cfg.init_lora)
        copy_adapter(nets.denoiser, "student", "target")
        self.pairs = _adapter_pairs(nets.denoiser, "target", "student")
        if any(w > 0 for w in self.cfg.adv_weight):
            self.head = FeatureHeads(feature_channels(nets.denoiser), self.cfg.adv_head_channels).to(nets.device)

    def cfg_scales(self) -> dict[str, float]:
        return {"method.guidance_min": self.cfg.guidance_min, "method.guidance_max": self.cfg.guidance_max}

    def stage(self, step: int, max_steps: int) -> int:
        ends = stage_bounds(self.cfg.segments, self.cfg.stage_steps, max_steps)
        return next((i for i, e in enumerate(ends) if step < e), len(ends) - 1)

    def _weights(self, i: int) -> tuple[float, float]:
        """(consistency, adversarial) weights of stage i."""
        cfg = self.cfg
        return (cfg.consistency_weight[i] if cfg.consistency_weight else 1.0,
                cfg.adv_weight[i] if cfg.adv_weight else 0.0)

    # ---- the consistency pair ----
    def _to_end(self, x_t, t, out, t_end):
        """Map a prediction at t to the end point t_end: DDIM, or LCM's boundary form when t_end is clean data."""
        ndim = x_t.ndim
        alpha_end, sigma_end = self.schedule.alpha_sigma(t_end, ndim)
        x_end = ddim_step(out.x0, out.eps, alpha_end.to(x_t.device), sigma_end.to(x_t.device))
        if self.cfg.boundary == "lcm":
            c_skip, c_out = lcm_boundary_scalings(_bcast(t, ndim).clamp(min=0))
            lcm = c_skip * x_t.double() + c_out * out.x0
            x_end = torch.where(_bcast(t_end < 0, ndim), lcm, x_end)
        return x_end

    def consistency_pair(self, nets: Nets, batch: Batch, k: int, grad: bool = True, extra=None):
        """(pred, target, t_end): the student's and the target's images of x_t at the end point of t's segment.

        `extra`, a callable drawing more (x, t) rows for the student after the pair's own draws, has them run in the
        same batched student call; their DenoiserOut comes back as a fourth item (tscd_unified's one-step sample).
        """
        x_t, t, t_end, target = self._pair_inputs(nets, batch, k)
        x, t_all, cond = x_t, t, batch.data_cond  # the pair is noised real data when the run has images
        if extra:  # generated rows: the run's own size conditioning
            x_e, t_e = extra()
            x, t_all, cond = torch.cat([x_t, x_e]), torch.cat([t, t_e]), cond.cat(batch.cond)
        n = x_t.shape[0]
        with torch.set_grad_enabled(grad):
            out = nets.student(x, t_all, cond)
            pred = self._to_end(x_t, t, DenoiserOut(out.x0[:n], out.eps[:n]), t_end)
        if extra:
            return pred, target, t_end, DenoiserOut(out.x0[n:], out.eps[n:])
        return pred, target, t_end

    def _pair_inputs(self, nets: Nets, batch: Batch, k: int):
        """(x_t, t, t_end, target) of a consistency pair: every draw and every no-grad pass it needs."""
        cfg, device = self.cfg, nets.device
        x0_data = self._data_x0(nets, batch)
        t = self.grid[batch.randint(0, len(self.grid), device=self.grid.device)].to(device)  # grid indexed where it lives
        t_b = segment_start(t, k, self.T)
        t_prev = torch.maximum(t - self.delta, t_b)
        if cfg.end_point == "random":
            u = batch.rand(device)
            t_end = t_b + torch.floor(u * (t_prev - t_b + 1).double()).long()
        else:
            t_end = t_b
        eps = batch.randn(*x0_data.shape[1:], device=device).to(x0_data.dtype)
        x_t = self.schedule.add_noise(x0_data, eps, t)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * batch.rand(device)
        # Real latents: each image's own size conditioning in every call on its trajectory (diffusers'
        # train_lcm_distill_sdxl_wds.py does the same); a teacher sample: batch.cond (data_cond is cond then).
        cond = batch.data_cond

        with torch.no_grad():
            teacher = nets.teacher(x_t, t, cond, guidance_scale=w)
            a_prev, s_prev = self.schedule.alpha_sigma(t_prev, x_t.ndim)
            x_prev = ddim_step(teacher.x0, teacher.eps, a_prev.to(device), s_prev.to(device)).to(x_t.dtype)
            target_net = nets.target if cfg.target == "ema" else nets.student
            target_out = target_net(x_prev, t_prev.clamp(min=0), cond)
            target = self._to_end(x_prev, t_prev, target_out, t_end)
            # The teacher already reached the end point: the target is x_prev itself (boundary condition).
            target = torch.where(_bcast(t_prev == t_end, x_t.ndim), x_prev.double(), target)
        return x_t, t, t_end, target

    def distance(self, pred, target):
        if self.cfg.loss == "huber":
            return pseudo_huber(pred.float(), target.float(), self.cfg.huber_c)
        return mse(pred.float(), target.float())

    # ---- the adversarial term ----
    def _adv_inputs(self, nets: Nets, batch: Batch, pred, target, t_end, k: int):
        """Both sides noised forward from t_end to t_adv ~ U[t_end + 1, t_end + T/k] with independent noise (PCM); with
        adv_real=data the real side is the batch's data noised from x0 to t_adv (the same draws, so runs line up)."""
        device, ndim = nets.device, pred.ndim
        width = self.T // k
        t_adv = (t_end + 1 + torch.floor(batch.rand(device) * width).long()).clamp(max=self.T - 1)
        z_fake = batch.randn(*pred.shape[1:], device=device)
        z_real = batch.randn(*pred.shape[1:], device=device)
        # On the teacher's own path (DDPM or flow), so the discriminator sees x_t as the teacher was trained on.
        end = [v.to(device) for v in self.schedule.alpha_sigma(t_end, ndim)]
        adv = [v.to(device) for v in self.schedule.alpha_sigma(t_adv, ndim)]
        fake = noise_forward_path(pred, *end, *adv, z_fake)
        if self.cfg.adv_real == "data":  # q(x_t_adv | x0) of the real latents: the marginal the student should reach
            clean = [v.to(device) for v in self.schedule.alpha_sigma(torch.full_like(t_adv, -1), ndim)]
            real = noise_forward_path(self._real_latents(batch).to(device), *clean, *adv, z_real)
        else:
            real = noise_forward_path(target, *end, *adv, z_real)
        return fake, real, t_adv

    @staticmethod
    def _real_latents(batch: Batch):
        if batch.latents is None:
            raise ConfigError("method.adv_real=data needs real latents: set data.images=FOLDER (image-caption pairs, "
                              "or toy:N for the toy world) or use method.adv_real=target")
        return batch.latents

    def _logits(self, nets: Nets, x_adv, t_adv, cond):
        return self.head(teacher_features(nets.teacher.denoiser, x_adv, t_adv, cond))

    # ---- the losses ----
    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut:
        return self._consistency_loss(nets, batch, step)[0]

    def _consistency_loss(self, nets: Nets, batch: Batch, step: int, extra=None):
        """(LossOut, DenoiserOut of `extra`'s rows or None): the consistency (+ adversarial) term; `extra` as in
        consistency_pair, taken only in a stage without the adversarial term (whose draws come before extra's)."""
        i = self.stage(step, self.ctx.max_steps)
        self._stage = i
        k = self.cfg.segments[i]
        w_cons, w_adv = self._weights(i)
        extra_out = None
        if extra is not None and w_adv == 0:
            pred, target, t_end, extra_out = self.consistency_pair(nets, batch, k, extra=extra)
        else:
            pred, target, t_end = self.consistency_pair(nets, batch, k)
        cons = self.distance(pred, target)
        loss = w_cons * cons
        logs = {"consistency_loss": cons.detach().mean(), "k": float(k)}
        samples, inputs = None, None
        if w_adv > 0:
            fake, real, t_adv = self._adv_inputs(nets, batch, pred, target, t_end, k)
            g = through_frozen_nets(lambda x: hinge_generator_loss(self._logits(nets, x, t_adv, batch.data_cond)), fake)
            loss = loss + w_adv * g
            logs["adv_g_loss"] = g.detach().mean()
            samples = fake.detach()
            inputs = CriticInputs(samples, (samples, real, t_adv))
        logs["loss"] = loss.detach().mean()
        return LossOut(loss, logs, samples=samples, critic_inputs=inputs), extra_out

    def critic_loss(self, nets: Nets, batch: Batch, inputs: CriticInputs | None) -> LossOut | None:
        """inputs: what student_loss left for this micro-batch; None for a fresh batch (a later critic update)."""
        return self._discriminator_loss(nets, batch, inputs.adv if inputs else None)

    def _discriminator_loss(self, nets: Nets, batch: Batch, adv) -> LossOut | None:
        """The heads' hinge loss on the real side (consistency target, or data: adv_real) and the student's side (fake),
        both noised to t_adv."""
        if self._weights(self._stage)[1] == 0 or self.head is None:
            return None
        if adv is None:  # a fresh batch: a new pair, without student gradient
            k = self.cfg.segments[self._stage]
            pred, target, t_end = self.consistency_pair(nets, batch, k, grad=False)
            adv = self._adv_inputs(nets, batch, pred, target, t_end, k)
        fake, real, t_adv = adv
        cond = batch.data_cond  # both sides come from the same (real, when the run has images) x_t
        with torch.no_grad():  # real and fake in one batched call of the teacher
            feats = teacher_features(nets.teacher.denoiser, torch.cat([real, fake.detach()]), torch.cat([t_adv, t_adv]),
                                     cond.cat(cond))
        n = real.shape[0]
        maps = self.head(feats)  # per head, a logit at every location of real then fake rows
        loss = hinge_discriminator_loss([m[:n] for m in maps], [m[n:] for m in maps])
        return LossOut(loss, {"adv_d_loss": loss.detach().mean()})

    def _data_x0(self, nets: Nets, batch: Batch):
        """Clean latents x0 to noise: real data when the run has images (data.images), else a teacher sample.

        Consistency training only needs points x_t on the teacher's marginal; without a data set, an 8-step CFG DDIM
        solve of the teacher from fresh noise stands in for the data.
        """
        if batch.latents is not None:
            return batch.latents.to(nets.device)
        return self._teacher_x0(nets, batch)

    @torch.no_grad()
    def _teacher_x0(self, nets: Nets, batch: Batch):
        x_T = batch.randn(*batch.latent_shape[1:], device=nets.device)
        mean_w = 0.5 * (self.cfg.guidance_min + self.cfg.guidance_max)
        teacher = partial(nets.teacher, guidance_scale=mean_w)
        return ddim_sample(teacher, x_T, trailing_timesteps(8, self.T), batch.cond, self.schedule)

    def after_step(self, nets: Nets, step: int) -> list[Event]:
        if self.cfg.target == "ema":
            ema_update_([p for p, _ in self.pairs], [q for _, q in self.pairs], self.cfg.ema_decay)
        max_steps = self.ctx.max_steps
        if not self._budget_checked:  # once; the loop sets max_steps after setup
            self._budget_checked = True
            _check_stage_budget(self.cfg.stage_steps, max_steps)
        ends = stage_bounds(self.cfg.segments, self.cfg.stage_steps, max_steps)
        i = self.stage(step, max_steps)
        if len(self.cfg.segments) > 1 and step + 1 == ends[i]:
            k = self.cfg.segments[i]
            return [ExportStage(f"stages/stage{i + 1}-k{k}", self._recipe_for(k, k))]
        return []

    # ---- inference ----
    def _recipe_for(self, k: int, steps: int) -> dict:
        """A k-segment student's sampler: trailing DDIM at k steps (its segment edges), guidance 0 (CFG is baked in);
        on a flow teacher, Euler at the same timesteps."""
        if is_flow(self.schedule):
            family = self.ctx.family
            return flow_euler_recipe(self.schedule, trailing_timesteps(steps, self.T), family)
        if self.cfg.boundary == "lcm" and k == 1:
            return {
                "scheduler_class": "LCMScheduler",
                "scheduler_config": {"original_inference_steps": self.cfg.num_ddim_timesteps},
                "timesteps": None, "num_inference_steps": steps, "guidance_scale": 0.0, "eta": 0.0,
            }
        return trailing_ddim_recipe(steps)

    def recipe(self, family) -> dict:
        k = self.cfg.segments[-1]
        return self._recipe_for(k, self.cfg.inference_steps or k)

    def sample(self, nets: Nets, cond, x_T, generator=None, steps: int | None = None, recipe: dict | None = None):
        """The student run exactly as the recipe's diffusers scheduler runs it (default: the final LoRA's recipe)."""
        recipe = recipe or self.recipe(None)
        return recipe_sample(nets.student, x_T, cond, self.schedule, recipe, generator, steps)


class UnifiedDistiller(ConsistencyDistiller):
    """Consistency (k = 1, random end point) + DMD's distribution matching on the one-step sample from t = 999.

    The fake score, a second LoRA on the shared base, keeps fitting the student's one-step samples in the critic
    phase (dm.fake_score_loss); the DM gradient is DMD's, from stepdistill.methods.dm. With progressive segments and
    a per-stage dm_weight it is also a consistency run with a DM stage at the end (configs/toy/tscd_4step.yaml).
    """

    extra_adapters: ClassVar[tuple[str, ...]] = ("target", "fake_score")
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {"student": ("student",), "critic": ("fake_score",)}
    # Its recipe is TCDScheduler, a DDPM scheduler.
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __init__(self, cfg: UnifiedConfig, schedule):
        super().__init__(cfg, schedule)
        self.critic_updates = cfg.critic_updates_per_student_update

    def cfg_scales(self) -> dict[str, float]:
        return {**super().cfg_scales(), "method.dm_guidance_scale": self.cfg.dm_guidance_scale}

    def _dm_teacher(self, nets: Nets, batch: Batch):
        cfg = self.cfg
        if cfg.dm_guidance_scale is not None:
            return nets.teacher.with_scale(cfg.dm_guidance_scale)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * batch.rand(nets.device)
        return nets.teacher.with_scale(w)

    def _one_step_rows(self, nets: Nets, batch: Batch):
        """(z, t): pure noise at t = T - 1, the input of the 1-step sample of its TCD recipe."""
        z = batch.randn(*batch.latent_shape[1:], device=nets.device)
        return z, torch.full((batch.size,), self.T - 1, dtype=torch.long, device=nets.device)

    def _one_step(self, nets: Nets, batch: Batch, grad: bool):
        """x0 of the student's 1-step sample."""
        z, t = self._one_step_rows(nets, batch)
        with torch.set_grad_enabled(grad):
            return nets.student(z, t, batch.cond).x0

    def _dm_sample(self, nets: Nets, batch: Batch, grad: bool):
        """x0 of the student's dm_steps-step sample from pure noise, as its recipe's TCDScheduler at eta 0 draws it
        (DDIM steps between the recipe's timesteps), the gradient through every step; the 1-step sample at one step."""
        n = self.cfg.dm_sample_steps
        if n == 1:
            return self._one_step(nets, batch, grad)
        z, _ = self._one_step_rows(nets, batch)
        with torch.set_grad_enabled(grad):
            return tcd_sample(nets.student, z, tcd_timesteps(n, self.cfg.num_ddim_timesteps, self.T), batch.cond,
                              self.schedule, eta=0.0, return_x0=True)[1]

    def _dm_weight(self, step: int) -> float:
        """The DM weight of the stage that `step` falls in."""
        return self.cfg.dm_weight_of(self.stage(step, self.ctx.max_steps))

    def in_critic_warmup(self, step: int) -> bool:
        """Whether `step` is one of the first dm_critic_warmup iterations of a stage where the DM term turns on."""
        if not self.cfg.dm_critic_warmup:
            return False
        i = self.stage(step, self.ctx.max_steps)
        start = ([0] + stage_bounds(self.cfg.segments, self.cfg.stage_steps, self.ctx.max_steps))[i]
        return self.cfg.dm_starts()[i] and step - start < self.cfg.dm_critic_warmup

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut | None:
        cfg, device = self.cfg, nets.device
        w_dm = self._dm_weight(step)
        if w_dm > 0 and self.in_critic_warmup(step):
            # The student waits while the fake score fits its samples (critic_loss draws them: inputs None).
            self._stage = self.stage(step, self.ctx.max_steps)
            return None
        if w_dm == 0:  # a consistency-only stage
            return self._consistency_loss(nets, batch, step)[0]
        # A one-step sample rides in the consistency term's student call (one batched pass of 2B rows).
        extra = partial(self._one_step_rows, nets, batch) if cfg.dm_sample_steps == 1 else None
        out, one_step = self._consistency_loss(nets, batch, step, extra=extra)
        x0 = one_step.x0 if one_step is not None else self._dm_sample(nets, batch, grad=True)
        t = batch.randint(*dm_timestep_bounds(cfg.dm_t_min, cfg.dm_t_max, self.T), device=device)
        eps = batch.randn(*x0.shape[1:], device=device)
        dm = dm_loss(x0, self._dm_teacher(nets, batch), nets.fake_score, batch.cond, self.schedule, t, eps)
        loss = out.loss + w_dm * dm
        logs = {**out.logs, "dm_loss": dm.detach().mean(), "loss": loss.detach().mean()}
        samples = x0.detach()
        adv = out.critic_inputs.adv if out.critic_inputs else None
        return LossOut(loss, logs, samples=samples, critic_inputs=CriticInputs(samples, adv))

    def critic_loss(self, nets: Nets, batch: Batch, inputs: CriticInputs | None) -> LossOut | None:
        device = nets.device
        if self.cfg.dm_weight_of(self._stage) == 0:
            # A consistency-only stage: the fake score waits for the DM stage, and the extra critic updates (the fake
            # score's, DMD2's two time-scale rule) are skipped: one discriminator update per student update, as tscd.
            return super().critic_loss(nets, batch, inputs) if inputs is not None else None
        x0 = inputs.samples if inputs else self._dm_sample(nets, batch, grad=False)
        t = batch.randint(0, self.T, device=device)
        eps = batch.randn(*x0.shape[1:], device=device)
        loss = fake_score_loss(nets.fake_score, x0, batch.cond, self.schedule, t, eps)
        logs = {"fake_score_loss": loss.detach().mean()}
        d = self._discriminator_loss(nets, batch, inputs.adv if inputs else None)
        if d is not None:
            loss = loss + d.loss
            logs.update(d.logs)
        return LossOut(loss, logs)

    def after_step(self, nets: Nets, step: int) -> list[Event]:
        """The consistency stages' events, and a fresh student optimizer where the DM term starts: its gradients are
        ~25x the consistency term's (toy SD1.5: grad norm 0.002 -> 0.05), which Adam's second moment, kept from the
        consistency stages, would turn into steps of many times lr (docs/tscd.md, "Third round")."""
        events = super().after_step(nets, step)
        now, after = self.stage(step, self.ctx.max_steps), self.stage(step + 1, self.ctx.max_steps)
        if self.cfg.dm_weight_of(now) == 0 < self.cfg.dm_weight_of(after):
            events.append(ResetOptimizer("student"))
        return events

    def lr_scale(self, phase: str) -> float:
        """method.dm_lr_scale on the student's rate in a stage with the DM term (the stage of the update being made:
        student_loss has set it)."""
        return self.cfg.dm_lr_scale if phase == "student" and self.cfg.dm_weight_of(self._stage) > 0 else 1.0

    def recipe(self, family) -> dict:
        """TCDScheduler on the training grid (original_inference_steps = N), eta as configured, guidance 0."""
        return {
            "scheduler_class": "TCDScheduler",
            "scheduler_config": {"original_inference_steps": self.cfg.num_ddim_timesteps},
            "timesteps": None, "num_inference_steps": self.cfg.inference_steps or 1, "guidance_scale": 0.0,
            "eta": self.cfg.tcd_eta,
        }


def _adapter_pairs(unet, a: str, b: str):
    """Matching LoRA tensors of adapters a and b, in the same order."""
    pa = {n.replace(f".{a}.", ".#."): p for n, p in unet.named_parameters() if f".{a}." in n and "lora_" in n}
    pb = {n.replace(f".{b}.", ".#."): p for n, p in unet.named_parameters() if f".{b}." in n and "lora_" in n}
    if set(pa) != set(pb):
        raise RuntimeError(f"adapters {a!r} and {b!r} do not have the same layers")
    return [(pa[k], pb[k]) for k in sorted(pa)]


register_method("tscd", TSCDConfig, ConsistencyDistiller)
register_method("lcm", LCMConfig, ConsistencyDistiller)
register_method("tscd_unified", UnifiedConfig, UnifiedDistiller)
