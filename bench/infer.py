"""`stepdistill bench infer`: one-step and few-step generation latency, split into text encoding, UNet and VAE decode.

Models are random-init and built in code from their architecture configs (no weights are needed for
timing; stepdistill.models.random_init): each family's released architecture at its own resolution (SD1.5 at
512 px, SDXL and FLUX at 1024 px) on a GPU, or the tiny test architectures on the CPU.
Each configuration (attention backend x torch.compile x VAE x steps) gets warm-up runs, then `repeats`
timed runs; GPU segments are timed with CUDA events, CPU ones with perf_counter; medians are reported.

The generation path is the deployed one: prompts through the family's text encoders behind an LRU prompt cache
(models.prompt_cache; every run times a cold lookup, which encodes, and a warm one, which hits), consistency
multistep sampling (core.samplers.lcm_sample) on the LCM timestep grid with the UNet called directly, or Euler
flow steps for a flow family (FLUX), then the VAE decoder. A random LoRA is attached and fused into the weights
before anything is compiled, as a deployed student is (a fused LoRA adds no work). There is no classifier-free
guidance: distilled students use none. Compiled rows run the text encoders, the denoiser and the VAE decoder under
torch.compile (default mode "reduce-overhead": CUDA graphs, the shapes being static at one batch and resolution).
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

from stepdistill.core.attention import (
    MEASURED,
    attention_modules,
    head_dim,
    resolve_backend,
    set_attention_backend,
)
from stepdistill.core.denoiser import Cond, Denoiser
from stepdistill.core.samplers import lcm_sample
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.core.solvers import lcm_inference_timesteps
from stepdistill.models.prompt_cache import PromptCache
from stepdistill.models.registry import family_names, get_family

log = logging.getLogger(__name__)

TINY_RESOLUTION = 64
SEGMENTS = ("text_ms", "text_warm_ms", "unet_ms", "vae_ms", "total_ms", "total_warm_ms")
DEFAULT_COMPILE_MODE = "reduce-overhead"


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


class Sampler:
    """The few-step sampler of a family: LCM consistency steps for a DDPM UNet, Euler flow steps for a flow family."""

    def __init__(self, model, dtype, resolution: int, steps: int):
        self.model, self.dtype, self.steps = model, dtype, steps
        self.flow = "flow" in model.parameterisations
        if self.flow:
            from stepdistill.core.flow import image_seq_len, mu_from_config, scheduler_sigmas

            side = resolution // vae_scale_factor(model.vae)
            config = model.scheduler_config
            mu = None
            if config.get("use_dynamic_shifting"):
                mu = mu_from_config(config, image_seq_len(side, side, 1, model.token_patch))
            self.sigmas = scheduler_sigmas(steps, config, mu).tolist()
        else:
            self.schedule = NoiseSchedule.from_scheduler_config(model.scheduler_config)
            self.denoiser = DeployedDenoiser(model.unet, self.schedule, dtype=dtype)
            self.timesteps = lcm_inference_timesteps(steps)

    def __call__(self, x_T, cond: Cond, generator) -> torch.Tensor:
        if not self.flow:
            return lcm_sample(self.denoiser, x_T, self.timesteps, cond, self.schedule, generator=generator)
        from stepdistill.core.flow import network_timestep

        model, x = self.model, x_T
        cond = cond.to(x.device, self.dtype)
        for sigma, sigma_next in itertools.pairwise(self.sigmas):
            t = network_timestep(torch.full((x.shape[0],), sigma), model.timestep_scale).to(x.device, self.dtype)
            v = model.denoiser_call(model.unet, x.to(self.dtype), t, cond)
            x = (x.float() + (sigma_next - sigma) * v.float()).to(self.dtype)  # Euler (flow.euler_step), in float32
        return x


def generate_once(model, sampler: Sampler, prompts, resolution, clock, generator, cache: PromptCache,
                  graphs: bool = False) -> list[float]:
    """One text -> image generation; returns [text cold, text warm, unet, vae] milliseconds.

    Text cold: the prompt cache is emptied first, so the text encoders run (and the result is stored); text warm:
    the same prompts again, a cache hit. The image is generated once, from the warm conditioning.
    """
    side = resolution // vae_scale_factor(model.vae)
    shape = (len(prompts), model.latent_channels, side, side)
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new generation: CUDA-graph outputs of the last one may be reused
    with torch.inference_mode():
        cache.clear()
        marks = [clock.mark()]
        cache.encode(model, prompts, resolution)
        marks.append(clock.mark())
        cond = cache.encode(model, prompts, resolution)
        marks.append(clock.mark())
        x_T = torch.randn(shape, generator=generator, device=generator.device, dtype=sampler.dtype)
        latents = sampler(x_T, cond, generator)
        marks.append(clock.mark())
        model.decode(latents)
        marks.append(clock.mark())
    return clock.elapsed_ms(marks)


def fuse_random_lora(model, rank: int, seed: int = 0) -> None:
    """Attach a rank-`rank` LoRA with random weights to the denoiser and fuse it into the base weights, as deployment
    does before compiling: the compiled graph then holds plain layers, and the LoRA costs no time per step."""
    from stepdistill.core.lora import add_adapter

    net = model.unet
    params = add_adapter(net, "deployed", rank, targets=model.lora_targets("attn" if model.lora_target_presets else
                                                                           "full"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():  # B = 0 at init would fuse nothing: give both factors small random values
            p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device, p.dtype))
    net.fuse_lora(adapter_names=["deployed"])
    net.unload_lora()
    net.requires_grad_(False)


@contextmanager
def compiled(model, enabled: bool, mode: str):
    """Run with the text encoders, the denoiser and the VAE decoder under torch.compile, compiled in place
    (nn.Module.compile: each keeps its class, which encode_prompts checks); plain again afterwards."""
    if not enabled:
        yield model
        return
    modules = [model.unet, model.vae.decoder, *model.text_encoders]
    torch._dynamo.reset()
    for module in modules:
        module.compile(mode=mode)
    try:
        yield model
    finally:
        for module in modules:
            module._compiled_call_impl = None  # what nn.Module.compile set: calls go to the eager forward again
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
    text, text_warm, unet, vae = (statistics.median(column) for column in zip(*samples))
    total = statistics.median(cold + u + v for cold, _, u, v in samples)
    total_warm = statistics.median(warm + u + v for _, warm, u, v in samples)
    return {"text_ms": text, "text_warm_ms": text_warm, "unet_ms": unet, "vae_ms": vae, "total_ms": total,
            "total_warm_ms": total_warm}


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


def time_generation(model, sampler: Sampler, prompts, resolution: int, warmup: int, repeats: int, seed: int,
                    graphs: bool = False) -> dict:
    """Medians over `repeats` timed generations after `warmup` untimed ones (which also trigger compilation)."""
    device = model.unet.device
    generator = torch.Generator(device).manual_seed(seed)
    clock, cache = Clock(device), PromptCache(maxsize=max(8, len(prompts)))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        generate_once(model, sampler, prompts, resolution, clock, generator, cache, graphs)
    samples = [generate_once(model, sampler, prompts, resolution, clock, generator, cache, graphs)
               for _ in range(repeats)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {**_summary(samples), "peak_mem_gb": peak}


def _swap_vae(model, vae_kind: str, device, dtype, tiny: bool, seed: int):
    """The model with `vae_kind`'s VAE (the full one it was built with, or a fresh AutoencoderTiny)."""
    from stepdistill.models.random_init import build_vae, default_dtype, model_configs

    if vae_kind == "full":
        return model.full_vae
    torch.manual_seed(seed)
    cfg = model_configs(model.name, tiny)["vae"]
    with torch.device(device), default_dtype(dtype if torch.device(device).type == "cuda" else torch.float32):
        vae = build_vae(cfg, "tiny", tiny).requires_grad_(False).eval()
    if vae.dtype != dtype:
        vae.to(dtype=dtype)
    if torch.device(device).type == "cuda":
        vae.to(memory_format=torch.channels_last)
    return vae


def explain_steps(rows: list[dict]) -> None:
    """Fill each row's `note`: why n steps do not cost n times one step (text and VAE run once per image; the
    sampler's own work between UNet calls), from the rows' own medians."""
    one = {(r["family"], r["vae"], r["backend"], r["compile"]): r for r in rows if r["steps"] == 1}
    for r in rows:
        r["unet_ms_per_step"] = r["unet_ms"] / r["steps"]
        base = one.get((r["family"], r["vae"], r["backend"], r["compile"]))
        if r["steps"] == 1 or base is None:
            r["note"] = "text encoders and VAE run once per image whatever the steps"
            continue
        n = r["steps"]
        r["note"] = (f"{n} steps: UNet {r['unet_ms'] / base['unet_ms']:.2f}x the one-step UNet ({n} calls plus "
                     f"{n - 1} sampler updates between them); text (once per prompt, cached when warm) and VAE (once per "
                     f"image) do not repeat, so the total is {r['total_ms'] / base['total_ms']:.2f}x cold and "
                     f"{r['total_warm_ms'] / base['total_warm_ms']:.2f}x warm")


def bench_infer(family: str = "sd15", resolution: int | None = None, steps=(1, 4), backends=("auto",),
                compile=False, device: str = "auto", tiny: bool = False, repeats: int = 20, *, vae="full",
                batch: int = 1, warmup: int = 2, dtype=None, compile_mode: str = DEFAULT_COMPILE_MODE, seed: int = 0,
                lora_rank: int = 4, show: bool = True, on_row=None) -> list[dict]:
    """Time generation for every (vae, backend, compile, steps); returns one row per configuration.

    steps, backends, compile and vae take one value or a list (compile=[False, True] times both). Rows
    hold the medians text_ms (prompt cache cold: the encoders run), text_warm_ms (a cache hit), unet_ms (all steps),
    vae_ms, total_ms (cold) and total_warm_ms, a note on the steps, the device name and peak memory. The model is built
    once (full VAE; the tiny one is swapped in) and compiled once per backend, so 1 and 4 steps and both VAEs share
    one compilation. on_row(row) is called as each row is measured.
    """
    from stepdistill.models.random_init import build_family_model
    from stepdistill.models.tiny import TINY_PROMPTS

    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    resolution = resolution or (TINY_RESOLUTION if tiny else get_family(family).default_resolution)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    family_cls = get_family(family)
    backends = _as_list(backends)
    if not family_cls.attention_backends and backends != ["auto"]:
        raise ValueError(f"the {family} transformer keeps diffusers' own attention processors: use --backends auto")
    concrete = {name: resolve_backend(name, device) for name in backends}
    prompts = [TINY_PROMPTS[0]] * batch
    fixed = {"family": family, "tiny": tiny, "resolution": resolution, "batch": batch,
             "dtype": str(dtype).removeprefix("torch."), "repeats": repeats, "device": device_name(device),
             "lora_rank": lora_rank, "compile_mode": compile_mode}
    rows = []
    model = build_family_model(family, tiny, "full", device, dtype, seed)
    model.full_vae = model.vae
    if lora_rank:
        fuse_random_lora(model, lora_rank, seed)
    for requested, backend in concrete.items():
        if family_cls.attention_backends:
            set_attention_backend(model.unet, backend, device)
        for use_compile in map(bool, _as_list(compile)):
            graphs = use_compile and "reduce-overhead" in compile_mode and device.type == "cuda"
            for vae_kind in _as_list(vae):
                model.vae = _swap_vae(model, vae_kind, device, dtype, tiny, seed)
                if resolution % vae_scale_factor(model.vae):
                    raise ValueError(f"resolution {resolution} is not a multiple of {vae_scale_factor(model.vae)}")
                vae_backend = _vae_backend(model.vae, backend) if family_cls.attention_backends else "diffusers"
                if family_cls.attention_backends:
                    set_attention_backend(model.vae, vae_backend, device)
                if use_compile and backend == MEASURED:
                    # attention=auto times each shape at its first eager call; inside torch.compile nothing can be
                    # timed (an unmeasured shape would run sdpa), so one eager generation goes first.
                    generate_once(model, Sampler(model, dtype, resolution, 1), prompts, resolution, Clock(device),
                                  torch.Generator(device).manual_seed(seed), PromptCache())
                with compiled(model, use_compile, compile_mode):
                    for n_steps in map(int, _as_list(steps)):
                        sampler = Sampler(model, dtype, resolution, n_steps)
                        timing = time_generation(model, sampler, prompts, resolution, warmup, repeats, seed, graphs)
                        shown = backend if family_cls.attention_backends else "diffusers"
                        row = {**fixed, "steps": n_steps, "vae": vae_kind, "backend": shown, "requested": requested,
                               "vae_attention": vae_backend, "compile": use_compile, "cuda_graphs": graphs, **timing}
                        rows.append(row)
                        explain_steps(rows)
                        if on_row is not None:
                            on_row(row)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if show:
        print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table of the rows, headed by the device, with the notes on the step counts below."""
    if not rows:
        return "(no rows)"
    header = ("family", "res", "steps", "vae", "attention", "compile", "text ms", "text warm", "unet ms", "vae ms",
              "total ms", "total warm")
    first = rows[0]
    title = (f"device: {first['device']}, dtype {first['dtype']}, batch {first['batch']}, "
             f"median of {first['repeats']} runs; text ms: prompt cache cold (encoders run), text warm: cache hit")
    lines = [title, "  ".join(f"{h:>10}" for h in header)]
    for r in rows:
        family = r["family"] + ("-tiny" if r["tiny"] else "")
        cells = (family, r["resolution"], r["steps"], r["vae"], r["backend"], "yes" if r["compile"] else "no",
                 *(f"{r[key]:.2f}" for key in SEGMENTS))
        lines.append("  ".join(f"{c:>10}" for c in cells))
    notes = [f"- {r['family']} {r['vae']} VAE{' compiled' if r['compile'] else ''}: {r['note']}"
             for r in rows if r["steps"] > 1 and "note" in r]
    return "\n".join(lines + notes)


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
            lora_rank=args.lora_rank,
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
    p.add_argument("--compile-mode", default=DEFAULT_COMPILE_MODE,
                   help="torch.compile mode (default reduce-overhead: CUDA graphs), e.g. max-autotune-no-cudagraphs")
    p.add_argument("--lora-rank", type=int, default=4,
                   help="rank of the random LoRA fused into the denoiser before compiling (0: none)")
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--tiny", action="store_true", help="tiny test architectures (CPU) instead of full-size models")
    p.add_argument("--vae", default="full", choices=["full", "tiny", "both"],
                   help="full VAE or AutoencoderTiny (TAESD)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp16", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
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
