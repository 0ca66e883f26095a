"""`stepdistill bench data`: the data path at 1k / 100k / 1M prompts, cached and streamed, on 1 and 2 processes.

Each row runs in a fresh process (torchrun for 2 processes, gloo), so its start-up time and peak host memory are its
own. A row reports:

* start-up: seconds from the start of training set-up (models loaded, data opened, adapters attached) to the end of
  the first training step, i.e. what a user waits for before the first log line, imports excluded;
* peak RSS: the process's peak resident memory (resource.getrusage), the largest over processes;
* data samples/s: `next()` alone (read, tokenize, encode; for a stream, the background thread's rate), all processes;
* train samples/s: tiny LCM training iterations with that data, all processes.

The prompt files are generated (words of the tiny vocabulary, seed 0) into --workdir and kept for later rows.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SIZES = (1_000, 100_000, 1_000_000)


def write_prompts(path: Path, n: int, seed: int = 0) -> Path:
    """n prompts of 4 to 12 tiny-vocabulary words, one per line."""
    from ..models.tokenizer import TINY_WORDS

    if path.is_file() and path.read_bytes().count(b"\n") == n:
        return path
    rng = random.Random(seed)
    words = list(TINY_WORDS)
    with open(path, "w") as f:
        f.writelines(" ".join(rng.choices(words, k=rng.randint(4, 12))) + "\n" for _ in range(n))
    return path


def _worker(args) -> None:
    """One row: set up the real Trainer, time the first step and a few more, then the data path alone."""
    import torch

    from ..config import load_config
    from ..resources import preset_path
    from ..train.loop import Trainer

    torch.set_num_threads(args.threads)
    cfg = load_config(preset_path("configs/tiny/lcm_sd15.yaml"), [
        f"model.path={args.model}", f"data.prompts={args.prompts}", f"data.cache={args.cache}",
        f"data.batch_size={args.batch}", "loop.progress=false", f"loop.max_steps={args.steps + 1}"])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, args.run_dir)
    trainer.setup()
    trainer.iteration()
    first_step = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _ in range(args.steps):
        trainer.iteration()
    train_rate = args.steps * args.batch * trainer.dist.world / (time.perf_counter() - t1)
    data = trainer.built.data
    data.next()  # the thread is running: time the steady state
    t2 = time.perf_counter()
    for _ in range(args.data_batches):
        data.next()
    data_rate = args.data_batches * args.batch * trainer.dist.world / (time.perf_counter() - t2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    from stepdistill.data.stream import StreamData

    mode = "stream" if isinstance(data, StreamData) else "memory"
    row = torch.tensor([first_step, rss, train_rate, data_rate], dtype=torch.float64)
    if trainer.dist.world > 1:
        torch.distributed.all_reduce(row[:2], op=torch.distributed.ReduceOp.MAX)
    if trainer.dist.rank == 0:
        Path(args.result).write_text(json.dumps({
            "prompts": args.n, "processes": trainer.dist.world, "cache": f"{args.cache} -> {mode}",
            "startup_s": row[0].item(), "peak_rss_mib": row[1].item(), "train_samples_per_s": row[2].item(),
            "data_samples_per_s": row[3].item()}))
    trainer.close()  # stops a stream's prefetch thread too


def run_row(n: int, procs: int, cache: str, workdir: Path, model: Path, args) -> dict:
    prompts = write_prompts(workdir / f"prompts_{n}.txt", n)
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        # One JSON argument: torchrun would read option-like words after the module as its own abbreviations.
        job = {"model": str(model), "prompts": str(prompts), "n": n, "cache": cache, "batch": args.batch,
               "steps": args.steps, "data_batches": args.data_batches, "threads": args.threads,
               "run_dir": str(Path(tmp) / "run"), "result": str(result)}
        worker = ["-m", "stepdistill.bench.data", "--worker", json.dumps(job)]
        launch = [sys.executable] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        proc = subprocess.run([*launch, *map(str, worker)], env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench data row n={n} procs={procs} failed:\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def format_table(rows) -> str:
    head = ("| prompts | processes | data.cache | start-up to 1st step (s) | peak RSS (MiB) | data samples/s | "
            "train samples/s |\n|---:|---:|---|---:|---:|---:|---:|")
    lines = [f"| {r['prompts']:,} | {r['processes']} | {r['cache']} | {r['startup_s']:.2f} | {r['peak_rss_mib']:.0f} | "
             f"{r['data_samples_per_s']:.0f} | {r['train_samples_per_s']:.1f} |" for r in rows]
    return "\n".join([head, *lines])


def bench_data(args) -> list[dict]:
    from ..models.tiny import save_tiny_pipeline

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="stepdistill-bench-data-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model = workdir / "tiny_sd15"
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline(model, family="sd15", seed=0)
    rows = []
    for n in args.sizes:
        for cache in args.cache:
            for procs in args.procs:
                row = run_row(n, procs, cache, workdir, model, args)
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(format_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def _add_arguments(p) -> None:
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="prompt set sizes")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="process counts (2: torchrun, gloo)")
    p.add_argument("--cache", nargs="+", default=["auto"], choices=["auto", "memory", "stream"])
    p.add_argument("--batch", type=int, default=4, help="per-process batch")
    p.add_argument("--steps", type=int, default=5, help="timed training iterations after the first")
    p.add_argument("--data-batches", type=int, default=20, help="timed next() calls of the data path alone")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workdir", help="where the generated prompt files and the tiny model are kept")
    p.add_argument("--out", help="also write the rows as JSON")


def add_bench_data_command(subparsers) -> None:
    """Register `stepdistill bench data`."""
    p = subparsers.add_parser("data", help="data path at 1k/100k/1M prompts: start-up, peak host memory, samples/s")
    _add_arguments(p)
    p.set_defaults(func=bench_data)


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m stepdistill.bench.data")
    _add_arguments(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # one row, as JSON (run_row)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.worker:
        _worker(argparse.Namespace(**json.loads(args.worker)))
    else:
        bench_data(args)


if __name__ == "__main__":
    main()
