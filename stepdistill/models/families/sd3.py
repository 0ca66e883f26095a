"""Stable Diffusion 3 / 3.5 family: MMDiT transformer, CLIP-L + CLIP-G + T5 text, rectified flow with a static shift."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...core.denoiser import Cond
from ..flow_common import DEFAULT_ARCH, FLOW_VAE, MMDIT_ATTN, MMDIT_FF, SD3_SCHEDULER_CONFIG, T5_XXL, FlowFamily
from ..registry import register_family
from ..sd_common import CLIP_L
from ..toy_recipe import TOY_CLIP_PAIR, TOY_FLOW_VAE

CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
              "projection_dim": 1280, "hidden_act": "gelu", "max_position_embeddings": 77, "vocab_size": 49408}
# SD3.5 Medium (2.5 B; MMDiT-X: dual attention in the first 13 blocks) and SD3.5 Large (8.1 B) transformers.
SD35_MEDIUM = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                   "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
                   "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
                   "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}
SD35_LARGE = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 38,
                  "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
                  "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
                  "qk_norm": "rms_norm"}


@register_family
class SD3Model(FlowFamily):
    name = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_parts: ClassVar = (
        ("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "CLIPTokenizer"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "CLIPTokenizer"),
        ("text_encoder_3", "tokenizer_3", "T5EncoderModel", "T5TokenizerFast"),
    )
    hub_tag = "stable-diffusion-3"
    denoiser_class_name = "SD3Transformer2DModel"
    default_scheduler_config: ClassVar = SD3_SCHEDULER_CONFIG
    timestep_scale = 1000.0  # StableDiffusion3Pipeline tells the transformer t = 1000 sigma
    t5_max_length = 256
    tiny_arch: ClassVar = DEFAULT_ARCH["sd3"]
    full_configs: ClassVar = {
        "transformer": SD35_MEDIUM,
        "vae": dict(FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": CLIP_L,
        "text_encoder_2": CLIP_G,
        "text_encoder_3": T5_XXL,
    }
    full_variants: ClassVar = {"sd3.5-medium": SD35_MEDIUM, "sd3.5-large": SD35_LARGE}
    bench_batch = 2
    dmd2_critic_ratio = 5
    # One step from pure noise; the teacher's real CFG in the DM term (SD3's pipeline default is 7.0; DMD2's SDXL
    # recipe uses a lower real-guidance scale for the DM term than for sampling).
    method_defaults: ClassVar = {"dmd": {"timesteps": [999], "guidance_scale": 4.5}}
    lora_target_presets: ClassVar = {"attn": MMDIT_ATTN, "full": MMDIT_ATTN + MMDIT_FF}
    # The toy world's SD3-architecture teacher (train.toy_teacher): an MMDiT with patch 2 (the 16x16 latents are 64 image
    # tokens) on the shared 4-channel toy VAE; SD3's three encoders at toy size, both CLIPs one layer more because SD3
    # reads their penultimate layer, T5 at least as wide as the CLIP widths it pads. Width 96 (6 heads of 16): at width
    # 64 the transformer drew the small shapes near chance (docs/toy_world.md, "SD3-toy").
    toy_arch: ClassVar = {
        "transformer": {"patch_size": 2, "num_layers": 4, "attention_head_dim": 16, "num_attention_heads": 6,
                        "pos_embed_max_size": 16},
        "vae": TOY_FLOW_VAE,
        **TOY_CLIP_PAIR,
        "text_encoder_3": {"d_model": 96, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    }
    toy_t5_part: ClassVar = 2

    @classmethod
    def toy_encode_text(cls, pipe, input_ids, drop):
        """As StableDiffusion3Pipeline.encode_prompt: both CLIPs' penultimate states side by side, zero-padded to T5's
        width, then T5's sequence; pooled = both CLIP projections. A dropped caption was tokenized as "", which is what
        the pipeline encodes for its negative prompt (it has no force_zeros_for_empty_prompt)."""
        hidden, pooled = [], []
        for encoder, ids in zip((pipe.text_encoder, pipe.text_encoder_2), input_ids[:2]):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled.append(out.text_embeds)
        t5 = pipe.text_encoder_3(input_ids[2]).last_hidden_state
        clip = torch.nn.functional.pad(torch.cat(hidden, dim=-1), (0, t5.shape[-1] - sum(h.shape[-1] for h in hidden)))
        return torch.cat([clip, t5], dim=-2), {"pooled_projections": torch.cat(pooled, dim=-1)}

    @classmethod
    def toy_velocity(cls, net, x_t, sigma, hidden, added):
        """SD3Transformer2DModel told t = 1000 sigma, as StableDiffusion3Pipeline tells it."""
        return net(hidden_states=x_t, timestep=(cls.timestep_scale * sigma).float(), encoder_hidden_states=hidden,
                   pooled_projections=added["pooled_projections"]).sample

    @classmethod
    def tiny_part_configs(cls, sample_size, arch, model_max_length=77):
        from ..tiny_flow import tiny_sd3_configs

        return tiny_sd3_configs(sample_size, arch, model_max_length=model_max_length)

    @classmethod
    def tiny_pipeline(cls, seed, words, sample_size, arch, model_max_length=77):
        from ..tiny_flow import build_tiny_sd3_pipeline

        return build_tiny_sd3_pipeline(seed, words, sample_size, arch, model_max_length, cls.t5_max_length)

    @classmethod
    def kohya_tensors(cls, state, rank, alpha, dtype=None):
        # StableDiffusion3Pipeline.load_lora_weights converts no kohya layout: the diffusers file is the format.
        return None

    @property
    def denoiser_call(self):
        return _sd3_call

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): CLIP-L | CLIG-G penultimate states padded to
        T5's width, then the T5 sequence; pooled = both CLIP projections. `resolution` is unused (no size ids)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        hidden, pooled = [], []
        for tokenizer, encoder in zip(self.tokenizers[:2], self.text_encoders[:2]):
            ids = self._clip_ids(tokenizer, prompts, self.clip_max_length).to(encoder.device)
            out = encoder(ids, output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2].to(self.text_encoders[0].dtype))
        t5 = self._t5(self.text_encoders[2], self.tokenizers[2], prompts)
        clip = torch.cat(hidden, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return Cond(torch.cat([clip, t5.to(clip.device, clip.dtype)], dim=-2),
                    {"pooled_projections": torch.cat(pooled, dim=-1)})


def _sd3_call(net, x_t, timestep, cond: Cond) -> torch.Tensor:
    """SD3Transformer2DModel as StableDiffusion3Pipeline calls it: latents, t = 1000 sigma, text, pooled text."""
    return net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.encoder_hidden_states,
               pooled_projections=cond.added_cond_kwargs["pooled_projections"], return_dict=False)[0]
