"""The one place that loads models and attaches adapters (DESIGN.md sec. 2).

Memory model: one frozen base UNet serves as the teacher (adapters disabled), the student (adapter "student")
and every critic (adapters "fake_score", "target", ...). Gradient synchronisation across processes is done by
the loop over each phase's own parameters (see loop.sync_gradients), not by wrapping the UNet in DDP: DDP
assumes every parameter of the wrapped module takes part in every backward, which is false when the student
and the fake score, two adapters of one module, are updated in separate phases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import Config
from ..core.denoiser import Denoiser, GuidedDenoiser, checkpoint_under_adapter
from ..core.lora import add_adapter, resolve_targets
from ..core.schedule import NoiseSchedule
from ..data.prompts import PromptData
from ..data.stream import open_data
from ..methods.base import Nets
from ..registry import get_method

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Built:
    cfg: Config
    family: object  # stepdistill.models.FamilyModel
    nets: Nets
    distiller: object
    data: PromptData
    params: dict  # phase -> list of trainable parameters
    targets: list[str]


def base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[cfg.model.dtype]


def adapter_parameters(unet, name: str) -> list[torch.nn.Parameter]:
    """Every LoRA tensor of adapter `name` (peft names them ...lora_A.<name>.weight)."""
    return [p for n, p in unet.named_parameters() if f".{name}." in n and "lora_" in n]


def build(cfg: Config, device: torch.device, rank: int = 0, world: int = 1, progress: bool = True,
          model=None, data: PromptData | None = None) -> Built:
    """Load the teacher and data, attach the adapters. `model` (a FamilyModel in memory, frozen, on `device`, in
    base_dtype) and `data` stand in for model.path and data.*: the training benchmark builds random-init
    full-size models in code instead of writing 10 GB folders."""
    from ..models import load_family

    spec = get_method(cfg.method.name)
    dtype = base_dtype(cfg, device)
    family = model or load_family(cfg.model.path, cfg.model.family, device=device, dtype=dtype)
    unet = family.unet
    unet.requires_grad_(False)
    _set_attention(unet, cfg.model.attention, device)
    if cfg.model.channels_last:
        # Base weights only: that is where the convolution FLOPs are; LoRA convolutions are rank-thin.
        unet.to(memory_format=torch.channels_last)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_under_adapter)

    targets = resolve_targets(cfg.lora.targets)
    rank_critic = cfg.lora.critic_rank or cfg.lora.rank
    add_adapter(unet, "student", cfg.lora.rank, cfg.lora.effective_alpha, targets)
    # Which adapter mirrors whom: by default a target mirrors the student (EMA / stop-grad copies) and critics get
    # their own rank; a method overrides it per adapter (DisBack's target holds nodes of the critic adapter).
    roles = {"target": "student", **getattr(spec.distiller_cls, "adapter_ranks", {})}
    for name in spec.distiller_cls.extra_adapters:
        if roles.get(name, "critic") == "student":
            add_adapter(unet, name, cfg.lora.rank, cfg.lora.effective_alpha, targets)
        else:
            add_adapter(unet, name, rank_critic, float(rank_critic), targets)
    # LoRA tensors train in fp32 even when the frozen base is bf16 (fp32 master weights).
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()

    schedule = NoiseSchedule.from_scheduler_config(family.scheduler_config)
    resolution = cfg.model.resolution or family.resolution
    uncond = family.empty_cond(1)
    run_dtype = dtype if dtype != torch.float32 else None
    teacher = GuidedDenoiser(Denoiser(unet, schedule, None, run_dtype), uncond, getattr(cfg.method, "guidance_scale", 1.0))
    nets = Nets(
        unet=unet, schedule=schedule, teacher=teacher,
        student=Denoiser(unet, schedule, "student", run_dtype),
        fake_score=Denoiser(unet, schedule, "fake_score", run_dtype) if "fake_score" in spec.distiller_cls.extra_adapters else None,
        target=Denoiser(unet, schedule, "target", run_dtype) if "target" in spec.distiller_cls.extra_adapters else None,
        device=device,
    )
    nets.extra["latent_shape"] = family.latent_shape(1, resolution)[1:]
    nets.extra["uncond"] = uncond
    nets.extra["decode"] = family.decode
    nets.extra["family"] = family  # the FamilyModel: per-family method defaults (FamilyModel.defaults_for)

    distiller = spec.distiller_cls(cfg.method, schedule)
    distiller.setup(nets)

    params = {}
    for phase, adapters in spec.distiller_cls.trainable.items():
        ps = [p for a in adapters for p in adapter_parameters(unet, a)]
        ps += list(distiller.parameters(phase)) if hasattr(distiller, "parameters") else []
        for p in ps:
            p.requires_grad_(True)
        params[phase] = ps
    for a in spec.distiller_cls.extra_adapters:
        if not any(a in adapters for adapters in spec.distiller_cls.trainable.values()):
            for p in adapter_parameters(unet, a):
                p.requires_grad_(False)

    if cfg.model.compile:
        _compile(unet)
    if data is None:
        data = build_data(cfg, family, resolution, rank, world, progress=progress and rank == 0)
    nets.extra["prompt_data"] = data  # every encoded prompt, for work a method does once (dmd's ODE pairs)
    return Built(cfg, family, nets, distiller, data, params, targets)


def build_data(cfg: Config, family, resolution: int, rank: int, world: int, progress: bool):
    """Prompts alone, or image-caption pairs (captions become the prompts), cached or streamed (docs/data.md)."""
    return open_data(family, cfg.data, resolution, cfg.seed, rank, world, progress=progress)


# torch.compile options of the UNet; tests swap in a cheap backend (e.g. {"backend": "eager"}).
COMPILE_OPTIONS: dict = {"dynamic": False}


def _compile(unet) -> None:
    """Compile the UNet in place (parameter names unchanged, so checkpoints and exports are the same).

    Dynamo guards on the PEFT layers' active-adapter flags, so each adapter gets its own graph, as does each
    batch shape and grad mode: a dmd iteration compiles five (teacher at 2B, student and fake score with and
    without grad), DisBack's target adds more; past dynamo's default limit of 8 per frame it would fall back to
    eager with only a log line.
    """
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, limit, max(getattr(config, limit), 64))
    unet.compile(**COMPILE_OPTIONS)


def _set_attention(unet, backend: str, device):
    try:
        from ..core.attention import set_attention_backend
    except ImportError:  # attention backends not available in this build
        if backend not in ("auto", "math", "sdpa"):
            raise
        return
    set_attention_backend(unet, backend, device=device)
