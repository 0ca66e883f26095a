"""Trajectory-segmented consistency distillation (Hyper-SD TSCD, arXiv 2404.13686 sec. 3.1), with
LCM (Luo et al. 2023: one segment, LCM boundary scalings) and PCM (Wang et al. 2024: fixed k, segment edge)
as configurations of the same loss.

For t on the skipping grid, the teacher solves one DDIM step with CFG from t to t' = max(t - delta, t_b), the
segment start; the student at t and the target at t' are both mapped by DDIM to the end point t_end in the
segment, and their distance is the loss. The network never sees t_end: the map is analytic (DDIM), so the
student stays an ordinary eps-prediction UNet that a plain diffusers scheduler can run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ConfigError, MethodConfig
from ..core.ema import ema_update_
from ..core.samplers import ddim_sample, lcm_sample
from ..core.solvers import (
    ddim_step, lcm_boundary_scalings, lcm_inference_timesteps, lcm_origin_timesteps, segment_start,
    trailing_timesteps,
)
from ..registry import register_method
from .base import Batch, LossOut, Nets


@dataclass
class TSCDConfig(MethodConfig):
    name: str = "tscd"
    segments: list[int] = field(default_factory=lambda: [8, 4, 2, 1])  # k per stage (Hyper-SD progressive)
    stage_steps: list[int] = field(default_factory=list)  # student updates per stage; empty = equal split
    num_ddim_timesteps: int = 50  # skipping grid N: delta = T / N
    end_point: str = "random"  # random: t_end ~ U[t_b, t'] (TSCD); edge: t_end = t_b (PCM, LCM)
    boundary: str = "ddim"  # ddim | lcm (LCM's c_skip/c_out when the end point is clean data)
    guidance_min: float = 3.0  # teacher CFG scale w ~ U[min, max], baked into the student
    guidance_max: float = 8.0
    target: str = "ema"  # ema (Hyper-SD) | online (stop-grad student: LCM-LoRA, PCM)
    ema_decay: float = 0.95
    loss: str = "huber"  # huber (pseudo-Huber, LCM/PCM) | mse
    huber_c: float = 0.001
    inference_steps: int = 0  # recipe steps for the final LoRA; 0 = k of the last stage (LCM preset: 4)

    def validate(self):
        if not self.segments or any(k < 1 or 1000 % k for k in self.segments):
            raise ConfigError(f"method.segments must be divisors of 1000 such as [8, 4, 2, 1] (got {self.segments})")
        if self.stage_steps and len(self.stage_steps) != len(self.segments):
            raise ConfigError("method.stage_steps needs one entry per method.segments entry (or leave it empty)")
        for key, value, allowed in (("end_point", self.end_point, ("random", "edge")),
                                    ("boundary", self.boundary, ("ddim", "lcm")),
                                    ("target", self.target, ("ema", "online")),
                                    ("loss", self.loss, ("huber", "mse"))):
            if value not in allowed:
                raise ConfigError(f"method.{key} must be one of {list(allowed)} (got {value!r})")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"method.ema_decay must be in [0, 1) (got {self.ema_decay})")
        if self.guidance_min > self.guidance_max:
            raise ConfigError("method.guidance_min must be <= method.guidance_max")


@dataclass
class LCMConfig(TSCDConfig):
    """LCM-LoRA: one segment ending at x0 with LCM's boundary scalings, online target, skipping grid of 50."""

    name: str = "lcm"
    segments: list[int] = field(default_factory=lambda: [1])
    end_point: str = "edge"
    boundary: str = "lcm"
    target: str = "online"
    guidance_min: float = 3.0
    guidance_max: float = 13.0
    inference_steps: int = 4


def pseudo_huber(a, b, c: float):
    """sqrt(|a - b|^2 + c^2) - c per element (Song & Dhariwal 2023, eq. 6), averaged per sample."""
    return (((a - b) ** 2 + c**2).sqrt() - c).flatten(1).mean(1)


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


class ConsistencyDistiller:
    extra_adapters = ("target",)
    trainable = {"student": ("student",)}

    def __init__(self, cfg: TSCDConfig, schedule):
        self.cfg, self.schedule = cfg, schedule
        self.T = schedule.num_train_timesteps
        self.grid = torch.tensor(lcm_origin_timesteps(cfg.num_ddim_timesteps, self.T))  # t_n, descending
        self.delta = self.T // cfg.num_ddim_timesteps
        self.max_steps = None  # set by setup from the loop's config (via nets.extra)

    # ---- set-up and state ----
    def setup(self, nets: Nets):
        from ..core.lora import copy_adapter

        copy_adapter(nets.unet, "student", "target")
        self.pairs = _adapter_pairs(nets.unet, "target", "student")
        self.ends = None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass

    def stage(self, step: int, max_steps: int) -> int:
        ends = stage_bounds(self.cfg.segments, self.cfg.stage_steps, max_steps)
        return next((i for i, e in enumerate(ends) if step < e), len(ends) - 1)

    # ---- the loss ----
    def _to_end(self, x_t, t, out, t_end):
        """Map a prediction at t to the end point t_end: DDIM, or LCM's boundary form when t_end is clean data."""
        ndim = x_t.ndim
        alpha_end, sigma_end = self.schedule.alpha_sigma(t_end, ndim)
        x_end = ddim_step(out.x0, out.eps, alpha_end.to(x_t.device), sigma_end.to(x_t.device))
        if self.cfg.boundary == "lcm":
            c_skip, c_out = lcm_boundary_scalings(t.reshape(-1, *([1] * (ndim - 1))).clamp(min=0))
            lcm = c_skip * x_t.double() + c_out * out.x0
            x_end = torch.where((t_end < 0).reshape(-1, *([1] * (ndim - 1))), lcm, x_end)
        return x_end

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut:
        cfg, device = self.cfg, nets.device
        k = cfg.segments[self.stage(step, nets.extra["max_steps"])]
        n = batch.size
        x0_data = self._data_x0(nets, batch)
        t = self.grid[batch.randint(0, len(self.grid))].to(device)
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

        with torch.no_grad():
            teacher = nets.teacher(x_t, t, batch.cond, guidance_scale=w)
            a_prev, s_prev = self.schedule.alpha_sigma(t_prev, x_t.ndim)
            x_prev = ddim_step(teacher.x0, teacher.eps, a_prev.to(device), s_prev.to(device)).to(x_t.dtype)
            target_net = nets.target if cfg.target == "ema" else nets.student
            target_out = target_net(x_prev, t_prev.clamp(min=0), batch.cond)
            target = self._to_end(x_prev, t_prev, target_out, t_end)
            # The teacher already reached the end point: the target is x_prev itself (boundary condition).
            same = (t_prev == t_end).reshape(-1, *([1] * (x_t.ndim - 1)))
            target = torch.where(same, x_prev.double(), target)

        pred = self._to_end(x_t, t, nets.student(x_t, t, batch.cond), t_end)
        if cfg.loss == "huber":
            loss = pseudo_huber(pred.float(), target.float(), cfg.huber_c)
        else:
            loss = ((pred.float() - target.float()) ** 2).flatten(1).mean(1)
        return LossOut(loss, {"loss": float(loss.detach().mean()), "k": float(k)})

    def _data_x0(self, nets: Nets, batch: Batch):
        """Clean latents x0: real data when given, else the teacher's own x0 from noise is not needed for
        consistency training, which only needs points x_t on the teacher's marginal. Without a data set we use
        real latents when present and fall back to a teacher sample (a few DDIM steps) otherwise."""
        if batch.latents is not None:
            return batch.latents.to(nets.device)
        return self._teacher_x0(nets, batch)

    @torch.no_grad()
    def _teacher_x0(self, nets: Nets, batch: Batch):
        x_T = batch.randn(*batch.latent_shape[1:], device=nets.device)
        mean_w = 0.5 * (self.cfg.guidance_min + self.cfg.guidance_max)
        return ddim_sample(_Guided(nets.teacher, mean_w), x_T, trailing_timesteps(8, self.T), batch.cond, self.schedule)

    def critic_loss(self, nets, batch, samples):
        return None

    def after_step(self, nets: Nets, step: int):
        if self.cfg.target == "ema":
            ema_update_([p for p, _ in self.pairs], [q for _, q in self.pairs], self.cfg.ema_decay)
        max_steps = nets.extra["max_steps"]
        ends = stage_bounds(self.cfg.segments, self.cfg.stage_steps, max_steps)
        i = self.stage(step, max_steps)
        if len(self.cfg.segments) > 1 and step + 1 == ends[i] and "export_lora" in nets.extra:
            k = self.cfg.segments[i]
            nets.extra["export_lora"](f"stages/stage{i + 1}-k{k}", self._recipe_for(k, k))

    # ---- inference ----
    def _recipe_for(self, k: int, steps: int) -> dict:
        if self.cfg.boundary == "lcm" and k == 1:
            return {
                "scheduler_class": "LCMScheduler",
                "scheduler_config": {"original_inference_steps": self.cfg.num_ddim_timesteps},
                "timesteps": None, "num_inference_steps": steps, "guidance_scale": 0.0, "eta": 0.0,
            }
        return {
            "scheduler_class": "DDIMScheduler",
            "scheduler_config": {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False},
            "timesteps": None, "num_inference_steps": steps, "guidance_scale": 0.0, "eta": 0.0,
        }

    def recipe(self, family) -> dict:
        k = self.cfg.segments[-1]
        return self._recipe_for(k, self.cfg.inference_steps or k)

    def sample(self, nets: Nets, cond, x_T, generator=None, steps: int | None = None):
        """The student run exactly as the recipe's diffusers scheduler runs it."""
        r = self.recipe(None)
        n = steps or r["num_inference_steps"]
        if r["scheduler_class"] == "LCMScheduler":
            ts = lcm_inference_timesteps(n, self.cfg.num_ddim_timesteps, self.T)
            return lcm_sample(nets.student, x_T, ts, cond, self.schedule, generator)
        return ddim_sample(nets.student, x_T, trailing_timesteps(n, self.T), cond, self.schedule)


class _Guided:
    """A GuidedDenoiser pinned to one guidance scale, callable like a Denoiser."""

    def __init__(self, guided, w):
        self.guided, self.w = guided, w

    def __call__(self, x_t, t, cond):
        return self.guided(x_t, t, cond, guidance_scale=self.w)


def _adapter_pairs(unet, a: str, b: str):
    """Matching LoRA tensors of adapters a and b, in the same order."""
    pa = {n.replace(f".{a}.", ".#."): p for n, p in unet.named_parameters() if f".{a}." in n and "lora_" in n}
    pb = {n.replace(f".{b}.", ".#."): p for n, p in unet.named_parameters() if f".{b}." in n and "lora_" in n}
    if set(pa) != set(pb):
        raise RuntimeError(f"adapters {a!r} and {b!r} do not have the same layers")
    return [(pa[k], pb[k]) for k in sorted(pa)]


register_method("tscd", TSCDConfig, ConsistencyDistiller)
register_method("lcm", LCMConfig, ConsistencyDistiller)
