"""Distribution matching distillation: DMD2 (Yin et al., arXiv 2405.14867) with DMD's gradient (arXiv 2311.18828)
and, as an alternative generator loss, score identity distillation (SiD, Zhou et al., arXiv 2404.04057).

The student G maps noise to x0 in one step (or k steps, trained by backward simulation). Its samples are noised
at a random t and denoised by the teacher (with CFG) and by a fake score that keeps fitting the student's own
distribution; their difference, normalised per sample, is the gradient that moves G's samples towards the
teacher's distribution. The fake score is a second LoRA on the same frozen base (DESIGN.md sec. 3), updated
`critic_updates_per_student_update` times per student update (DMD2's two-time-scale rule). Optional: a GAN head on
the fake score's middle features (a UNet's mid block, a transformer's middle block) with real latents (DMD2 sec.
4.2), and a regression warm-up on teacher ODE pairs (DMD's regression loss, in latent space).

The DM maths (shared with disback, tscd_unified and reward) is in methods/dm.py; the GAN heads and losses in
methods/gan.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from ..core.dist import Dist
from ..core.io import atomic_write
from ..core.samplers import ddim_sample, lcm_sample
from ..core.solvers import lcm_boundary_scalings, lcm_original_steps, trailing_timesteps
from ..errors import ConfigError
from ..registry import register_method
from .base import Batch, CriticHeadState, LossOut, Nets, RunContext, flow_euler_recipe, is_flow
from .config import MethodConfig
from .dm import dm_loss, dm_timestep_bounds, fake_score_loss, shift_timesteps, sid_generator_loss, through_frozen_nets
from .gan import feature_reader, gan_discriminator_loss, gan_generator_loss

log = logging.getLogger(__name__)

REGRESSION_PAIRS_FILE = "regression_pairs.pt"

# The generator's timesteps and the teacher's CFG scale in the DM term default to the family's (DMD2's released
# scripts, e.g. SD1.5 one step at t = 999 with real_guidance_scale 1.75): FamilyModel.method_defaults["dmd"].


@dataclass
class DMDConfig(MethodConfig):
    name: str = "dmd"
    timesteps: list[int] = field(default_factory=list)  # generator timesteps, descending; [] = family default
    guidance_scale: float | None = None  # teacher CFG in the DM term; null = family default
    generator_loss: str = "dmd"  # dmd (DMD2) | sid (score identity distillation, SiD alpha form)
    sid_alpha: float = 1.2  # SiD's alpha (1.2 in SiD, 1.0 in SiD-LSG)
    dm_t_min: float = 0.02  # DM term: t ~ U{dm_t_min T, ..., dm_t_max T} (DMD2 min/max_step_percent)
    dm_t_max: float = 0.98
    dm_t_shift: float = 1.0  # DM term's t/T shifted like SD3's sigmas: > 1 high noise, < 1 low (dm.shift_timesteps)
    critic_t_shift: float = 1.0  # the same shift for the fake score's denoising t ~ U[0, T) (1 = uniform, as DMD2)
    critic_updates_per_student_update: int = 5  # DMD2 dfake_gen_update_ratio: 5 SDXL, 10 SD1.5
    gan: bool = False  # GAN head on the fake score's middle features; needs real latents (data.images)
    gan_generator_weight: float = 5e-3  # DMD2 gen_cls_loss_weight: 5e-3 SDXL, 1e-3 SD1.5
    gan_discriminator_weight: float = 1e-2  # DMD2 guidance_cls_loss_weight
    gan_t_max: float = 1.0  # diffusion GAN: real and fake latents noised at t ~ U[0, gan_t_max T)
    regression_steps: int = 0  # first N student updates regress teacher ODE pairs instead of the DM loss
    regression_weight: float = 0.0  # DMD's lambda_reg: the regression term kept beside the DM loss after (DMD: 0.25)
    regression_pairs: int = 1024  # teacher ODE pairs, solved once per run and kept in RUN/regression_pairs.pt
    regression_teacher_steps: int = 25  # DDIM steps of the teacher's ODE solve for those pairs

    def validate(self):
        if any(t < 0 or t >= 1000 for t in self.timesteps):
            raise ConfigError(f"method.timesteps must lie in [0, 1000) (got {self.timesteps})")
        if any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ConfigError(f"method.timesteps must be strictly descending, e.g. [999, 749, 499, 249] (got {self.timesteps})")
        if self.generator_loss not in ("dmd", "sid"):
            raise ConfigError(f"method.generator_loss must be 'dmd' or 'sid' (got {self.generator_loss!r})")
        if not 0 <= self.dm_t_min < self.dm_t_max <= 1:
            raise ConfigError(f"need 0 <= method.dm_t_min < method.dm_t_max <= 1 (got {self.dm_t_min}, {self.dm_t_max})")
        for key in ("dm_t_shift", "critic_t_shift"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"method.{key} must be > 0 (1 = DMD2's uniform t; got {getattr(self, key)})")
        if not 0 < self.gan_t_max <= 1:
            raise ConfigError(f"method.gan_t_max must be in (0, 1] (got {self.gan_t_max})")
        for key in ("critic_updates_per_student_update", "regression_teacher_steps", "regression_pairs"):
            if getattr(self, key) < 1:
                raise ConfigError(f"method.{key} must be >= 1 (got {getattr(self, key)})")
        for key in ("gan_generator_weight", "gan_discriminator_weight", "regression_steps", "regression_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"method.{key} must be >= 0 (got {getattr(self, key)})")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise ConfigError(f"method.guidance_scale must be >= 0 or null (got {self.guidance_scale})")


def regression_loss(x0, x0_target):
    """DMD's regression loss with latent MSE in place of LPIPS: |G(z) - ODE_teacher(z)|^2 per sample."""
    return ((x0.double() - x0_target.double()) ** 2).flatten(1).mean(1)


@torch.no_grad()
def solve_ode_pairs(teacher, prompt_cond, n: int, latent_shape, steps: int, schedule, seed: int, device,
                    chunk: int = 64, progress: bool = True, dist: Dist | None = None) -> dict:
    """DMD's paired set: n noises z, each with a prompt drawn from `prompt_cond` and the teacher's deterministic DDIM
    solution ODE(z). Solved once, not per update: the 25-step CFG solve costs ~50 student forwards per pair.
    Kept in fp16 (4096 SDXL pairs: 1 GB), z rounded before the solve so that each pair stays exact.

    Under several processes each solves every world-th chunk and the shares are summed (each pair solved once, not
    W times). Every process makes the same number of teacher calls (a share one chunk short re-solves a chunk and
    drops it): a sharded teacher's forward is a collective."""
    dist = dist or Dist()
    g = torch.Generator().manual_seed(seed)
    prompt_index = torch.randint(0, len(prompt_cond), (n,), generator=g)
    z = torch.randn((n, *latent_shape), generator=g).half()
    ts = trailing_timesteps(steps, schedule.num_train_timesteps)
    starts = list(range(0, n, chunk))
    mine = starts[dist.rank :: dist.world]
    rounds = -(-len(starts) // dist.world)
    x0 = torch.zeros((n, *latent_shape), dtype=torch.float32)
    for r in tqdm(range(rounds), desc="teacher ODE pairs", disable=not progress):
        i = mine[r] if r < len(mine) else starts[0]
        cond = prompt_cond.index(prompt_index[i : i + chunk]).to(device)
        out = ddim_sample(teacher, z[i : i + chunk].to(device).float(), ts, cond, schedule).half().float().cpu()
        if r < len(mine):
            x0[i : i + chunk] = out
    # Exact: every entry is one process's fp16 value plus zeros.
    x0 = dist.all_sum_(x0.to(dist.device)).cpu().half()
    return {"prompt_index": prompt_index, "z": z, "x0": x0}


def load_or_solve_pairs(path: Path | None, meta: dict, solve) -> dict:
    """The pairs kept at `path` if they were solved with `meta`, else solve() and keep them (atomically), so a resumed
    run does not pay for the solve again."""
    if path is not None and path.exists():
        kept = torch.load(path, map_location="cpu", weights_only=True)
        if kept.get("meta") == meta:
            return kept
        log.info("%s was solved with %s, not %s: solving again", path, kept.get("meta"), meta)
    pairs = {**solve(), "meta": meta}
    if path is not None:
        atomic_write(path, partial(torch.save, pairs))
    return pairs


def lcm_x0(denoiser, x_t, t, cond):
    """x0 as LCMScheduler reads it: c_skip x_t + c_out x0_hat (c_skip < 1e-7 at t >= 200, but it is what runs)."""
    c_skip, c_out = lcm_boundary_scalings(t.reshape(-1, *([1] * (x_t.ndim - 1))))
    return c_skip * x_t.double() + c_out * denoiser(x_t, t, cond).x0


# ---- the method -----------------------------------------------------------------------------------------------

class DMDDistiller(CriticHeadState):
    """On a flow teacher (sd3, flux) the student is a plain x0 predictor sampled with deterministic Euler (the recipe's
    FlowMatchEulerDiscreteScheduler), backward simulation included; the fake score fits by flow matching."""

    head_state_key = "gan_head"
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample", "flow")
    extra_adapters: ClassVar[tuple[str, ...]] = ("fake_score",)
    trainable: ClassVar[dict[str, tuple[str, ...]]] = {"student": ("student",), "critic": ("fake_score",)}

    def __init__(self, cfg: DMDConfig, schedule):
        super().__init__(cfg, schedule)
        if any(t >= self.T for t in cfg.timesteps):
            raise ConfigError(f"method.timesteps {cfg.timesteps} must be below the teacher's {self.T} timesteps")
        self.timesteps = list(cfg.timesteps)
        self.critic_updates = cfg.critic_updates_per_student_update
        self.guidance_scale = cfg.guidance_scale
        self.head = None
        self.features = None  # where the GAN head reads the fake score (methods.gan.feature_reader)
        self.pairs = None  # teacher ODE pairs for the regression term, solved on first use

    # ---- set-up and state ----
    def setup(self, nets: Nets, ctx: RunContext):
        super().setup(nets, ctx)
        # Resolves self.guidance_scale, which the builder then makes the teacher's default.
        self._resolve(ctx.family)
        if is_flow(self.schedule):
            # The export's recipe must be one the family's stock pipeline runs (WanPipeline: only its own step-count
            # grids): refused now, not after training.
            try:
                self.schedule.pipeline_sampling(self.timesteps)
            except ValueError as err:
                raise ConfigError(f"method.timesteps {list(self.timesteps)}: {err}") from None
        if self.cfg.gan:
            self.features = feature_reader(nets.denoiser)
            self.head = self.features.head(nets.fake_score, ctx.latent_shape, ctx.uncond).to(nets.device)

    def _resolve(self, family):
        """Options left to the family (timesteps [], guidance_scale null) take the family's defaults."""
        defaults = family.defaults_for("dmd")
        try:
            self.timesteps = self.timesteps or list(defaults["timesteps"])
            if self.guidance_scale is None:
                self.guidance_scale = 1.0 if family.guidance_distilled else defaults["guidance_scale"]
        except KeyError as e:
            raise ConfigError(f"the {family.name} family has no default method.{e.args[0]} for dmd: set it") from None

    def cfg_scales(self) -> dict[str, float]:
        return {"method.guidance_scale": self.guidance_scale}

    # ---- the generator ----
    def _generate(self, nets: Nets, batch: Batch, grad: bool):
        """Student x0 at a random stage k_i of its k-step sampler, per sample. Stages before k_i run the student itself
        without grad (DMD2 backward simulation: it learns from its own intermediate outputs, fresh noise between).

        All noise is drawn up front, so every process makes the same draws whatever its stages (Batch.randn).
        """
        device, shape, n = nets.device, batch.latent_shape[1:], batch.size
        ts = torch.tensor(self.timesteps, device=device)
        noise = [batch.randn(*shape, device=device) for _ in ts]  # x_T, then the fresh noise of each later step
        k = batch.randint(0, len(ts), device=device) if len(ts) > 1 else torch.zeros(n, dtype=torch.long, device=device)
        x = noise[0]
        with torch.no_grad():
            # Every stage but the last runs on the whole batch, rows past their own k_i keep x (torch.where): reading
            # k.max() back would be a sync per call; the stages it would skip are no-grad and each holds most rows.
            for i in range(len(ts) - 1):
                x_next = self._next(nets, x, ts[i].expand(n), ts[i + 1].expand(n), noise[i + 1], batch.cond)
                x = torch.where((k > i).reshape(-1, *([1] * len(shape))), x_next, x)
        with torch.set_grad_enabled(grad):
            return self._x0(nets.student, x, ts[k], batch.cond)

    def _x0(self, student, x_t, t, cond):
        """The student's x0 as its recipe's scheduler reads it: LCMScheduler's boundary form, or a flow model's x0."""
        if is_flow(self.schedule):
            return student(x_t, t, cond).x0
        return lcm_x0(student, x_t, t, cond)

    def _next(self, nets: Nets, x, t, t_next, noise, cond):
        """One step of the student's sampler: LCM (fresh noise at t_next), or deterministic Euler on a flow teacher."""
        if is_flow(self.schedule):
            out = nets.student(x, t, cond)
            alpha, sigma = self.schedule.alpha_sigma(t_next, x.ndim)
            return (alpha.to(x.device) * out.x0 + sigma.to(x.device) * out.eps).to(x.dtype)
        x0 = lcm_x0(nets.student, x, t, cond)
        return self.schedule.add_noise(x0, noise, t_next).to(x.dtype)

    def _teacher(self, nets: Nets):
        return nets.teacher.with_scale(self.guidance_scale)

    # ---- the losses ----
    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut:
        cfg, device = self.cfg, nets.device
        if step < cfg.regression_steps:
            loss, _ = self._regression(nets, batch)
            value = loss.detach().mean()
            # No samples for the critic: the pair batch's prompts are not the batch's, so it draws its own.
            return LossOut(loss, {"regression_loss": value, "loss": value})
        x0 = self._generate(nets, batch, grad=True)
        bounds = dm_timestep_bounds(cfg.dm_t_min, cfg.dm_t_max, self.T)
        t = shift_timesteps(batch.randint(*bounds, device=device), cfg.dm_t_shift, self.T, bounds)
        eps = batch.randn(*x0.shape[1:], device=device)
        if cfg.generator_loss == "dmd":
            loss = dm_loss(x0, self._teacher(nets), nets.fake_score, batch.cond, self.schedule, t, eps)
        else:
            sid = partial(sid_generator_loss, teacher=self._teacher(nets), fake_score=nets.fake_score, cond=batch.cond,
                          schedule=self.schedule, t=t, eps=eps, alpha=cfg.sid_alpha)
            loss = through_frozen_nets(sid, x0)
        logs = {f"{cfg.generator_loss}_loss": loss.detach().mean()}
        if cfg.gan:
            self._real_latents(batch)
            gan_g = through_frozen_nets(lambda x: gan_generator_loss(self._logits(nets, [(x, batch.cond)], batch)[0]), x0)
            loss = loss + cfg.gan_generator_weight * gan_g
            logs["gan_g_loss"] = gan_g.detach().mean()
        if cfg.regression_weight > 0:
            reg, _ = self._regression(nets, batch)
            loss = loss + cfg.regression_weight * reg
            logs["regression_loss"] = reg.detach().mean()
        logs["loss"] = loss.detach().mean()
        samples = x0.detach()
        return LossOut(loss, logs, samples=samples, critic_inputs=samples)

    def _regression(self, nets: Nets, batch: Batch):
        """DMD's regression term on batch.size pairs drawn from the solved set: the student's first step from noise z
        regresses the teacher's CFG DDIM solve from the same z and prompt. Returns (per-sample loss, student x0)."""
        pairs = self._ode_pairs(nets)
        i = batch.randint(0, len(pairs["z"]), device="cpu")
        cond = self.ctx.prompt_data.encode_indices(pairs["prompt_index"][i]).to(nets.device)
        z, target = pairs["z"][i].to(nets.device).float(), pairs["x0"][i].to(nets.device).float()
        t = torch.full((batch.size,), self.timesteps[0], dtype=torch.long, device=nets.device)
        x0 = self._x0(nets.student, z, t, cond)
        return regression_loss(x0, target), x0

    def _ode_pairs(self, nets: Nets) -> dict:
        if self.pairs is None:
            if self.ctx.prompt_data is None:
                raise RuntimeError("the regression term needs the encoded prompts (RunContext.prompt_data): "
                                   "train/build.py sets it")
            cfg, data = self.cfg, self.ctx.prompt_data
            meta = {"n": cfg.regression_pairs, "teacher_steps": cfg.regression_teacher_steps,
                    "guidance_scale": float(self.guidance_scale), "seed": data.seed,
                    "prompts": data.fingerprint()}
            run_dir = self.ctx.run_dir
            solve = partial(solve_ode_pairs, self._teacher(nets), data.conds, cfg.regression_pairs,
                            self.ctx.latent_shape, cfg.regression_teacher_steps, self.schedule, data.seed,
                            nets.device, dist=self.ctx.dist)
            self.pairs = load_or_solve_pairs(Path(run_dir) / REGRESSION_PAIRS_FILE if run_dir else None, meta, solve)
        return self.pairs

    def critic_loss(self, nets: Nets, batch: Batch, samples: torch.Tensor | None) -> LossOut:
        """samples: the student's detached samples of this micro-batch (LossOut.critic_inputs), None for a fresh batch."""
        cfg, device = self.cfg, nets.device
        if samples is None:
            samples = self._generate(nets, batch, grad=False)
        # The fake score is only read where the DM term reads it; critic_t_shift = dm_t_shift trains it on that density
        # (FastGen's default: one sample_t for both phases).
        t = shift_timesteps(batch.randint(0, self.T, device=device), cfg.critic_t_shift, self.T, (0, self.T))
        eps = batch.randn(*samples.shape[1:], device=device)
        loss = fake_score_loss(nets.fake_score, samples, batch.cond, self.schedule, t, eps)
        logs = {"fake_score_loss": loss.detach().mean()}
        if cfg.gan:
            real = self._real_latents(batch).to(device)
            # Both sides get the run's conditioning (as DMD2 does): with each image's own size ids (batch.data_cond) on
            # the real rows, the head could tell real from generated by the time embedding alone.
            gan_d = gan_discriminator_loss(*self._logits(nets, [(real, batch.cond), (samples.detach(), batch.cond)],
                                                         batch))
            loss = loss + cfg.gan_discriminator_weight * gan_d
            logs["gan_d_loss"] = gan_d.detach().mean()
        return LossOut(loss, logs)

    def _logits(self, nets: Nets, inputs: list, batch: Batch) -> list:
        """Diffusion GAN: the head's logits on the fake score's middle features (a UNet's mid block, a transformer's
        middle block) at x_t, t ~ U[0, gan_t_max T) on the teacher's schedule (DDPM or flow), for each (x0, cond) of
        `inputs` (each its own t and noise, drawn in turn); one batched call for all of them (real and fake)."""
        x_ts, ts = [], []
        for x0, _ in inputs:
            ts.append(batch.randint(0, max(1, int(self.cfg.gan_t_max * self.T)), device=nets.device))
            x_ts.append(self.schedule.add_noise(x0, batch.randn(*x0.shape[1:], device=nets.device), ts[-1]))
        cond = inputs[0][1]
        for _, c in inputs[1:]:
            cond = cond.cat(c)
        logits = self.head(self.features.middle(nets.fake_score, torch.cat(x_ts), torch.cat(ts), cond))
        return list(logits.split([x.shape[0] for x in x_ts]))

    def _real_latents(self, batch: Batch):
        if batch.latents is None:
            raise ConfigError(
                "method.gan is on but the batch has no real latents: set data.images=FOLDER (image-caption pairs, "
                "or toy:N for the toy world) or turn the GAN off with --set method.gan=false"
            )
        return batch.latents

    # ---- inference ----
    def recipe(self, family) -> dict:
        if not self.timesteps:
            self._resolve(family)
        if is_flow(self.schedule):
            return flow_euler_recipe(self.schedule, self.timesteps, family)
        return {
            "scheduler_class": "LCMScheduler",
            "scheduler_config": {"original_inference_steps": lcm_original_steps(self.timesteps, self.T)},
            "timesteps": list(self.timesteps), "num_inference_steps": len(self.timesteps),
            "guidance_scale": 0.0, "eta": 0.0,
        }

    def sample(self, nets: Nets, cond, x_T, generator=None, steps: int | None = None):
        """The student run exactly as the recipe's LCMScheduler runs it (fresh noise between steps)."""
        if steps is not None and steps != len(self.timesteps):
            raise ValueError(
                f"this student was trained for the timesteps {self.timesteps}; sample with steps={len(self.timesteps)} "
                "or train with method.timesteps set to the steps you want"
            )
        if is_flow(self.schedule):
            return ddim_sample(nets.student, x_T, self.timesteps, cond, self.schedule)  # Euler, as the recipe runs
        return lcm_sample(nets.student, x_T, self.timesteps, cond, self.schedule, generator)


register_method("dmd", DMDConfig, DMDDistiller)
