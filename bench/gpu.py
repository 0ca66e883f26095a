"""`stepdistill bench gpu --out DIR`: every GPU figure of docs/benchmarks.md in one prepared run, within a time budget.

Four parts, each in its own subprocess with its own time cap (a crash, an out-of-memory error or a hang in one part
costs that part only), each writing DIR/<part>.json as its sub-steps finish (so a part stopped at its cap keeps what
it measured), then DIR/summary.md, a Markdown table with the goals, written at the end also when a part failed:

1. attention: our Triton kernel (core/triton_attention.py) and xformers (when importable) against SDPA, forward and
   forward+backward, at SD1.5 and SDXL attention shapes in bf16: max error (against a float32 reference and
   against SDPA) and time;
2. train: `bench train` (bench/train.py) for dmd, tscd and lcm on SD1.5 at 512 px and SDXL at 1024 px with the
   default levers: step time, samples/s, achieved TFLOP/s against a bf16 matmul ceiling measured in the part, peak
   memory, UNet passes per update;
3. max_batch: the largest SDXL dmd batch that fits in --memory-gb of GPU memory (doubling then bisection, CUDA
   out-of-memory caught; bench/train.largest_batch);
4. infer: one-step and four-step generation latency (bench/infer.py) of SDXL 1024 px (compiled with CUDA graphs),
   SD1.5 512 px and FLUX 1024 px (eager), tiny and full VAE, text with the prompt cache cold and warm.

Full-size models are random-init, built in code from the family registry (models/random_init.py): no weights, no
network. `--tiny` runs the same parts on the tiny architectures on the CPU in seconds (what CI runs); `--dry-run`
prints the plan and a time estimate per part; `--parts` selects parts; `--budget-s` bounds the whole run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Part:
    share: float  # of the budget left when the part starts, among the parts still to run
    estimate_s: float  # full-size, one H200: a planning figure, not a measurement
    estimate_tiny_s: float
    what: str


PARTS = {
    "attention": Part(0.08, 40, 15, "Triton / xformers vs SDPA at SD1.5 and SDXL attention shapes, bf16, fwd and fwd+bwd"),
    "train": Part(0.30, 190, 40, "bench train: dmd, tscd, lcm on SD1.5 512 px and SDXL 1024 px, default levers"),
    "max_batch": Part(0.12, 85, 15, "largest SDXL 1024 px dmd batch in --memory-gb (OOM caught)"),
    "infer": Part(0.30, 180, 30, "SDXL (compiled, CUDA graphs) / SD1.5 / FLUX 1- and 4-step latency, tiny / full VAE, "
                  "prompt cache cold / warm"),
    "memory": Part(0.15, 120, 30, "SDXL dmd in 24 GiB and FLUX.1-dev dmd in 80 GiB (set_per_process_memory_fraction), "
                   "with the levers of docs/memory.md's rows: fits, peak allocated and reserved"),
    "profile": Part(0.20, 90, 60, "torch.profiler on one SDXL dmd iteration: peft / fused / compiled / channels_last / "
                    "batch 6: time by kernel kind, busy fraction, syncs, top kernels"),
}
# Rows of the profile part: (name, config overrides, batch or None for the family's). Each is one real SDXL dmd
# iteration after warm-up; peft against fused is the LoRA path, the others one lever each on top of eager fused.
# model.compile is pinned: its default (auto) compiles by region on CUDA, and only the compiled row should pay for it
# (its first iteration, with the compilation, is recorded as first_iteration_s in every row).
EAGER = "model.compile=off"
PROFILE_ROWS = (
    ("peft", ["model.lora_kernel=peft", EAGER], None),
    ("fused", [EAGER], None),
    ("compiled", ["model.compile=regional"], None),
    ("channels_last", ["model.channels_last=true", EAGER], None),
    ("batch6", [EAGER], 6),
)
# Rows of the memory part, the claims of docs/memory.md: (family, GiB the process may use, checkpointing, text encoders
# offloaded, batch). The smallest lever set that the CPU estimate (bench/mem_estimate.py) says fits comes first.
MEMORY_ROWS = (
    ("sdxl", 24, True, True, 1),
    ("sdxl", 24, True, False, 1),
    ("sdxl", 24, True, True, 4),
    ("flux", 80, True, True, 1),
    ("flux", 80, True, True, 2),
)
DEFAULT_BUDGET_S = 420  # the GPU session is 15 minutes with start-up; the command must end within 8
H100_80GB_GIB = 79.2  # torch.cuda.get_device_properties(0).total_memory of an "80 GB" H100, in GiB
GRACE_S = 10  # a part's subprocess is killed this long after its cap; its JSON keeps what it finished

# docs/benchmarks.md, "GPU goals"
GOALS = {
    "sdxl_dmd_utilisation": 0.35, "sd15_dmd_utilisation": 0.25, "sdxl_dmd_batch_per_80gb": 4,
    "triton_bf16_err_vs_sdpa": 1e-2, "triton_time_vs_sdpa": 1.2, "sdxl_1step_full_vae_ms": 170.0,
    "sdxl_1step_tiny_vae_ms": 45.0, "sdxl_dmd_gib": 24, "flux_dmd_gib": 80,
}

# name: (B, H, Lq, Lk, D). SD1.5 @ 512 px: 4096 / 1024 / 256 tokens, head dims 40 / 80 / 160; SDXL @ 1024 px: 4096
# tokens x 10 heads and 1024 x 20, head dim 64; cross attention over 77 text tokens. Batch 2 (CFG's two halves).
ATTENTION_SHAPES = {
    "sd15_self_4096_d40": (2, 8, 4096, 4096, 40),
    "sd15_cross_4096x77_d40": (2, 8, 4096, 77, 40),
    "sd15_self_1024_d80": (2, 8, 1024, 1024, 80),
    "sd15_self_256_d160": (2, 8, 256, 256, 160),
    "sdxl_self_4096_d64": (2, 10, 4096, 4096, 64),
    "sdxl_self_1024_d64": (2, 20, 1024, 1024, 64),
    "sdxl_cross_1024x77_d64": (2, 20, 1024, 77, 64),
}
# The --tiny rehearsal's training settings (every part that trains): small adapters, two critic updates.
TINY_SETS = ["lora.rank=4", "method.critic_updates_per_student_update=2"]
TINY_ATTENTION_SHAPES = {"tiny_self_64_d32": (1, 2, 64, 64, 32), "tiny_cross_64x8_d32": (1, 2, 64, 8, 32)}
TRAIN_ROWS = [("dmd", "sdxl"), ("dmd", "sd15"), ("tscd", "sdxl"), ("tscd", "sd15"), ("lcm", "sdxl"), ("lcm", "sd15")]


# ---------------------------------------------------------------------------------------------------------------
# Writing results as they come
# ---------------------------------------------------------------------------------------------------------------


class PartLog:
    """DIR/<part>.json, rewritten after every sub-step: status, rows so far, notes."""

    def __init__(self, out: Path, part: str, tiny: bool, device: str, deadline: float, only=()):
        self.path, self.deadline, self.only = out / f"{part}.json", deadline, set(only)
        self.data = {"part": part, "status": "running", "tiny": tiny, "device": device, "rows": [], "notes": [],
                     "started": time.time()}
        self.write()

    def write(self):
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def add(self, row: dict):
        self.data["rows"].append(row)
        self.write()

    def note(self, text: str):
        log.info(text)
        self.data["notes"].append(text)
        self.write()

    def left(self) -> float:
        return self.deadline - time.time()

    def wanted(self, key: str) -> bool:
        """Whether the sub-step `key` was asked for (--only; a rerun of what a first run missed)."""
        if not self.only or key in self.only:
            return True
        self.note(f"not asked for: {key} (--only)")
        return False

    def has_time(self, need_s: float, what: str) -> bool:
        """Whether `need_s` more seconds fit before the cap; else note that `what` was skipped."""
        if self.left() >= need_s:
            return True
        self.note(f"skipped {what}: {self.left():.0f} s left of the part's cap, about {need_s:.0f} s needed")
        return False

    def finish(self, status: str = "ok"):
        self.data.update(status=status, seconds=time.time() - self.data["started"])
        self.write()


def _device(tiny: bool) -> str:
    if tiny:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA GPU (or --tiny for the CPU rehearsal on tiny models)")
    return "cuda"


# ---------------------------------------------------------------------------------------------------------------
# Part 1: attention kernels
# ---------------------------------------------------------------------------------------------------------------


def _attention_kernels(device: str) -> dict:
    """name -> attend(q, k, v) over (B, H, L, D), for the kernels this machine has."""
    import torch.nn.functional as F

    kernels = {"sdpa": F.scaled_dot_product_attention}
    from stepdistill.core.attention import resolve_backend

    try:
        if resolve_backend("triton", device) == "triton":
            from stepdistill.core.triton_attention import flash_attention

            kernels["triton"] = flash_attention
    except (ImportError, RuntimeError, ValueError) as e:
        log.info("triton attention unavailable: %s", e)
    attend, _ = xformers_kernel()
    if attend is not None:  # importable: measured (a shape where its kernels fail becomes a note)
        kernels["xformers"] = attend
    return kernels


# What PyPI offered when this was checked (2026-12-07, `pip index versions xformers`, `pip download --no-deps
# xformers==0.0.35`): the newest xformers, 0.0.35, is one wheel built for torch 2.10.0+cu128 (CUDA 12.8,
# libcudart.so.12); imported beside torch 2.14.1+cu130 it says "xFormers can't load C++/CUDA extensions. xFormers
# was built for: PyTorch 2.10.0+cu128". docs/benchmarks.md keeps the details.
XFORMERS_PYPI = "PyPI's newest xformers (0.0.35) is built for torch 2.10.0+cu128"


def xformers_kernel():
    """(attend(q, k, v) over (B, H, L, D) or None, why it is missing or may fail, or None)."""
    try:
        import xformers.ops as xops
    except ImportError as e:
        return None, f"no wheel for torch {torch.__version__}: not installed ({e}); {XFORMERS_PYPI}"
    try:
        from xformers import _cpp_lib

        failed = getattr(_cpp_lib, "_cpp_library_load_exception", None)
    except ImportError:
        failed = None
    why = None
    if failed is not None:  # its Python ops may still reach PyTorch's flash kernels: measured where they run
        why = (f"no wheel for torch {torch.__version__}: the installed xformers cannot load its C++/CUDA extensions "
               f"({str(failed).splitlines()[0][:120]}); {XFORMERS_PYPI}")

    def attend(q, k, v):
        return xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    return attend, why


def _time_ms(fn, device, repeats: int) -> float:
    """Median milliseconds of `fn()` after two untimed calls (Triton autotuning happens there)."""
    from .infer import Clock

    clock = Clock(device)
    for _ in range(2):
        fn()
    marks = [clock.mark()]
    for _ in range(repeats):
        fn()
        marks.append(clock.mark())
    return statistics.median(clock.elapsed_ms(marks))


def _measure_kernel(attend, q, k, v, do, device, repeats: int) -> dict:
    """One kernel on (q, k, v): its output and gradients (for the errors), forward and forward+backward times."""
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attend(*qkv)
    grads = torch.autograd.grad(out, qkv, do)
    with torch.no_grad():
        fwd_ms = _time_ms(lambda: attend(q, k, v), device, repeats)
    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    all_ms = _time_ms(lambda: torch.autograd.grad(attend(*qkv), qkv, do), device, repeats)
    return {"out": out.detach(), "grads": [x.detach() for x in grads], "fwd_ms": fwd_ms, "fwd_bwd_ms": all_ms}


def _attention_rows(name, shape, kernels, device, dtype, repeats, plog: PartLog) -> list[dict]:
    """Rows of every kernel at one shape: times, and max errors against float32 math and against SDPA."""
    import torch.nn.functional as F

    B, H, Lq, Lk, D = shape
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device=device, dtype=dtype, generator=g) for n in (Lq, Lk, Lk))
    do = torch.randn(B, H, Lq, D, device=device, dtype=dtype, generator=g)
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves, do.float())
    results = {}
    for kname, attend in kernels.items():
        try:
            results[kname] = _measure_kernel(attend, q, k, v, do, device, repeats)
        except (RuntimeError, ValueError, TypeError, NotImplementedError) as e:  # a note, not the end of the part
            plog.note(f"{kname} on {name}: {type(e).__name__}: {str(e)[:200]}")
    sdpa, rows = results.get("sdpa"), []
    for kname, r in results.items():
        row = {"shape": name, "B_H_Lq_Lk_D": list(shape), "kernel": kname, "dtype": str(dtype).removeprefix("torch."),
               "fwd_ms": r["fwd_ms"], "fwd_bwd_ms": r["fwd_bwd_ms"],
               "max_err_out_vs_fp32": (r["out"].float() - ref).abs().max().item(),
               "max_err_grad_vs_fp32": max((a.float() - b).abs().max().item() for a, b in zip(r["grads"], ref_grads))}
        if sdpa is not None:
            row.update(max_err_out_vs_sdpa=(r["out"].float() - sdpa["out"].float()).abs().max().item(),
                       fwd_ratio_vs_sdpa=r["fwd_ms"] / sdpa["fwd_ms"],
                       fwd_bwd_ratio_vs_sdpa=r["fwd_bwd_ms"] / sdpa["fwd_bwd_ms"])
        rows.append(row)
    return rows


def part_attention(plog: PartLog, tiny: bool, device: str):
    shapes = TINY_ATTENTION_SHAPES if tiny else ATTENTION_SHAPES
    dtype = torch.float32 if tiny else torch.bfloat16
    kernels = _attention_kernels(device)
    if "triton" not in kernels:
        plog.note("triton: not available here (rows without it)")
    _, xformers_why = xformers_kernel()
    if xformers_why:
        plog.note(f"xformers: {xformers_why}")
    for name, shape in shapes.items():
        if not plog.wanted(name):
            continue
        if not plog.has_time(3 if tiny else 6, f"shape {name}"):
            break
        rows = _attention_rows(name, shape, kernels, device, dtype, 3 if tiny else 20, plog)
        for row in rows:
            plog.add(row)
        if xformers_why and not any(r["kernel"] == "xformers" for r in rows):  # says why instead of leaving it out
            plog.add({"shape": name, "B_H_Lq_Lk_D": list(shape), "kernel": "xformers",
                      "dtype": str(dtype).removeprefix("torch."), "unavailable": xformers_why})
        if device == "cuda":
            torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Part 2: training throughput
# ---------------------------------------------------------------------------------------------------------------


def part_train(plog: PartLog, tiny: bool, device: str):
    from stepdistill.models.registry import get_family

    from .train import TINY_BATCH, _free_cuda, bench_one, matmul_ceiling

    ceiling = matmul_ceiling(device)
    plog.data["ceiling"] = ceiling
    plog.write()
    iters, warmup = (1, 0) if tiny else (3, 1)
    # Eager: six rows compiling by region (model.compile's CUDA default) would not fit the part's cap; the profile
    # part's compiled row measures what compiling gains.
    sets = TINY_SETS if tiny else [EAGER]
    plog.note("train rows run eagerly (model.compile=off); the compiled figure is the profile part's row")
    for method, family in TRAIN_ROWS:
        if not plog.wanted(f"{method}:{family}"):
            continue
        if not plog.has_time(4 if tiny else 25, f"{method} {family}"):
            continue  # a later, cheaper row may still fit
        batch = TINY_BATCH if tiny else get_family(family).bench_batch
        try:
            row = bench_one(method, family, tiny, device, batch, "baseline", sets, iters=iters, warmup=warmup,
                            ceiling=ceiling)
        except torch.cuda.OutOfMemoryError as e:
            plog.note(f"{method} {family} batch {batch}: out of memory ({str(e).splitlines()[0][:120]})")
            continue
        finally:
            _free_cuda()
        plog.add(row)


def part_profile(plog: PartLog, tiny: bool, device: str):
    """PROFILE_ROWS: one profiled SDXL dmd iteration each (bench/train.profile_iteration)."""
    import tempfile

    from stepdistill.models.registry import get_family

    from .train import TINY_BATCH, _free_cuda, bench_run, make_trainer, profile_iteration, run_iteration

    family = "sdxl"
    sets = TINY_SETS if tiny else []
    for name, overrides, batch in PROFILE_ROWS:
        if not plog.wanted(f"profile:{name}"):
            continue
        if tiny and name == "compiled":
            plog.note("profile compiled: not rehearsed with --tiny (inductor compiles for minutes on the CPU)")
            continue
        if not plog.has_time(5 if tiny else 40, f"profile {name}"):
            continue
        b = (min(batch, TINY_BATCH + 1) if tiny else batch) if batch else (
            TINY_BATCH if tiny else get_family(family).bench_batch)
        try:
            cfg, model, data = bench_run("dmd", family, tiny, device, b, [*sets, *overrides])
            with tempfile.TemporaryDirectory(prefix="bench-profile-") as out:
                trainer = make_trainer(cfg, model, data, out, device)
                try:
                    trainer.step = max(trainer.step, getattr(cfg.method, "regression_steps", 0))
                    warmup = []
                    for _ in range(1 if tiny else 2):  # warm-up (compilation, optimizer moments)
                        t0 = time.perf_counter()
                        run_iteration(trainer)
                        if device == "cuda":
                            torch.cuda.synchronize()
                        warmup.append(time.perf_counter() - t0)
                    row = {"row": name, "method": "dmd", "family": family, "batch": b, "overrides": overrides,
                           "compiled": trainer.built.compiled, "first_iteration_s": warmup[0],
                           "warmup_iteration_s": warmup, **profile_iteration(trainer)}
                finally:
                    trainer.close()
        except torch.cuda.OutOfMemoryError as e:
            plog.note(f"profile {name} batch {b}: out of memory ({str(e).splitlines()[0][:120]})")
            continue
        finally:
            _free_cuda()
        plog.add(row)


# ---------------------------------------------------------------------------------------------------------------
# Part 3: the largest SDXL dmd batch
# ---------------------------------------------------------------------------------------------------------------


class _OutOfTime(Exception):
    pass


def part_max_batch(plog: PartLog, tiny: bool, device: str, memory_gb: float = H100_80GB_GIB, limit: int = 32):
    import tempfile

    from .train import bench_run, fits, largest_batch, make_trainer

    if device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        fraction = min(1.0, memory_gb * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction)
        plog.data.update(memory_gb=memory_gb, memory_fraction=fraction, device_memory_gb=total / 2**30)
    else:
        limit = 4
        plog.note("CPU: no out-of-memory to catch; the search runs to its limit (4)")
    # Eager: each new batch size would compile new graphs; compiled code uses no more memory than eager.
    sets = TINY_SETS if tiny else [EAGER]
    cfg, model, data = bench_run("dmd", "sdxl", tiny, device, 1, sets)
    probes = []

    def probe(b: int) -> bool:
        if plog.left() < (2 if tiny else 12):
            raise _OutOfTime
        t0 = time.time()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ok = fits(trainer, b)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        probes.append({"batch": b, "fits": ok, "seconds": time.time() - t0, "peak_gb": peak if ok else None})
        plog.data["probes"] = probes
        plog.write()
        return ok

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as out:
        trainer = make_trainer(cfg, model, data, out, device)
        try:
            best = largest_batch(probe, limit, start=1 if tiny else 4)
            plog.add({"method": "dmd", "family": "sdxl", "tiny": tiny, "resolution": cfg.model.resolution or
                      model.resolution, "max_batch": best, "limit": limit, "complete": True})
        except _OutOfTime:
            fitting = [p["batch"] for p in probes if p["fits"]]
            plog.add({"method": "dmd", "family": "sdxl", "tiny": tiny, "max_batch": max(fitting, default=0),
                      "limit": limit, "complete": False})
            plog.note("time cap reached during the search: max_batch is a lower bound")
        finally:
            trainer.close()


# ---------------------------------------------------------------------------------------------------------------
# Part: memory within a consumer card's size (docs/memory.md)
# ---------------------------------------------------------------------------------------------------------------


def part_memory(plog: PartLog, tiny: bool, device: str):
    """MEMORY_ROWS: each run built with its levers inside a per-process memory cap, two iterations (the second holds
    the optimizer states), the peak allocated and reserved; an out-of-memory error is the row's answer, not a failure.
    The rows use the CPU estimate's settings (bench/mem_estimate.COMMON), so the two tables compare row by row."""
    import tempfile

    from .mem_estimate import COMMON, Levers, estimate_row
    from .train import TINY_BATCH, _free_cuda, bench_run, make_trainer, run_iteration

    total = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else None
    # --tiny rehearses the first row of each family (the code path; a CPU has no memory cap to test)
    rows = MEMORY_ROWS if not tiny else [r for i, r in enumerate(MEMORY_ROWS) if r[0] not in
                                         {q[0] for q in MEMORY_ROWS[:i]}]
    for family, gib, checkpointing, offload, batch in rows:
        levers = Levers(checkpointing, offload)
        what = f"memory:{family}:{batch}:{'ckpt' if checkpointing else 'no-ckpt'}:{'offload' if offload else 'text-on-gpu'}"
        if not plog.wanted(what) or not plog.has_time(5 if tiny else 45, what):
            continue
        b = min(batch, TINY_BATCH) if tiny else batch
        row = {"family": family, "batch": b, "levers": levers.name, "limit_gib": gib, "tiny": tiny}
        if device == "cuda":
            torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / total))
            torch.cuda.reset_peak_memory_stats()
        trainer = None
        try:
            cfg, model, data = bench_run("dmd", family, tiny, device, b, [*COMMON, *levers.overrides()])
            with tempfile.TemporaryDirectory(prefix="bench-memory-") as out:
                trainer = make_trainer(cfg, model, data, out, device)
                trainer.step = max(trainer.step, getattr(cfg.method, "regression_steps", 0))
                if device == "cuda":
                    row["static_gib"] = torch.cuda.memory_allocated() / 2**30
                for _ in range(2):
                    run_iteration(trainer)
                row["fits"] = True
        except torch.cuda.OutOfMemoryError as e:
            row.update(fits=False, error=str(e).splitlines()[0][:200])
        finally:
            if trainer is not None:
                trainer.close()
            trainer = model = data = None
        if device == "cuda":
            row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                       peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30)
        elif tiny:  # the rehearsal also runs the CPU estimate of the same tiny row (seconds)
            row["estimate_peak_gib"] = estimate_row("dmd", family, levers, b, tiny=True)["peak"]["Total"] / 2**30
        _free_cuda()
        plog.add(row)
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0)


# ---------------------------------------------------------------------------------------------------------------
# Part 4: generation latency
# ---------------------------------------------------------------------------------------------------------------


# (family, compiled, VAEs), in order of what the goals need: SDXL compiled (CUDA graphs) with both VAEs first (both
# goals), then SD1.5 eager with both, then FLUX eager with its full VAE (a 12 B transformer: its compilation, or a
# second VAE's 20 x 5 more steps, would not fit the part's cap; `stepdistill bench infer --family flux` has the rest).
# Each runs 1 and 4 steps with the prompt cache cold and warm, in bf16 (random-init full size).
INFER_CASES = [("sdxl", True, ("tiny", "full")), ("sd15", False, ("tiny", "full")), ("flux", False, ("full",))]
# Seconds a case needs on one H100 / H200 (build, fuse, compile, warm-up + 20 generations per row): planning figures
# scaled from the first run's SDXL rows, not measurements of these cases.
INFER_NEED_S = {"sdxl": 100, "sd15": 25, "flux": 55}
INFER_REPEATS = 20


def part_infer(plog: PartLog, tiny: bool, device: str):
    from .infer import bench_infer

    repeats, warmup = (2, 1) if tiny else (INFER_REPEATS, 3)  # reduce-overhead records its CUDA graphs in warm-up
    for family, compiled, vaes in INFER_CASES:
        compiled = compiled and not tiny
        what = f"{family}:{'compiled' if compiled else 'eager'}"
        if not plog.wanted(what):
            continue
        if not plog.has_time(5 if tiny else INFER_NEED_S[family], what):
            continue
        try:
            bench_infer(family=family, steps=(1, 4), backends=("auto",), compile=compiled, device=device, tiny=tiny,
                        repeats=repeats, vae=list(vaes), warmup=warmup, dtype="bf16" if device == "cuda" else
                        "fp32", show=False, on_row=plog.add)
        except torch.cuda.OutOfMemoryError as e:
            plog.note(f"{what}: out of memory ({str(e).splitlines()[0][:120]})")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
    if tiny:
        plog.note("--tiny: eager only (inductor on the CPU takes minutes); the GPU run compiles sdxl with mode "
                  "reduce-overhead (CUDA graphs)")


PART_FUNCTIONS = {"attention": part_attention, "train": part_train, "max_batch": part_max_batch, "infer": part_infer,
                  "memory": part_memory, "profile": part_profile}


def run_part(part: str, out: Path, tiny: bool, deadline: float, memory_gb: float = H100_80GB_GIB, only=()) -> None:
    """One part in this process (the driver runs each in its own subprocess)."""
    device = _device(tiny)
    if tiny:
        torch.set_num_threads(1)
    plog = PartLog(out, part, tiny, device, deadline, only)
    try:
        if part == "max_batch":
            part_max_batch(plog, tiny, device, memory_gb)
        else:
            PART_FUNCTIONS[part](plog, tiny, device)
        plog.finish("ok" if plog.data["rows"] else "empty")
    except BaseException as e:
        plog.note(f"failed: {type(e).__name__}: {str(e)[:500]}")
        plog.finish("failed")
        raise


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------


def sub_steps(tiny: bool) -> list[str]:
    """Every name --only takes: attention shapes, train rows METHOD:FAMILY, infer cases FAMILY:eager|compiled,
    profile rows profile:ROW."""
    shapes = TINY_ATTENTION_SHAPES if tiny else ATTENTION_SHAPES
    return [*shapes, *(f"{m}:{f}" for m, f in TRAIN_ROWS),
            *(f"{family}:{'compiled' if compiled and not tiny else 'eager'}" for family, compiled, _ in INFER_CASES),
            *(f"profile:{name}" for name, *_ in PROFILE_ROWS),
            *(f"memory:{f}:{b}:{'ckpt' if c else 'no-ckpt'}:{'offload' if o else 'text-on-gpu'}"
              for f, _, c, o, b in MEMORY_ROWS)]


def plan(parts, budget_s: float, tiny: bool) -> list[dict]:
    """Each part's share of the budget (were every part to use all of its cap) and its estimated time."""
    left, rows = budget_s, []
    for i, name in enumerate(parts):
        share = sum(PARTS[p].share for p in parts[i:])
        cap = left * PARTS[name].share / share
        estimate = PARTS[name].estimate_tiny_s if tiny else PARTS[name].estimate_s
        rows.append({"part": name, "cap_s": cap, "estimate_s": estimate, "what": PARTS[name].what})
        left -= cap
    return rows


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _run_subprocess(part: str, out: Path, tiny: bool, cap_s: float, memory_gb: float, log_file, only=()) -> dict:
    deadline = time.time() + cap_s
    cmd = [sys.executable, "-m", "stepdistill.bench.gpu", "--run-part", part, "--out", str(out),
           "--deadline", repr(deadline), "--memory-gb", str(memory_gb)] + (["--tiny"] if tiny else [])
    cmd += ["--only", *only] if only else []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if tiny:
        env["TRITON_INTERPRET"] = "1"  # the Triton kernel runs in Triton's CPU interpreter on tiny shapes
    t0 = time.time()
    log_file.write(f"\n===== part {part}: cap {cap_s:.0f} s =====\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=cap_s + GRACE_S)
        status = None if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        proc.wait()
        status = "timeout"
    finally:
        _kill_group(proc)  # compile workers and other children the part left
    path = out / f"{part}.json"
    data = json.loads(path.read_text()) if path.exists() else {"part": part, "rows": [], "notes": []}
    if status is not None:
        data["status"] = status if data.get("status") in (None, "running") else f"{data['status']} ({status})"
    data["wall_s"] = time.time() - t0
    path.write_text(json.dumps(data, indent=1, default=str))
    return data


def bench_gpu(out, parts=None, tiny: bool = False, budget_s: float = DEFAULT_BUDGET_S, dry_run: bool = False,
              memory_gb: float = H100_80GB_GIB, show: bool = True, only=()) -> dict:
    """Run the parts, each in a subprocess within its cap; DIR/<part>.json, DIR/summary.md; returns the summary."""
    parts = list(parts or PARTS)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}: use {', '.join(PARTS)}")
    strays = sorted(set(only) - set(sub_steps(tiny)))
    if strays:
        raise ValueError(f"unknown --only step(s) {strays}: use {', '.join(sub_steps(tiny))}")
    steps = plan(parts, budget_s, tiny)
    if dry_run:
        text = format_plan(steps, budget_s, tiny)
        if show:
            print(text)
        return {"plan": steps}
    if not tiny:
        _device(tiny)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results, end = {}, time.time() + budget_s
    try:
        with open(out / "bench_gpu.log", "a") as log_file:
            for i, name in enumerate(parts):
                share = sum(PARTS[p].share for p in parts[i:])
                cap = max(0.0, (end - time.time()) * PARTS[name].share / share)
                if cap < 5:
                    results[name] = {"part": name, "status": "skipped (budget spent)", "rows": [], "notes": []}
                    (out / f"{name}.json").write_text(json.dumps(results[name], indent=1))
                    continue
                log.info("bench gpu: part %s, cap %.0f s", name, cap)
                results[name] = _run_subprocess(name, out, tiny, cap, memory_gb, log_file, only)
    finally:
        summary = format_summary(results, tiny, budget_s)
        (out / "summary.md").write_text(summary)
        if show:
            print(summary)
    return results


def format_plan(steps, budget_s, tiny) -> str:
    lines = [(f"bench gpu plan ({'tiny models, CPU' if tiny else 'full-size models, one CUDA GPU'}), budget "
              f"{budget_s:.0f} s; caps shift to later parts when a part ends early; estimates are planning figures"),
             "| part | cap s | estimate s | what |", "|---|---|---|---|"]
    lines += [f"| {s['part']} | {s['cap_s']:.0f} | {s['estimate_s']:.0f} | {s['what']} |" for s in steps]
    lines.append(f"| total | {budget_s:.0f} | {sum(s['estimate_s'] for s in steps):.0f} | |")
    return "\n".join(lines)


# ---- the summary table -----------------------------------------------------------------------------------------


def _goal(value, goal, higher_is_better: bool, tiny: bool) -> str:
    if value is None:
        return "not measured"
    if tiny:
        return "n/a (tiny)"
    ok = value >= goal if higher_is_better else value <= goal
    return "met" if ok else "missed"


def goal_rows(results: dict, tiny: bool) -> list[tuple[str, str, str, str]]:
    """(goal, target, measured, verdict) for each goal of docs/benchmarks.md."""
    rows = []
    train = {(r["method"], r["family"]): r for r in results.get("train", {}).get("rows", [])}
    for family, key, res in (("sdxl", "sdxl_dmd_utilisation", 1024), ("sd15", "sd15_dmd_utilisation", 512)):
        r = train.get(("dmd", family))
        u = r.get("utilisation") if r else None
        rows.append((f"{family} {res} px dmd, share of the bf16 matmul ceiling", f">= {100 * GOALS[key]:.0f}%",
                     "-" if u is None else f"{100 * u:.1f}%", _goal(u, GOALS[key], True, tiny)))
    mb = (results.get("max_batch", {}).get("rows") or [{}])[-1]
    best = mb.get("max_batch")
    shown = "-" if best is None else f"{best}{'' if mb.get('complete', True) else ' (lower bound)'}"
    rows.append(("sdxl 1024 px dmd batch per 80 GB", f">= {GOALS['sdxl_dmd_batch_per_80gb']}", shown,
                 _goal(best, GOALS["sdxl_dmd_batch_per_80gb"], True, tiny)))
    mem = results.get("memory", {}).get("rows", [])
    for family, key, res in (("sdxl", "sdxl_dmd_gib", 1024), ("flux", "flux_dmd_gib", 1024)):
        fit = [r for r in mem if r["family"] == family and r.get("fits") and r["limit_gib"] == GOALS[key]]
        best = min(fit, key=lambda r: r.get("peak_allocated_gib") or 0, default=None)
        shown = "-" if best is None else (f"batch {best['batch']}, {best['levers']}, peak "
                                          f"{best.get('peak_allocated_gib') or float('nan'):.1f} GiB")
        verdict = "not measured" if not mem else ("n/a (tiny)" if tiny else ("met" if fit else "missed"))
        rows.append((f"{family} {res} px dmd at batch >= 1 within {GOALS[key]} GiB", "fits", shown, verdict))
    att = [r for r in results.get("attention", {}).get("rows", []) if r["kernel"] == "triton" and "fwd_ms" in r]
    err = max((r.get("max_err_out_vs_sdpa", 0.0) for r in att), default=None)
    ratio = max((r.get("fwd_bwd_ratio_vs_sdpa", 0.0) for r in att), default=None)
    rows.append(("Triton vs SDPA, max abs error in bf16 (worst shape)", f"<= {GOALS['triton_bf16_err_vs_sdpa']}",
                 "-" if err is None else f"{err:.2e}", _goal(err, GOALS["triton_bf16_err_vs_sdpa"], False, tiny)))
    rows.append(("Triton time / SDPA time, fwd+bwd (worst shape)", f"<= {GOALS['triton_time_vs_sdpa']}x",
                 "-" if ratio is None else f"{ratio:.2f}x", _goal(ratio, GOALS["triton_time_vs_sdpa"], False, tiny)))
    infer = [r for r in results.get("infer", {}).get("rows", []) if r["steps"] == 1 and r["family"] == "sdxl"]
    # The tiny-VAE goal is for a repeated prompt (warm cache: no text encoding), the full-VAE one for a new prompt.
    for vae, key, field, cache in (("full", "sdxl_1step_full_vae_ms", "total_ms", "cold"),
                                   ("tiny", "sdxl_1step_tiny_vae_ms", "total_warm_ms", "warm")):
        best_ms = min((r[field] for r in infer if r["vae"] == vae and field in r), default=None)
        rows.append((f"one-step sdxl 1024 px, {vae} VAE, prompt cache {cache} (best of eager / compiled)",
                     f"<= {GOALS[key]:.0f} ms", "-" if best_ms is None else f"{best_ms:.1f} ms",
                     _goal(best_ms, GOALS[key], False, tiny)))
    return rows


def _generation_table(rows: list[dict]) -> list[str]:
    """Latency rows: text with the prompt cache cold (encoders run) and warm (a hit), UNet (all steps), VAE, totals,
    and why n steps are not n times one step."""
    lines = ["", (f"## Generation (median of {rows[0].get('repeats', '?')} runs, batch 1, fused LoRA; compile: "
             "torch.compile reduce-overhead, CUDA graphs)"), "",
             ("| family | res | steps | VAE | compile | text cold ms | text warm ms | UNet ms | VAE ms | total cold ms | "
             "total warm ms | why not n x one step |"), "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['resolution']} | {r['steps']} | {r['vae']} | "
                     f"{'yes' if r['compile'] else 'no'} | {r['text_ms']:.1f} | {r.get('text_warm_ms', float('nan')):.2f} "
                     f"| {r['unet_ms']:.1f} | {r['vae_ms']:.1f} | {r['total_ms']:.1f} | "
                     f"{r.get('total_warm_ms', float('nan')):.1f} | {r.get('note', '').replace('|', '/')} |")
    return lines


def format_summary(results: dict, tiny: bool, budget_s: float) -> str:
    lines = [f"# bench gpu{' (--tiny: tiny models on the CPU; goals apply to the GPU run)' if tiny else ''}", ""]
    lines += ["| part | status | rows | seconds | notes |", "|---|---|---|---|---|"]
    for name, r in results.items():
        notes = "; ".join(r.get("notes", []))[:300].replace("|", "/")
        lines.append(f"| {name} | {r.get('status')} | {len(r.get('rows', []))} | {r.get('wall_s', 0):.0f} | {notes} |")
    lines += ["", "## Goals", "", "| goal | target | measured | verdict |", "|---|---|---|---|"]
    lines += [f"| {g} | {t} | {m} | {v} |" for g, t, m, v in goal_rows(results, tiny)]
    train = results.get("train", {})
    if train.get("rows"):
        c = train.get("ceiling", {})
        lines += ["", f"## Training (matmul ceiling {c.get('tflops', 0):.4g} TFLOP/s {c.get('dtype', '')})", "",
                  "| method | family | res | batch | ms/iter | samples/s | TFLOP/s | % ceiling | peak GB | UNet calls |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in train["rows"]:
            peak = "-" if r.get("peak_mem_gb") is None else f"{r['peak_mem_gb']:.1f}"
            lines.append(f"| {r['method']} | {r['family']} | {r['resolution']} | {r['batch']} | "
                         f"{r['iteration_ms']:.1f} | {r['samples_per_s']:.2f} | {r['achieved_tflops']:.3g} | "
                         f"{100 * r.get('utilisation', 0):.1f} | {peak} | {r['passes']['calls']} |")
    att = results.get("attention", {}).get("rows", [])
    if att:
        lines += ["", "## Attention", "", ("| shape | kernel | dtype | fwd ms | fwd+bwd ms | x SDPA (fwd+bwd) | "
                                           "max err vs SDPA | max err vs fp32 |"), "|---|---|---|---|---|---|---|---|"]
        for r in att:
            if "unavailable" in r:
                lines.append(f"| {r['shape']} | {r['kernel']} | {r['dtype']} | {r['unavailable'].split(':')[0]} | | | | |")
                continue
            lines.append(f"| {r['shape']} | {r['kernel']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r.get('fwd_bwd_ratio_vs_sdpa', float('nan')):.2f} | "
                         f"{r.get('max_err_out_vs_sdpa', float('nan')):.2e} | {r['max_err_out_vs_fp32']:.2e} |")
    prof = results.get("profile", {}).get("rows", [])
    if prof:
        kinds = list(dict.fromkeys(k for r in prof for k in r["share_by_kind"]))
        lines += ["", "## Profile (one SDXL dmd iteration)", "",
                  "| row | batch | first iteration s | wall ms | kernel ms | busy | syncs | " + " | ".join(kinds) + " |",
                  "|---" * (7 + len(kinds)) + "|"]
        for r in prof:
            shares = " | ".join(f"{100 * r['share_by_kind'].get(k, 0):.1f}%" for k in kinds)
            lines.append(f"| {r['row']} | {r['batch']} | {r.get('first_iteration_s', float('nan')):.1f} | "
                         f"{r['wall_ms']:.1f} | {r['kernel_ms']:.1f} | "
                         f"{100 * r['busy_fraction']:.0f}% | {r['syncs_per_iteration']} | {shares} |")
        lines += ["", "Top kernels (fused row): " + "; ".join(
            f"{n[:60]} {ms:.1f} ms" for n, ms in next((r for r in prof if r["row"] == "fused"), prof[0])["top_kernels"])]
    mem = results.get("memory", {}).get("rows", [])
    if mem:
        lines += ["", "## Memory (one dmd iteration after one to warm up, inside set_per_process_memory_fraction)", "",
                  "| family | batch | levers | limit GiB | fits | static GiB | peak allocated GiB | peak reserved GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mem:
            def gib(key, r=r):
                return "-" if r.get(key) is None else f"{r[key]:.2f}"
            lines.append(f"| {r['family']} | {r['batch']} | {r['levers']} | {r['limit_gib']} | "
                         f"{'yes' if r.get('fits') else 'no'} | {gib('static_gib')} | {gib('peak_allocated_gib')} | "
                         f"{gib('peak_reserved_gib')} |")
    infer = results.get("infer", {}).get("rows", [])
    if infer:
        lines += _generation_table(infer)
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _bench_gpu_command(args):
    if args.run_part:
        run_part(args.run_part, Path(args.out), args.tiny, args.deadline, args.memory_gb, args.only)
        return
    if not args.out and not args.dry_run:
        sys.exit("stepdistill: error: bench gpu needs --out DIR (or --dry-run)")
    try:
        results = bench_gpu(args.out, args.parts, args.tiny, args.budget_s, args.dry_run, args.memory_gb,
                            only=args.only)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"stepdistill: error: {e}")
    if not args.dry_run and any(r.get("status") != "ok" for r in results.values()):
        sys.exit(1)


def add_bench_gpu_command(subparsers) -> None:
    """Register `stepdistill bench gpu`."""
    p = subparsers.add_parser("gpu", help="every GPU figure in one run within a time budget: attention kernels, "
                                          "training throughput, largest batch, generation latency")
    p.add_argument("--out", help="folder for <part>.json, summary.md and bench_gpu.log")
    p.add_argument("--parts", nargs="+", choices=list(PARTS), help=f"default: all ({' '.join(PARTS)})")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (a rehearsal in seconds)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and a time estimate per part")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="the whole run's time budget")
    p.add_argument("--memory-gb", type=float, default=H100_80GB_GIB,
                   help="GiB of GPU memory the batch search may use (part max_batch); default: what an 80 GB H100 has")
    p.add_argument("--only", nargs="+", default=[], metavar="STEP",
                   help="run only these sub-steps (a rerun of what a first run missed): attention shape names "
                        "(e.g. sdxl_self_4096_d64), train rows METHOD:FAMILY (e.g. tscd:sdxl), infer cases "
                        "FAMILY:eager|compiled (e.g. sdxl:compiled, flux:eager); parts given in --parts run in that order")
    p.add_argument("--run-part", choices=list(PARTS), help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    p.set_defaults(func=_bench_gpu_command)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stepdistill.bench.gpu")
    add_bench_gpu_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gpu", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    main()
