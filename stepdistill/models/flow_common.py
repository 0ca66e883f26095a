"""What the flow-matching families (sd3, flux) share: a FlowSchedule at the training resolution, the pipelines'
transformer-call conventions, LoRA presets for MMDiT blocks, the T5 architecture. Not a family itself: families live
in models/families/, one module each.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from ..core.flow import FlowSchedule, image_seq_len, mu_from_config
from .base import FamilyModel

# The teachers' scheduler_config.json: SD3 / SD3.5 shift statically; FLUX.1-dev shifts by image token count.
SD3_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
}

# The text widths all differ (SD3: CLIP-L 32, CLIP-G 64, pooled 16 + 40 = 56, T5 128; FLUX: CLIP 32, T5 64), so a
# mix-up between hidden states, pooled embeddings and the T5 sequence fails loudly. SD3 pads the concatenated CLIP
# states (32 + 64) to T5's width (128), as the real model pads 768 + 1280 to 4096.
_CLIP = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "quick_gelu"}
_T5 = {"d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 4, "feed_forward_proj": "gated-gelu",
       "dropout_rate": 0.0, "relative_attention_num_buckets": 8, "relative_attention_max_distance": 32}
# Latent channels 16 and no quant convs, like both teachers' VAE; two blocks make the VAE factor 2.
_VAE = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 16,
        "use_quant_conv": False, "use_post_quant_conv": False}

DEFAULT_ARCH = {
    "sd3": {
        "transformer": {"patch_size": 2, "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2,
                        "pos_embed_max_size": 32},
        "vae": dict(_VAE, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": dict(_CLIP, hidden_size=32, projection_dim=16),
        "text_encoder_2": dict(_CLIP, hidden_size=64, intermediate_size=128, projection_dim=40, hidden_act="gelu"),
        "text_encoder_3": dict(_T5, d_model=128),
    },
    "flux": {
        "transformer": {"patch_size": 1, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
                        "num_attention_heads": 2, "axes_dims_rope": (4, 6, 6), "guidance_embeds": True},
        "vae": dict(_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": dict(_CLIP, hidden_size=32, projection_dim=32),
        "text_encoder_2": dict(_T5, d_model=64),
    },
}


# Attention projections of the MMDiT joint blocks (image and text streams) and the feed-forwards of both streams.
MMDIT_ATTN = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
MMDIT_FF = ["ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]

# T5-XXL v1.1 (google/t5-v1_1-xxl, the encoder SD3 and FLUX.1 ship): 4.7 B parameters.
T5_XXL = {"d_model": 4096, "d_ff": 10240, "d_kv": 64, "num_heads": 64, "num_layers": 24, "feed_forward_proj": "gated-gelu",
              "vocab_size": 32128, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
              "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}
# The 16-channel VAE of SD3 and FLUX.1 (their configs differ only in scaling and shift factors).
FLOW_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "latent_channels": 16, "norm_num_groups": 32,
                "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
                "act_fn": "silu", "use_quant_conv": False, "use_post_quant_conv": False, "sample_size": 1024}


class FlowFamily(FamilyModel):
    """A rectified-flow transformer teacher: velocity prediction, sigma-valued timesteps, a 16-channel VAE."""

    parameterisations: ClassVar[tuple[str, ...]] = ("flow",)
    # What SD3 and FLUX share: the denoiser is `transformer/`, no IP-Adapter parts, trained at 1024 px.
    pipeline_kwargs: ClassVar = {"image_encoder": None, "feature_extractor": None}
    denoiser_prefix = "transformer"
    default_resolution = 1024
    attention_backends: ClassVar[bool] = False
    denoiser_class_name = "SD3Transformer2DModel"
    # What the transformer is told at sigma (core.flow.network_timestep): SD3 1000 sigma, FLUX sigma.
    timestep_scale: ClassVar[float] = 1000.0
    # Image tokens per latent side: the transformer's patch size (SD3) or the packing (FLUX, 2).
    token_patch: ClassVar[int] = 2
    # The T5 sequence length the pipeline encodes prompts at (its max_sequence_length default).
    t5_max_length: ClassVar[int] = 256

    # ---- toy-world teacher hooks: a rectified flow on the shared toy VAE, sampled with a static shift ----
    # Smaller batches than the UNets': every joint block carries the text tokens beside the 64 image tokens.
    toy_defaults: ClassVar[dict] = {"steps": 4000, "batch_size": 64}

    @classmethod
    def toy_scheduler_config(cls) -> dict:
        """FlowMatchEulerDiscreteScheduler at the toy's static shift (no resolution-dependent shifting)."""
        from .toy_recipe import TOY_FLOW_SHIFT

        config = {**cls.default_scheduler_config, "shift": TOY_FLOW_SHIFT}
        if config.get("use_dynamic_shifting"):
            config["use_dynamic_shifting"] = False  # FLUX.1-schnell's scheduler: a static shift
        return config

    @classmethod
    def toy_prepare_vae(cls, vae) -> None:
        """The flow pipelines decode latents / scaling_factor + shift_factor: the SD1.5-toy VAE has none (None)."""
        vae.register_to_config(shift_factor=0.0)

    @classmethod
    def toy_velocity(cls, net, x_t, sigma, hidden, added) -> torch.Tensor:
        """The transformer's velocity at (x_t, sigma) as the family's pipeline calls it, with gradients."""
        raise NotImplementedError(f"the {cls.name} family has no toy teacher recipe")

    @classmethod
    def toy_loss_fn(cls, pipe, sampling=None, logit_normal=None):
        """Rectified flow |v_theta - (eps - x0)|^2, sigma drawn logit-normal(0, 1) unless told otherwise."""
        from .toy_recipe import flow_loss_fn

        return flow_loss_fn(pipe, cls.toy_velocity, sampling, logit_normal)

    @classmethod
    def toy_objective(cls, sampling=None, logit_normal=None) -> dict:
        from .toy_recipe import TOY_FLOW_SHIFT, sampling_record

        return {"objective": "rectified flow (v = eps - x0)", "sigma_sampling": sampling_record(sampling, logit_normal),
                "shift": TOY_FLOW_SHIFT}

    def noise_schedule(self, resolution: int | None = None) -> FlowSchedule:
        """The teacher's shifted sigmas; a resolution-dependent shift (FLUX's mu) at the training resolution."""
        config = self.scheduler_config
        mu = None
        if config.get("use_dynamic_shifting"):
            side = resolution or self.resolution
            mu = mu_from_config(config, image_seq_len(side, side, self.vae_scale_factor, self.token_patch))
        return FlowSchedule.from_scheduler_config(config, mu, self.timestep_scale)

    def trained_size(self, resolution: int | None = None) -> dict:
        """The trained square side as a pipeline call's height and width."""
        side = int(resolution or self.resolution)
        return {"height": side, "width": side}

    def recipe_size(self, resolution: int | None = None) -> dict:
        """A resolution-dependent shift takes its mu from the image size: the recipe keeps the trained one."""
        return self.trained_size(resolution) if self.scheduler_config.get("use_dynamic_shifting") else {}

    def network_timestep(self, schedule, t, dtype) -> torch.Tensor:
        """StableDiffusion3Pipeline's timestep: the scheduler's float32 t = 1000 sigma, passed as is in every run dtype
        (the transformer's sinusoidal projection reads it in float32; casting it to bf16 would move t = 750 to 752)."""
        return schedule.pipeline_timestep(t)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def _clip_ids(self, tokenizer, prompts, length: int):
        return tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids

    def _t5(self, encoder, tokenizer, prompts) -> torch.Tensor:
        """T5's last hidden state, as the pipelines' _get_t5_prompt_embeds (padded to t5_max_length)."""
        ids = tokenizer(list(prompts), padding="max_length", max_length=self.t5_max_length, truncation=True,
                        add_special_tokens=True, return_tensors="pt").input_ids
        return encoder(ids.to(encoder.device))[0].to(encoder.dtype)

    @property
    def clip_max_length(self) -> int:
        """The pipelines' tokenizer_max_length: the first tokenizer's model_max_length (77 for CLIP)."""
        return self.tokenizers[0].model_max_length

    def shard_units(self) -> list:
        """The MMDiT's joint transformer blocks (model.shard=fsdp2)."""
        return list(self.unet.transformer_blocks)

    def compile_units(self) -> list:
        """The transformer's blocks, as for sharding (model.compile=regional; core/compile.py)."""
        return self.shard_units()

    def offload_text_encoders(self) -> None:
        """T5-XXL alone is 9.5 GB in bf16: once the prompts are encoded, every text encoder goes to the CPU (encoding
        a new prompt still works there, slowly)."""
        for encoder in self.text_encoders:
            encoder.to("cpu")

    def empty_cond(self, n: int, resolution: int | None = None):
        """The empty prompt, encoded: the pipelines' negative conditioning when negative_prompt is None."""
        empty = self.encode_prompts([""], resolution)
        return empty.index([0] * n)
