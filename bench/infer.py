"""`stepdistill bench infer`: one-step and few-step generation latency, split into text encoding, UNet and VAE decode.

Models are random-init and built in code from their architecture configs (no weights are needed for
timing; stepdistill.models.random_init): each family's released architecture at its own resolution (SD1.5 at
512 px, SDXL at 1024 px) on a GPU, or the tiny test architectures on the CPU.
Each configuration (attention backend x torch.compile x VAE x steps) gets warm-up runs, then `repeats`
timed runs; GPU segments are timed with CUDA events, CPU ones with perf_counter; medians are reported.

The generation path is the deployed one: prompts through the family's text encoders, consistency multistep
sampling (core.samplers.lcm_sample) on the LCM timestep grid with the UNet called directly (a fused or merged
LoRA adds no work), then the VAE decoder. There is no classifier-free guidance: distilled students use none.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import platform
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from stepdistill.core.attention import attention_modules, head_dim, resolve_backend, set_attention_backend
from stepdistill.core.denoiser import Cond, Denoiser
from stepdistill.core.samplers import lcm_sample
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.core.solvers import lcm_inference_timesteps
from stepdistill.models.registry import family_names, get_family

log = logging.getLogger(__name__)

TINY_RESOLUTION = 64
SEGMENTS = ("text_ms", "unet_ms", "vae_ms", "total_ms")


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def vae_scale_factor(vae) -> int:
    """Pixels per latent: 2 ** (number of decoder blocks - 1) for both AutoencoderKL and AutoencoderTiny."""
    channels = getattr(vae.config, "block_out_channels", None) or vae.config.decoder_block_out_channels
    return 2 ** (len(channels) - 1)


class DeployedDenoiser(Denoiser):
    """The UNet called as deployed: no adapter switching per call (a fused or merged LoRA is part of the weights)."""

    def raw(self, x_t, t, cond: Cond) -> torch.Tensor:
        dtype = self.dtype
        t = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(x_t.shape[0])
        cond = cond.to(x_t.device, dtype)
        return self.unet(x_t.to(dtype), t, encoder_hidden_states=cond.encoder_hidden_states,
                         added_cond_kwargs=cond.added_cond_kwargs, return_dict=False)[0]


# ---------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------


class Clock:
    """Marks on the device timeline: CUDA events on a GPU (no sync between segments), perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def elapsed_ms(self, marks) -> list[float]:
        """Milliseconds between consecutive marks (waits for the GPU to reach the last one)."""
        if not self.cuda:
            return [(b - a) * 1e3 for a, b in itertools.pairwise(marks)]
        marks[-1].synchronize()
        return [a.elapsed_time(b) for a, b in itertools.pairwise(marks)]


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"CPU {platform.machine()} ({capability}, {torch.get_num_threads()} threads)"


def generate_once(model, denoiser, timesteps, prompts, resolution, clock, generator) -> list[float]:
    """One text -> image generation; returns [text, unet, vae] milliseconds."""
    schedule = denoiser.schedule
    side = resolution // vae_scale_factor(model.vae)
    shape = (len(prompts), model.unet.config.in_channels, side, side)
    with torch.inference_mode():
        marks = [clock.mark()]
        cond = model.encode_prompts(prompts, resolution)
        marks.append(clock.mark())
        x_T = torch.randn(shape, generator=generator, device=generator.device, dtype=denoiser.dtype)
        latents = lcm_sample(denoiser, x_T, timesteps, cond, schedule, generator=generator)
        marks.append(clock.mark())
        model.decode(latents)
        marks.append(clock.mark())
    return clock.elapsed_ms(marks)


@contextmanager
def compiled(model, enabled: bool, mode: str):
    """Run with the UNet and the VAE decoder under torch.compile; the original modules come back afterwards."""
    if not enabled:
        yield model
        return
    unet, decoder = model.unet, model.vae.decoder
    torch._dynamo.reset()
    model.unet = torch.compile(unet, mode=mode)
    model.vae.decoder = torch.compile(decoder, mode=mode)
    try:
        yield model
    finally:
        model.unet, model.vae.decoder = unet, decoder
        torch._dynamo.reset()


def _vae_backend(vae, backend: str) -> str:
    """The full VAE's mid-block attention has one 512-wide head, beyond the triton kernel: it keeps SDPA then."""
    if backend != "triton":
        return backend
    from stepdistill.core.triton_attention import MAX_HEAD_DIM

    widest = max((head_dim(m) for m in attention_modules(vae)), default=0)
    if widest > MAX_HEAD_DIM:
        log.info("attention=triton: the VAE's %d-wide attention heads run on sdpa", widest)
        return "sdpa"
    return backend


def _summary(samples: list[list[float]]) -> dict[str, float]:
    text, unet, vae = (statistics.median(column) for column in zip(*samples))
    total = statistics.median(sum(run) for run in samples)
    return {"text_ms": text, "unet_ms": unet, "vae_ms": vae, "total_ms": total}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible: run with --device cpu --tiny, or on a GPU machine")
    return device


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    from ..core.dtypes import DTYPES as names

    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in names:
        raise ValueError(f"dtype {dtype!r} is not supported: use one of auto, {', '.join(names)}")
    return names[dtype]


def time_generation(model, denoiser, steps: int, prompts, resolution: int, warmup: int, repeats: int,
                    seed: int) -> dict:
    """Medians over `repeats` timed generations after `warmup` untimed ones (which also trigger compilation)."""
    device = model.unet.device
    timesteps = lcm_inference_timesteps(steps)
    generator = torch.Generator(device).manual_seed(seed)
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        generate_once(model, denoiser, timesteps, prompts, resolution, clock, generator)
    samples = [generate_once(model, denoiser, timesteps, prompts, resolution, clock, generator) for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**_summary(samples), "peak_mem_gb": peak}


def bench_infer(family: str = "sd15", resolution: int | None = None, steps=(1, 4), backends=("auto",),
                compile=False, device: str = "auto", tiny: bool = False, repeats: int = 10, *, vae="full",
                batch: int = 1, warmup: int = 2, dtype=None, compile_mode: str = "default", seed: int = 0,
                show: bool = True) -> list[dict]:
    """Time generation for every (vae, backend, compile, steps); returns one row per configuration.

    steps, backends, compile and vae take one value or a list (compile=[False, True] times both). Rows
    hold the medians text_ms, unet_ms (all steps), vae_ms and total_ms, the device name and peak memory.
    """
    from stepdistill.models.random_init import build_family_model
    from stepdistill.models.tiny import TINY_PROMPTS

    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    resolution = resolution or (TINY_RESOLUTION if tiny else get_family(family).default_resolution)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    concrete = {name: resolve_backend(name, device) for name in _as_list(backends)}
    prompts = [TINY_PROMPTS[0]] * batch
    fixed = {"family": family, "tiny": tiny, "resolution": resolution, "batch": batch,
             "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "device": device_name(device)}
    rows = []
    for vae_kind in _as_list(vae):
        model = build_family_model(family, tiny, vae_kind, device, dtype, seed)
        if resolution % vae_scale_factor(model.vae):
            raise ValueError(f"resolution {resolution} is not a multiple of {vae_scale_factor(model.vae)}")
        schedule = NoiseSchedule.from_scheduler_config(model.scheduler_config)
        for requested, backend in concrete.items():
            set_attention_backend(model.unet, backend, device)
            vae_backend = _vae_backend(model.vae, backend)
            set_attention_backend(model.vae, vae_backend, device)
            for use_compile in map(bool, _as_list(compile)):
                with compiled(model, use_compile, compile_mode):
                    denoiser = DeployedDenoiser(model.unet, schedule, dtype=dtype)
                    for n_steps in map(int, _as_list(steps)):
                        timing = time_generation(model, denoiser, n_steps, prompts, resolution, warmup, repeats, seed)
                        rows.append({**fixed, "steps": n_steps, "vae": vae_kind, "backend": backend,
                                     "requested": requested, "vae_attention": vae_backend, "compile": use_compile,
                                     **timing})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if show:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows, headed by the device."""
    if not rows:
        return "(no rows)"
    header = ("family", "res", "steps", "vae", "attention", "compile", "text ms", "unet ms", "vae ms", "total ms")
    first = rows[0]
    title = (f"device: {first['device']}, dtype {first['dtype']}, batch {first['batch']}, "
             f"median of {first['repeats']} runs")
    lines = [title, "  ".join(f"{h:>9}" for h in header)]
    for r in rows:
        family = r["family"] + ("-tiny" if r["tiny"] else "")
        cells = (family, r["resolution"], r["steps"], r["vae"], r["backend"], "yes" if r["compile"] else "no",
                 *(f"{r[key]:.2f}" for key in SEGMENTS))
        lines.append("  ".join(f"{c:>9}" for c in cells))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _bench_infer_command(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    compile_choice = {"off": False, "on": True, "both": [False, True]}[args.compile]
    vae = ["full", "tiny"] if args.vae == "both" else args.vae
    try:
        rows = bench_infer(
            family=args.family, resolution=args.resolution, steps=args.steps, backends=args.backends,
            compile=compile_choice, device=args.device, tiny=args.tiny, repeats=args.repeats, vae=vae,
            batch=args.batch, warmup=args.warmup, dtype=args.dtype, compile_mode=args.compile_mode, seed=args.seed,
        )
    except (ValueError, ImportError, RuntimeError) as e:
        sys.exit(f"stepdistill: error: {e}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))


def add_bench_infer_command(subparsers) -> None:
    """Register `stepdistill bench infer`."""
    p = subparsers.add_parser("infer", help="generation latency: text encoding, UNet, VAE decode per backend")
    p.add_argument("--family", default="sd15", choices=family_names())
    p.add_argument("--resolution", type=int, help="pixels (default: the family's own, 64 with --tiny)")
    p.add_argument("--steps", type=int, nargs="+", default=[1, 4], help="sampling steps to time (default 1 4)")
    p.add_argument("--backends", nargs="+", default=["auto"], help="attention: auto sdpa xformers triton math")
    p.add_argument("--compile", default="off", choices=["off", "on", "both"], help="torch.compile the UNet and VAE")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny test architectures (CPU) instead of full-size models")
    p.add_argument("--vae", default="full", choices=["full", "tiny", "both"],
                   help="full VAE or AutoencoderTiny (TAESD)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--out", help="also write the rows as JSON")
    p.set_defaults(func=_bench_infer_command)


def run_subcommand(module: str, add_command, name: str, argv=None) -> None:
    """`python -m <module> ARGS` as `stepdistill bench <name> ARGS`: one parser, registered the same way."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    add_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([name, *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


def main(argv=None) -> None:
    run_subcommand("stepdistill.bench.infer", add_bench_infer_command, "infer", argv)


if __name__ == "__main__":
    main()
