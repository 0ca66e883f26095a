"""`stepdistill bench train`: training throughput of the real loop, in TFLOP/s against a measured matmul ceiling.

For each method and model family the benchmark builds a random-init UNet from its architecture config (full-size
SD1.5 at 512 px or SDXL at 1024 px on a GPU; the tiny test architectures on the CPU), wraps it in the real
`Trainer` (train/build.py attaches the adapters, train/loop.py runs `iteration()`: one student update and the
method's critic updates), and reports:

* step time: median over timed iterations after warm-up (CUDA events on a GPU, perf_counter on the CPU);
* FLOPs: one whole iteration counted by torch.utils.flop_counter.FlopCounterMode (every forward, backward and
  gradient-checkpointing recomputation that actually ran; docs/benchmarks.md, "FLOP accounting");
* achieved TFLOP/s = FLOPs per iteration / step time, and its share of a bf16 matmul ceiling measured in the
  same process (the best of a few large square matmuls);
* network passes: the UNet calls of that iteration (adapter, batch, grad; core/passes.py);
* aten ops dispatched in one iteration and the reads of a tensor value back to Python among them (each a sync on a
  GPU): CPU proxies of launch overhead and stalls that anyone can measure without a device (OpCount);
* peak GPU memory, and with --find-max-batch the largest per-GPU batch that fits.

Efficiency levers are config switches (`--levers` names a set of `--set` overrides per row), so what is
measured is exactly what a training run with that config executes.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import logging
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import Config, _merge, build_config, parse_overrides
from ..core.passes import PassCounter
from ..models.registry import family_names, get_family
from ..registry import method_names

log = logging.getLogger(__name__)

METHODS = ("dmd", "disback", "tscd")
TINY_BATCH = 2
# DisBack is measured in its stage 2 (backtracking, the long one): two nodes recorded one iteration each, then the
# target adapter holds node 1 for 500 iterations, longer than any benchmark.
_DISBACK_STAGE2 = {"num_nodes": 2, "interval": 1, "steps_per_node": 500}
# Iterations a method needs before it reaches the phase measured: DisBack's two recording iterations, then one in
# stage 2 (where the target adapter's graphs get compiled).
MIN_WARMUP = {"disback": 3}
# data.images is what switches cached real latents on in training; the benchmark fills it with random latents.
RANDOM_LATENTS = "random-latents"
# Each lever is the baseline plus these config overrides (docs/benchmarks.md, "Efficiency levers").
LEVERS = {
    "baseline": {},
    "fp32_base": {"model.dtype": "fp32"},
    "channels_last": {"model.channels_last": True},
    "compile": {"model.compile": "regional"},  # the default on CUDA (auto); on the CPU the baseline is eager
    "compile_full": {"model.compile": "full"},
    "eager": {"model.compile": "off"},
    "grad_ckpt": {"model.gradient_checkpointing": True},
    "attention_math": {"model.attention": "math"},
    "attention_triton": {"model.attention": "triton"},
    "no_cached_latents": {"data.images": ""},
}
# Attention kernels that FlopCounterMode cannot see into (Triton launches, xformers ops): their FLOPs are counted
# on SDPA, which computes the same product.
OPAQUE_ATTENTION = ("triton", "xformers")


# ---------------------------------------------------------------------------------------------------------------
# The run under test: config, random-init models, cached data, the real Trainer
# ---------------------------------------------------------------------------------------------------------------


def method_preset(method: str, family: str) -> dict:
    """The methods' published recipes where they change the cost of an iteration: DMD2's fake-score updates per
    generator update are the family's (FamilyModel.dmd2_critic_ratio: its released scripts' dfake_gen_update_ratio)."""
    if method not in ("dmd", "disback"):
        return {}
    ratio = {"critic_updates_per_student_update": get_family(family).dmd2_critic_ratio}
    return {**ratio, **_DISBACK_STAGE2} if method == "disback" else ratio


def bench_config(method: str, family: str, batch: int, overrides=(), resolution: int = 0,
                 preset: dict | None = None) -> Config:
    """The config a training run would use: `preset` (a YAML preset's contents) or the method's family recipe,
    random-init models with cached latents in place of model.path and data, then `overrides`."""
    if method not in method_names():
        raise ValueError(f"method {method!r} is not registered (registered: {', '.join(method_names())})")
    overrides = [o for o in overrides if applies(o, method)]
    base = preset or {"method": {"name": method, **method_preset(method, family)}}
    run = {
        "model": {"path": f"random-init:{family}", "family": family, **({"resolution": resolution} if resolution else {})},
        "data": {"prompts": "in-memory", "batch_size": batch, "images": RANDOM_LATENTS},
        "loop": {"progress": False},
    }
    cfg = build_config(_merge(_merge(base, run), parse_overrides(list(overrides))))
    if hasattr(get_family(family), "default_frames") and not cfg.model.resolution:
        # Its pipeline's default clip (480 x 832, 81 frames) is not square, and the cached random latents stand in
        # for square-cropped images.
        raise ValueError(f"bench train on the video family {family} needs a square clip: pass --set "
                         "model.resolution=N --set model.frames=F (the tiny presets in configs/tiny/ use 16 and 5)")
    return cfg


def read_preset(path) -> tuple[dict, str, str]:
    """(contents, method, family) of a YAML preset such as configs/dmd/sdxl_1step.yaml."""
    from ..config import read_yaml

    preset = read_yaml(path)
    method = preset.get("method")
    method = method.get("name") if isinstance(method, dict) else method
    family = (preset.get("model") or {}).get("family", "auto")
    if not method or family not in family_names():
        raise ValueError(f"{path} must name method.name and model.family (one of {', '.join(family_names())}) "
                         "to be benchmarked")
    if isinstance(preset["method"], str):
        preset["method"] = {"name": method}
    return preset, method, family


def applies(override: str, method: str) -> bool:
    """Whether a --set override is for `method`: every non-method key is; method.X only where X is an option."""
    import dataclasses

    from ..registry import get_method

    key = override.split("=", 1)[0].strip()
    if not key.startswith("method."):
        return True
    option = key.split(".")[1]
    return option in {f.name for f in dataclasses.fields(get_method(method).config_cls)}


def _check_overrides(overrides, methods) -> None:
    """A method.X override that no benchmarked method has is a typo, not something to skip silently."""
    for o in overrides:
        if not any(applies(o, m) for m in methods):
            raise ValueError(f"--set {o}: none of the methods {', '.join(methods)} has this option")


def bench_model(family: str, tiny: bool, device, dtype, seed: int = 0):
    """A random-init FamilyModel with the released architecture (or the tiny test one), frozen, on `device`."""
    from ..models.random_init import build_family_model

    model = build_family_model(family, tiny, "full", device, dtype, seed)
    # build_family_model lays the UNet out channels-last on a GPU (its inference default); here that is the
    # model.channels_last lever, applied by train/build.py.
    model.unet.to(memory_format=torch.contiguous_format)
    return model


def bench_data(cfg: Config, model, seed: int = 0):
    """Cached prompt embeddings (as in every run) and, when data.images is set, cached random latents."""
    from ..data.images import uncropped_sizes
    from ..data.prompts import PromptData
    from ..models.tiny import TINY_PROMPTS
    from ..train.build import set_sample_shape

    set_sample_shape(model, cfg)  # the prompts and latents cached here have the run's T5 length and frames
    latents = sizes = None
    if cfg.data.images:
        shape = model.latent_shape(len(TINY_PROMPTS), cfg.model.resolution or None)
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        sizes = uncropped_sizes(len(TINY_PROMPTS), shape[-1] * model.vae_scale_factor)  # "images" made at that size
    return PromptData.from_family(model, list(TINY_PROMPTS), cfg.data.batch_size, cfg.seed, latents=latents,
                                  image_sizes=sizes)


def make_trainer(cfg: Config, model, data, out_dir, device):
    """The real Trainer around in-memory models: train/build.py attaches adapters, loop.py owns the iteration."""
    from ..core.dist import Dist
    from ..train.build import build
    from ..train.loop import Trainer

    dist = Dist.from_env()
    if dist.world > 1:
        raise RuntimeError("bench train measures one process: launch it without torchrun (scaling: docs/scaling.md)")
    dist.device = torch.device(device)
    trainer = Trainer(cfg, out_dir, dist)
    trainer.setup(build(cfg, dist.device, model=model, data=data, progress=False))
    return trainer


def trainer_from_config(cfg: Config, out_dir):
    """The real Trainer built from the config's model.path and data, as `stepdistill train` builds it, not yet run
    (the memory benchmark, bench/memory.py, measures it on full-size folders)."""
    from ..train.loop import Trainer

    trainer = Trainer(cfg, out_dir)
    trainer.setup()
    return trainer


def run_iteration(trainer) -> dict:
    """One student update plus its critic updates, advancing the step counter as Trainer.run does."""
    logs = trainer.iteration()
    trainer.step += 1
    return logs


# ---------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FlopCount:
    total: int
    by_op: dict[str, int] = field(default_factory=dict)  # conv / matmul / attention
    by_module: dict[str, int] = field(default_factory=dict)  # top-level module -> FLOPs (the UNet, a GAN head)


def _cpu_sdpa_formulas() -> dict:
    """FLOP formulas for the CPU SDPA kernel, which the counter does not know (its CUDA kernels it does)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}

    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


def _op_kind(op) -> str:
    name = str(op)
    if "attention" in name:
        return "attention"
    return "conv" if "conv" in name else "matmul"


@contextlib.contextmanager
def _countable(unet, backend: str, compiled: bool):
    """Run eagerly (the counter sees aten ops, not compiled graphs) with attention the counter can see into."""
    from ..core.attention import set_attention_backend

    with contextlib.ExitStack() as stack:
        if compiled:
            if not hasattr(torch.compiler, "set_stance"):
                raise RuntimeError("counting the FLOPs of a compiled UNet needs torch >= 2.6 "
                                   "(torch.compiler.set_stance): upgrade torch, or bench without model.compile")
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        if backend in OPAQUE_ATTENTION:
            saved = unet.attn_processors
            set_attention_backend(unet, "sdpa")
            stack.callback(unet.set_attn_processor, saved)
        yield


def count_flops(fn, unet, backend: str = "auto", compiled: bool = False) -> FlopCount:
    """FLOPs of whatever `fn()` runs (forward, backward, recomputation), by op kind and top-level module."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False, custom_mapping=_cpu_sdpa_formulas())
    with _countable(unet, backend, compiled), counter:
        fn()
    counts = counter.get_flop_counts()
    by_op: dict[str, int] = {}
    for op, n in counts.get("Global", {}).items():
        by_op[_op_kind(op)] = by_op.get(_op_kind(op), 0) + n
    by_module = {name: sum(ops.values()) for name, ops in counts.items() if name != "Global" and "." not in name}
    return FlopCount(counter.get_total_flops(), by_op, by_module)


def unet_forward_flops(trainer) -> int:
    """F: one teacher forward (base UNet, no adapter, no CFG) of one sample, the unit of docs/benchmarks.md."""
    b = trainer.built
    cond = b.data.cond.index([0]).to(b.nets.device)
    x = torch.randn((1, *b.ctx.latent_shape), device=b.nets.device)
    t = torch.tensor([500], device=b.nets.device)

    def forward():
        with torch.no_grad(), trainer.autocast:
            b.nets.teacher.denoiser(x, t, cond)

    return count_flops(forward, b.nets.denoiser, trainer.cfg.model.attention, b.compiled != "off").total


# ---------------------------------------------------------------------------------------------------------------
# CPU proxies of GPU speed: aten ops dispatched and values read back to the host (issue 33)
# ---------------------------------------------------------------------------------------------------------------

# Ops that read a tensor's value back to Python: on a GPU each waits for the device (a sync).
VALUE_READS = ("_local_scalar_dense", "nonzero", "item", "tolist", "numpy", "is_nonzero", "equal", "masked_select",
               "unique", "_unique2", "repeat_interleave", "_assert_async")


class OpCount:
    """Counts the aten ops dispatched while active (a TorchDispatchMode) and the value reads among them.

    tolist() and numpy() on a CPU tensor read memory without dispatching an op (on a GPU they copy to the host
    first), so they are counted where Python calls them.
    """

    def __init__(self):
        from collections import Counter

        self.ops = Counter()

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    def reads(self) -> dict:
        return {k: v for k, v in self.ops.items() if k in VALUE_READS}

    @contextlib.contextmanager
    def __call__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops = self.ops

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                ops[func.overloadpacket.__name__] += 1
                return func(*args, **(kwargs or {}))

        originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

        def counted(name):
            def read(tensor, *args, **kwargs):
                ops[name] += 1
                return originals[name](tensor, *args, **kwargs)
            return read

        try:
            for name in originals:
                setattr(torch.Tensor, name, counted(name))
            with Mode():
                yield self
        finally:
            for name, fn in originals.items():
                setattr(torch.Tensor, name, fn)


def count_ops(fn, unet, backend: str = "auto", compiled: bool = False) -> OpCount:
    """aten ops and value reads of whatever `fn()` runs, eagerly (a compiled UNet's graphs hide their ops)."""
    counter = OpCount()
    with _countable(unet, backend, compiled), counter():
        fn()
    return counter


# ---------------------------------------------------------------------------------------------------------------
# Profile: where one iteration's device time goes (`bench gpu --parts profile`)
# ---------------------------------------------------------------------------------------------------------------

# Kernel (CUDA) or aten op (CPU) name -> kind; the first pattern that matches wins, so the order matters.
KERNEL_KINDS = (
    ("memcpy", r"memcpy|memset"),
    ("optimizer", r"adam|multi_tensor|foreach"),
    ("attention", r"flash|fmha|attention|sdpa|softmax"),
    ("conv", r"conv|implicit_gemm|winograd|cudnn"),
    ("gemm", r"gemm|matmul|\bmm\b|addmm|bmm|baddbmm|cutlass|cublas|sm\d+_xmma|nvjet"),
    ("norm", r"norm"),
    ("layout", r"transpose|permute|nchw|nhwc|contiguous|clone"),
    ("copy/cast", r"copy|_to_copy|cast|convert"),
    ("index", r"index|gather|scatter|slice|cat\b|where"),
)


def kernel_kind(name: str) -> str:
    import re

    low = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, low)), "elementwise/other")


def profile_iteration(trainer, top: int = 10) -> dict:
    """One iteration under torch.profiler: time by kernel kind, busy fraction, syncs, top kernels.

    On a GPU the device kernels are counted (their summed time over the iteration's wall time is the busy fraction)
    and torch.cuda.set_sync_debug_mode("warn") counts the syncs; on the CPU (the --tiny rehearsal) the aten ops'
    self time stands in for kernels and the value reads (OpCount) for syncs.
    """
    import time
    import warnings

    from torch.profiler import ProfilerActivity, profile

    device = trainer.dist.device
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    syncs = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                run_iteration(trainer)
                if cuda:
                    torch.cuda.synchronize(device)
                wall = time.perf_counter() - start
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(0)
    if cuda:
        syncs = sum("synchroniz" in str(w.message).lower() for w in caught)
    times: dict[str, float] = {}
    for e in prof.key_averages():
        us = (e.self_device_time_total if cuda else e.self_cpu_time_total) or 0
        if us <= 0 or (cuda and e.device_type.name != "CUDA") or (not cuda and not e.key.startswith("aten::")):
            continue
        times[e.key] = times.get(e.key, 0.0) + us
    busy_us = sum(times.values())
    by_kind: dict[str, float] = {}
    for name, us in times.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + us
    if syncs is None:
        syncs = sum(count_ops(lambda: run_iteration(trainer), trainer.built.nets.denoiser).reads().values())
    return {
        "wall_ms": wall * 1e3, "kernel_ms": busy_us / 1e3, "busy_fraction": busy_us / 1e6 / wall,
        "share_by_kind": {k: v / busy_us for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])} if busy_us else {},
        "syncs_per_iteration": syncs, "sync_source": "cuda sync debug mode" if cuda else "value reads (CPU proxy)",
        "top_kernels": [(name, us / 1e3) for name, us in sorted(times.items(), key=lambda kv: -kv[1])[:top]],
    }


# ---------------------------------------------------------------------------------------------------------------
# Time, the matmul ceiling, memory
# ---------------------------------------------------------------------------------------------------------------


def matmul_ceiling(device, dtype=None, sizes=None, repeats: int | None = None) -> dict:
    """The best TFLOP/s of large square matmuls in `dtype` (bf16 on a GPU, fp32 on the CPU), timed like a step."""
    from .infer import Clock

    device = torch.device(device)
    cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if cuda else torch.float32)
    sizes = sizes or ((4096, 8192, 16384) if cuda else (256, 512))
    repeats = repeats or (20 if cuda else 3)
    clock, best = Clock(device), {"tflops": 0.0, "size": 0}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        marks = [clock.mark()]
        for _ in range(repeats):
            a @ b
        marks.append(clock.mark())
        (ms,) = clock.elapsed_ms(marks)
        tflops = 2 * n**3 * repeats / (ms * 1e-3) / 1e12
        if tflops > best["tflops"]:
            best = {"tflops": tflops, "size": n}
        del a, b
    return {**best, "dtype": str(dtype).removeprefix("torch.")}


def time_iterations(trainer, iters: int) -> list[float]:
    """Milliseconds of each of `iters` real iterations."""
    from .infer import Clock

    clock = Clock(trainer.dist.device)
    marks = [clock.mark()]
    for _ in range(iters):
        run_iteration(trainer)
        marks.append(clock.mark())
    return clock.elapsed_ms(marks)


def _free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fits(trainer, batch: int, iters: int = 2) -> bool:
    """Whether `iters` iterations at per-process batch `batch` run without a CUDA out-of-memory error.

    Two iterations: the first creates the optimizers' moments, so only the second holds the steady state.
    """
    trainer.built.data.batch_size = batch
    try:
        for _ in range(iters):
            run_iteration(trainer)
        return True
    except torch.cuda.OutOfMemoryError:
        log.info("batch %d: out of memory", batch)
    # Outside the except block: the traceback (and the activations its frames hold) is released by now.
    for opt in trainer.optimizers.values():
        opt.zero_grad(set_to_none=True)
    _free_cuda()
    return False


def largest_batch(fits_fn, limit: int, start: int = 1) -> int:
    """The largest b in 1..limit with fits_fn(b), for fits_fn true up to some size: doubling from `start`, then
    bisection (a `start` near the answer saves probes).

    0 when even batch 1 does not fit.
    """
    lo, hi = 0, limit + 1  # lo fits (0 trivially); hi is taken not to
    b = max(1, min(start, limit))
    while b < hi and fits_fn(b):
        lo, b = b, 2 * b
    hi = min(hi, b)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits_fn(mid):
            lo = mid
        else:
            hi = mid
    return lo


def find_max_batch(trainer, limit: int) -> dict:
    """Largest per-GPU batch that fits, and the peak memory of two iterations at that batch."""
    device = trainer.dist.device
    if device.type != "cuda":
        raise RuntimeError("--find-max-batch needs a CUDA device (it searches by catching CUDA out-of-memory errors)")
    batch = trainer.built.data.batch_size
    best = largest_batch(lambda b: fits(trainer, b), limit)
    peak = None
    if best:
        torch.cuda.reset_peak_memory_stats(device)
        fits(trainer, best)
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    trainer.built.data.batch_size = batch
    _free_cuda()
    return {"max_batch": best, "max_batch_limit": limit, "max_batch_peak_gb": peak}


# ---------------------------------------------------------------------------------------------------------------
# One row, all rows, the table
# ---------------------------------------------------------------------------------------------------------------


def measure(trainer, iters: int, warmup: int, ceiling: dict | None = None) -> dict:
    """Warm up, count one iteration's FLOPs, time `iters` more; everything per process."""
    cfg, device = trainer.cfg, trainer.dist.device
    warmup = max(warmup, MIN_WARMUP.get(cfg.method.name, 0))
    # A regression warm-up (dmd, disback: a 25-step teacher solve per sample) is not the phase to measure.
    trainer.step = max(trainer.step, getattr(cfg.method, "regression_steps", 0))
    for _ in range(warmup):
        run_iteration(trainer)  # also compiles, when model.compile is on
    compiled = trainer.built.compiled != "off"
    with PassCounter(trainer.built.nets.denoiser) as passes:  # the same iteration: its UNet calls (core/passes.py)
        flops = count_flops(lambda: run_iteration(trainer), trainer.built.nets.denoiser, cfg.model.attention, compiled)
    ops = count_ops(lambda: run_iteration(trainer), trainer.built.nets.denoiser, cfg.model.attention, compiled)
    unit = unet_forward_flops(trainer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = time_iterations(trainer, iters)
    ms = statistics.median(times)
    samples = cfg.data.batch_size * cfg.loop.grad_accum
    achieved = flops.total / (ms * 1e-3) / 1e12
    row = {
        "warmup": warmup, "iteration_ms": ms, "iteration_ms_all": times, "samples_per_iteration": samples,
        "samples_per_s": samples / (ms * 1e-3), "flops_per_iteration": flops.total,
        "unet_forward_flops": unit, "forwards_per_sample": flops.total / (samples * unit),
        "achieved_tflops": achieved, "flops_by_op": flops.by_op, "flops_by_module": flops.by_module,
        "passes": passes.summary(),
        "aten_ops_per_iteration": ops.total, "value_reads_per_iteration": sum(ops.reads().values()),
        "value_reads_by_op": ops.reads(),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }
    if ceiling:
        row.update(ceiling_tflops=ceiling["tflops"], ceiling_dtype=ceiling["dtype"],
                   utilisation=achieved / ceiling["tflops"])
    return row


def bench_run(method: str, family: str, tiny: bool, device, batch: int, overrides=(), resolution: int = 0,
              seed: int = 0, preset: dict | None = None):
    """(config, random-init model in the run's base dtype, cached data) of one benchmarked run; make_trainer next."""
    from ..train.build import base_dtype

    cfg = bench_config(method, family, batch, overrides, resolution, preset)
    device = torch.device(device)
    torch.manual_seed(seed)
    model = bench_model(family, tiny, device, base_dtype(cfg, device), seed)
    return cfg, model, bench_data(cfg, model, seed)


def bench_one(method: str, family: str, tiny: bool, device, batch: int, lever: str = "baseline", overrides=(),
              resolution: int = 0, iters: int = 5, warmup: int = 2, ceiling: dict | None = None,
              max_batch: int = 0, seed: int = 0, preset: dict | None = None) -> dict:
    """Build the run for (method, family, lever) and measure it; max_batch > 0 also searches the largest batch."""
    if lever not in LEVERS:
        raise ValueError(f"unknown lever {lever!r}: use one of {', '.join(LEVERS)}")
    sets = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in LEVERS[lever].items()]
    cfg, model, data = bench_run(method, family, tiny, device, batch, [*sets, *overrides], resolution, seed, preset)
    device = torch.device(device)
    row = {"method": method, "family": family, "tiny": tiny, "lever": lever, "overrides": [*sets, *overrides],
           "resolution": cfg.model.resolution or model.resolution, "batch": batch, "base_dtype": cfg.model.dtype,
           "attention": cfg.model.attention}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as out:
        trainer = make_trainer(cfg, model, data, out, device)
        try:
            row.update(measure(trainer, iters, warmup, ceiling))
            if max_batch:
                row.update(find_max_batch(trainer, max_batch))
        finally:
            trainer.close()
    return row


def bench_train(methods=None, families=None, tiny: bool = False, device: str = "auto", batch: int | None = None,
                levers=("baseline",), overrides=(), resolution: int = 0, iters: int = 5, warmup: int = 2,
                max_batch: int = 0, seed: int = 0, show: bool = True, config=None) -> list[dict]:
    """One row per (method, family, lever); see the module docstring for what each row holds. `config`, a YAML
    preset, replaces the built-in recipes: its method and family, its batch unless `batch` is given."""
    from .infer import _resolve_device, device_name

    preset = None
    if config:
        preset, method, family = read_preset(config)
        if tiny:  # the tiny models at their own few pixels, whatever size the preset trains at
            (preset.get("model") or {}).pop("resolution", None)
        methods, families = [method], [family]
        batch = batch or (preset.get("data") or {}).get("batch_size")
    methods = list(methods or [m for m in METHODS if m in method_names()])
    device = _resolve_device(device)
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0 (got {iters}, {warmup})")
    families = list(families or family_names())
    for family in families:
        get_family(family)  # an unknown family fails here, naming the close match
    for method in methods:
        bench_config(method, families[0], 1)  # unregistered methods fail here, before any model is built
    _check_overrides(overrides, methods)
    ceiling = matmul_ceiling(device)
    rows = []
    for method, family, lever in itertools.product(methods, families, levers):
        b = batch or (TINY_BATCH if tiny else get_family(family).bench_batch)
        log.info("bench train: %s %s%s batch %d, lever %s", method, family, " (tiny)" if tiny else "", b, lever)
        row = bench_one(method, family, tiny, device, b, lever, overrides, resolution, iters, warmup, ceiling,
                        max_batch, seed, preset)
        rows.append({**row, "config": str(config or ""), "device": device_name(device), "ceiling_size": ceiling["size"]})
        _free_cuda()  # this row's models are unreachable now: hand their memory back before the next row builds
    if show:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table headed by the device and the measured ceiling."""
    if not rows:
        return "(no rows)"
    first = rows[0]
    n = first["ceiling_size"]
    title = (f"device: {first['device']}; {first['ceiling_dtype']} matmul ceiling {first['ceiling_tflops']:.4g} "
             f"TFLOP/s (measured, {n}x{n}x{n}); median of {len(first['iteration_ms_all'])} iterations")
    header = ("method", "family", "res", "batch", "lever", "ms/iter", "samples/s", "TFLOP/iter", "F/sample",
              "TFLOP/s", "% ceil", "peak GB", "max batch", "passes", "aten ops", "reads")
    lines = [title, "  ".join(f"{h:>10}" for h in header)]
    for r in rows:
        peak = "-" if r["peak_mem_gb"] is None else f"{r['peak_mem_gb']:.1f}"
        cells = (r["method"], r["family"] + ("-tiny" if r["tiny"] else ""), r["resolution"], r["batch"], r["lever"],
                 f"{r['iteration_ms']:.1f}", f"{r['samples_per_s']:.2f}", f"{r['flops_per_iteration'] / 1e12:.3g}",
                 f"{r['forwards_per_sample']:.2f}", f"{r['achieved_tflops']:.3g}", f"{100 * r['utilisation']:.1f}",
                 peak, r.get("max_batch", "-"), r["passes"]["calls"], r.get("aten_ops_per_iteration", "-"),
                 r.get("value_reads_per_iteration", "-"))
        lines.append("  ".join(f"{c:>10}" for c in cells))
    lines.append("passes: UNet calls of one update (adapter:fwd[+bwd]xbatch, count); core/passes.py")
    lines.append("aten ops / reads: ops dispatched in one iteration, and the values among them read back to the host "
                 "(_local_scalar_dense, nonzero, tolist...: each a sync on a GPU)")
    for r in rows:
        calls = ", ".join(f"{label} {n}" for label, n in r["passes"]["by_label"].items())
        lines.append(f"  {r['method']} {r['family']} {r['lever']}: {r['passes']['calls']} calls, "
                     f"{r['passes']['forward_rows']} rows forward, {r['passes']['grad_rows']} with grad: {calls}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _bench_train_command(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        rows = bench_train(
            methods=args.method, families=args.family, tiny=args.tiny, device=args.device, batch=args.batch,
            levers=args.levers, overrides=args.set, resolution=args.resolution or 0, iters=args.iters,
            warmup=args.warmup, max_batch=args.max_batch if args.find_max_batch else 0, seed=args.seed,
            config=args.config,
        )
    except (ValueError, ImportError, RuntimeError) as e:
        sys.exit(f"stepdistill: error: {e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


def add_bench_train_command(subparsers) -> None:
    """Register `stepdistill bench train`."""
    p = subparsers.add_parser("train", help="training throughput of the real loop: step time, TFLOP/s against a "
                                            "measured matmul ceiling, peak memory, largest batch")
    p.add_argument("--method", nargs="+", help=f"methods (default: those of {', '.join(METHODS)} registered)")
    p.add_argument("--config", help="measure a YAML preset (e.g. configs/dmd/sdxl_1step.yaml) instead of the "
                                    "built-in recipes: its method, family and batch")
    p.add_argument("--family", nargs="+", default=family_names(), choices=family_names())
    p.add_argument("--tiny", action="store_true", help="tiny test architectures (CPU) instead of full-size models")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--batch", type=int, help=f"per-process batch (default: the family's, {TINY_BATCH} with --tiny)")
    p.add_argument("--resolution", type=int, help="pixels (default: the model's own)")
    p.add_argument("--levers", nargs="+", default=["baseline"], choices=list(LEVERS),
                   help="one row per lever: the baseline config plus that lever's overrides")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every row")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (compilation happens here)")
    p.add_argument("--find-max-batch", action="store_true", help="also search the largest per-GPU batch that fits")
    p.add_argument("--max-batch", type=int, default=128, help="upper end of that search")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="also write the rows as JSON")
    p.set_defaults(func=_bench_train_command)


def main(argv=None) -> None:
    from .infer import run_subcommand

    run_subcommand("stepdistill.bench.train", add_bench_train_command, "train", argv)


if __name__ == "__main__":
    main()
