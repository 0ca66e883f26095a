"""SDXL family: two CLIP text encoders, penultimate hidden states concatenated, pooled text and size ids added."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...core.denoiser import Cond
from ..base import FamilyModel
from ..registry import register_family
from ..sd_common import CLIP_L, SD_SCHEDULER_CONFIG, SD_VAE, TINY_CLIP, TINY_VAE
from ..toy_recipe import TOY_CLIP_PAIR, TOY_UNET_LAYOUT, TOY_VAE

TIME_IDS = 6  # (original H, W, crop top, left, target H, W)


@register_family
class SDXLModel(FamilyModel):
    name = "sdxl"
    hub_tag = "stable-diffusion-xl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_kwargs = dict(feature_extractor=None, image_encoder=None, add_watermarker=False)
    text_parts = (
        ("text_encoder", "tokenizer", "CLIPTextModel", "CLIPTokenizer"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "CLIPTokenizer"),
    )
    default_resolution = 1024
    default_scheduler_config = SD_SCHEDULER_CONFIG
    # Block layout of the real model (no attention in the first block, linear projections, text_time added
    # embedding) at 32/64 channels.
    tiny_arch = {
        "unet": dict(
            block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=32, attention_head_dim=(2, 4),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        ),
        "vae": dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True),
        # Two encoders of different widths, and a projection narrower than encoder 2, as in SDXL (768, 1280,
        # 1280): a mix-up between hidden states and pooled embeddings fails loudly instead of passing.
        "text_encoder": TINY_CLIP,
        "text_encoder_2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               projection_dim=32, hidden_act="gelu"),
    }
    # Counts (diffusers 0.42): UNet 2,567.5 M parameters.
    full_configs = {
        "unet": dict(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
            norm_num_groups=32,
        ),
        # The fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix) has this architecture and runs in fp16.
        "vae": dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=False),
        "text_encoder": CLIP_L,
        "text_encoder_2": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                               projection_dim=1280, hidden_act="gelu", max_position_embeddings=77, vocab_size=49408),
    }
    bench_batch = 4
    # DMD2's released SDXL script: 5 fake-score updates per generator update (dfake_gen_update_ratio).
    dmd2_critic_ratio = 5
    # DMD2's released SDXL recipe: one step at t = 399, real_guidance_scale 8.
    method_defaults = {"dmd": {"timesteps": [399], "guidance_scale": 8.0}}
    # The toy world's SDXL-architecture teacher (train.toy_teacher): SD1.5-toy's UNet layout plus SDXL's conditioning
    # (pooled text and size ids, linear projections); each encoder one layer more, as SDXL reads the penultimate one.
    toy_arch: ClassVar = {
        "unet": {**TOY_UNET_LAYOUT, "use_linear_projection": True, "addition_embed_type": "text_time",
                 "addition_time_embed_dim": 8},
        "vae": TOY_VAE,
        **TOY_CLIP_PAIR,
    }

    @classmethod
    def toy_encode_text(cls, pipe, input_ids, drop):
        """Both encoders' penultimate hidden states side by side, encoder 2's pooled projection and the size ids of an
        uncropped image at the pipeline's default size; a dropped caption is all zeros, the pipeline's
        force_zeros_for_empty_prompt unconditional input."""
        hidden, pooled = [], None
        for encoder, ids in zip((pipe.text_encoder, pipe.text_encoder_2), input_ids):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        keep = (~drop).to(pooled.dtype)
        hidden = torch.cat(hidden, dim=-1) * keep[:, None, None]
        pooled = pooled * keep[:, None]
        size = pipe.default_sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=pooled.dtype)
        return hidden, {"text_embeds": pooled, "time_ids": time_ids.repeat(len(pooled), 1)}

    @classmethod
    def link_tiny_configs(cls, cfg: dict[str, dict]) -> None:
        """SDXL concatenates both encoders' hidden states; its added embedding reads the time ids and pooled text."""
        unet = cfg["unet"]
        unet.setdefault("cross_attention_dim", cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"])
        unet.setdefault(
            "projection_class_embeddings_input_dim",
            TIME_IDS * unet["addition_time_embed_dim"] + cfg["text_encoder_2"]["projection_dim"],
        )

    @staticmethod
    def default_vae_dtype(dtype: torch.dtype) -> torch.dtype:
        # SDXL's VAE overflows in fp16 (its config sets force_upcast), so it stays in float32.
        return torch.float32

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    def size_conditioning(self, resolution: int | None = None) -> dict:
        """SDXL's micro-conditioning at `resolution` (default: the run's, FamilyModel.resolution), as the pipeline's
        call arguments: an uncropped square image of that size generated at that size."""
        size = int(resolution or self.resolution)
        return {"original_size": [size, size], "crops_coords_top_left": [0, 0], "target_size": [size, size]}

    def time_ids(self, n: int, resolution: int | None = None, dtype=None) -> torch.Tensor:
        """(original H, W, crop top, left, target H, W) per sample, in the order the pipeline's _get_add_time_ids
        concatenates size_conditioning's three pairs."""
        size = self.size_conditioning(resolution)
        row = [*size["original_size"], *size["crops_coords_top_left"], *size["target_size"]]
        ids = torch.tensor([row], dtype=dtype or self.text_encoders[1].dtype)
        return ids.repeat(n, 1).to(self.text_encoders[1].device)

    def with_image_sizes(self, cond: Cond, image_sizes: torch.Tensor, resolution: int | None = None) -> Cond:
        """`cond` with each real image's own time_ids: (its original H, W, its crop top, left, target H, W), as SDXL
        was trained on real images (Podell et al. 2023, sec. 2.2; diffusers' train_text_to_image_sdxl.py): an image
        seen through a crop of a larger original must be conditioned as one, not as an uncropped `resolution` square.
        The target is the latents' size, `resolution` (default: the run's)."""
        size = int(resolution or self.resolution)
        sizes = torch.as_tensor(image_sizes).reshape(-1, 4)
        if len(sizes) != len(cond):
            raise ValueError(f"{len(sizes)} image size rows for {len(cond)} conditionings: one per real image")
        old = cond.added_cond_kwargs["time_ids"]
        target = torch.tensor([size, size], dtype=sizes.dtype).expand(len(sizes), 2)
        time_ids = torch.cat([sizes, target], dim=1).to(old.device, old.dtype)
        return Cond(cond.encoder_hidden_states, {**cond.added_cond_kwargs, "time_ids": time_ids})

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As StableDiffusionXLPipeline.encode_prompt (clip_skip None) and its added conditioning at `resolution`."""
        from transformers import CLIPTextModelWithProjection as with_projection

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = self._tokenize(tokenizer, prompts).input_ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if isinstance(encoder, with_projection):
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
        return {**super()._pipeline_parts(), "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
