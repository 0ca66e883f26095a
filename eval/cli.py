"""`stepdistill eval generate | fid | clip | preference | report`: thin commands, one library call each."""

from __future__ import annotations

import argparse
import json
import sys

from stepdistill.metrics.clip import CONVENTIONS

from .fid import PROTOCOLS
from .preference import PREFERENCE_METRICS


def _run(fn, *args, **kwargs):
    """Call a library function; bad input (ValueError) or a missing optional package becomes a one-line error."""
    try:
        return fn(*args, **kwargs)
    except (ValueError, ImportError) as e:
        sys.exit(f"stepdistill: error: {e}")


def _print(result: dict) -> None:
    print(json.dumps(result, indent=2))


def _generate(args):
    from .generate import run_generation

    result = _run(
        run_generation, args.prompts, args.out, base=args.base, lora=args.lora, steps=args.steps,
        guidance_scale=args.guidance_scale, batch_size=args.batch_size, limit=args.limit, base_seed=args.seed,
        height=args.height, width=args.width, dtype=args.dtype, name=args.name, training_step=args.training_step,
    )
    if result:
        _print(result)


def _fid(args):
    from .fid import compute_fid

    _print(_run(
        compute_fid, args.gen_dir, protocol=args.protocol, ref=args.ref, eval_res=args.eval_res,
        ref_name=args.ref_name, inception_path=args.inception, allow_download=args.allow_download,
        cache_dir=args.cache_dir, batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
        kid=not args.no_kid,
    ))


def _clip(args):
    from .clip import compute_clip

    _print(_run(
        compute_clip, args.gen_dir, convention=args.convention, weights=args.clip_weights, eval_res=args.eval_res,
        batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
    ))


def _preference(args):
    from .preference import compute_preference

    weights = dict(w.split("=", 1) for w in args.weights)
    _print(_run(compute_preference, args.gen_dir, args.metrics, weights=weights, device=args.device))


def _report(args):
    from .report import report

    print(_run(report, args.runs, args.out, n_grid_prompts=args.grid_prompts))


def add_eval_commands(subparsers) -> None:
    """Register generate, fid, clip, preference and report under `stepdistill eval`."""
    g = subparsers.add_parser("generate", help="generate a prompt file's images (sharded with accelerate, resumable)")
    g.add_argument("--prompts", required=True, help=".txt (one per line), .csv/.json/.jsonl with id, prompt[, seed]")
    g.add_argument("--out", required=True, help="evaluation folder (rerun the same command to resume)")
    g.add_argument("--base", help="teacher: diffusers folder or hub id; student: override the recipe's base")
    g.add_argument("--lora", help="student: folder with the LoRA and stepdistill.json (omit for the teacher)")
    g.add_argument("--steps", type=int, help="teacher steps (student: override the recipe's)")
    g.add_argument("--guidance-scale", type=float, help="teacher classifier-free guidance scale")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--limit", type=int, help="only the first N prompts")
    g.add_argument("--seed", type=int, default=0, help="base seed: prompt i uses seed + i unless the file gives one")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    g.add_argument("--name", help="label of this run in reports (default: the folder name)")
    g.add_argument("--training-step", type=int, help="training step of the student, for FID-vs-step plots")
    g.set_defaults(func=_generate)

    f = subparsers.add_parser("fid", help="FID + KID of a generation folder (clean-fid clean mode)")
    f.add_argument("gen_dir")
    f.add_argument("--protocol", default="folder", choices=list(PROTOCOLS))
    f.add_argument("--ref", help="reference image folder, or a statistics .npz")
    f.add_argument("--ref-name", help="custom protocol: cache the reference statistics under this name")
    f.add_argument("--eval-res", type=int, help="folder/custom: centre crop + Lanczos to this size first")
    f.add_argument("--inception", help="path of inception-2015-12-05.pt (or its folder)")
    f.add_argument("--allow-download", action="store_true", help="let clean-fid download the Inception weights")
    f.add_argument("--cache-dir", help="reference statistics cache (default ~/.cache/stepdistill)")
    f.add_argument("--batch-size", type=int, default=64)
    f.add_argument("--num-workers", type=int, help="CPU workers for decoding and resizing")
    f.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    f.add_argument("--no-kid", action="store_true", help="skip KID (saves keeping all features)")
    f.set_defaults(func=_fid)

    c = subparsers.add_parser("clip", help="CLIP score of a generation folder against its prompts")
    c.add_argument("gen_dir")
    c.add_argument("--convention", default="gigagan", choices=list(CONVENTIONS),
                   help="gigagan: ViT-g-14, 'A photo depicts', raw cosine; torchmetrics: ViT-L/14, 100 x cosine")
    c.add_argument("--clip-weights", help="local weights (open_clip file, or transformers folder) or hub id")
    c.add_argument("--eval-res", type=int, help="centre crop + Lanczos to this size first (GigaGAN/DMD2: 256 / 512)")
    c.add_argument("--batch-size", type=int, default=32)
    c.add_argument("--num-workers", type=int, default=0)
    c.add_argument("--device")
    c.set_defaults(func=_clip)

    p = subparsers.add_parser("preference", help="optional ImageReward / HPSv2.1 / LAION aesthetic scores")
    p.add_argument("gen_dir")
    p.add_argument("--metrics", nargs="+", default=list(PREFERENCE_METRICS), choices=list(PREFERENCE_METRICS))
    p.add_argument("--weights", action="append", default=[], metavar="METRIC=PATH", help="local weights of a metric")
    p.add_argument("--device")
    p.set_defaults(func=_preference)

    r = subparsers.add_parser("report", help="compare evaluation folders: markdown table, plots, image grid")
    r.add_argument("runs", nargs="+", help="evaluation folders (teacher and students)")
    r.add_argument("--out", required=True, help="report folder")
    r.add_argument("--grid-prompts", type=int, default=6)
    r.set_defaults(func=_report)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser (`python -m stepdistill.eval.cli ...`) with the same commands as `stepdistill eval`."""
    parser = argparse.ArgumentParser(prog="stepdistill eval")
    add_eval_commands(parser.add_subparsers(dest="eval_command", required=True))
    return parser


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    parsed.func(parsed)
