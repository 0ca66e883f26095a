"""Stable Diffusion 1.x/2.x family: one CLIP text encoder, its last hidden state as conditioning."""

from __future__ import annotations

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextModel

from ..core.denoiser import Cond
from .base import FamilyModel


class SD15Model(FamilyModel):
    name = "sd15"
    pipeline_class = StableDiffusionPipeline
    text_parts = (("text_encoder", "tokenizer", CLIPTextModel),)

    @property
    def text_encoder(self):
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """Last hidden state of the text encoder, as StableDiffusionPipeline.encode_prompt with clip_skip None.

        `resolution` is accepted for a family-independent call and unused: SD1.5 has no size conditioning.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self._tokenize(self.tokenizer, prompts)
        device = self.text_encoder.device
        use_mask = getattr(self.text_encoder.config, "use_attention_mask", False)
        mask = tokens.attention_mask.to(device) if use_mask else None
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return Cond(hidden.to(self.text_encoder.dtype))

    def empty_cond(self, n: int, resolution: int | None = None) -> Cond:
        """The empty prompt's embedding repeated n times: the pipeline's negative when negative_prompt is None."""
        empty = self.encode_prompts([""])
        return Cond(empty.encoder_hidden_states.repeat(n, 1, 1))

    def _pipeline_parts(self) -> dict:
        return dict(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
