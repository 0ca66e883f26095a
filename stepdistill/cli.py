"""`stepdistill` command line: thin commands, each calling one library function."""

from __future__ import annotations

import argparse
import logging
import sys


def _train(args):
    from .config import dump_config, load_config
    from .train.loop import train

    cfg = load_config(args.config, args.set, validate=not args.dry_run)
    if args.dry_run:
        print(dump_config(cfg), end="")
        return
    out = args.output_dir or f"runs/{cfg.method.name}"
    final = train(cfg, out)
    print(f"done: LoRA and recipe in {final}")


def _generate(args):
    from .errors import ConfigError
    from .generate import generate_image, generate_images

    if args.prompts:
        manifest = generate_images(args.lora, args.prompts, args.out, n=args.n, batch_size=args.batch_size,
                                   seed=args.seed, base=args.base, steps=args.steps, lora_weights=args.lora_weight)
        print(f"wrote the images and {manifest}")
        return
    if args.n != 1:
        raise ConfigError("--n needs --prompts FILE (one prompt per line); --prompt makes one image")
    path = generate_image(args.lora, args.prompt, args.out, base=args.base, steps=args.steps, seed=args.seed,
                          lora_weights=args.lora_weight)
    print(f"wrote {path}")


def _push(args):
    from .push import push_run

    url, files = push_run(args.run, args.repo_id, private=args.private)
    print(f"pushed {', '.join(files)} to {url}")


def _export(args):
    from .errors import ModelError
    from .export import export_run

    try:
        out = export_run(args.run, args.format, args.out)
    except ValueError as e:
        # export's ValueErrors are about the run's LoRA file (keys, rank, metadata): bad input, not a bug.
        raise ModelError(f"cannot export {args.run}: {e}") from e
    print(f"wrote {out}")


def _demo(args):
    from .toy.demo import run_demo

    out = run_demo(args.output_dir, quick=args.quick, method=args.method)
    print(f"demo report: {out}")


def _toy_teacher(args):
    from .toy.teacher import train_toy_teacher

    steps = {"steps": args.steps} if args.steps else {}
    optional = {k: getattr(args, k) for k in ("batch_size", "lr", "ema_decay", "lr_final", "timestep_sampling",
                                               "init_from") if getattr(args, k) is not None}
    if args.logit_normal is not None:
        optional["logit_normal"] = tuple(args.logit_normal)
    out = train_toy_teacher(args.out, family=args.family, seed=args.seed, vae_from=args.vae_from,
                            snapshot_every=args.snapshot_every, max_sequence_length=args.max_sequence_length,
                            lr_schedule=args.lr_schedule, keep_snapshots=args.keep_snapshots,
                            progress=not args.no_progress, **steps, **optional)
    print(f"toy teacher written to {out}")


def _toy_random_pipeline(args):
    from .models.random_init import DTYPES_ON_DISK, save_random_pipeline

    save_random_pipeline(args.out, args.family, DTYPES_ON_DISK[args.dtype], seed=args.seed)


def _toy_judge(args):
    from .toy.judge import train_judge

    steps = {"steps": args.steps} if args.steps else {}
    train_judge(args.out, seed=args.seed, **steps)
    print(f"toy judge written to {args.out}")


def _eval_toy(args):
    from stepdistill.toy.evaluate import run_eval_toy

    from .errors import ModelError

    try:
        run_eval_toy(lora=args.lora, teacher=args.teacher, steps=args.steps, n=args.n, out=args.out,
                     guidance_scale=args.guidance_scale, family=args.family, timestep_spacing=args.timestep_spacing,
                     teacher_dir=args.teacher_dir)
    except ValueError as e:
        # eval's ValueErrors are about its inputs: the LoRA, its recipe, the flags (as in eval.cli).
        raise ModelError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import family_names

    families = family_names()
    p = argparse.ArgumentParser(prog="stepdistill", description="Distil diffusion teachers into few-step LoRA students.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student (resumes when rerun on the same output dir)")
    t.add_argument("--config", required=True, help="YAML preset, e.g. configs/toy/dmd_1step.yaml")
    t.add_argument("--output-dir", help="run directory (default runs/<method>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="generate an image with an exported LoRA and its recipe")
    g.add_argument("--lora", required=True, action="append",
                   help="folder with pytorch_lora_weights.safetensors and stepdistill.json; give it again to mix "
                        "LoRAs (the first one's recipe is used)")
    g.add_argument("--lora-weight", type=float, action="append",
                   help="weight of each --lora, in order (default: the recipe's lora_scale, 1 for the others)")
    g.add_argument("--base", help="base model folder or hub id (default: the recipe's)")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt: --out is the image file")
    which.add_argument("--prompts", help="text file, one prompt per line: --out is a folder of numbered PNGs + images.jsonl")
    g.add_argument("--n", type=int, default=1, help="images per prompt (with --prompts)")
    g.add_argument("--batch-size", type=int, default=4, help="images per pipeline call (with --prompts)")
    g.add_argument("--steps", type=int, help="inference steps (default: the recipe's)")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    g.add_argument("--out", required=True, help="output PNG (--prompt) or folder (--prompts)")
    g.set_defaults(func=_generate)

    ps = sub.add_parser("push", help="upload a run's LoRA, recipe, model card and sample grid to the Hugging Face Hub")
    ps.add_argument("--run", required=True, help="training run directory (its final/ is pushed) or an export folder")
    ps.add_argument("--repo-id", required=True, help="USER/NAME of the model repo (created when missing)")
    ps.add_argument("--private", action="store_true", help="create the repo private")
    ps.set_defaults(func=_push)

    e = sub.add_parser("export", help="export a run's student LoRA in another format")
    e.add_argument("--run", required=True, help="training run directory")
    e.add_argument("--format", required=True, choices=["diffusers", "kohya", "merged"])
    e.add_argument("--out", required=True)
    e.set_defaults(func=_export)

    d = sub.add_parser("demo", help="distil the built-in toy teacher on CPU and write a report")
    d.add_argument("--output-dir", default="demo_out")
    d.add_argument("--quick", action="store_true", help="a tiny budget (tests)")
    d.add_argument("--method", default=None, help="method to demo (default: the best one-step method)")
    d.set_defaults(func=_demo)

    toy = sub.add_parser("toy", help="the built-in toy world").add_subparsers(dest="toy_command", required=True)
    tt = toy.add_parser("train-teacher", help="retrain a toy teacher pipeline")
    tt.add_argument("--out", required=True)
    tt.add_argument("--family", default="sd15", choices=families,
                    help="a family with a toy recipe: sd15 | sdxl (eps prediction) | sd3 | flux (rectified flows)")
    tt.add_argument("--steps", type=int, default=None)
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument("--vae-from", default=None, help="reuse this toy pipeline's VAE (SDXL-toy and SD3-toy reuse "
                    "SD1.5-toy's)")
    tt.add_argument("--snapshot-every", type=int, default=0, help="also save the pipeline every N UNet steps")
    tt.add_argument("--max-sequence-length", type=int, default=None,
                    help="a T5 family's prompt length (default 16: every toy caption fits); sample at the same length")
    tt.add_argument("--batch-size", type=int, default=None, help="default: the family's (128 UNet, 64 flow)")
    tt.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-3)")
    tt.add_argument("--lr-schedule", default="constant", choices=("constant", "cosine"),
                    help="constant after 200 warm-up steps (default), or cosine decay to --lr-final x lr")
    tt.add_argument("--lr-final", type=float, default=None, help="cosine's last rate as a fraction of --lr (default 0)")
    tt.add_argument("--ema-decay", type=float, default=None, help="EMA of the weights that is saved (default 0.999)")
    tt.add_argument("--timestep-sampling", default=None, choices=("logit-normal", "uniform"),
                    help="a flow family's sigma sampling (default logit-normal, as SD3 trains)")
    tt.add_argument("--logit-normal", type=float, nargs=2, default=None, metavar=("MEAN", "STD"),
                    help="the logit-normal's location and scale (default 0 1)")
    tt.add_argument("--init-from", default=None, help="continue from this toy teacher folder (same family and "
                    "architecture): its denoiser, text encoders and VAE")
    tt.add_argument("--keep-snapshots", action="store_true", help="keep a copy of every --snapshot-every save in "
                    "OUT/snapshots/step-N")
    tt.add_argument("--no-progress", action="store_true", help="no progress bar; one JSON log line per snapshot")
    tt.set_defaults(func=_toy_teacher)
    rp = toy.add_parser("random-pipeline", help="write a full-size pipeline folder of the released architecture with "
                        "random weights (no download): for memory and end-to-end checks")
    rp.add_argument("--family", required=True, choices=families)
    rp.add_argument("--out", required=True)
    rp.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"], help="weights on disk (default fp16)")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=_toy_random_pipeline)
    tj = toy.add_parser("train-judge", help="retrain the toy judge")
    tj.add_argument("--out", required=True)
    tj.add_argument("--steps", type=int, default=None)
    tj.add_argument("--seed", type=int, default=0)
    tj.set_defaults(func=_toy_judge)

    ev = sub.add_parser("eval", help="evaluate: fid | clip | toy | generate | report").add_subparsers(
        dest="eval_command", required=True)
    et = ev.add_parser("toy", help="toy FID, alignment and images/s with the toy judge")
    et.add_argument("--lora", help="student LoRA folder")
    et.add_argument("--teacher", action="store_true", help="evaluate the toy teacher instead")
    et.add_argument("--teacher-dir", default=None, help="with --teacher: this toy teacher folder (e.g. a training "
                    "snapshot) instead of the shipped assets/toy/<family>")
    et.add_argument("--steps", type=int, default=None)
    et.add_argument("--n", type=int, default=500)
    et.add_argument("--guidance-scale", type=float, default=None)
    et.add_argument("--timestep-spacing", default=None, choices=("leading", "trailing", "linspace"),
                    help="the teacher's DDIM timestep spacing (default: its scheduler's, leading)")
    et.add_argument("--family", default="sd15", choices=families)
    et.add_argument("--out", required=True, help="metrics JSON")
    et.set_defaults(func=_eval_toy)
    _optional_commands(ev, "stepdistill.eval.cli", "add_eval_commands")

    bench = sub.add_parser("bench", help="benchmarks: infer | train | eval | data | gpu").add_subparsers(
        dest="bench_command", required=True)
    _optional_commands(bench, "stepdistill.eval.bench_infer", "add_bench_infer_command")
    _optional_commands(bench, "stepdistill.eval.bench", "add_bench_eval_command")
    _optional_commands(bench, "stepdistill.eval.bench_train", "add_bench_train_command")
    _optional_commands(bench, "stepdistill.eval.bench_data", "add_bench_data_command")
    _optional_commands(bench, "stepdistill.eval.bench_gpu", "add_bench_gpu_command")
    return p


def _optional_commands(subparsers, module: str, fn: str):
    import importlib

    try:
        getattr(importlib.import_module(module), fn)(subparsers)
    except (ImportError, AttributeError):
        pass


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from .errors import RUN_ERRORS, USER_ERRORS

    try:
        args.func(args)
    except USER_ERRORS as e:
        _print_error(e)
        return 2
    except RUN_ERRORS as e:
        _print_error(e)
        return 1
    return 0


def _print_error(e: BaseException) -> None:
    # One line, whatever the message holds (YAML and hub errors come with line breaks).
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip())
    print(f"stepdistill: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
