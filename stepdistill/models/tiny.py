"""Tiny, randomly initialised pipelines of every registered family, built offline for tests and the toy world.

The architecture is a parameter: `arch` overrides any config key of the family's parts (FamilyModel.tiny_arch:
"unet", "vae" and its text encoders); the keys that tie the parts together (cross-attention width, added-embedding
width, vocabulary size, sample sizes) are derived from the others unless given explicitly.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler

from .base import library_class
from .registry import get_family
from .sd_common import SD_SCHEDULER_CONFIG  # noqa: F401  (re-exported: the toy teachers' schedule)
from .tokenizer import TINY_WORDS, build_word_tokenizer, save_word_tokenizer

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "euler": EulerDiscreteScheduler, "pndm": PNDMScheduler}

# Prompts made of TINY_WORDS only, for tests and demos on the tiny teachers.
TINY_PROMPTS = [
    "a red cat on the sea", "a photo of a blue car in the city", "a small yellow bird in a tree",
    "a painting of a white house and a green field", "a big black dog in the night", "a drawing of a red flower",
    "a blue circle and a yellow square", "the sky with a white triangle", "a green tree in the day",
    "a photo of a small cat with a big dog",
]


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is not supported: use one of {sorted(choices)}")


def tiny_configs(family: str = "sd15", sample_size: int = 8, arch: dict | None = None, vocab_size: int = 49408,
                 token_ids: dict | None = None, model_max_length: int = 77) -> dict[str, dict]:
    """Complete configs of every part: defaults, then `arch` overrides, then the derived linking keys."""
    family_cls = get_family(family)
    own = family_cls.tiny_part_configs(sample_size, arch, model_max_length)
    if own is not None:
        return own
    defaults = family_cls.tiny_arch
    arch = arch or {}
    unknown = set(arch) - set(defaults)
    if unknown:
        raise ValueError(f"arch has unknown parts {sorted(unknown)}: a {family} pipeline has {sorted(defaults)}")
    cfg = {part: {**defaults[part], **arch.get(part, {})} for part in defaults}

    for part in (encoder for encoder, _, _, _ in family_cls.text_parts):
        cfg[part].setdefault("vocab_size", vocab_size)
        cfg[part].setdefault("max_position_embeddings", model_max_length)
        for key, value in (token_ids or {}).items():
            cfg[part].setdefault(key, value)

    vae, unet = cfg["vae"], cfg[family_cls.denoiser_prefix]
    n_vae_blocks = len(vae["block_out_channels"])
    vae.setdefault("down_block_types", ("DownEncoderBlock2D",) * n_vae_blocks)
    vae.setdefault("up_block_types", ("UpDecoderBlock2D",) * n_vae_blocks)
    vae.setdefault("sample_size", sample_size * 2 ** (n_vae_blocks - 1))
    unet.setdefault("sample_size", sample_size)
    unet.setdefault("in_channels", vae["latent_channels"])
    unet.setdefault("out_channels", vae["latent_channels"])
    family_cls.link_tiny_configs(cfg)
    return cfg


def build_tiny_pipeline(family: str = "sd15", seed: int = 0, words: list[str] | None = None, sample_size: int = 8,
                        arch: dict | None = None, scheduler: str = "ddim", model_max_length: int = 77):
    """A randomly initialised pipeline of the family in memory, identical for identical arguments."""
    family_cls = get_family(family)
    own = family_cls.tiny_pipeline(seed, words, sample_size, arch, model_max_length)
    if own is not None:
        return own
    _check_choice("scheduler", scheduler, SCHEDULERS)
    tokenizer = build_word_tokenizer(words or TINY_WORDS, model_max_length)
    token_ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id)
    cfg = tiny_configs(family, sample_size, arch, len(tokenizer), token_ids, model_max_length)

    # Each part gets its own seed inside a forked RNG: overriding one part leaves the others' weights unchanged,
    # and the caller's global RNG state is untouched.
    builders = [(family_cls.denoiser_prefix, lambda c: family_cls.denoiser_class(**c)),
                ("vae", lambda c: family_cls.vae_class(**c))]
    for encoder, _, encoder_class, _ in family_cls.text_parts:
        model_class = library_class("transformers", encoder_class)
        builders.append((encoder, lambda c, m=model_class: m(m.config_class(**c))))
    parts = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders):
            torch.manual_seed(seed + offset)
            parts[name] = build(cfg[name]).eval()

    sched = SCHEDULERS[scheduler].from_config(family_cls.default_scheduler_config)
    tokenizers = {tok: tokenizer for _, tok, _, _ in family_cls.text_parts}
    return family_cls.pipeline_class(**parts, **tokenizers, scheduler=sched, **family_cls.pipeline_kwargs)


def save_tiny_pipeline(directory, family: str = "sd15", seed: int = 0, words: list[str] | None = None,
                       sample_size: int = 8, arch: dict | None = None, scheduler: str = "ddim",
                       model_max_length: int = 77) -> Path:
    """Build a tiny pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    directory = Path(directory)
    pipe = build_tiny_pipeline(family, seed, words, sample_size, arch, scheduler, model_max_length)
    pipe.save_pretrained(directory, safe_serialization=True)
    # Add vocab.json + merges.txt next to tokenizer.json so older transformers' CLIPTokenizer loads it too.
    for _, sub, _, tokenizer_class in get_family(family).text_parts:
        if tokenizer_class.startswith("CLIPTokenizer"):
            save_word_tokenizer(directory / sub, words or TINY_WORDS, model_max_length)
    return directory
