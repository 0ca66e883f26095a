"""`python -m stepdistill.bench.memory`: peak host memory of one training update per method x full-size family x
frozen-base dtype, on the CPU, each configuration in its own subprocess (docs/memory.md, "Measured on the CPU").

A child builds the run exactly as `stepdistill train` does (train/build.py on a `stepdistill toy random-pipeline`
folder), runs one iteration (the student update and its critic updates) and reports its resident set: after imports,
after the build (static: base, text encoders, VAE, adapters), and the peak over the whole process (ru_maxrss).
The parent runs the children one at a time and prints a Markdown table beside the per-component estimate.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30
COMMON = ["data.batch_size=1", "lora.rank=4", "lora.alpha=4", "loop.progress=false", "loop.checkpoint_every=1000"]
CRITIC = ["lora.critic_rank=4", "method.critic_updates_per_student_update=1"]
# (tiny preset, overrides) per method: the phases of tests/slow/test_full_size.py, one iteration each.
METHODS = {
    "lcm": ("configs/tiny/lcm_{family}.yaml", []),
    "tscd": ("configs/tiny/tscd_{family}.yaml", ["method.segments=[2,1]", "method.stage_steps=[1,1]",
                                                 "method.adv_weight=[0.0,0.1]"]),
    "dmd": ("configs/tiny/dmd_{family}.yaml", [*CRITIC, "method.gan=true", "data.images=toy:4",
                                               "method.regression_steps=0", "method.regression_weight=0.25",
                                               "method.regression_pairs=2", "method.regression_teacher_steps=2"]),
    "disback": ("configs/tiny/disback_{family}.yaml", [*CRITIC, "method.num_nodes=1", "method.interval=1",
                                                       "method.steps_per_node=1", "method.regression_steps=0"]),
    "tscd_unified": ("configs/tiny/tscd_unified_sd15.yaml", [*CRITIC, "model.family={family}"]),
}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure_one(method: str, family: str, dtype: str, base: str, resolution: int, prompts: str) -> dict:
    """In this process: build the run, one iteration; memory figures in bytes plus the estimate's components."""
    import torch

    from ..config import load_config
    from ..resources import preset_path
    from .train import run_iteration, trainer_from_config

    torch.set_num_threads(2)
    after_import = _rss()
    preset, sets = METHODS[method]
    cfg = load_config(preset_path(preset.format(family=family)), [
        f"model.path={base}", f"data.prompts={prompts}", f"model.dtype={dtype}", f"model.resolution={resolution}",
        *COMMON, *(s.format(family=family) for s in sets)])
    with tempfile.TemporaryDirectory() as out:
        trainer = trainer_from_config(cfg, out)
        static = _rss()
        peak_build = _maxrss()
        run_iteration(trainer)
        after = _rss()
        b = trainer.built
        unet = b.nets.denoiser
        lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        base_params = sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n)
        text = sum(p.numel() * p.element_size() for e in b.family.text_encoders for p in e.parameters())
        vae = sum(p.numel() * p.element_size() for p in b.family.vae.parameters())
        trainable = sum(p.numel() for phase in b.params.values() for p in phase)
        return {
            "method": method, "family": family, "base_dtype": dtype, "resolution": resolution,
            "after_import": after_import, "static": static, "peak_build": peak_build, "after_update": after,
            "peak": _maxrss(),
            "est_base": base_params * torch.tensor([], dtype=unet.dtype).element_size(), "est_text": text,
            "est_vae": vae, "est_adapters": lora * 4, "est_optimizer": trainable * 12,
        }


def run_children(methods, families, dtypes, base_dirs: dict, resolution: int, prompts: str) -> list[dict]:
    """One subprocess per configuration, one at a time (each child's RSS is its own measurement)."""
    rows = []
    for family in families:
        for dtype in dtypes:
            for method in methods:
                cmd = [sys.executable, "-m", "stepdistill.bench.memory", "--child", method, family, dtype,
                       base_dirs[family], str(resolution), prompts]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode:
                    print(f"{method} {family} {dtype}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(table([row], header=not rows[:-1]), flush=True)
    return rows


def table(rows, header=True) -> str:
    lines = []
    if header:
        lines += ["| method | family | base | static RSS (GiB) | peak RSS (GiB) | peak - static | estimate static |",
                  "|---|---|---|---|---|---|---|"]
    for r in rows:
        est = (r["est_base"] + r["est_text"] + r["est_vae"] + r["est_adapters"]) / GIB
        lines.append(f"| {r['method']} | {r['family']} | {r['base_dtype']} | {r['static'] / GIB:.2f} | "
                     f"{r['peak'] / GIB:.2f} | {(r['peak'] - r['static']) / GIB:.2f} | {est:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        method, family, dtype, base, resolution, prompts = argv[1:]
        print(json.dumps(measure_one(method, family, dtype, base, int(resolution), prompts)))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", action="append", required=True, metavar="FAMILY=DIR",
                   help="a `stepdistill toy random-pipeline` folder per family, e.g. sdxl=/tmp/sdxl")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    base_dirs = dict(b.split("=", 1) for b in args.base)
    from ..models.tiny import TINY_PROMPTS

    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(TINY_PROMPTS[:4]) + "\n")
        rows = run_children(args.methods, list(base_dirs), args.dtypes, base_dirs, args.resolution, str(prompts))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
