"""SDXL family: two CLIP text encoders, penultimate hidden states concatenated, pooled text and size ids added."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..core.denoiser import Cond
from .base import FamilyModel


class SDXLModel(FamilyModel):
    name = "sdxl"
    pipeline_class = StableDiffusionXLPipeline
    text_parts = (
        ("text_encoder", "tokenizer", CLIPTextModel),
        ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection),
    )

    @staticmethod
    def default_vae_dtype(dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16 (its config sets force_upcast), so it stays in float32.
        return torch.float32

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    def time_ids(self, n: int, resolution: int | None = None, dtype=None) -> torch.Tensor:
        """SDXL micro-conditioning (original H, W, crop top, left, target H, W) = (H, W, 0, 0, H, W), per sample."""
        size = resolution or self.resolution
        ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=dtype or self.text_encoders[1].dtype)
        return ids.repeat(n, 1).to(self.text_encoders[1].device)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As StableDiffusionXLPipeline.encode_prompt (clip_skip None) and its added conditioning at `resolution`."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = self._tokenize(tokenizer, prompts).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if isinstance(encoder, CLIPTextModelWithProjection):
                pooled = out.text_embeds
        dtype = self.text_encoders[1].dtype
        return self._cond(torch.cat(hidden, dim=-1).to(dtype), pooled.to(dtype), resolution)

    def empty_cond(self, n: int, resolution: int | None = None) -> Cond:
        """The pipeline's negative conditioning for negative_prompt=None: zeros (force_zeros_for_empty_prompt)."""
        if not self.force_zeros_for_empty_prompt:
            empty = self.encode_prompts([""], resolution)
            return Cond(empty.encoder_hidden_states.repeat(n, 1, 1),
                        {k: v.repeat(n, 1) for k, v in empty.added_cond_kwargs.items()})
        seq_len = self.tokenizers[0].model_max_length
        width = sum(encoder.config.hidden_size for encoder in self.text_encoders)
        pooled_dim = self.text_encoders[1].config.projection_dim
        kw = dict(device=self.text_encoders[1].device, dtype=self.text_encoders[1].dtype)
        return self._cond(torch.zeros(n, seq_len, width, **kw), torch.zeros(n, pooled_dim, **kw), resolution)

    def _cond(self, hidden: torch.Tensor, pooled: torch.Tensor, resolution: int | None) -> Cond:
        time_ids = self.time_ids(len(hidden), resolution, hidden.dtype)
        return Cond(hidden, {"text_embeds": pooled, "time_ids": time_ids})

    def _pipeline_parts(self) -> dict:
        return dict(
            vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
            force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt, add_watermarker=False,
        )
