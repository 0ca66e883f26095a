"""Qwen-Image family: a 20 B MMDiT over 2x2-packed latents of a causal 3D VAE (one frame), Qwen2.5-VL text through
a chat template whose system prompt is dropped, per-channel latent mean / std, and a resolution-dependent shift.

Everything here follows diffusers' QwenImagePipeline: the template and its 34 dropped tokens, the masked text
sequence, the packing and `img_shapes`, the transformer's timestep (the scheduler's t = 1000 sigma in float32, cast
to the latents' dtype, then divided by 1000) and the VAE's `latents / (1 / std) + mean`.
"""

from __future__ import annotations

from functools import partial
from typing import ClassVar

import torch

from ...core.denoiser import Cond, DenoiserOut
from ...core.flow import norm_rescaled_cfg, x0_eps_from_velocity
from ..flow_common import MMDIT_ATTN, FlowFamily
from ..qwenimage_spec import (
    DEFAULT_SAMPLE_SIZE,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_DROP,
    QWEN25_VL_7B,
    QWEN_IMAGE_20B,
    QWEN_IMAGE_VAE,
    QWENIMAGE_SCHEDULER_CONFIG,
    TINY_ARCH,
    TOKENIZER_MAX_LENGTH,
)
from ..registry import register_family
from .flux import FluxModel, pack_latents, unpack_latents

# The feed-forwards of both streams (Qwen-Image names them img_mlp / txt_mlp, not ff / ff_context).
QWEN_FF = ["img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"]


def true_cfg(schedule, x_t, t, cond: DenoiserOut, uncond: DenoiserOut, guidance_scale) -> DenoiserOut:
    """The teacher's guided (x0, eps) as QwenImagePipeline guides its velocity: comb = v_u + w (v_c - v_u), then
    comb |v_c| / |comb| with norms over each packed token's 4 C values (its noise_pred's last axis). At w <= 1 the
    pipeline runs no CFG at all: the conditional prediction."""
    h, w = x_t.shape[-2:]
    sigma = schedule.alpha_sigma(t, x_t.ndim)[1].to(x_t.device)
    v_c, v_u = cond.eps - cond.x0, uncond.eps - uncond.x0  # flow: v = eps - x0
    scale = torch.as_tensor(guidance_scale, dtype=torch.float64, device=x_t.device).reshape(-1, 1, 1)
    v = torch.where(scale > 1, norm_rescaled_cfg(pack_latents(v_c), pack_latents(v_u), scale), pack_latents(v_c))
    return DenoiserOut(*x0_eps_from_velocity(x_t, unpack_latents(v, h, w), sigma))


@register_family
class QwenImageModel(FlowFamily):
    name = "qwenimage"
    pipeline_class_name = "QwenImagePipeline"
    pipeline_kwargs: ClassVar = {}
    text_parts: ClassVar = (("text_encoder", "tokenizer", "Qwen2_5_VLForConditionalGeneration", "Qwen2Tokenizer"),)
    hub_tag = "qwen-image"
    denoiser_class_name = "QwenImageTransformer2DModel"
    vae_class_name = "AutoencoderKLQwenImage"
    default_scheduler_config: ClassVar = QWENIMAGE_SCHEDULER_CONFIG
    default_resolution = DEFAULT_SAMPLE_SIZE * 8
    token_patch = 2  # 2x2 packing
    # The pipeline call's max_sequence_length (its default 512): prompt tokens kept after the template's are dropped.
    # Training pads every prompt to it (masked), so conditional and empty prompts batch together.
    t5_max_length = 512
    tiny_arch: ClassVar = TINY_ARCH
    full_configs: ClassVar = {"transformer": QWEN_IMAGE_20B, "vae": QWEN_IMAGE_VAE, "text_encoder": QWEN25_VL_7B}
    bench_batch = 1
    dmd2_critic_ratio = 5
    # The teacher's CFG in the DM term: the pipeline's true_cfg_scale default (4.0).
    method_defaults: ClassVar = {"dmd": {"timesteps": [999], "guidance_scale": 4.0}}
    lora_target_presets: ClassVar = {"attn": MMDIT_ATTN, "full": MMDIT_ATTN + QWEN_FF}

    @classmethod
    def tiny_part_configs(cls, sample_size, arch, model_max_length=77):
        from ..tiny_qwenimage import tiny_qwenimage_configs

        return tiny_qwenimage_configs(arch)

    @classmethod
    def tiny_pipeline(cls, seed, words, sample_size, arch, model_max_length=77):
        from ..tiny_qwenimage import build_tiny_qwenimage_pipeline

        return build_tiny_qwenimage_pipeline(seed, words, arch)

    @classmethod
    def kohya_tensors(cls, state, rank, alpha, dtype=None):
        """The ComfyUI layout QwenImagePipeline.load_lora_weights converts (_convert_non_diffusers_qwen_lora_to_diffusers):
        `diffusion_model.<module>.lora_down / lora_up / alpha`, the diffusers module names unchanged."""
        from ...core.lora_layout import kohya_layout_tensors

        return kohya_layout_tensors(state, rank, alpha, dtype, name=lambda module: f"diffusion_model.{module}")

    # ---- schedule and the network call -------------------------------------------------------------------------
    # QwenImagePipeline computes its timestep as FluxPipeline does: the scheduler's float32 t cast to the latents'
    # dtype, then / 1000 in it.
    network_timestep = FluxModel.network_timestep

    @property
    def denoiser_call(self):
        return self._call

    def _call(self, net, x_t, timestep, cond: Cond) -> torch.Tensor:
        """QwenImageTransformer2DModel as QwenImagePipeline calls it, on unpacked latents: pack, mask, img_shapes."""
        b, _, h, w = x_t.shape
        mask = cond.added_cond_kwargs["encoder_hidden_states_mask"]
        out = net(hidden_states=pack_latents(x_t), timestep=timestep,
                  guidance=None, encoder_hidden_states_mask=mask, encoder_hidden_states=cond.encoder_hidden_states,
                  img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
        return unpack_latents(out, h, w)

    def guidance_rule(self, schedule):
        """QwenImagePipeline's true CFG (true_cfg_scale with a negative prompt): the guided velocity rescaled, per packed
        2x2 token, to the conditional velocity's norm (core.flow.norm_rescaled_cfg), then read as (x0, eps)."""
        return partial(true_cfg, schedule)

    # ---- text -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As QwenImagePipeline.encode_prompt: the chat-templated prompt's last hidden state, the template's first 34
        tokens dropped, kept to max_sequence_length; padded with masked zeros to max_sequence_length (the pipeline pads
        to the batch's longest, which the mask makes the same for the transformer)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        tokens = tokenizer([PROMPT_TEMPLATE.format(p) for p in prompts], max_length=TOKENIZER_MAX_LENGTH + PROMPT_TEMPLATE_DROP,
                           padding=True, truncation=True, return_tensors="pt").to(encoder.device)
        hidden = encoder(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                         output_hidden_states=True).hidden_states[-1]
        n = self.t5_max_length
        embeds = hidden.new_zeros(len(prompts), n, hidden.shape[-1])
        mask = torch.zeros(len(prompts), n, dtype=torch.long, device=hidden.device)
        for i, (states, keep) in enumerate(zip(hidden, tokens.attention_mask.bool())):
            kept = states[keep][PROMPT_TEMPLATE_DROP:][:n]
            embeds[i, : len(kept)], mask[i, : len(kept)] = kept, 1
        return Cond(embeds.to(encoder.dtype), {"encoder_hidden_states_mask": mask})

    def empty_cond(self, n: int, resolution: int | None = None) -> Cond:
        """The empty prompt, encoded: what the pipeline's negative_prompt="" gives."""
        return self.encode_prompts([""], resolution).index([0] * n)

    # ---- latents and the VAE ----------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        """The pipeline's: 2 ** len(vae.temperal_downsample) (8 for the real VAE)."""
        return 2 ** len(self.vae.config.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def native_resolution(self) -> int:
        """The pipeline's default height and width: default_sample_size * vae_scale_factor."""
        return DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = resolution or self.resolution
        step = 2 * self.vae_scale_factor
        if resolution % step:
            raise ValueError(f"resolution {resolution} is not a multiple of {step} (VAE factor x 2x2 packing): use e.g. "
                             f"{max(step, resolution // step * step)}")
        return super().latent_shape(batch, resolution)

    def size_conditioning(self, resolution: int | None = None) -> dict:
        """The trained size as the pipeline call's height and width (its default is 1024 whatever the training)."""
        return self.trained_size(resolution)

    @staticmethod
    def to_pipeline_latents(x):
        return pack_latents(x)

    @staticmethod
    def from_pipeline_latents(out, h, w):
        return unpack_latents(out, h, w)

    def _stats(self, like: torch.Tensor):
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 images in [-1, 1], as the pipeline decodes: latents / (1 / std) + mean, one frame."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._stats(latents)
        latents = latents / (1.0 / std) + mean
        images = self.vae.decode(latents.unsqueeze(2), return_dict=False)[0][:, :, 0]
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled float32 latents (z - mean) / std, a sample of the VAE posterior, one frame."""
        images = images.to(self.vae.device, self.vae.dtype).unsqueeze(2)
        latents = self.vae.encode(images).latent_dist.sample(generator=generator)[:, :, 0]
        mean, std = self._stats(latents)
        return ((latents - mean) * (1.0 / std)).float()

    def offload_text_encoders(self) -> None:
        """Qwen2.5-VL-7B is 16 GB in bf16: once the prompts are encoded it goes to the CPU."""
        for encoder in self.text_encoders:
            encoder.to("cpu")
