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
    "tiny": {"encoder_block_out_channels": (16, 16), "decoder_block_out_channels": (16, 16),
                 "num_encoder_blocks": (1, 1), "num_decoder_blocks": (1, 1)},
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
    """The family's VAE from `config` ("full"), or an AutoencoderTiny ("tiny": TAESD's size, or a tiny one) with the
    family's latent channels (TAESD 4, TAEF1 16)."""
    if kind == "full":
        return (family_cls.vae_class if family_cls else library_class("diffusers", "AutoencoderKL"))(**config)
    channels = {"latent_channels": config["latent_channels"]} if "latent_channels" in config else {}
    return library_class("diffusers", "AutoencoderTiny")(**TINY_VAE_CONFIGS["tiny" if tiny else "full"], **channels)


def _bench_tokenizers(family_cls) -> list:
    """One word-level tokenizer per text part: CLIP's for CLIP encoders, T5's (padded to the family's T5 length) for
    T5 encoders (models.tiny_flow)."""
    tokenizers = []
    for _, _, _, tokenizer_class in family_cls.text_parts:
        if tokenizer_class.startswith("T5"):
            from .tiny_flow import build_t5_word_tokenizer

            tokenizers.append(build_t5_word_tokenizer(TINY_WORDS, family_cls.t5_max_length))
        else:
            tokenizers.append(build_word_tokenizer(TINY_WORDS))
    return tokenizers


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
    # Word-level tokenizers stand in for CLIP's BPE and T5's SentencePiece vocabularies (not shipped offline);
    # prompts are padded to 77 (CLIP) or the family's T5 length either way, so the text encoders do the same work.
    tokenizers = _bench_tokenizers(family_cls)
    torch.manual_seed(seed)
    with torch.device(device), default_dtype(dtype if torch.device(device).type == "cuda" else torch.float32):
        unet = family_cls.denoiser_class(**cfg[family_cls.denoiser_prefix])
        autoencoder = build_vae(cfg["vae"], vae, tiny, family_cls)
        encoders = []
        for (encoder, _, encoder_class, _), tokenizer in zip(family_cls.text_parts, tokenizers):
            model_class = library_class("transformers", encoder_class)
            ids = {}
            if not encoder_class.startswith("T5"):  # T5 configs carry T5's own pad / eos ids, which the word T5 keeps
                ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                           "pad_token_id": tokenizer.pad_token_id}
            encoders.append(model_class(model_class.config_class(**{**ids, **cfg[encoder]})))
    for module in (unet, autoencoder, *encoders):
        module.requires_grad_(False).eval()
        if module.dtype != dtype:
            module.to(dtype=dtype)
    if torch.device(device).type == "cuda":
        # NHWC convolutions are the fast path for cuDNN on tensor cores.
        unet.to(memory_format=torch.channels_last)
        autoencoder.to(memory_format=torch.channels_last)
    return family_cls(unet, autoencoder, encoders, tokenizers, family_cls.default_scheduler_config, path="random-init")


def _part_builders(family_cls, cfg: dict, tokenizer) -> list[tuple[str, object]]:
    """(subfolder, zero-argument builder) of every weighted part, denoiser first (the largest)."""
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    prefix = family_cls.denoiser_prefix
    builders = [(prefix, lambda: family_cls.denoiser_class(**cfg[prefix])),
                ("vae", lambda: family_cls.vae_class(**cfg["vae"]))]
    for encoder, _, encoder_class, _ in family_cls.text_parts:
        model_class = library_class("transformers", encoder_class)
        builders.append((encoder, lambda m=model_class, c={**ids, **cfg[encoder]}: m(m.config_class(**c))))
    return builders


def random_pipeline_bytes(family: str, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of weights save_random_pipeline writes (parts built on the meta device: no memory, no time)."""
    family_cls = get_family(family)
    tokenizer = build_word_tokenizer(TINY_WORDS)
    total = 0
    with torch.device("meta"):
        for _, build in _part_builders(family_cls, model_configs(family, tiny=False), tokenizer):
            total += sum(p.numel() for p in build().parameters())
    return total * torch.empty((), dtype=dtype).element_size()


def save_random_pipeline(out, family: str, dtype: torch.dtype = torch.float16, seed: int = 0, log=print):
    """Write a complete diffusers pipeline folder of the family's released architecture (FamilyModel.full_configs)
    with random weights, stored in `dtype`: what `from_pretrained` and `stepdistill train --set model.path=` load.

    Parts are built, saved and freed one at a time, so the peak is the largest part in float32 (SDXL's UNet, 10 GB).
    The tokenizer is the project's word-level CLIP tokenizer (models.tokenizer); prompts still pad to 77 tokens.
    """
    import shutil
    from pathlib import Path

    from ..errors import ModelFileError
    from .tokenizer import save_word_tokenizer

    family_cls = get_family(family)
    out = Path(out)
    need = random_pipeline_bytes(family, dtype)
    existing = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    if free < need * 1.05:
        raise ModelFileError(f"not enough disk space at {existing}: a random {family} pipeline needs "
                             f"{need / 2**30:.1f} GiB and {free / 2**30:.1f} GiB are free; free space or pass another --out")
    cfg = model_configs(family, tiny=False)
    tokenizer = build_word_tokenizer(TINY_WORDS)
    builders = _part_builders(family_cls, cfg, tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    # model_index.json from the pipeline class itself, built around meta-device parts (nothing allocated).
    with torch.device("meta"):
        parts = {name: build() for name, build in builders}
    scheduler = library_class("diffusers", "EulerDiscreteScheduler").from_config(family_cls.default_scheduler_config)
    tokenizers = {tok: tokenizer for _, tok, _, _ in family_cls.text_parts}
    family_cls.pipeline_class(**parts, **tokenizers, scheduler=scheduler, **family_cls.pipeline_kwargs).save_config(out)
    del parts
    scheduler.save_pretrained(out / "scheduler")
    for _, sub, _, _ in family_cls.text_parts:
        save_word_tokenizer(out / sub, TINY_WORDS)
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders):
            torch.manual_seed(seed + offset)
            module = build().to(dtype)
            count = sum(p.numel() for p in module.parameters())
            log(f"{name}: {count / 1e6:,.1f} M parameters, writing {count * module.dtype.itemsize / 2**30:.2f} GiB")
            module.save_pretrained(out / name, safe_serialization=True)
            del module
    log(f"random {family} pipeline written to {out}")
    return out
