"""FLUX.1 family: double- and single-stream transformer over 2x2-packed latents with rotary ids, CLIP-L pooled +
T5 sequence text, resolution-dependent shift, and (dev) an embedded guidance scale in place of CFG."""

from __future__ import annotations

from typing import ClassVar

import torch

from ...core.denoiser import Cond
from ..flow_common import DEFAULT_ARCH, FLOW_VAE, FLUX_SCHEDULER_CONFIG, MMDIT_ATTN, MMDIT_FF, T5_XXL, FlowFamily
from ..registry import register_family
from ..sd_common import CLIP_L
from ..toy_recipe import TOY_FLOW_VAE

# FLUX.1-dev's transformer (11.9 B): 19 double-stream and 38 single-stream blocks, guidance embedding.
FLUX1_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                 "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
                 "axes_dims_rope": (16, 56, 56)}
# Single-stream blocks: attention projections (caught by MMDIT_ATTN) plus the parallel MLP in. Their output projection
# is `proj_out`, a name the transformer's final layer shares: a suffix cannot take one without the other, and diffusers'
# kohya converter drops the final layer's keys (its converted keys lack the `transformer.` prefix), so neither is a
# default target.
SINGLE = ["proj_mlp"]

# kohya / ComfyUI (BFL) names of the double-stream block parts, and the fused q|k|v groups, by diffusers module.
_DOUBLE = {"attn.to_out.0": "img_attn_proj", "ff.net.0.proj": "img_mlp_0", "ff.net.2": "img_mlp_2",
           "attn.to_add_out": "txt_attn_proj", "ff_context.net.0.proj": "txt_mlp_0", "ff_context.net.2": "txt_mlp_2"}
_DOUBLE_FUSED = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4 C): each 2x2 patch becomes one token, channels-major (FluxPipeline's order)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of pack_latents for an (h, w) latent."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """Rotary position ids of the packed tokens: (0, row, col) per token, row-major."""
    rows = torch.arange(h // 2, device=device).reshape(-1, 1).expand(h // 2, w // 2)
    cols = torch.arange(w // 2, device=device).reshape(1, -1).expand(h // 2, w // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(dtype=dtype)


@register_family
class FluxModel(FlowFamily):
    name = "flux"
    pipeline_class_name = "FluxPipeline"
    text_parts: ClassVar = (
        ("text_encoder", "tokenizer", "CLIPTextModel", "CLIPTokenizer"),
        ("text_encoder_2", "tokenizer_2", "T5EncoderModel", "T5TokenizerFast"),
    )
    hub_tag = "flux"
    denoiser_class_name = "FluxTransformer2DModel"
    default_scheduler_config: ClassVar = FLUX_SCHEDULER_CONFIG
    timestep_scale = 1.0  # FluxPipeline tells the transformer sigma; it multiplies by 1000 inside
    token_patch = 2  # 2x2 packing
    # FLUX.1's VAE factor 8 times the 2x2 packing; the tiny VAE (factor 2) keeps the rule, so tiny runs refuse what
    # full-size ones must.
    resolution_multiple = 16
    t5_max_length = 512
    tiny_arch: ClassVar = DEFAULT_ARCH["flux"]
    full_configs: ClassVar = {
        "transformer": FLUX1_DEV,
        "vae": dict(FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": CLIP_L,
        "text_encoder_2": T5_XXL,
    }
    bench_batch = 1
    dmd2_critic_ratio = 5
    # dev is guidance-distilled: the real score is one pass at the embedded guidance (below), no CFG (scale 1).
    method_defaults: ClassVar = {"dmd": {"timesteps": [999], "guidance_scale": 1.0}}
    lora_target_presets: ClassVar = {"attn": MMDIT_ATTN, "full": MMDIT_ATTN + MMDIT_FF + SINGLE}
    # The guidance value FLUX.1-dev's guidance embedding gets, in every pass (teacher, student, fake score) and in the
    # exported recipe (FluxPipeline's guidance_scale); its pipeline's default is 3.5.
    default_embedded_guidance: ClassVar[float] = 3.5
    # The toy world's FLUX-architecture teacher (train.toy_teacher): double-stream then single-stream blocks over 2x2-packed
    # latents (16x16x4 -> 64 tokens of 16) with rotary image ids, on the shared 4-channel toy VAE; CLIP's pooled output
    # and T5's sequence. No guidance embedding, as FLUX.1-schnell: it learns CFG from caption dropout instead, and is
    # sampled with FluxPipeline's true CFG (true_cfg_scale, negative prompt "").
    toy_arch: ClassVar = {
        "transformer": {"patch_size": 1, "num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16,
                        "num_attention_heads": 6, "axes_dims_rope": (4, 6, 6), "guidance_embeds": False},
        "vae": TOY_FLOW_VAE,
        "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "projection_dim": 32},
        "text_encoder_2": {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4},
    }
    toy_t5_part: ClassVar = 1

    @classmethod
    def toy_encode_text(cls, pipe, input_ids, drop):
        """As FluxPipeline.encode_prompt: T5's sequence, and CLIP's pooled output as the pooled projection. A dropped
        caption was tokenized as "", what the pipeline encodes for negative_prompt="" under true CFG."""
        pooled = pipe.text_encoder(input_ids[0], output_hidden_states=False).pooler_output
        return pipe.text_encoder_2(input_ids[1]).last_hidden_state, {"pooled_projections": pooled}

    @classmethod
    def toy_velocity(cls, net, x_t, sigma, hidden, added):
        """FluxTransformer2DModel as FluxPipeline calls it (told sigma; it scales by 1000 inside), on unpacked latents."""
        if net.config.guidance_embeds:
            raise ValueError("the toy FLUX recipe trains no guidance embedding: build the transformer with "
                             "guidance_embeds=False (FLUX.1-schnell's layout)")
        _, _, h, w = x_t.shape
        out = net(hidden_states=pack_latents(x_t), timestep=(cls.timestep_scale * sigma).float(), guidance=None,
                  pooled_projections=added["pooled_projections"], encoder_hidden_states=hidden,
                  txt_ids=torch.zeros(hidden.shape[1], 3, dtype=hidden.dtype),
                  img_ids=image_ids(h, w, dtype=hidden.dtype)).sample
        return unpack_latents(out, h, w)

    @classmethod
    def toy_generate_kwargs(cls, guidance_scale, image_size):
        """CFG without a guidance embedding: FluxPipeline's true CFG against the "" prompt (guidance_scale only feeds an
        embedding this transformer does not have); FluxPipeline's default size is not the toy's, so it is given."""
        return {"guidance_scale": 1.0, "true_cfg_scale": guidance_scale, "negative_prompt": "",
                "height": image_size, "width": image_size}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.embedded_guidance = self.default_embedded_guidance

    def shard_units(self) -> list:
        """The double-stream blocks, then the single-stream ones (model.shard=fsdp2)."""
        return [*self.unet.transformer_blocks, *self.unet.single_transformer_blocks]

    @staticmethod
    def to_pipeline_latents(x):
        return pack_latents(x)

    @staticmethod
    def from_pipeline_latents(out, h, w):
        return unpack_latents(out, h, w)

    @classmethod
    def tiny_part_configs(cls, sample_size, arch, model_max_length=77):
        from ..tiny_flow import tiny_flux_configs

        return tiny_flux_configs(sample_size, arch, model_max_length=model_max_length)

    @classmethod
    def tiny_pipeline(cls, seed, words, sample_size, arch, model_max_length=77):
        from ..tiny_flow import build_tiny_flux_pipeline

        return build_tiny_flux_pipeline(seed, words, sample_size, arch, model_max_length, cls.t5_max_length)

    @property
    def native_resolution(self) -> int:
        """The VAE's sample size (the transformer has none: it takes any token grid)."""
        return int(self.vae.config.sample_size)

    @property
    def guidance_embeds(self) -> bool:
        return bool(getattr(self.unet.config, "guidance_embeds", False))

    @property
    def guidance_distilled(self) -> bool:
        """dev: the guidance embedding replaces CFG."""
        return self.guidance_embeds

    def recipe_size(self, resolution: int | None = None) -> dict:
        """Always the trained size: FluxPipeline's default (a fixed 128-latent side, 1024 px) follows neither the
        transformer's config nor the training, and its resolution-dependent shift reads the size too."""
        return self.trained_size(resolution)

    def recipe_guidance_scale(self) -> float:
        """dev: FluxPipeline's guidance_scale feeds the guidance embedding, so the recipe carries the trained value."""
        return float(self.embedded_guidance) if self.guidance_embeds else 0.0

    def network_timestep(self, schedule, t, dtype) -> torch.Tensor:
        """FluxPipeline's timestep: the scheduler's float32 t cast to the latents' dtype, then divided by 1000 in that
        dtype (the transformer multiplies by 1000 again in its own): in bf16, bf16(bf16(t) / 1000)."""
        return schedule.pipeline_timestep(t).to(dtype) / 1000

    @property
    def denoiser_call(self):
        return self._call

    def _call(self, net, x_t, timestep, cond: Cond) -> torch.Tensor:
        """FluxTransformer2DModel as FluxPipeline calls it, on unpacked latents: pack, ids, guidance, unpack."""
        b, _, h, w = x_t.shape
        text = cond.encoder_hidden_states
        guidance = None
        if net.config.guidance_embeds:
            guidance = torch.full((b,), float(self.embedded_guidance), device=x_t.device, dtype=torch.float32)
        out = net(hidden_states=pack_latents(x_t), timestep=timestep, guidance=guidance,
                  pooled_projections=cond.added_cond_kwargs["pooled_projections"], encoder_hidden_states=text,
                  txt_ids=torch.zeros(text.shape[1], 3, device=x_t.device, dtype=text.dtype),
                  img_ids=image_ids(h, w, x_t.device, text.dtype), return_dict=False)[0]
        return unpack_latents(out, h, w)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], resolution: int | None = None) -> Cond:
        """As FluxPipeline.encode_prompt: the T5 sequence, and CLIP's pooled output as the pooled projection."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        clip, t5 = self.text_encoders
        ids = self._clip_ids(self.tokenizers[0], prompts, self.clip_max_length).to(clip.device)
        pooled = clip(ids, output_hidden_states=False).pooler_output.to(clip.dtype)
        sequence = self._t5(t5, self.tokenizers[1], prompts)
        return Cond(sequence, {"pooled_projections": pooled.to(sequence.device)})

    @classmethod
    def kohya_tensors(cls, state, rank, alpha, dtype=None):
        """The kohya / ComfyUI (BFL) layout FluxPipeline.load_lora_weights converts: `lora_unet_double_blocks_*`,
        `lora_unet_single_blocks_*`, `lora_unet_final_layer_linear`.

        BFL fuses q|k|v (and, in single blocks, the MLP in) into one linear; a group of n LoRAs of rank r becomes one
        of rank n r (A stacked, B block-diagonal, alpha n alpha: the same alpha / r scale), which diffusers splits back
        exactly. A member the adapter lacks gets zeros. diffusers applies final_layer without alpha, so its B carries
        the scale and its alpha is r.
        """
        from ...core.lora_layout import lora_modules

        def cast(v):
            return v if dtype is None else v.to(dtype)

        modules, out, used = set(lora_modules(state)), {}, set()

        def single(name, module, scale_into_b=False):
            a, b_ = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            out[f"{name}.lora_down.weight"] = cast(a)
            out[f"{name}.lora_up.weight"] = cast(b_ * (alpha / rank) if scale_into_b else b_)
            out[f"{name}.alpha"] = torch.tensor(float(rank if scale_into_b else alpha), dtype=dtype or torch.float32)
            used.add(module)

        def fused(name, members):
            present = [m for m in members if m in modules]
            if not present:
                return
            downs, ups = [], []
            for m in members:
                if m in modules:
                    downs.append(state[f"{m}.lora_A.weight"])
                    ups.append(state[f"{m}.lora_B.weight"])
                    used.add(m)
                else:
                    raise ValueError(f"{m} has no LoRA but {present[0]} does: BFL's kohya layout fuses them into "
                                     f"{name}; train with all of {[x.rsplit('.', 1)[-1] for x in members]} targeted")
            n = len(members)
            out[f"{name}.lora_down.weight"] = cast(torch.cat(downs))
            out[f"{name}.lora_up.weight"] = cast(torch.block_diag(*[u.flatten(1) for u in ups]))
            out[f"{name}.alpha"] = torch.tensor(float(n * alpha), dtype=dtype or torch.float32)

        blocks = sorted({int(m.split(".")[1]) for m in modules if m.startswith("transformer_blocks.")})
        for i in blocks:
            prefix = f"transformer_blocks.{i}"
            for part, bfl in _DOUBLE.items():
                if f"{prefix}.{part}" in modules:
                    single(f"lora_unet_double_blocks_{i}_{bfl}", f"{prefix}.{part}")
            for bfl, parts in _DOUBLE_FUSED.items():
                fused(f"lora_unet_double_blocks_{i}_{bfl}", [f"{prefix}.{p}" for p in parts])
        singles = sorted({int(m.split(".")[1]) for m in modules if m.startswith("single_transformer_blocks.")})
        for i in singles:
            prefix = f"single_transformer_blocks.{i}"
            fused(f"lora_unet_single_blocks_{i}_linear1", [f"{prefix}.{p}" for p in _SINGLE_FUSED])
            if f"{prefix}.proj_out" in modules:
                single(f"lora_unet_single_blocks_{i}_linear2", f"{prefix}.proj_out")
        if "proj_out" in modules:
            single("lora_unet_final_layer_linear", "proj_out", scale_into_b=True)
        left = sorted(modules - used)
        if left:
            raise ValueError(f"no kohya (BFL) name for the FLUX modules {left[:3]}: export the diffusers format")
        return out
