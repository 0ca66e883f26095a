"""Tiny, randomly initialised SD1.5- and SDXL-architecture pipelines, built offline for tests and the toy world.

The architecture is a parameter: `arch` overrides any config key of "unet", "vae", "text_encoder" and
"text_encoder_2"; the keys that tie the parts together (cross-attention width, added-embedding width, vocabulary
size, sample sizes) are derived from the others unless given explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .tokenizer import TINY_WORDS, build_word_tokenizer, save_word_tokenizer

FAMILIES = ("sd15", "sdxl")
SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler}
SDXL_TIME_IDS = 6  # (original H, W, crop top, left, target H, W)

# Prompts made of TINY_WORDS only, for tests and demos on the tiny teachers.
TINY_PROMPTS = [
    "a red cat on the sea", "a photo of a blue car in the city", "a small yellow bird in a tree",
    "a painting of a white house and a green field", "a big black dog in the night", "a drawing of a red flower",
    "a blue circle and a yellow square", "the sky with a white triangle", "a green tree in the day",
    "a photo of a small cat with a big dog",
]

# Stable Diffusion's training noise schedule, shared by SD1.5 and SDXL.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", steps_offset=1, timestep_spacing="leading", clip_sample=False,
    set_alpha_to_one=False, skip_prk_steps=True,
)

# Block layouts follow the real models (SD1.5: attention in the high-resolution blocks; SDXL: not in the
# first block, linear projections, text_time added embedding), at 32/64 channels.
DEFAULT_ARCH = {
    "sd15": {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                    scaling_factor=0.18215),
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32, hidden_act="quick_gelu"),
    },
    "sdxl": {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        ),
        "vae": dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, latent_channels=4,
                    scaling_factor=0.13025, force_upcast=True),
        # Two encoders of different widths, and a projection narrower than encoder 2, as in SDXL (768, 1280,
        # 1280): a mix-up between hidden states and pooled embeddings fails loudly instead of passing.
        "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             projection_dim=32, hidden_act="quick_gelu"),
        "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               projection_dim=32, hidden_act="gelu"),
    },
}


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported: use one of {sorted(choices)}")


def tiny_configs(family: str = "sd15", sample_size: int = 8, arch: dict | None = None, vocab_size: int = 49408,
                 token_ids: dict | None = None, model_max_length: int = 77) -> dict[str, dict]:
    """Complete configs of every part: defaults, then `arch` overrides, then the derived linking keys."""
    _check_choice("family", family, FAMILIES)
    defaults = DEFAULT_ARCH[family]
    arch = arch or {}
    unknown = set(arch) - set(defaults)
    if unknown:
        raise ValueError(f"arch has unknown parts {sorted(unknown)}: a {family} pipeline has {sorted(defaults)}")
    cfg = {part: {**defaults[part], **arch.get(part, {})} for part in defaults}

    for part in (p for p in cfg if p.startswith("text_encoder")):
        cfg[part].setdefault("vocab_size", vocab_size)
        cfg[part].setdefault("max_position_embeddings", model_max_length)
        for key, value in (token_ids or {}).items():
            cfg[part].setdefault(key, value)

    vae, unet = cfg["vae"], cfg["unet"]
    n_vae_blocks = len(vae["block_out_channels"])
    vae.setdefault("down_block_types", ("DownEncoderBlock2D",) * n_vae_blocks)
    vae.setdefault("up_block_types", ("UpDecoderBlock2D",) * n_vae_blocks)
    vae.setdefault("sample_size", sample_size * 2 ** (n_vae_blocks - 1))
    unet.setdefault("sample_size", sample_size)
    unet.setdefault("in_channels", vae["latent_channels"])
    unet.setdefault("out_channels", vae["latent_channels"])
    if family == "sd15":
        unet.setdefault("cross_attention_dim", cfg["text_encoder"]["hidden_size"])
    else:
        # SDXL concatenates both encoders' hidden states; its added embedding reads the time ids and pooled text.
        width = cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
        unet.setdefault("cross_attention_dim", width)
        unet.setdefault(
            "projection_class_embeddings_input_dim",
            SDXL_TIME_IDS * unet["addition_time_embed_dim"] + cfg["text_encoder_2"]["projection_dim"],
        )
    return cfg


def build_tiny_pipeline(family: str = "sd15", seed: int = 0, words: list[str] | None = None, sample_size: int = 8,
                        arch: dict | None = None, scheduler: str = "ddim", model_max_length: int = 77):
    """A randomly initialised StableDiffusion(XL)Pipeline in memory, identical for identical arguments."""
    _check_choice("family", family, FAMILIES)
    _check_choice("scheduler", scheduler, SCHEDULERS)
    tokenizer = build_word_tokenizer(words or TINY_WORDS, model_max_length)
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    cfg = tiny_configs(family, sample_size, arch, len(tokenizer), token_ids, model_max_length)

    # Each part gets its own seed inside a forked RNG: overriding one part leaves the others' weights unchanged,
    # and the caller's global RNG state is untouched.
    parts = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate([
            ("unet", lambda c: UNet2DConditionModel(**c)),
            ("vae", lambda c: AutoencoderKL(**c)),
            ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**c))),
            ("text_encoder_2", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
        ]):
            if name in cfg:
                torch.manual_seed(seed + offset)
                parts[name] = build(cfg[name]).eval()

    sched = SCHEDULERS[scheduler].from_config(SD_SCHEDULER_CONFIG)
    if family == "sd15":
        return StableDiffusionPipeline(
            **parts, tokenizer=tokenizer, scheduler=sched, safety_checker=None, feature_extractor=None,
            image_encoder=None, requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        **parts, tokenizer=tokenizer, tokenizer_2=tokenizer, scheduler=sched, image_encoder=None,
        feature_extractor=None, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )


def save_tiny_pipeline(directory, family: str = "sd15", seed: int = 0, words: list[str] | None = None,
                       sample_size: int = 8, arch: dict | None = None, scheduler: str = "ddim",
                       model_max_length: int = 77) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(family, seed, words, sample_size, arch, scheduler, model_max_length)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Add vocab.json + merges.txt next to tokenizer.json so older transformers' CLIPTokenizer loads it too.
    for sub in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        save_word_tokenizer(directory / sub, words or TINY_WORDS, model_max_length)
    return directory
