"""`stepdistill bench memory`: the GPU memory one training iteration needs at full size, estimated on the CPU with
fake tensors (no memory allocated, no GPU), per combination of memory levers (docs/memory.md, "24 GB and 80 GB").

Each row builds the run exactly as `stepdistill train` does (train/build.py: the family's released architecture with
random weights, models/random_init.py; the adapters, the method, the fused optimizer), all under torch's
FakeTensorMode, then runs real iterations (Trainer.updates: the student update and a critic update, with their
backward passes and optimizer steps) under torch.distributed._tools.mem_tracker.MemTracker, which attributes every
tensor alive to parameters, gradients, activations, backward temporaries and optimizer states. The first iteration
creates the optimizer states; the peak is read over the second, the steady state.

What lives on the GPU follows the run's settings: the denoiser (base + adapters), the VAE, the method's own modules
(a GAN head), and the text encoders unless they are offloaded (model.offload_text_encoders, or the family's default).
The prompt-embedding cache stays in host memory, as in training.

The figures are tensor bytes: they leave out the CUDA context and cuBLAS / cuDNN workspaces (about 0.5-1 GiB) and the
caching allocator's fragmentation, and the CPU's autocast and SDPA kernels stand in for CUDA's (the fused CPU attention
saves the output and log-sum-exp for backward, as flash attention does on a GPU). `bench gpu --parts memory` measures
the same rows on a GPU, inside torch.cuda.set_per_process_memory_fraction, to check them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)
GIB = 2**30


@dataclass(frozen=True)
class Levers:
    """One row's memory levers, as config overrides."""

    checkpointing: bool = True
    offload_text: bool = True

    def overrides(self) -> list[str]:
        return [f"model.gradient_checkpointing={str(self.checkpointing).lower()}",
                f"model.offload_text_encoders={str(self.offload_text).lower()}"]

    @property
    def name(self) -> str:
        on = [n for n, v in (("checkpointing", self.checkpointing), ("text encoders offloaded", self.offload_text)) if v]
        return " + ".join(["bf16 base", *on])


# The rows of docs/memory.md: SDXL at 1024 px for a 24 GB card, FLUX.1-dev at 1024 px for an 80 GB one.
ROWS = {
    "sdxl": [(Levers(False, False), 1), (Levers(True, False), 1), (Levers(True, True), 1), (Levers(True, True), 4)],
    "flux": [(Levers(False, True), 1), (Levers(True, True), 1), (Levers(True, True), 2)],
}
# Every row: the frozen base in bf16 under bf16 autocast (the rows of docs/memory.md; auto is bf16_pure on a GPU
# since), the fused LoRA path, eager (compiled code
# holds no more), one critic update per student update (a phase frees its graph at its backward, so the peak of one
# critic update is that of five), no sample grids.
COMMON = ["model.dtype=bf16", "loop.mixed_precision=bf16", "model.compile=off", "model.attention=sdpa",
          "method.critic_updates_per_student_update=1", "data.images=", "loop.sample_every=0"]
CATEGORIES = ("Parameter", "Buffer", "Gradient", "Activation", "Temp", "Optstate", "Other")


def _tracker_class():
    """MemTracker for a training iteration, where one network runs several times (teacher, student, fake score are one
    base with adapters) and only the global peak is wanted. Two of its hooks are adapted: a root module called again
    starts a new record (MemTracker refuses a second root call: it expects one forward per iteration), and the
    per-module peaks are not kept (they cost a pass over every module seen so far for every op dispatched: thousands of
    modules x tens of thousands of ops at full size)."""
    from torch.distributed._tools import mem_tracker

    class PeakTracker(mem_tracker.MemTracker):
        def _pre_fw_hook(self, module, inputs) -> None:
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
                if parents == {"Global"}:
                    del self.memory_tracking[module]
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # Gradient hooks only on trainable parameters: the frozen base cannot take one (MemTracker assumes every
            # parameter trains).
            out = super()._track_module_params_and_buffers(module, install_grad_hooks=False)
            if install_grad_hooks:
                for p in module.parameters():
                    if p.requires_grad and self._param_to_grad_hook_handles.get(p, None) is None:
                        def hook(grad):
                            self._update_and_maybe_create_winfos(grad, mem_tracker._MemRefType.GRAD)

                        self._param_to_grad_hook_handles[p] = (
                            p.register_hook(hook), p.register_post_accumulate_grad_hook(lambda q: hook(q.grad)))
            return out

        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mem_tracker._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mem_tracker._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

    return PeakTracker


@contextlib.contextmanager
def _castable(mode):
    """Let nn.Module.to / .float() cast fake parameters (the builder, PEFT and the family move and cast modules).

    Module._apply swaps a fake parameter with its cast copy (torch.utils.swap_tensors), which refuses tensors that have
    weak references, and the fake mode's converter memo holds one to every fake tensor: the memo (which maps real
    tensors to their fakes, only needed when the same real tensor is converted twice) is cleared before each swap."""
    original = torch.utils.swap_tensors
    converter = mode.fake_tensor_converter.meta_converter

    def swap(t1, t2):
        converter.tensor_memo.clear()
        converter.storage_memo.clear()
        return original(t1, t2)

    torch.utils.swap_tensors = swap
    try:
        yield
    finally:
        torch.utils.swap_tensors = original


def _by_category(snapshot: dict) -> dict:
    """{category: bytes} summed over devices (one device here), with "Total"."""
    out = dict.fromkeys((*CATEGORIES, "Total"), 0)
    for dev_snap in snapshot.values():
        for k, v in dev_snap.items():
            out[getattr(k, "value", str(k))] = out.get(getattr(k, "value", str(k)), 0) + v
    return out


def estimate_row(method: str, family: str, levers: Levers, batch: int, resolution: int = 0, tiny: bool = False,
                 sets=()) -> dict:
    """Peak tensor memory of one steady-state iteration of (method, family) at `batch` with `levers`, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from stepdistill.models.random_init import build_family_model

    from .train import bench_config, bench_data, make_trainer

    cfg = bench_config(method, family, batch, [*COMMON, *levers.overrides(), *sets], resolution)
    t0 = time.perf_counter()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _castable(mode), \
            tempfile.TemporaryDirectory(prefix="mem-estimate-") as out:
        model = build_family_model(family, tiny, "full", "cpu", torch.bfloat16)
        model.vae.to(dtype=type(model).default_vae_dtype(torch.bfloat16))  # as from_pretrained loads it
        data = bench_data(cfg, model)
        trainer = make_trainer(cfg, model, data, out, "cpu")
        try:
            with unset_fake_temporarily():  # the data order is read as Python ints: drawn on real tensors
                data.order._permutation(0)
            b = trainer.built
            trainer.step = max(trainer.step, getattr(cfg.method, "regression_steps", 0))
            offloaded = levers.offload_text  # model.offload_text_encoders, set by the row
            on_gpu = [b.nets.denoiser, b.family.vae, *([] if offloaded else b.family.text_encoders)]
            extra = [p for ps in b.params.values() for p in ps]  # the method's own modules (a GAN head)
            trainable = {id(p): p for p in extra}
            weights = {id(p): p for m in on_gpu for p in [*m.parameters(), *m.buffers()]} | trainable
            tracker = _tracker_class()()
            tracker.track_external(*on_gpu, *extra)
            static = _by_category(tracker.get_tracker_snapshot("current"))
            built_s = time.perf_counter() - t0
            with tracker:
                trainer.updates()  # creates the optimizer states
            trainer.step += 1
            with tracker:  # re-entering starts the peak from the current memory: the steady-state iteration
                trainer.updates()
            peak = _by_category(tracker.get_tracker_snapshot("peak"))
        finally:
            trainer.close()
    return {
        "method": method, "family": family, "tiny": tiny, "resolution": cfg.model.resolution or model.resolution,
        "batch": batch, "levers": levers.name, "checkpointing": levers.checkpointing, "text_offloaded": offloaded,
        "overrides": [*COMMON, *levers.overrides(), *sets], "static": static, "peak": peak,
        "weight_bytes": sum(p.numel() * p.element_size() for p in weights.values()),
        "trainable_params": sum(p.numel() for p in trainable.values()), "trainable_tensors": len(trainable),
        "build_s": built_s, "seconds": time.perf_counter() - t0,
        "host_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def table(rows: list[dict]) -> str:
    """docs/memory.md's table: the peak and what it is made of, in GiB."""
    lines = [("| family | px | batch | levers | weights | LoRA grads | optimizer | activations + temp | peak | "
             "peak with 8-bit Adam states (arithmetic) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = {k: v / GIB for k, v in r["peak"].items()}
        weights = p["Parameter"] + p["Buffer"] + p["Other"]
        # 8-bit AdamW keeps its two moments in 1 byte each instead of 4: 1/4 of the fp32 states (block scales aside).
        eight_bit = p["Total"] - 0.75 * p["Optstate"]
        lines.append(f"| {r['family']} | {r['resolution']} | {r['batch']} | {r['levers']} | {weights:.2f} | "
                     f"{p['Gradient']:.2f} | {p['Optstate']:.2f} | {p['Activation'] + p['Temp']:.2f} | "
                     f"**{p['Total']:.2f}** | {eight_bit:.2f} |")
    return "\n".join(lines)


def bench_memory(families=("sdxl", "flux"), method: str = "dmd", tiny: bool = False, rows=None, out=None,
                 show: bool = True) -> list[dict]:
    """Every row of ROWS for `families` (or `rows`: [(family, Levers, batch)]), one after the other."""
    plan = rows or [(f, lev, b) for f in families for lev, b in ROWS[f]]
    results = []
    for family, levers, batch in plan:
        log.info("bench memory: %s %s batch %d, %s", method, family, batch, levers.name)
        row = estimate_row(method, family, levers, batch, tiny=tiny)
        results.append(row)
        log.info("  peak %.2f GiB (%.0f s)", row["peak"]["Total"] / GIB, row["seconds"])
        if out:
            Path(out).write_text(json.dumps(results, indent=1))
    if show:
        print(table(results))
    return results


def _bench_memory_command(args):
    torch.set_num_threads(args.threads)
    rows = None
    if args.batch or args.levers:
        levers = [Levers("checkpointing" in s, "offload" in s) for s in (args.levers or ["checkpointing,offload"])]
        rows = [(f, lev, b) for f in args.family for lev in levers for b in (args.batch or [1])]
    try:
        bench_memory(args.family, args.method, args.tiny, rows, args.out)
    except (ValueError, RuntimeError) as e:
        sys.exit(f"stepdistill: error: {e}")


def add_bench_memory_command(subparsers) -> None:
    """Register `stepdistill bench memory`."""
    p = subparsers.add_parser("memory", help="GPU memory of one training iteration at full size, estimated on the CPU "
                                             "with fake tensors, per memory lever (docs/memory.md)")
    p.add_argument("--family", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--method", default="dmd")
    p.add_argument("--batch", nargs="+", type=int, help="batches (with --levers: instead of the built-in rows)")
    p.add_argument("--levers", nargs="+", metavar="LEVERS",
                   help="comma-separated lever sets, e.g. 'none' 'checkpointing' 'checkpointing,offload' "
                        "(instead of the built-in rows)")
    p.add_argument("--tiny", action="store_true", help="the tiny test architectures (seconds; for tests)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the rows as JSON")
    p.set_defaults(func=_bench_memory_command)


def main(argv=None) -> None:
    from .infer import run_subcommand

    run_subcommand("stepdistill.bench.mem_estimate", add_bench_memory_command, "memory", argv)


if __name__ == "__main__":
    main()
