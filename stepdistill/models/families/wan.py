"""Wan 2.1 / 2.2 text-to-video family (WanPipeline): a 3D DiT over (frames, height, width) latents of a causal video
VAE with per-channel latent mean / std, UMT5 text, and flow matching with the model's `flow_shift`.

A video is one sample: the latent is (B, C, F, h, w), so noise, the DM gradient's normaliser and every loss reduce
over the whole clip (the methods reduce over all non-batch axes). WanPipeline takes no `sigmas`, only a step count:
the training table is its own UniPC scheduler's flow ladder (WanGridSchedule), on which every trailing n-step grid
(n dividing 1000: 1 step [999]; 4 steps [999, 749, 499, 249]) is that scheduler's n-step grid, so a recipe is
UniPCMultistepScheduler(flow_shift, first order, no corrector) and n steps; tscd's segment edges are such grids.
Sizes are WanPipeline's: height x width (model.resolution [480, 832], its default) and frames (81).
"""

from __future__ import annotations

import math
import re
from typing import ClassVar

import torch

from ...core.denoiser import Cond
from ...core.flow import FlowSchedule
from ...core.solvers import trailing_timesteps
from ..base import normal_size, size_hw
from ..flow_common import FlowFamily
from ..registry import register_family
from ..wan_spec import (
    TINY_ARCH,
    UMT5_XXL,
    WAN21_1_3B,
    WAN21_14B,
    WAN_SCHEDULER_CONFIG,
    WAN_VAE,
)

# Self-attention, cross-attention (attn2; its to_k / to_v read the text) and the feed-forward of each block.
WAN_ATTN = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
            "attn2.to_out.0"]
WAN_FF = ["ffn.net.0.proj", "ffn.net.2"]
# diffusers' names of a block's linears -> Wan's original ones (the ComfyUI LoRA layout), as diffusers converts them.
_COMFY_NAMES = {**{f"attn1.{d}": f"self_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
                **{f"attn2.{d}": f"cross_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
                "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}


def prompt_clean(text: str) -> str:
    """WanPipeline's prompt_clean without ftfy (not installed here): whitespace runs to one space, stripped."""
    return re.sub(r"\s+", " ", text).strip()


# The recipe's scheduler: WanPipeline's own UniPCMultistepScheduler over flow sigmas, made a plain first-order step
# (solver_order 1, no UniC corrector), which on flow sigmas is DDIM's, i.e. the Euler step every method samples with.
UNIPC_EULER = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "solver_order": 1,
               "final_sigmas_type": "zero", "use_karras_sigmas": False, "use_exponential_sigmas": False,
               "use_beta_sigmas": False, "use_dynamic_shifting": False, "thresholding": False, "shift_terminal": None}


def unipc_flow_grid(n: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) WanPipeline's UniPC scheduler visits at n steps, from the scheduler itself: sigmas float32
    shift(linspace(1, 1/T, n + 1)[:-1]) (the first 1 - 1e-6), timesteps int64 trunc(T sigma) (what the transformer is
    told). Not on the table for other n than divisors of T."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(num_train_timesteps=num_train_timesteps, flow_shift=shift,
                                        **{k: v for k, v in UNIPC_EULER.items() if v is not None})
    scheduler.set_timesteps(n)
    return scheduler.sigmas[:-1].clone(), scheduler.timesteps.clone()


class WanGridSchedule(FlowSchedule):
    """WanPipeline's UniPC flow ladder at T steps as the training table (ascending in t): sigma_t = shift(1 - (T - 1 -
    t)(T - 1) / T^2), told the int64 trunc(1000 sigma_t). WanPipeline takes no `sigmas`, only a step count, and this
    scheduler's n-step grid is linspace(1, 1/T, n + 1)[:-1] before the shift: for n dividing T it is exactly this table
    at the trailing timesteps T - 1 - k T / n (1 step [999]; 2 [999, 499]; 4 [999, 749, 499, 249]; 8...), so every
    trailing grid, and so every tscd segment edge, is a recipe the stock pipeline runs. (FlowMatchEulerDiscreteScheduler
    spaces n steps to its own sigma_min instead, so its grids for different n do not nest on one table.)"""

    def __init__(self, shift: float, num_train_timesteps: int = 1000):
        sigmas, told = unipc_flow_grid(num_train_timesteps, shift, num_train_timesteps)
        super().__init__(sigmas.double().flip(0), 1000.0)
        self.shift = float(shift)
        self._told = told.flip(0)

    def pipeline_timestep(self, t) -> torch.Tensor:
        """The scheduler's int64 trunc(1000 sigma_t), as WanPipeline hands it to the transformer."""
        t = torch.as_tensor(t).reshape(-1).long()
        return self._told.to(t.device)[t.clamp(min=0)]

    def grid(self, n: int) -> list[int]:
        """The table indices of the pipeline's n-step grid: the trailing timesteps (ValueError off the table)."""
        T = self.num_train_timesteps
        if n < 1 or T % n:
            raise ValueError(f"WanPipeline's {n}-step grid is not on the {T}-step table: use a step count dividing {T} "
                             "(1, 2, 4, 5, 8, 10...)")
        timesteps = trailing_timesteps(n, T)
        sigmas, told = unipc_flow_grid(n, self.shift, T)
        index = torch.tensor(timesteps)
        if not (torch.allclose(sigmas.double(), self.sigma(index), rtol=0, atol=1e-6)
                and torch.equal(told, self.pipeline_timestep(index))):
            raise ValueError(f"WanPipeline's {n}-step timesteps {told.tolist()} are not the table's at {timesteps} "
                             f"(shift {self.shift}): use another step count")
        return timesteps

    def pipeline_sampling(self, timesteps) -> dict:
        timesteps = [int(t) for t in timesteps]
        grid = self.grid(len(timesteps))
        if timesteps != grid:
            raise ValueError(f"timesteps {timesteps} are not WanPipeline's {len(timesteps)}-step grid: set "
                             f"method.timesteps={grid} (the pipeline takes no sigmas, only a step count)")
        # disable_corrector lists every step: UniC would fold the next model output into each step.
        config = {**UNIPC_EULER, "flow_shift": self.shift, "disable_corrector": list(range(len(timesteps)))}
        return {"scheduler_class": "UniPCMultistepScheduler", "scheduler_config": config, "sigmas": None,
                "num_inference_steps": len(timesteps)}


@register_family
class WanModel(FlowFamily):
    name = "wan"
    pipeline_class_name = "WanPipeline"
    pipeline_kwargs: ClassVar = {}
    text_parts: ClassVar = (("text_encoder", "tokenizer", "UMT5EncoderModel", "T5TokenizerFast"),)
    hub_tag = "wan"
    denoiser_class_name = "WanTransformer3DModel"
    vae_class_name = "AutoencoderKLWan"
    default_scheduler_config: ClassVar = WAN_SCHEDULER_CONFIG
    default_resolution = (480, 832)  # WanPipeline's default height x width
    non_square = True
    resolution_multiple = 16  # WanPipeline's check_inputs: height and width divisible by 16
    default_frames = 81  # WanPipeline's num_frames default
    t5_max_length = 512  # WanPipeline's max_sequence_length default
    tiny_arch: ClassVar = TINY_ARCH
    full_configs: ClassVar = {"transformer": WAN21_1_3B, "vae": WAN_VAE, "text_encoder": UMT5_XXL}
    full_variants: ClassVar = {"wan2.1-1.3b": WAN21_1_3B, "wan2.1-14b": WAN21_14B}
    bench_batch = 1
    dmd2_critic_ratio = 5
    # The teacher's CFG in the DM term: WanPipeline's guidance_scale default (5.0).
    method_defaults: ClassVar = {"dmd": {"timesteps": [999], "guidance_scale": 5.0}}
    lora_target_presets: ClassVar = {"attn": WAN_ATTN, "full": WAN_ATTN + WAN_FF}
    _frames: int | None = None

    @classmethod
    def tiny_part_configs(cls, sample_size, arch, model_max_length=77):
        from ..tiny_wan import tiny_wan_configs

        return tiny_wan_configs(arch)

    @classmethod
    def tiny_pipeline(cls, seed, words, sample_size, arch, model_max_length=77):
        from ..tiny_wan import build_tiny_wan_pipeline

        return build_tiny_wan_pipeline(seed, words, arch)

    @classmethod
    def kohya_tensors(cls, state, rank, alpha, dtype=None):
        """The ComfyUI layout WanPipeline.load_lora_weights converts (_convert_non_diffusers_wan_lora_to_diffusers):
        `diffusion_model.blocks.N.<Wan's own name>.lora_down / lora_up / alpha`, Wan's names being self_attn.q|k|v|o,
        cross_attn.q|k|v|o and ffn.0 / ffn.2 for diffusers' attn1, attn2 and ffn.net.0.proj / ffn.net.2."""
        from ...core.lora_layout import kohya_layout_tensors

        def comfy_name(module):
            found = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
            name = _COMFY_NAMES.get(found.group(2)) if found else None
            if name is None:
                raise ValueError(f"no ComfyUI (Wan) name for the module {module}: export the diffusers format")
            return f"diffusion_model.blocks.{found.group(1)}.{name}"

        return kohya_layout_tensors(state, rank, alpha, dtype, name=comfy_name)

    def shard_units(self) -> list:
        """The DiT's blocks (model.shard=fsdp2): WanTransformer3DModel calls them `blocks`."""
        return list(self.unet.blocks)

    # ---- frames -----------------------------------------------------------------------------------------------
    @property
    def frames(self) -> int:
        """Video frames of a sample: the run's (model.frames), else the pipeline's default."""
        return self._frames or self.default_frames

    @frames.setter
    def frames(self, value: int | None) -> None:
        self._frames = int(value) if value else None

    @property
    def latent_frames(self) -> int:
        """WanPipeline's (num_frames - 1) // temporal factor + 1; frames it would round (with a warning) are refused."""
        factor = int(self.vae.config.scale_factor_temporal)
        if (self.frames - 1) % factor:
            fix = (self.frames - 1) // factor * factor + 1
            raise ValueError(f"model.frames={self.frames}: WanPipeline needs frames - 1 divisible by the VAE's temporal "
                             f"factor {factor}: use e.g. model.frames={max(1, fix)}")
        return (self.frames - 1) // factor + 1

    @property
    def vae_scale_factor(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.z_dim)

    @property
    def native_resolution(self):
        return normal_size(self.default_resolution)

    def latent_shape(self, batch: int, resolution=None) -> tuple[int, ...]:
        """(B, C, latent frames, height / f, width / f); height and width multiples of 16 and of the VAE factor times
        the transformer's patch (what WanPipeline would otherwise round down with a warning)."""
        height, width = size_hw(normal_size(resolution) or self.resolution)
        patch = self.unet.config.patch_size
        steps = (math.lcm(16, self.vae_scale_factor * patch[1]), math.lcm(16, self.vae_scale_factor * patch[2]))
        if height % steps[0] or width % steps[1]:
            fix = [max(m, side // m * m) for side, m in zip((height, width), steps)]
            raise ValueError(f"resolution {height} x {width} is not a multiple of {steps[0]} x {steps[1]} (WanPipeline: 16, "
                             f"VAE factor x patch): use e.g. model.resolution={fix}")
        f = self.vae_scale_factor
        return (batch, self.latent_channels, self.latent_frames, height // f, width // f)

    def size_conditioning(self, resolution=None) -> dict:
        """The pipeline call's height, width and num_frames (its defaults 480, 832, 81 whatever the training)."""
        height, width = size_hw(normal_size(resolution) or self.resolution)
        return {"height": height, "width": width, "num_frames": self.frames}

    # ---- schedule and the network call ------------------------------------------------------------------------
    def network_timestep(self, schedule, t, dtype) -> torch.Tensor:
        """WanPipeline's timestep: its UniPC scheduler's int64 trunc(1000 sigma), in every run dtype."""
        return schedule.pipeline_timestep(t)

    def noise_schedule(self, resolution: int | None = None) -> WanGridSchedule:
        config = self.scheduler_config
        # FlowMatchEulerDiscreteScheduler configs say `shift`, Wan's UniPC config `flow_shift`.
        shift = config.get("shift", config.get("flow_shift", 1.0))
        return WanGridSchedule(float(shift), int(config.get("num_train_timesteps", 1000)))

    @property
    def denoiser_call(self):
        return self._call

    def _call(self, net, x_t, timestep, cond: Cond) -> torch.Tensor:
        """WanTransformer3DModel as WanPipeline calls it: latents in the network's dtype, the scheduler's int64
        trunc(1000 sigma) (not cast), the UMT5 sequence."""
        return net(hidden_states=x_t, timestep=timestep, encoder_hidden_states=cond.encoder_hidden_states,
                   return_dict=False)[0]

    # ---- text -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As WanPipeline._get_t5_prompt_embeds: UMT5's last hidden state over the cleaned prompt, zeros after its
        tokens, max_sequence_length long."""
        prompts = [prompt_clean(p) for p in ([prompts] if isinstance(prompts, str) else prompts)]
        tokenizer, encoder = self.tokenizers[0], self.text_encoders[0]
        n = self.t5_max_length
        tokens = tokenizer(prompts, padding="max_length", max_length=n, truncation=True, add_special_tokens=True,
                           return_attention_mask=True, return_tensors="pt")
        hidden = encoder(tokens.input_ids.to(encoder.device), tokens.attention_mask.to(encoder.device)).last_hidden_state
        keep = tokens.attention_mask.gt(0).to(hidden.device).unsqueeze(-1)
        return Cond(torch.where(keep, hidden, torch.zeros_like(hidden)).to(encoder.dtype))

    def empty_cond(self, n: int, resolution: int | None = None) -> Cond:
        """The empty prompt: WanPipeline's negative prompt when none is given."""
        return self.encode_prompts([""], resolution).index([0] * n)

    # ---- the VAE ----------------------------------------------------------------------------------------------
    def _stats(self, like: torch.Tensor):
        shape = (1, -1, 1, 1, 1)
        mean = torch.tensor(self.vae.config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(self.vae.config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> float32 video (B, 3, frames, H, W) in [-1, 1], as WanPipeline: latents / (1 / std) + mean."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._stats(latents)
        video = self.vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
        return video.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos (B, 3, frames, H, W) in [-1, 1] -> scaled float32 latents (z - mean) / std."""
        latents = self.vae.encode(images.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator=generator)
        mean, std = self._stats(latents)
        return ((latents - mean) * (1.0 / std)).float()

    def offload_text_encoders(self) -> None:
        """UMT5-XXL is 11 GB in bf16: once the prompts are encoded it goes to the CPU."""
        for encoder in self.text_encoders:
            encoder.to("cpu")
