"""Stable Diffusion 1.x/2.x family: one CLIP text encoder, its last hidden state as conditioning."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...core.denoiser import Cond
from ..base import FamilyModel
from ..registry import register_family
from ..sd_common import CLIP_L, SD_SCHEDULER_CONFIG, SD_VAE, TINY_CLIP, TINY_VAE
from ..toy_recipe import TOY_UNET_LAYOUT, TOY_VAE


@register_family
class SD15Model(FamilyModel):
    name = "sd15"
    hub_tag = "stable-diffusion"
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_kwargs = dict(safety_checker=None, feature_extractor=None, image_encoder=None,
                           requires_safety_checker=False)
    text_parts = (("text_encoder", "tokenizer", "CLIPTextModel", "CLIPTokenizer"),)
    default_resolution = 512
    default_scheduler_config = SD_SCHEDULER_CONFIG
    # Block layout of the real model (attention in the high-resolution blocks) at 32/64 channels.
    tiny_arch = {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        ),
        "vae": dict(TINY_VAE, scaling_factor=0.18215),
        "text_encoder": TINY_CLIP,
    }
    # Counts (diffusers 0.42): UNet 859.5 M parameters.
    full_configs = {
        "unet": dict(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
            block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8, cross_attention_dim=768,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        ),
        "vae": dict(SD_VAE, sample_size=512, scaling_factor=0.18215),
        "text_encoder": CLIP_L,
    }
    bench_batch = 16
    # DMD2's released SD1.5 script: 10 fake-score updates per generator update (dfake_gen_update_ratio).
    dmd2_critic_ratio = 10
    # DMD2's released SD1.5 recipe: one step at t = 999, real_guidance_scale 1.75.
    method_defaults = {"dmd": {"timesteps": [999], "guidance_scale": 1.75}}
    # The toy world's SD1.5-architecture teacher (train.toy_teacher): the shared toy UNet layout, VAE and a 2-layer CLIP.
    toy_arch: ClassVar = {
        "unet": {**TOY_UNET_LAYOUT},
        "vae": TOY_VAE,
        "text_encoder": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "projection_dim": 64},
    }

    @classmethod
    def toy_encode_text(cls, pipe, input_ids, drop):
        """The last hidden state; a dropped caption was tokenized as "" (the pipeline's negative prompt)."""
        return pipe.text_encoder(input_ids[0]).last_hidden_state, None

    @classmethod
    def link_tiny_configs(cls, cfg: dict[str, dict]) -> None:
        cfg["unet"].setdefault("cross_attention_dim", cfg["text_encoder"]["hidden_size"])

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
