"""FamilyModel: the frozen parts of a Stable Diffusion teacher and the family-specific glue around its UNet.

A family (sd15, sdxl) says how prompts become conditioning (`Cond`) and how latents map to pixels; the
UNet itself is read by core.denoiser. Everything is loaded frozen and in eval mode: trainable weights are
LoRA adapters that train/build.py attaches to `unet` afterwards.
"""

from __future__ import annotations

from typing import ClassVar

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTokenizer

from ..core.denoiser import Cond
from ..errors import ModelFileError


def _load_part(load, path: str, subfolder: str, **kwargs):
    """from_pretrained of one pipeline part, failing with the folder and part named."""
    try:
        return load(path, subfolder=subfolder, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelFileError(
            f"could not load the {subfolder!r} part of the model at {path}: {err}\n"
            "The folder must be a complete diffusers pipeline (save it with pipeline.save_pretrained)."
        ) from err


class FamilyModel:
    """UNet, VAE, text encoders and tokenizers of one teacher, plus its family's conditioning rules."""

    name: ClassVar[str]
    pipeline_class: ClassVar[type]
    # (text encoder subfolder, tokenizer subfolder, text encoder class), in the pipeline's order.
    text_parts: ClassVar[tuple[tuple[str, str, type], ...]]

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler_config: dict, path: str = "",
                 pipeline_config: dict | None = None):
        self.unet, self.vae = unet, vae
        self.text_encoders, self.tokenizers = list(text_encoders), list(tokenizers)
        self.scheduler_config = dict(scheduler_config)
        self.path = str(path)
        self.pipeline_config = dict(pipeline_config or {})

    @classmethod
    def from_pretrained(cls, path: str, device="cpu", dtype=torch.float32, vae_dtype=None,
                        local_files_only: bool = False, pipeline_config: dict | None = None) -> FamilyModel:
        """Load every part frozen: UNet and text encoders in `dtype`, the VAE in `vae_dtype` or default_vae_dtype."""
        kw = {"local_files_only": local_files_only}
        vae_dtype = vae_dtype or cls.default_vae_dtype(dtype)
        unet = _load_part(UNet2DConditionModel.from_pretrained, path, "unet", torch_dtype=dtype, **kw)
        vae = _load_part(AutoencoderKL.from_pretrained, path, "vae", torch_dtype=vae_dtype, **kw)
        # Cast after loading: transformers renamed from_pretrained's dtype argument across versions.
        text_encoders = [_load_part(cls_.from_pretrained, path, sub, **kw).to(dtype) for sub, _, cls_ in cls.text_parts]
        tokenizers = [_load_part(CLIPTokenizer.from_pretrained, path, tok, **kw) for _, tok, _ in cls.text_parts]
        scheduler_config = _load_part(DDPMScheduler.load_config, path, "scheduler", **kw)
        for module in [unet, vae, *text_encoders]:
            module.requires_grad_(False).eval().to(device)
        return cls(unet, vae, text_encoders, tokenizers, scheduler_config, path, pipeline_config)

    @staticmethod
    def default_vae_dtype(dtype: torch.dtype) -> torch.dtype:
        return dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Default pixel size: the UNet's training latent size times the VAE's downsampling."""
        return self.unet.config.sample_size * self.vae_scale_factor

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = resolution or self.resolution
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE's scale factor {self.vae_scale_factor}: "
                f"use e.g. {resolution // self.vae_scale_factor * self.vae_scale_factor}"
            )
        side = resolution // self.vae_scale_factor
        return (batch, self.unet.config.in_channels, side, side)

    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        raise NotImplementedError

    def empty_cond(self, n: int, resolution: int | None = None) -> Cond:
        raise NotImplementedError

    @staticmethod
    def _tokenize(tokenizer, prompts: list[str]):
        """Token ids (and mask) padded and truncated to the tokenizer's length, as the SD pipelines tokenize."""
        return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt")

    def _latent_stats(self, latents: torch.Tensor):
        """The VAE's per-channel latents mean and std when its config has them (as SDXL's pipeline reads them)."""
        config = self.vae.config
        if getattr(config, "latents_mean", None) is None or getattr(config, "latents_std", None) is None:
            return None
        shape = (1, -1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images in [-1, 1] (inverse of encode_images; keeps the graph)."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        scale = self.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        latents = latents / scale if stats is None else latents * stats[1] / scale + stats[0]
        images = self.vae.decode(latents, return_dict=False)[0]
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled float32 latents, a sample of the VAE posterior (the UNet's data space)."""
        images = images.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.sample(generator=generator)
        scale = self.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        latents = latents * scale if stats is None else (latents - stats[0]) * scale / stats[1]
        return latents.float()

    def pipeline(self, scheduler=None):
        """A diffusers pipeline sharing these modules (no copies); the folder's scheduler unless one is given."""
        if scheduler is None:
            scheduler_class = getattr(diffusers, self.scheduler_config.get("_class_name", "DDIMScheduler"))
            scheduler = scheduler_class.from_config(self.scheduler_config)
        return self.pipeline_class(**self._pipeline_parts(), scheduler=scheduler)

    def _pipeline_parts(self) -> dict:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, path={self.path!r}, resolution={self.resolution})"
