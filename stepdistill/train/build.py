"""The one place that loads models and attaches adapters (DESIGN.md sec. 2).

Memory model: one frozen base UNet serves as the teacher (adapters disabled), the student (adapter "student")
and every critic (adapters "fake_score", "target", ...). Gradient synchronisation across processes is done by
the loop over each phase's own parameters (see loop.sync_gradients), not by wrapping the UNet in DDP: DDP
assumes every parameter of the wrapped module takes part in every backward, which is false when the student
and the fake score, two adapters of one module, are updated in separate phases.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from ..config import Config, ConfigError
from ..core.denoiser import Denoiser, GuidedDenoiser, checkpoint_under_adapter
from ..core.dist import Dist
from ..core.dtypes import dtype_from_name
from ..core.lora import add_adapter, use_fused_lora
from ..data.prompts import PromptData
from ..data.stream import open_data
from ..methods.base import Distiller, Nets, RunContext
from ..registry import get_method
from .shard import move_unsharded, require_processes, shard_base

log = logging.getLogger(__name__)


@dataclass
class Built:
    cfg: Config
    family: object  # stepdistill.models.FamilyModel
    nets: Nets
    distiller: Distiller
    data: PromptData
    params: dict  # phase -> list of trainable parameters
    targets: list[str]
    ctx: RunContext  # the run facts the distiller reads; the loop fills in run_dir, max_steps and dist
    compiled: str = "off"  # how the denoiser was compiled: off | regional | full (model.compile, resolved)


def precision_mode(cfg: Config, device: torch.device) -> str:
    """loop.mixed_precision resolved: no | bf16 (autocast) | bf16_pure (bf16 end to end, no autocast).

    auto is bf16_pure on a GPU, where the base is bf16 and the fused LoRA path runs (the toy-world check of issue 33,
    docs/training-speed.md: level with fp32 within the seed spread on the demo preset and tscd_4step, three seeds
    each, on the fused LoRA path); autocast over an fp32/fp16 base (kept as the user asked) or with PEFT's own LoRA
    forward (not the path measured); none on the CPU."""
    mode = cfg.loop.mixed_precision
    if mode != "auto":
        return mode
    if device.type != "cuda":
        return "no"
    pure_ok = cfg.model.dtype in ("auto", "bf16") and cfg.model.lora_kernel == "fused"
    return "bf16_pure" if pure_ok else "bf16"


def base_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    if cfg.model.dtype == "auto":
        pure = precision_mode(cfg, device) == "bf16_pure"  # bf16 end to end: the base too (Config.validate)
        return torch.bfloat16 if device.type == "cuda" or pure else torch.float32
    return dtype_from_name(cfg.model.dtype)


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
    distiller_cls: type[Distiller] = spec.distiller_cls
    dtype = base_dtype(cfg, device)
    # A base to be sharded loads on the CPU: fully_shard moves it to `device` one block at a time, so no process
    # ever holds the whole base on the GPU (the point when it does not fit there).
    load_device = device
    if cfg.model.shard == "fsdp2":
        require_processes(world)  # before minutes of loading
        load_device = torch.device("cpu")
    family = model or load_family(cfg.model.path, cfg.model.family, device=load_device, dtype=dtype)
    set_sample_shape(family, cfg)
    unet = family.unet
    unet.requires_grad_(False)
    if family.attention_backends:
        _set_attention(unet, cfg.model.attention, device)
    elif cfg.model.attention not in ("auto", "sdpa"):
        raise ConfigError(f"model.attention={cfg.model.attention!r}: the {family.name} transformer keeps diffusers' own "
                          "attention processors (joint text-image attention); set model.attention=auto")
    if cfg.model.channels_last:
        # Base weights only: that is where the convolution FLOPs are; LoRA convolutions are rank-thin.
        unet.to(memory_format=torch.channels_last)
    if cfg.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing(checkpoint_under_adapter)

    # Flow vs DDPM parameterisation: a method declares what it can distil (Distiller.parameterisations).
    resolution = _run_size(cfg, family)
    schedule = family.noise_schedule(resolution)
    distiller_cls.check_parameterisation(cfg.method, schedule.prediction_type, _families_with)
    targets = family.lora_targets(cfg.lora.targets)
    rank_critic = cfg.lora.critic_rank or cfg.lora.rank
    add_adapter(unet, "student", cfg.lora.rank, cfg.lora.effective_alpha, targets)
    # Which adapter mirrors whom (Distiller.adapter_ranks): by default a target mirrors the student and critics get
    # their own rank; DisBack's target holds nodes of the critic adapter.
    for name in distiller_cls.extra_adapters:
        if distiller_cls.adapter_ranks.get(name, "critic") == "student":
            add_adapter(unet, name, cfg.lora.rank, cfg.lora.effective_alpha, targets)
        else:
            add_adapter(unet, name, rank_critic, float(rank_critic), targets)
    # LoRA tensors train in fp32 even when the frozen base is bf16 (fp32 master weights).
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()
    # One autograd node per LoRA layer, bf16 compute copies of the fp32 masters (core/lora.py, issue 33); without
    # autocast (bf16_pure) the low-rank term computes in the base's dtype too, not in the masters' fp32.
    fused = cfg.model.lora_kernel == "fused"
    use_fused_lora(unet, fused, low_precision=fused and precision_mode(cfg, device) == "bf16_pure")
    if cfg.model.shard == "fsdp2":
        # After the adapters exist (their tensors stay whole, see train/shard.py) and before any forward.
        shard_base(unet, family.shard_units(), Dist(world, rank, device))
        move_unsharded(family, device)

    family.resolution = resolution  # every cond (prompts, empty, samples) carries this size conditioning (SDXL)
    uncond = family.empty_cond(1)
    run_dtype = dtype if dtype != torch.float32 else None
    # The network call is the family's (UNet, or a transformer with pooled text, packing, ids, embedded guidance).
    view = partial(Denoiser, unet, schedule, dtype=run_dtype, call=family.denoiser_call,
                   network_timestep=family.network_timestep)
    teacher = GuidedDenoiser(view(None), uncond, Distiller.guidance_scale, family.guidance_rule(schedule))
    nets = Nets(
        denoiser=unet, schedule=schedule, teacher=teacher, student=view("student"),
        fake_score=view("fake_score") if "fake_score" in distiller_cls.extra_adapters else None,
        target=view("target") if "target" in distiller_cls.extra_adapters else None,
        device=device,
    )
    # The models a method uses besides the teacher (a reward model) are loaded here, never by the method.
    models = {name: load(device) for name, load in distiller_cls.models_to_load(cfg.method).items()}
    ctx = RunContext(latent_shape=family.latent_shape(1, resolution)[1:], uncond=uncond, decode=family.decode,
                     family=family, dist=Dist(world, rank, device), models=models)

    distiller = distiller_cls(cfg.method, schedule)
    distiller.setup(nets, ctx)
    # The teacher's default CFG scale is the method's (dmd resolves its own per family in setup).
    distiller.check_cfg(family)
    teacher.guidance_scale = distiller.guidance_scale

    params = {}
    for phase, adapters in distiller_cls.trainable.items():
        ps = [p for a in adapters for p in adapter_parameters(unet, a)] + list(distiller.parameters(phase))
        for p in ps:
            p.requires_grad_(True)
        params[phase] = ps
    for a in distiller_cls.extra_adapters:
        if not any(a in adapters for adapters in distiller_cls.trainable.values()):
            for p in adapter_parameters(unet, a):
                p.requires_grad_(False)

    compiled = compile_denoiser(family, cfg.model.compile, device, cfg.model.shard)
    if data is None:
        data = build_data(cfg, family, resolution, rank, world, progress=progress and rank == 0)
    # Every prompt is encoded now (the embedding cache, also when the caller brought `data`): the text encoders
    # (T5-XXL: 9.5 GB) leave the GPU where model.offload_text_encoders or the family says so.
    _offload_text_encoders(family, cfg.model.offload_text_encoders)
    ctx.prompt_data = data
    return Built(cfg, family, nets, distiller, data, params, targets, ctx, compiled)


def _families_with(parameterisations) -> list[str]:
    """The registered families whose denoiser predicts one of `parameterisations` (for refusal messages)."""
    from ..models.registry import family_names, get_family

    return [n for n in family_names() if set(get_family(n).parameterisations) & set(parameterisations)]


def build_data(cfg: Config, family, resolution: int, rank: int, world: int, progress: bool):
    """Prompts alone, or image-caption pairs (captions become the prompts), cached or streamed (docs/data.md)."""
    return open_data(family, cfg.data, resolution, cfg.seed, rank, world, progress=progress)


# torch.compile options of the denoiser or its blocks; tests swap in a cheap backend (e.g. {"backend": "aot_eager"}).
COMPILE_OPTIONS: dict = {"dynamic": False}


def resolve_compile(setting: str, device: torch.device, shard: str = "none") -> tuple[str, str]:
    """(off | regional | full, why) for model.compile on `device`. auto: regional on CUDA, where the iteration is
    launch-bound (docs/training-speed.md); off on the CPU (inductor compiles for minutes there and gained nothing
    measurable at the tiny sizes, docs/benchmarks.md) and under FSDP2 sharding (not tested together)."""
    if setting == "auto":
        if shard != "none":
            return "off", "auto: off under model.shard=fsdp2 (compile and sharding are not tested together)"
        if device.type == "cuda":
            return "regional", "auto: regional on CUDA"
        return "off", f"auto: off on {device.type} (compiling pays on CUDA; set model.compile=regional to force it)"
    if setting in ("regional", "full") and device.type == "cpu" and not _cxx_compiler():
        raise ConfigError(f"model.compile={setting} on the CPU needs a C++ compiler for inductor (none found on PATH): "
                          "install g++ or set model.compile=off")
    return setting, f"model.compile={setting}"


def _cxx_compiler() -> str | None:
    import shutil

    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


def compile_denoiser(family, setting: str, device: torch.device, shard: str = "none") -> str:
    """Compile the family's denoiser in place as model.compile says (core/compile.py) and log what was compiled;
    returns the mode applied. Graphs are built at the first call of each adapter, grad mode and shape."""
    from ..core.compile import compile_regions, compile_whole, describe_units

    mode, why = resolve_compile(setting, device, shard)
    net = family.unet
    if mode == "regional":
        units = family.compile_units()
        compile_regions(net, units, **COMPILE_OPTIONS)
        log.info("%s: torch.compile per block, %s of the %s (graphs are built at the first iteration)", why,
                 describe_units(units), type(net).__name__)
    elif mode == "full":
        compile_whole(net, **COMPILE_OPTIONS)
        log.info("%s: torch.compile of the whole %s (graphs are built at the first iteration: minutes)", why,
                 type(net).__name__)
    else:
        log.info("%s: the %s runs eagerly", why if setting != "off" else "model.compile=off", type(net).__name__)
    return mode


def _offload_text_encoders(family, setting: bool | None) -> None:
    """model.offload_text_encoders: None = the family's choice (FamilyModel.offload_text_encoders), True = every text
    encoder to the CPU, False = kept where they are."""
    if setting is None:
        family.offload_text_encoders()
    elif setting:
        for encoder in family.text_encoders:
            encoder.to("cpu")


def _set_attention(unet, backend: str, device):
    try:
        from ..core.attention import set_attention_backend
    except ImportError:  # attention backends not available in this build
        if backend not in ("auto", "math", "sdpa"):
            raise
        return
    set_attention_backend(unet, backend, device=device)


def _run_size(cfg: Config, family):
    """model.resolution (a side, or (height, width) for a family that takes non-square sizes), else the model's own."""
    from ..models.base import check_resolution, normal_size

    size = normal_size(cfg.model.resolution) or family.resolution
    if isinstance(size, tuple):
        try:
            check_resolution(type(family), size)  # model.family=auto: the square families refuse the pair here
        except ValueError as e:
            raise ConfigError(f"model.resolution: {e}") from None
        if cfg.data.images:
            raise ConfigError(f"data.images with model.resolution={list(size)}: image-caption data is cropped square; "
                              "set one side, or train from prompts alone")
    return size


def set_sample_shape(family, cfg: Config) -> None:
    """The run's T5 length and video frames on the family instance (what its prompts and latents are shaped by): set
    before anything is encoded or drawn (bench/train.py sets them before caching its prompts and latents)."""
    _set_t5_length(family, cfg.model.max_sequence_length)
    _set_frames(family, cfg.model.frames)


def _set_t5_length(family, length):
    """model.max_sequence_length: the instance's T5 padding length (shadows the family's pipeline default)."""
    if length is None:
        return
    if not hasattr(family, "t5_max_length"):
        raise ConfigError(f"model.max_sequence_length={length}: the {family.name} family encodes no T5 prompt; "
                          "remove the key (it is for sd3/flux)")
    family.t5_max_length = int(length)


def _set_frames(family, frames):
    """model.frames: a video family's frames per sample (shadows its pipeline default)."""
    if frames is None:
        return
    if not hasattr(family, "frames"):
        raise ConfigError(f"model.frames={frames}: the {family.name} family makes images; remove the key (it is for "
                          "video families such as wan)")
    family.frames = int(frames)
