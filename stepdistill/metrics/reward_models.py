"""Reward and preference models, loaded once for both users: the ReFL stage (methods/reward.py, through
train/build.py) and the preference metric (eval/preference.py). Each loader returns a function
(images float [B, 3, H, W] in [-1, 1], prompts) -> rewards [B], differentiable in the images.

Models: the toy judge's alignment probability (the toy world, always available), ImageReward, the LAION aesthetic
predictor on CLIP ViT-L/14 and HPSv2.1, each behind an optional import and local weights; a missing one raises
RewardUnavailable with what to install or download.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConfigError

log = logging.getLogger(__name__)

# A reward model: (images float [B, 3, H, W] in [-1, 1], prompts) -> rewards [B], differentiable in the images.
RewardFn = Callable[[torch.Tensor, list[str]], torch.Tensor]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_L14 = "openai/clip-vit-large-patch14"


class RewardUnavailable(RuntimeError):
    """A reward model that cannot run here; the message says what to install or where to put the weights."""


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
    """The toy judge's alignment probability of an image given its toy caption (stepdistill.metrics.toy_judge)."""
    import numpy as np

    from ..data.toy_world import IMAGE_SIZE, parse_caption
    from ..metrics.toy_judge import load_judge

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
