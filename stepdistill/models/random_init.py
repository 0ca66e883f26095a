"""Random-init FamilyModels built in code from a family's architecture configs: full size (the released models'
architectures, for benchmarks on a GPU) or tiny (the test architectures, on the CPU). No weights are needed to
time a model, so nothing is downloaded and no multi-GB folder is written.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .base import FamilyModel, library_class
from .registry import get_family
from .tokenizer import TINY_WORDS, build_word_tokenizer

VAES = ("full", "tiny")
# TAESD / TAESDXL (madebyollin/taesd, taesdxl) are AutoencoderTiny's defaults; the tiny one is for CPU tests.
TINY_VAE_CONFIGS = {
    "full": {},
    "tiny": dict(encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
                 num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1)),
}


def model_configs(family: str, tiny: bool) -> dict[str, dict]:
    """Architecture configs of every part: the released model's (FamilyModel.full_configs), or the tiny test
    model's (models.tiny)."""
    family_cls = get_family(family)
    if not tiny:
        return {part: dict(cfg) for part, cfg in family_cls.full_configs.items()}
    from .tiny import tiny_configs

    return tiny_configs(family)


def build_vae(config: dict, kind: str, tiny: bool, family_cls=None):
    """The family's VAE from `config` ("full"), or an AutoencoderTiny ("tiny": TAESD's size, or a tiny one)."""
    if kind == "full":
        return (family_cls.vae_class if family_cls else library_class("diffusers", "AutoencoderKL"))(**config)
    return library_class("diffusers", "AutoencoderTiny")(**TINY_VAE_CONFIGS["tiny" if tiny else "full"])


@contextmanager
def default_dtype(dtype: torch.dtype):
    """Create parameters directly in `dtype` (on a GPU: no float32 copy of a 2.6 B-parameter UNet first)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_family_model(family: str, tiny: bool, vae: str, device, dtype, seed: int = 0) -> FamilyModel:
    """A random-init FamilyModel with the family's architecture (built directly on `device`)."""
    if vae not in VAES:
        raise ValueError(f"vae {vae!r} is not supported: use one of {', '.join(VAES)}")
    family_cls = get_family(family)
    cfg = model_configs(family, tiny)
    # A word-level CLIP tokenizer stands in for CLIP's BPE vocabulary (not shipped offline); prompts are
    # padded to 77 tokens either way, so the text encoders do the same work.
    tokenizer = build_word_tokenizer(TINY_WORDS)
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype if torch.device(device).type == "cuda" else torch.float32):
        unet = family_cls.denoiser_class(**cfg[family_cls.denoiser_prefix])
        autoencoder = build_vae(cfg["vae"], vae, tiny, family_cls)
        encoders = []
        for encoder, _, encoder_class, _ in family_cls.text_parts:
            model_class = library_class("transformers", encoder_class)
            encoders.append(model_class(model_class.config_class(**{**ids, **cfg[encoder]})))
    for module in (unet, autoencoder, *encoders):
        module.requires_grad_(False).eval()
        if module.dtype != dtype:
            module.to(dtype=dtype)
    if torch.device(device).type == "cuda":
        # NHWC convolutions are the fast path for cuDNN on tensor cores.
        unet.to(memory_format=torch.channels_last)
        autoencoder.to(memory_format=torch.channels_last)
    tokenizers = [tokenizer] * len(encoders)
    return family_cls(unet, autoencoder, encoders, tokenizers, family_cls.default_scheduler_config, path="random-init")
