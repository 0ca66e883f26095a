"""Human-feedback LoRA (Hyper-SD sec. 3.2) trained with ReFL (Xu et al. 2023, ImageReward sec. 4.2).

From noise, the student denoises without grad to a random late timestep t in [t_min, t_max] along its own
sampler's timesteps (DDIM jumps), predicts x0 there once with grad, the VAE decodes it, and a reward model scores
the image against its prompt. The loss is the hinge ReLU(alpha - r) (Hyper-SD eq. 4): samples already above the
threshold alpha give no gradient, so the LoRA is pushed only where the reward is low.

The student starts from a distilled LoRA (method.init_lora, e.g. a TSCD run's final/) and the exported LoRA keeps
that LoRA's recipe. Feedback learning may shift the output domain (Hyper-SD sec. 3.2), so the result is meant to be
merged back with a ratio r: W = W_base + (1 - r) dW_tscd + r dW_feedback, i.e.
`pipelines.load(base, "tscd/final", lora_scale=1 - r, extra_loras=(("reward/final", r),))`.

Reward models: the toy judge's alignment probability (the toy world, always available), ImageReward, the LAION
aesthetic predictor on CLIP ViT-L/14 and HPSv2.1, each behind an optional import and local weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import ConfigError, MethodConfig
from ..core.samplers import recipe_timesteps
from ..core.solvers import ddim_step
from ..registry import register_method
from .base import Batch, Distiller, LossOut, Nets, RunContext, trailing_ddim_recipe
from .consistency import start_from_lora
from .dmd import through_frozen_nets

log = logging.getLogger(__name__)

# A reward model: (images float [B, 3, H, W] in [-1, 1], prompts) -> rewards [B], differentiable in the images.
RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = "openai/clip-vit-large-patch14"


class RewardUnavailable(RuntimeError):
    """A reward model that cannot run here; the message says what to install or where to put the weights."""


# ---- reward models ---------------------------------------------------------------------------------------------

def clip_pixels(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """Images in [-1, 1] -> CLIP's input (centre crop, bicubic resize, mean/std), differentiable unlike PIL processors."""
    h, w = images.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = (images[..., top : top + side, left : left + side].float() + 1) / 2
    x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=side > size)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def judge_alignment_probability(judge, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """P(the judge reads every field the caption states) = prod over stated fields of softmax(logits)[label]."""
    log_p = 0.0
    for i, logits in enumerate(judge(images)):
        target = labels[:, i]
        stated = target >= 0
        picked = logits.log_softmax(1).gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
        log_p = log_p + torch.where(stated, picked, torch.zeros_like(picked))
    return log_p.exp()


def load_toy_judge(weights: str, device, clip_weights: str = "") -> RewardFn:
    """The toy judge's alignment probability of an image given its toy caption (stepdistill.toy.judge)."""
    import numpy as np

    from ..toy.judge import load_judge
    from ..toy.world import IMAGE_SIZE, parse_caption

    judge = load_judge(weights or None, device=device).requires_grad_(False)

    def reward(images, prompts):
        if images.shape[-1] != IMAGE_SIZE:
            images = F.interpolate(images.float(), size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        labels = torch.from_numpy(np.stack([parse_caption(p) for p in prompts])).to(images.device)
        return judge_alignment_probability(judge, images.float(), labels)

    return reward


def load_imagereward(weights: str, device, clip_weights: str = "") -> RewardFn:
    """ImageReward (Xu et al. 2023) through its package's differentiable `score_gard`, as its ReFL code uses it."""
    try:
        import ImageReward as image_reward
    except ImportError as e:
        raise RewardUnavailable("the imagereward reward needs the ImageReward package: pip install image-reward") from e
    try:
        model = image_reward.load(weights or "ImageReward-v1.0", device=device)
    except Exception as e:  # any failure here means the weights are not usable offline
        raise RewardUnavailable(
            f"ImageReward weights {weights or 'ImageReward-v1.0'!r} could not be loaded ({e}): download "
            "ImageReward.pt and med_config.json (THUDM/ImageReward) on a connected machine and pass "
            "method.reward_weights=PATH/ImageReward.pt"
        ) from e
    model.requires_grad_(False)

    def reward(images, prompts):
        tokens = model.blip.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        scores = model.score_gard(tokens.input_ids.to(device), tokens.attention_mask.to(device), clip_pixels(images))
        return scores.reshape(-1)

    return reward


def load_aesthetic(weights: str, device, clip_weights: str = "") -> RewardFn:
    """LAION's improved aesthetic predictor: an MLP on the normalised CLIP ViT-L/14 image embedding."""
    from ..metrics.aesthetic import AESTHETIC_WEIGHTS, AestheticMLP

    if not weights or not Path(weights).is_file():
        raise RewardUnavailable(
            f"the aesthetic reward needs its head's weights: download {AESTHETIC_WEIGHTS} "
            "(christophschuhmann/improved-aesthetic-predictor) and pass method.reward_weights=PATH"
        )
    from transformers import CLIPVisionModelWithProjection

    try:
        vision = CLIPVisionModelWithProjection.from_pretrained(clip_weights or CLIP_L14)
    except OSError as e:
        raise RewardUnavailable(
            f"CLIP ViT-L/14 {clip_weights or CLIP_L14!r} is not available: run `huggingface-cli download {CLIP_L14}` "
            "on a connected machine, or pass method.clip_weights=DIR"
        ) from e
    head = AestheticMLP()
    head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    vision = vision.eval().requires_grad_(False).to(device)
    head = head.eval().requires_grad_(False).to(device)

    def reward(images, prompts):
        return head(vision(pixel_values=clip_pixels(images)).image_embeds)

    return reward


def load_hpsv2(weights: str, device, clip_weights: str = "") -> RewardFn:
    """HPSv2.1 (Wu et al. 2023): cosine of open_clip ViT-H-14 image and text embeddings, with HPS's fine-tuned weights."""
    try:
        import open_clip
    except ImportError as e:
        raise RewardUnavailable("the hpsv2 reward needs open_clip: pip install 'stepdistill[clip]'") from e
    if not weights or not Path(weights).is_file():
        raise RewardUnavailable(
            "the hpsv2 reward needs HPS_v2.1_compressed.pt (xswu/HPSv2): download it and pass method.reward_weights=PATH"
        )
    model = open_clip.create_model("ViT-H-14", pretrained=None)
    checkpoint = load_state_dict_safely(weights)
    model.load_state_dict(checkpoint.get("state_dict", checkpoint))
    model = model.eval().requires_grad_(False).to(device)
    tokenizer = open_clip.get_tokenizer("ViT-H-14")

    def reward(images, prompts):
        image = F.normalize(model.encode_image(clip_pixels(images)), dim=-1)
        text = F.normalize(model.encode_text(tokenizer(prompts).to(device)), dim=-1)
        return (image * text).sum(-1)

    return reward


def load_state_dict_safely(path) -> dict:
    """Tensors of a third-party checkpoint without running pickled code: safetensors, or torch.load with
    weights_only=True (tensors and plain containers only). A file that needs more is refused unless
    STEPDISTILL_TRUST_PICKLE=1 says the user trusts it: unpickling runs whatever code the file names."""
    import os

    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle's refusal comes as several error types
        if os.environ.get("STEPDISTILL_TRUST_PICKLE") != "1":
            raise RewardUnavailable(
                f"{path} needs full unpickling, which can run code ({type(err).__name__}): convert it to safetensors, "
                "or set STEPDISTILL_TRUST_PICKLE=1 if you trust the file"
            ) from err
        log.warning("unpickling %s with weights_only=False (STEPDISTILL_TRUST_PICKLE=1)", path)
        return torch.load(path, map_location="cpu", weights_only=False)


REWARD_MODELS: dict[str, Callable[..., RewardFn]] = {
    "toy_judge": load_toy_judge,
    "imagereward": load_imagereward,
    "aesthetic": load_aesthetic,
    "hpsv2": load_hpsv2,
}
# Hinge thresholds alpha when method.threshold is unset. ImageReward's 2.0 is ReFL's (relu(2 - r)); the others are
# ours (Hyper-SD gives none): high in each model's range, so most samples still get a gradient.
REWARD_THRESHOLDS = {"toy_judge": 0.95, "imagereward": 2.0, "aesthetic": 7.0, "hpsv2": 0.32}


def register_reward_model(name: str, loader: Callable[..., RewardFn], threshold: float) -> None:
    """Make `method.reward_model: <name>` usable: loader(weights, device, clip_weights) -> RewardFn."""
    REWARD_MODELS[name] = loader
    REWARD_THRESHOLDS[name] = threshold


def load_reward_model(name: str, weights: str = "", device="cpu", clip_weights: str = "") -> RewardFn:
    """The reward function `name`; RewardUnavailable says what is missing."""
    if name not in REWARD_MODELS:
        raise ConfigError(f"unknown reward model {name!r}: choose one of {sorted(REWARD_MODELS)}")
    return REWARD_MODELS[name](weights, device, clip_weights)


# ---- ReFL ------------------------------------------------------------------------------------------------------

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

    def setup(self, nets: Nets, ctx: RunContext):
        from ..core.recipe import RECIPE_FILE, Recipe

        super().setup(nets, ctx)
        cfg = self.cfg
        if cfg.init_lora:
            start_from_lora(nets.unet, cfg.init_lora)
            if (Path(cfg.init_lora) / RECIPE_FILE).is_file():
                base = Recipe.load(cfg.init_lora).to_dict()
                self._recipe = {k: base[k] for k in RECIPE_SAMPLER_FIELDS}
        first = int(recipe_timesteps(self._recipe, None, self.T)[0])
        self.t_min, self.t_max = refl_window(cfg.t_min, cfg.t_max, first)
        if ctx.decode is None:
            raise RuntimeError("the reward method needs the VAE decoder (RunContext.decode): train/build.py sets it")
        self.decode = ctx.decode
        self.reward = load_reward_model(cfg.reward_model, cfg.reward_weights, nets.device, cfg.clip_weights)

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
