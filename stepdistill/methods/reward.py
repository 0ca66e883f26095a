"""Human-feedback LoRA (Hyper-SD sec. 3.2) trained with ReFL (Xu et al. 2023, ImageReward sec. 4.2).

From noise, the student denoises without grad to a random late timestep t in [t_min, t_max] along its own
sampler's timesteps (DDIM jumps), predicts x0 there once with grad, the VAE decodes it, and a reward model scores
the image against its prompt. The loss is the hinge ReLU(alpha - r) (Hyper-SD eq. 4): samples already above the
threshold alpha give no gradient, so the LoRA is pushed only where the reward is low.

The student starts from a distilled LoRA (method.init_lora, e.g. a TSCD run's final/) and the exported LoRA keeps
that LoRA's recipe. Feedback learning may shift the output domain (Hyper-SD sec. 3.2), so the result is meant to be
merged back with a ratio r: W = W_base + (1 - r) dW_tscd + r dW_feedback, i.e.
`pipelines.load(base, "tscd/final", lora_scale=1 - r, extra_loras=(("reward/final", r),))`.

Reward models (toy judge, ImageReward, LAION aesthetic, HPSv2.1) live in metrics/reward_models.py; the builder loads
the one this method names (`models_to_load`), the method only calls it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from ..core.samplers import recipe_timesteps
from ..core.solvers import ddim_step
from ..errors import ConfigError
from ..metrics.reward_models import REWARD_MODELS, REWARD_THRESHOLDS, load_reward_model
from ..registry import register_method
from .base import Batch, Distiller, LossOut, Nets, RunContext, trailing_ddim_recipe
from .config import MethodConfig
from .consistency import start_from_lora
from .dm import through_frozen_nets

log = logging.getLogger(__name__)

def refl_hinge(rewards: torch.Tensor, threshold: float) -> torch.Tensor:
    """ReLU(alpha - r) per sample (Hyper-SD eq. 4; ReFL's relu(2 - r) for ImageReward)."""
    return torch.relu(threshold - rewards)


def refl_window(t_min: int, t_max: int, first: int) -> tuple[int, int]:
    """ReFL's [t_min, t_max] within the student's sampler: its first timestep is where it takes pure noise, so a
    later t would hand it pure noise at a timestep it was never trained on (a dmd student told t = 399)."""
    if t_min > first:
        raise ConfigError(
            f"method.t_min={t_min} lies above the student's first sampling timestep {first} (its recipe): "
            f"set method.t_min <= {first}, e.g. method.t_min={first // 2} method.t_max={first}"
        )
    if t_max > first:
        log.warning("method.t_max=%d lies above the student's first timestep %d: ReFL samples t in [%d, %d]",
                    t_max, first, t_min, first)
    return t_min, min(t_max, first)


@torch.no_grad()
def denoise_to(denoiser, x_T, t, timesteps, cond, schedule):
    """DDIM from x_T at timesteps[0] along `timesteps` (descending), each sample stopping at its own t (no grad)."""
    x, n, ndim = x_T, x_T.shape[0], x_T.ndim
    grid = [int(s) for s in timesteps]
    for i, t_i in enumerate(grid):
        active = t < t_i
        if not bool(active.any()):
            break
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        dest = torch.clamp(t, min=t_next)
        out = denoiser(x, torch.full((n,), t_i, device=x.device, dtype=torch.long), cond)
        alpha, sigma = schedule.alpha_sigma(dest, ndim)
        x_next = ddim_step(out.x0, out.eps, alpha.to(x.device), sigma.to(x.device)).to(x_T.dtype)
        x = torch.where(active.reshape(-1, *([1] * (ndim - 1))), x_next, x)
    return x


@dataclass
class RewardConfig(MethodConfig):
    name: str = "reward"
    reward_model: str = "toy_judge"  # toy_judge | imagereward | aesthetic | hpsv2
    reward_weights: str = ""  # local weights of the reward model (toy_judge: a judge folder; default: the shipped one)
    clip_weights: str = ""  # aesthetic only: a CLIP ViT-L/14 folder or hub id (default openai/clip-vit-large-patch14)
    threshold: float | None = None  # alpha of ReLU(alpha - r); null = REWARD_THRESHOLDS[reward_model]
    t_min: int = 200  # ReFL's [t_left, t_right]: x0 is predicted (with grad) at t ~ U[t_min, t_max]
    t_max: int = 600
    init_lora: str = ""  # the distilled LoRA folder to start from (its recipe is kept), e.g. runs/tscd/final
    steps: int = 4  # sampler steps when there is no init_lora recipe (trailing DDIM, guidance 0)

    def validate(self):
        if self.reward_model not in REWARD_MODELS:
            raise ConfigError(f"method.reward_model must be one of {sorted(REWARD_MODELS)} (got {self.reward_model!r})")
        if not 0 <= self.t_min <= self.t_max < 1000:
            raise ConfigError(f"need 0 <= method.t_min <= method.t_max < 1000 (got {self.t_min}, {self.t_max})")
        if self.steps < 1:
            raise ConfigError(f"method.steps must be >= 1 (got {self.steps})")
        if self.init_lora and not Path(self.init_lora).is_dir():
            raise ConfigError(f"method.init_lora={self.init_lora!r} is not a folder: pass a LoRA folder stepdistill "
                              "exported, e.g. runs/tscd/final")


RECIPE_SAMPLER_FIELDS = ("scheduler_class", "scheduler_config", "timesteps", "num_inference_steps", "guidance_scale", "eta")


class RewardDistiller(Distiller):
    def __init__(self, cfg: RewardConfig, schedule):
        super().__init__(cfg, schedule)
        self.threshold = cfg.threshold if cfg.threshold is not None else REWARD_THRESHOLDS[cfg.reward_model]
        self._recipe = trailing_ddim_recipe(cfg.steps)

    @classmethod
    def models_to_load(cls, cfg: RewardConfig) -> dict:
        return {"reward": partial(load_reward_model, cfg.reward_model, cfg.reward_weights,
                                  clip_weights=cfg.clip_weights)}

    def setup(self, nets: Nets, ctx: RunContext):
        from ..core.recipe import RECIPE_FILE, Recipe

        super().setup(nets, ctx)
        cfg = self.cfg
        if cfg.init_lora:
            start_from_lora(nets.denoiser, cfg.init_lora)
            if (Path(cfg.init_lora) / RECIPE_FILE).is_file():
                base = Recipe.load(cfg.init_lora).to_dict()
                self._recipe = {k: base[k] for k in RECIPE_SAMPLER_FIELDS}
        first = int(recipe_timesteps(self._recipe, None, self.T)[0])
        self.t_min, self.t_max = refl_window(cfg.t_min, cfg.t_max, first)
        if ctx.decode is None:
            raise RuntimeError("the reward method needs the VAE decoder (RunContext.decode): train/build.py sets it")
        self.decode = ctx.decode
        self.reward = ctx.models["reward"]

    def student_loss(self, nets: Nets, batch: Batch, step: int) -> LossOut:
        device = nets.device
        x_T = batch.randn(*batch.latent_shape[1:], device=device)
        t = batch.randint(self.t_min, self.t_max + 1, device=device)
        x_t = denoise_to(nets.student, x_T, t, recipe_timesteps(self._recipe, None, self.T), batch.cond, self.schedule)
        x0 = nets.student(x_t, t, batch.cond).x0
        rewards = {}

        def hinge(x):
            r = self.reward(self.decode(x), batch.prompts)
            rewards["r"] = r.detach()
            return refl_hinge(r, self.threshold)

        # Gradient to x0 only: the VAE and the reward model stay frozen and collect no .grad.
        loss = through_frozen_nets(hinge, x0)
        r = rewards["r"]
        logs = {"loss": loss.detach().mean(), "reward": r.detach().mean(),
                "above_threshold": (r >= self.threshold).float().mean()}
        return LossOut(loss, logs)

    def recipe(self, family) -> dict:
        return dict(self._recipe)


register_method("reward", RewardConfig, RewardDistiller)
