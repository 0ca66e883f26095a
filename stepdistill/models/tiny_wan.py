"""A tiny, randomly initialised Wan text-to-video pipeline, built offline for tests.

A stock WanPipeline over tiny parts laid out like Wan 2.1's: a WanTransformer3DModel, an AutoencoderKLWan (causal 3D
VAE, temporal and spatial factor 2, per-channel latents mean / std), a UMT5 encoder over the project's word-level T5
tokenizer (models.tiny_flow), and Wan's UniPC flow scheduler config.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from transformers import UMT5Config, UMT5EncoderModel

from .tiny_flow import build_t5_word_tokenizer
from .wan_spec import TINY_ARCH, WAN_SCHEDULER_CONFIG


def tiny_wan_configs(arch: dict | None = None, tokenizer=None) -> dict[str, dict]:
    """Complete configs of every part: defaults, then `arch` overrides, then the keys that tie the parts together."""
    arch = arch or {}
    unknown = set(arch) - set(TINY_ARCH)
    if unknown:
        raise ValueError(f"arch has unknown parts {sorted(unknown)}: a tiny wan pipeline has {sorted(TINY_ARCH)}")
    cfg = {part: {**TINY_ARCH[part], **arch.get(part, {})} for part in TINY_ARCH}
    tr, vae, te = cfg["transformer"], cfg["vae"], cfg["text_encoder"]
    tok = tokenizer or build_t5_word_tokenizer()
    vae.setdefault("latents_mean", [round(0.1 * (i - 8), 2) for i in range(vae["z_dim"])])
    vae.setdefault("latents_std", [round(0.5 + 0.1 * i, 2) for i in range(vae["z_dim"])])
    tr.setdefault("in_channels", vae["z_dim"])
    tr.setdefault("out_channels", vae["z_dim"])
    tr.setdefault("text_dim", te["d_model"])
    te.setdefault("vocab_size", len(tok))
    te.setdefault("pad_token_id", tok.pad_token_id)
    te.setdefault("eos_token_id", tok.eos_token_id)
    te.setdefault("decoder_start_token_id", tok.pad_token_id)
    return cfg


def build_tiny_wan_pipeline(seed: int = 0, words: list[str] | None = None, arch: dict | None = None) -> WanPipeline:
    """A randomly initialised WanPipeline in memory, identical for identical arguments."""
    tok = build_t5_word_tokenizer(words)
    cfg = tiny_wan_configs(arch, tok)
    builders = [("transformer", lambda c: WanTransformer3DModel(**c)), ("vae", lambda c: AutoencoderKLWan(**c)),
                ("text_encoder", lambda c: UMT5EncoderModel(UMT5Config(**c)))]
    parts = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders):
            torch.manual_seed(seed + offset)
            parts[name] = build(cfg[name]).eval()
    scheduler = UniPCMultistepScheduler(**{k: v for k, v in WAN_SCHEDULER_CONFIG.items() if not k.startswith("_")})
    return WanPipeline(**parts, tokenizer=tok, scheduler=scheduler)


def save_tiny_wan_pipeline(directory, seed: int = 0, words: list[str] | None = None, arch: dict | None = None) -> Path:
    """Build a tiny Wan pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    directory = Path(directory)
    build_tiny_wan_pipeline(seed, words, arch).save_pretrained(directory, safe_serialization=True)
    return directory
