"""FamilyModel: the frozen parts of a teacher and everything family-specific around its denoiser.

A family (one module in stepdistill/models/families/, registered with models.registry) says how prompts become
conditioning (`Cond`) and how latents map to pixels, and declares as class attributes what the rest of the package
asks about it: its diffusers pipeline, text parts, default resolution, VAE dtype rule, the denoiser's prefix for
LoRA export, tiny and full-size random-init architectures, benchmark defaults and per-method defaults. The
denoiser itself is read by core.denoiser. Everything is loaded frozen and in eval mode: trainable weights are
LoRA adapters that train/build.py attaches to `unet` afterwards.

diffusers and transformers classes are named by string and imported on first use, so discovering the families
(e.g. for the CLI's --family choices) costs no multi-second diffusers import.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from ..core.denoiser import Cond, cast_timestep
from ..core.dtypes import dtype_kwargs
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


def library_class(module: str, name: str) -> type:
    """`module.name`, imported now (diffusers and transformers load their classes lazily)."""
    return getattr(importlib.import_module(module), name)


class _Named:
    """A class attribute that resolves the class named by another (string) attribute, on access."""

    def __init__(self, module: str, name_attr: str):
        self.module, self.name_attr = module, name_attr

    def __get__(self, obj, owner):
        return library_class(self.module, getattr(owner, self.name_attr))


class FamilyModel:
    """Denoiser, VAE, text encoders and tokenizers of one teacher, plus its family's conditioning rules.

    A subclass is a family: it sets every REQUIRED attribute below (tests/unit/test_families.py checks them)
    and registers itself with models.registry.register_family.
    """

    REQUIRED: ClassVar[tuple[str, ...]] = (
        "name", "pipeline_class_name", "text_parts", "default_resolution", "tiny_arch", "full_configs",
        "bench_batch", "dmd2_critic_ratio",
    )

    name: ClassVar[str]
    hub_tag: ClassVar[str] = ""  # the Hub tag model cards give this family's LoRAs (empty: the family name)
    # The diffusers pipeline: its model_index.json `_class_name` is how a folder's family is detected.
    pipeline_class_name: ClassVar[str]
    pipeline_class = _Named("diffusers", "pipeline_class_name")
    # Constant constructor arguments of that pipeline besides the modules (no safety checker, watermarker...).
    pipeline_kwargs: ClassVar[dict] = {}
    # (text encoder subfolder, tokenizer subfolder, encoder class, tokenizer class), in the pipeline's order.
    text_parts: ClassVar[tuple[tuple[str, str, str, str], ...]]
    # The denoiser: its pipeline attribute and subfolder, which is also the key prefix of an exported LoRA
    # ("unet" for the UNet families; "transformer" for DiT / flow families).
    denoiser_prefix: ClassVar[str] = "unet"
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"
    denoiser_class = _Named("diffusers", "denoiser_class_name")
    vae_class_name: ClassVar[str] = "AutoencoderKL"
    vae_class = _Named("diffusers", "vae_class_name")
    # Pixels the released model is trained at (the full-size benchmarks' default).
    default_resolution: ClassVar[int]
    # The noise schedule random-init models get (tiny and full size); loaded models read their folder's.
    default_scheduler_config: ClassVar[dict] = {}
    # Tiny test architecture: config overrides per part (denoiser_prefix, "vae", the text encoder subfolders);
    # models.tiny completes them and link_tiny_configs derives the keys that tie the parts together.
    tiny_arch: ClassVar[dict[str, dict]]
    # Full-size architecture of the released checkpoint, per part, for random-init benchmarks (nothing downloaded).
    full_configs: ClassVar[dict[str, dict]]
    # Benchmark defaults: per-GPU batch at full size, and DMD2's fake-score updates per generator update.
    bench_batch: ClassVar[int]
    dmd2_critic_ratio: ClassVar[int]
    # Per method, defaults of options the method leaves to the family, e.g. {"dmd": {"timesteps": [999]}}.
    method_defaults: ClassVar[dict[str, dict]] = {}
    # What the denoiser can predict: a DDPM family is one of eps / v / x0 (its scheduler config says which);
    # a flow family predicts a rectified-flow velocity ("flow"). Methods declare the ones they support.
    parameterisations: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    # Whether core.attention's processors (model.attention) fit the denoiser; a joint-attention transformer keeps
    # diffusers' own.
    attention_backends: ClassVar[bool] = True
    # What model.resolution must be a multiple of: the VAE's downsampling (8), times a transformer's packing.
    resolution_multiple: ClassVar[int] = 8
    # Whether model.resolution may be [height, width] with height != width (the family's latents, size conditioning
    # and recipe carry both sides); the others train square and refuse a pair in one line.
    non_square: ClassVar[bool] = False
    # LoRA target presets by name (lora.targets); {} = the UNet presets of core.lora.LORA_TARGETS.
    lora_target_presets: ClassVar[dict[str, list[str]]] = {}

    # ---- hooks the builder and the methods ask (defaults: a DDPM UNet family) ----
    @classmethod
    def lora_targets(cls, targets):
        """lora.targets (a preset name or a list of module suffixes) as module suffixes, from this family's presets."""
        from ..core.lora import resolve_targets

        if isinstance(targets, str) and cls.lora_target_presets:
            if targets not in cls.lora_target_presets:
                raise ValueError(f"unknown LoRA target preset {targets!r} for {cls.name}: use one of "
                                 f"{sorted(cls.lora_target_presets)} or a list of module-name suffixes")
            return list(cls.lora_target_presets[targets])
        return resolve_targets(targets)

    def noise_schedule(self, resolution: int | None = None):
        """The schedule the methods see (alpha_sigma, add_noise, network_timestep), at the training resolution."""
        from ..core.schedule import NoiseSchedule

        return NoiseSchedule.from_scheduler_config(self.scheduler_config)

    @property
    def denoiser_call(self):
        """call(net, x_t, timestep, cond) for core.denoiser.Denoiser; None = a UNet2DConditionModel's call."""
        return None

    def network_timestep(self, schedule, t, dtype) -> torch.Tensor:
        """The timestep the denoiser is told at schedule step t in a `dtype` run, as this family's pipeline computes it
        (core.denoiser.Denoiser's network_timestep): a DDPM UNet pipeline passes the integer t."""
        return cast_timestep(schedule, t, dtype)

    def shard_units(self) -> list:
        """The denoiser's blocks that FSDP2 shards one by one (model.shard=fsdp2): each is all-gathered just before it
        runs and freed after, so a process holds its shard of the base plus one block whole. The UNet's down, mid and
        up blocks; what is left (embeddings, conv_in / conv_out) is sharded with the root."""
        unet = self.unet
        return [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]

    def guidance_rule(self, schedule):
        """How the teacher's CFG combines its conditional and unconditional outputs, as this family's pipeline does:
        None for plain CFG (uncond + w (cond - uncond)), else rule(x_t, t, cond_out, uncond_out, w) -> DenoiserOut
        (core.denoiser.GuidedDenoiser), used wherever a method asks the teacher for a guided prediction."""
        return

    def compile_units(self) -> list:
        """The repeated blocks model.compile=regional compiles one by one (core/compile.py): every resnet and every
        transformer block of the UNet's down, mid and up blocks. These are also what gradient checkpointing wraps, so a
        compiled block runs inside the checkpoint (its recomputation reuses the graph) and the adapter switching of
        core.denoiser.checkpoint_under_adapter stays eager, outside the graphs."""
        unet = self.unet
        units = []
        for block in [*unet.down_blocks, *([unet.mid_block] if unet.mid_block is not None else []), *unet.up_blocks]:
            units += list(getattr(block, "resnets", None) or [])
            for attention in getattr(block, "attentions", None) or []:
                units += list(getattr(attention, "transformer_blocks", None) or [attention])
        return units

    def recipe_guidance_scale(self) -> float:
        """The guidance_scale a distilled student's pipeline call gets: 0, no CFG (CFG is baked into the student)."""
        return 0.0

    def offload_text_encoders(self) -> None:
        """Called once every prompt is encoded (the embedding cache): a family with large text encoders moves them off
        the accelerator here. The CLIP encoders of SD1.5 / SDXL are small enough to stay."""

    @classmethod
    def link_tiny_configs(cls, cfg: dict[str, dict]) -> None:
        """Derive, in place, the denoiser keys that depend on the text encoders (cross-attention width...)."""

    @classmethod
    def tiny_part_configs(cls, sample_size: int, arch: dict | None, model_max_length: int = 77) -> dict | None:
        """The tiny configs of every part when the family builds its own (models.tiny's generic builder otherwise)."""
        return None

    @classmethod
    def tiny_pipeline(cls, seed: int, words, sample_size: int, arch: dict | None, model_max_length: int = 77):
        """A tiny random-init pipeline when the family builds its own; None: models.tiny builds it generically."""
        return

    @classmethod
    def kohya_tensors(cls, state: dict, rank: int, alpha: float, dtype=None) -> dict | None:
        """This family's LoRA in the kohya / ComfyUI key layout; None when its pipeline loads no such file."""
        from ..core.lora_layout import kohya_layout_tensors

        return kohya_layout_tensors(state, rank, alpha, dtype)

    # ---- toy-world teacher hooks: train.toy_teacher trains a toy-size teacher of any family through these alone ----
    # Toy-size architecture (config overrides per part, as tiny_arch); {} = the family has no toy teacher recipe.
    toy_arch: ClassVar[dict[str, dict]] = {}
    # The trainer's defaults for this family: denoiser steps and batch size of the shipped toy teacher.
    toy_defaults: ClassVar[dict] = {"steps": 2000, "batch_size": 128}
    # Index in text_parts of a T5 encoder, whose prompt length (max_sequence_length) the toy teacher trains at.
    toy_t5_part: ClassVar[int | None] = None

    @classmethod
    def toy_scheduler_config(cls) -> dict:
        """The toy teacher's scheduler config (training schedule and the one saved with it): SD's DDPM schedule."""
        from .sd_common import SD_SCHEDULER_CONFIG

        return dict(SD_SCHEDULER_CONFIG)

    @classmethod
    def toy_prepare_vae(cls, vae) -> None:
        """Adapt a (shared) toy VAE's config to the family's pipeline; SD's pipelines read it as it is."""

    @classmethod
    def toy_encode_text(cls, pipe, input_ids: list, drop: torch.Tensor):
        """Conditioning with gradients, as the family's pipeline builds it: (encoder_hidden_states, added kwargs or
        None). input_ids: one tensor per text part; drop: the captions dropped (tokenized as "")."""
        raise NotImplementedError(f"the {cls.name} family has no toy teacher recipe")

    @classmethod
    def toy_loss_fn(cls, pipe, sampling: str | None = None, logit_normal: tuple[float, float] | None = None):
        """The training loss loss(x0, gen, hidden, added) on one batch: eps prediction on the DDPM schedule, t uniform
        (sampling and logit_normal are for flow families and refused here)."""
        from .toy_recipe import ddpm_loss_fn

        return ddpm_loss_fn(pipe, sampling, logit_normal)

    @classmethod
    def toy_objective(cls, sampling: str | None = None, logit_normal: tuple[float, float] | None = None) -> dict:
        """What toy_teacher.json records about the objective ({} for the SD recipe, whose record predates this)."""
        return {}

    @classmethod
    def toy_generate_kwargs(cls, guidance_scale: float, image_size: int) -> dict:
        """The pipeline-call arguments that sample a toy teacher at CFG scale guidance_scale."""
        return {"guidance_scale": guidance_scale}

    @classmethod
    def defaults_for(cls, method: str) -> dict:
        """This family's defaults for `method`'s options ({} when it has none)."""
        return dict(cls.method_defaults.get(method, {}))

    @classmethod
    def load_pipeline(cls, path, dtype=None, **kwargs):
        """The family's diffusers pipeline from a folder or hub id (what pipelines.load builds on)."""
        return cls.pipeline_class.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)

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
        unet = _load_part(cls.denoiser_class.from_pretrained, path, cls.denoiser_prefix, torch_dtype=dtype, **kw)
        vae = _load_part(cls.vae_class.from_pretrained, path, "vae", torch_dtype=vae_dtype, **kw)
        # Cast after loading: transformers renamed from_pretrained's dtype argument across versions.
        text_encoders = [_load_part(library_class("transformers", enc).from_pretrained, path, sub, **kw).to(dtype)
                         for sub, _, enc, _ in cls.text_parts]
        tokenizers = [_load_part(library_class("transformers", tok_cls).from_pretrained, path, tok, **kw)
                      for _, tok, _, tok_cls in cls.text_parts]
        scheduler_config = _load_part(library_class("diffusers", "DDPMScheduler").load_config, path, "scheduler", **kw)
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

    # The pixel size this model is used at when a run sets one (model.resolution); None = the native size.
    _resolution: int | None = None

    @property
    def native_resolution(self) -> int:
        """The UNet's training latent size times the VAE's downsampling."""
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def resolution(self) -> int:
        """Default pixel size of latents and size conditioning: the run's (train/build.py sets it), else native."""
        return self._resolution or self.native_resolution

    @resolution.setter
    def resolution(self, value) -> None:
        self._resolution = normal_size(value)

    def size_conditioning(self, resolution: int | None = None) -> dict | None:
        """The pipeline call arguments that carry the size conditioning the denoiser got at `resolution` (None: the
        family has none). A trained LoRA's recipe keeps them, so generation conditions as training did."""
        return None

    @property
    def guidance_distilled(self) -> bool:
        """Whether the teacher takes its guidance scale as an input (no real CFG on top): methods default to 1."""
        return False

    def recipe_size(self, resolution: int | None = None) -> dict:
        """The recipe's height and width when the schedule depends on the image size ({}: it does not)."""
        return {}

    def with_image_sizes(self, cond: Cond, image_sizes: torch.Tensor, resolution: int | None = None) -> Cond:
        """`cond` for real images with these size rows (data.images.SIZE_FIELDS: original H, W, crop top, left), made
        into latents at `resolution`. The default: unchanged, for families without size conditioning."""
        return cond

    def latent_shape(self, batch: int, resolution: int | None = None) -> tuple[int, ...]:
        resolution = normal_size(resolution) or self.resolution
        if isinstance(resolution, tuple):
            check_resolution(type(self), resolution)  # refuses the pair: this family is square
        if resolution % self.vae_scale_factor:
            raise ValueError(
                f"resolution {resolution} is not a multiple of the VAE's scale factor {self.vae_scale_factor}: "
                f"use e.g. {resolution // self.vae_scale_factor * self.vae_scale_factor}"
            )
        check_resolution(type(self), resolution)
        side = resolution // self.vae_scale_factor
        return (batch, self.latent_channels, side, side)

    @staticmethod
    def to_pipeline_latents(x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents in the layout the family's pipeline takes as `latents=` (FLUX packs 2x2 patches)."""
        return x

    @staticmethod
    def from_pipeline_latents(out: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """The pipeline's `output_type="latent"` result back to (B, C, h, w)."""
        return out

    @property
    def latent_channels(self) -> int:
        """Channels of the (unpacked) latents the denoiser works on."""
        return self.unet.config.in_channels

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
        latents = latents + self._shift_factor
        images = self.vae.decode(latents, return_dict=False)[0]
        return images.float().clamp(-1, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled float32 latents, a sample of the VAE posterior (the UNet's data space)."""
        images = images.to(self.vae.device, self.vae.dtype)
        latents = self.vae.encode(images).latent_dist.sample(generator=generator)
        scale = self.vae.config.scaling_factor
        stats = self._latent_stats(latents)
        latents = latents - self._shift_factor
        latents = latents * scale if stats is None else (latents - stats[0]) * scale / stats[1]
        return latents.float()

    @property
    def _shift_factor(self) -> float:
        """The VAE's latent shift (SD3 / FLUX VAEs: latents = (z - shift) * scale); 0 when it has none."""
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    def pipeline(self, scheduler=None):
        """A diffusers pipeline sharing these modules (no copies); the folder's scheduler unless one is given."""
        if scheduler is None:
            scheduler_class = library_class("diffusers", self.scheduler_config.get("_class_name", "DDIMScheduler"))
            scheduler = scheduler_class.from_config(self.scheduler_config)
        return self.pipeline_class(**self._pipeline_parts(), scheduler=scheduler)

    def _pipeline_parts(self) -> dict:
        """The pipeline's constructor arguments besides the scheduler: these modules, shared, by attribute name."""
        parts = {self.denoiser_prefix: self.unet, "vae": self.vae, **self.pipeline_kwargs}
        for (encoder, tokenizer, _, _), module, tok in zip(self.text_parts, self.text_encoders, self.tokenizers):
            parts[encoder], parts[tokenizer] = module, tok
        return parts

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, path={self.path!r}, resolution={self.resolution})"


def normal_size(value):
    """A model.resolution value in its one form: None for 0 / None, the side (int) for a square, else (height, width).

    model.resolution is a side (square, every family) or [height, width] (families with non_square, e.g. wan)."""
    if not value:
        return None
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise ValueError(f"resolution {list(value)} must be one side or [height, width] in pixels, e.g. [480, 832]")
        height, width = (int(v) for v in value)
        return height if height == width else (height, width)
    return int(value)


def size_hw(resolution) -> tuple[int, int]:
    """(height, width) of a resolution (a side or a [height, width] pair)."""
    size = normal_size(resolution)
    return size if isinstance(size, tuple) else (size, size)


def check_resolution(cls, resolution) -> None:
    """Refuse a resolution the family's pipeline cannot take, in one line (cls.resolution_multiple, cls.non_square)."""
    size = normal_size(resolution)
    if isinstance(size, tuple) and not cls.non_square:
        raise ValueError(f"{cls.name} trains square images: set model.resolution to one side (got {list(size)}); "
                         "[height, width] is for families such as wan")
    m = cls.resolution_multiple
    bad = [side for side in size_hw(size) if side % m]
    if bad:
        fix = [max(m, side // m * m) for side in size_hw(size)]
        raise ValueError(f"{cls.name} needs a resolution that is a multiple of {m} (got {resolution}): "
                         f"use e.g. model.resolution={fix[0] if fix[0] == fix[1] else fix}")
