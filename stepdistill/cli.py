"""`stepdistill` command line: thin commands, each calling one library function."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from functools import partial
from pathlib import Path

DEBUG_ENV = "STEPDISTILL_DEBUG"  # =1: show the traceback of a failure besides its one line


def _train(args):
    from .config import dump_config, load_config
    from .train.loop import train

    cfg = load_config(args.config, args.set, validate=False)
    if args.dry_run:
        _validate_for_dry_run(cfg)
        print(dump_config(cfg), end="")
        return
    cfg.validate()
    args.output_dir = args.output_dir or f"runs/{cfg.method.name}"  # the run folder error.log goes to
    final = train(cfg, _folder_arg("--output-dir", args.output_dir))
    print(f"done: LoRA and recipe in {final}")


def _validate_for_dry_run(cfg) -> None:
    """Every value checked as training checks it; only the paths a preset leaves to the command line may be empty."""
    from .errors import ConfigError

    try:
        cfg.validate()
    except ConfigError as e:
        if not (str(e).startswith("model.path is empty") or str(e).startswith("data.prompts is empty")):
            raise
        logging.getLogger("stepdistill").warning("dry run: %s", e)


def _folder_arg(flag: str, path) -> Path:
    """A folder argument: refused in one line when a file is in the way (it is created when missing)."""
    from .errors import ConfigError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder: pass another {flag}")
    return path


def _lora_arg(path) -> str:
    """--lora: the export folder, or its pytorch_lora_weights.safetensors (the recipe is read beside it)."""
    from .errors import ConfigError
    from .export import DIFFUSERS_WEIGHT_NAME

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        if path.name != DIFFUSERS_WEIGHT_NAME:
            raise ConfigError(f"--lora {path}: pass the folder, or its {DIFFUSERS_WEIGHT_NAME} (the diffusers LoRA "
                              "that stepdistill.json, beside it, describes)")
        return str(path.parent)
    return str(path)


def _generate(args):
    from .errors import ConfigError
    from .generate import generate_image, generate_images

    args.lora = [_lora_arg(x) for x in args.lora]
    if args.prompts:
        _folder_arg("--out", args.out)
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
        out = export_run(args.run, args.format, _folder_arg("--out", args.out))
    except ValueError as e:
        # export's ValueErrors are about the run's LoRA file (keys, rank, metadata): bad input, not a bug.
        raise ModelError(f"cannot export {args.run}: {e}") from e
    print(f"wrote {out}")


def _demo(args):
    from .demo import run_demo

    out = run_demo(args.output_dir, quick=args.quick, method=args.method)
    print(f"demo report: {out}")


def _toy_teacher(args):
    from .train.toy_teacher import train_toy_teacher

    steps = {"steps": args.steps} if args.steps else {}
    optional = {k: getattr(args, k) for k in ("batch_size", "lr", "ema_decay", "lr_final", "timestep_sampling",
                                               "init_from") if getattr(args, k) is not None}
    if args.logit_normal is not None:
        optional["logit_normal"] = tuple(args.logit_normal)
    if args.arch:
        optional["arch"] = _arch_arg(args.arch)
    out = train_toy_teacher(args.out, family=args.family, seed=args.seed, vae_from=args.vae_from,
                            snapshot_every=args.snapshot_every, max_sequence_length=args.max_sequence_length,
                            lr_schedule=args.lr_schedule, keep_snapshots=args.keep_snapshots,
                            progress=not args.no_progress, **steps, **optional)
    print(f"toy teacher written to {out}")


def _arch_arg(items: list[str]) -> dict[str, dict]:
    """--arch PART.KEY=VALUE items as {part: {key: value}}; a value is read as JSON (6, 0.1, true), else a string."""
    import json

    from .errors import ConfigError

    arch: dict[str, dict] = {}
    for item in items:
        name, sep, value = item.partition("=")
        part, dot, key = name.partition(".")
        if not (sep and dot and part and key):
            raise ConfigError(f"--arch {item!r}: write PART.KEY=VALUE, e.g. transformer.num_attention_heads=6")
        try:
            arch.setdefault(part, {})[key] = json.loads(value)
        except json.JSONDecodeError:
            arch[part][key] = value
    return arch


def _toy_random_pipeline(args):
    from .core.dtypes import dtype_from_name
    from .models.random_init import save_random_pipeline

    save_random_pipeline(args.out, args.family, dtype_from_name(args.dtype), seed=args.seed)


def _toy_tiny_pipeline(args):
    from .models.tiny import TINY_PROMPTS, save_tiny_pipeline

    out = save_tiny_pipeline(_folder_arg("--out", args.out), family=args.family, seed=args.seed)
    # Its tokenizer knows a small vocabulary only: prompts in it, ready for data.prompts.
    prompts = out / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    print(f"tiny {args.family} pipeline written to {out}: train on it with --set model.path={out} "
          f"--set data.prompts={prompts}")


def _toy_judge(args):
    from .metrics.toy_judge import train_judge

    steps = {"steps": args.steps} if args.steps else {}
    train_judge(args.out, seed=args.seed, **steps)
    print(f"toy judge written to {args.out}")


def _eval_toy(args):
    from stepdistill.eval.toy import run_eval_toy

    from .errors import ModelError

    try:
        run_eval_toy(lora=args.lora and _lora_arg(args.lora), base=args.base, teacher=args.teacher, steps=args.steps,
                     n=args.n, out=args.out, guidance_scale=args.guidance_scale, family=args.family,
                     timestep_spacing=args.timestep_spacing, teacher_dir=args.teacher_dir)
    except ValueError as e:
        # eval's ValueErrors are about its inputs: the LoRA, its recipe, the flags (as in eval.cli).
        raise ModelError(str(e)) from e


def build_parser() -> argparse.ArgumentParser:
    from .models.registry import family_names

    families = family_names()
    p = argparse.ArgumentParser(prog="stepdistill", description="Distil diffusion teachers into few-step LoRA students.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a student (resumes when rerun on the same output dir)")
    t.add_argument("--config", required=True, help="YAML preset, e.g. configs/toy/dmd_1step.yaml")
    t.add_argument("--output-dir", help="run directory (default runs/<method>)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. lora.rank=16 (lora.alpha=0, the default, means alpha = lora.rank)")
    t.add_argument("--dry-run", action="store_true", help="validate the config, print it resolved and exit")
    t.set_defaults(func=_train)

    g = sub.add_parser("generate", help="generate an image with an exported LoRA and its recipe")
    g.add_argument("--lora", required=True, action="append",
                   help="folder with pytorch_lora_weights.safetensors and stepdistill.json (or that .safetensors file); "
                        "give it again to mix LoRAs (the first one's recipe is used)")
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
    e.add_argument("--format", required=True, choices=["diffusers", "kohya", "merged"],
                   help="diffusers: pytorch_lora_weights.safetensors (pipe.load_lora_weights); kohya: the community "
                        "layout (ComfyUI, A1111); merged: a complete pipeline folder with the LoRA merged into the base "
                        "(DiffusionPipeline.from_pretrained loads it alone)")
    e.add_argument("--out", required=True,
                   help="folder to write (created when missing): the weights, stepdistill.json and a model card "
                        "README.md (a README.md you wrote there is never overwritten: the export is refused)")
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
    tt.add_argument("--arch", action="append", default=None, metavar="PART.KEY=VALUE",
                    help="override the family's toy architecture, e.g. transformer.num_attention_heads=6 (repeatable; "
                    "recorded in toy_teacher.json; a run continued with --init-from keeps its teacher's)")
    tt.set_defaults(func=_toy_teacher)
    tp = toy.add_parser("tiny-pipeline", help="write a tiny random-weight pipeline folder (what the tests train on "
                        "in seconds): for configs/tiny/ presets, --set model.path=DIR")
    tp.add_argument("--family", default="sd15", choices=families)
    tp.add_argument("--out", required=True)
    tp.add_argument("--seed", type=int, default=0)
    tp.set_defaults(func=_toy_tiny_pipeline)
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
    et.add_argument("--lora", help="student LoRA folder (or its pytorch_lora_weights.safetensors)")
    et.add_argument("--base", help="base model folder or hub id (default: the recipe's)")
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
    _optional_commands(ev, "stepdistill.eval.cli", "add_eval_commands", ("generate", "fid", "clip", "preference", "report"))

    bench = sub.add_parser("bench", help="benchmarks: infer | train | eval | data | gpu | memory").add_subparsers(
        dest="bench_command", required=True)
    _optional_commands(bench, "stepdistill.bench.infer", "add_bench_infer_command", ("infer",))
    _optional_commands(bench, "stepdistill.bench.eval", "add_bench_eval_command", ("eval",))
    _optional_commands(bench, "stepdistill.bench.train", "add_bench_train_command", ("train",))
    _optional_commands(bench, "stepdistill.bench.data", "add_bench_data_command", ("data",))
    _optional_commands(bench, "stepdistill.bench.gpu", "add_bench_gpu_command", ("gpu",))
    _optional_commands(bench, "stepdistill.bench.mem_estimate", "add_bench_memory_command", ("memory",))
    return p


def _optional_commands(subparsers, module: str, fn: str, names: tuple[str, ...]):
    """Add the commands `module.fn` registers. When the module cannot be imported (a missing optional package), the
    commands `names` still appear: --help says why each is unavailable, and running one says it in one line."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        reason = f"unavailable: {module} cannot be imported ({e}); install what it names, e.g. pip install -e '.[dev]'"
        for name in names:
            p = subparsers.add_parser(name, help=f"({reason})", description=reason)
            # Whatever follows the command name, parsing it stops with the reason (its real options are unknown).
            p.parse_known_args = partial(_unavailable, reason=f"{p.prog} is {reason}")
        return
    getattr(mod, fn)(subparsers)


def _unavailable(*args, reason: str):
    raise SystemExit(f"stepdistill: error: {reason}")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stepdistill")
    except PackageNotFoundError:
        return "unknown (not installed)"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 (the one top-level handler: each failure is one line)
        return _fail(e, args)
    return 0


# ---- the one top-level handler ------------------------------------------------------------------------------------

EXIT_INTERRUPTED = 130  # what a shell reports for Ctrl-C

# RuntimeError texts of tensors that do not fit a network: a LoRA or checkpoint made for another base.
_SHAPE_ERRORS = ("shapes cannot be multiplied", "must match the size of tensor", "size mismatch for",
                 "Expected size", "expected input with shape")


def describe_failure(e: BaseException, command: str) -> tuple[int, str] | None:
    """(exit code, one line saying what to do) for a known failure; None for a bug (its traceback is shown)."""
    from .errors import RUN_ERRORS, USER_ERRORS

    if isinstance(e, KeyboardInterrupt) or type(e).__name__ == "RunInterrupted":
        return EXIT_INTERRUPTED, (str(e) if str(e) else "interrupted" + (
            ": rerun the same command to resume from the last checkpoint" if command == "train" else ""))
    if isinstance(e, USER_ERRORS):
        return 2, _one_line(e)
    if isinstance(e, RUN_ERRORS):
        return 1, _one_line(e)
    if isinstance(e, OSError):
        return _os_failure(e, command)
    if isinstance(e, RuntimeError) and any(s in str(e) for s in _SHAPE_ERRORS):
        first = _one_line(e)[:200]
        return 2, (f"the weights do not fit the model ({first}): the LoRA or checkpoint was made for another base model. "
                   "Pass --base with the model it was trained on (its stepdistill.json names it), or train on this one")
    return None


def _os_failure(e: OSError, command: str) -> tuple[int, str]:
    where = e.filename or "a file"
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        then = "rerun the same command to resume from the last checkpoint" if command == "train" else "run it again"
        return 1, f"disk full writing {where} ({reason}): free some space, then {then}"
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        return 2, f"{where} is a file where a folder is needed ({reason}): pass another --output-dir / --out"
    if isinstance(e, IsADirectoryError):
        return 2, f"{where} is a folder where a file is needed ({reason}): pass a file path"
    if isinstance(e, PermissionError):
        return 2, f"no permission to use {where} ({reason}): pass a path you can write, or fix its permissions"
    return 2, f"{reason}: {where}" + (f" ({_one_line(e)[:200]})" if not e.strerror else "") + \
        ": check the path and run again"


def _run_folder(args) -> Path | None:
    """The run folder a failure belongs to (its error.log keeps the traceback), when it exists."""
    folder = getattr(args, "output_dir", None) if args.command == "train" else getattr(args, "run", None)
    if folder is None or args.command not in ("train", "export", "push"):
        return None
    folder = Path(folder)
    return folder if folder.is_dir() else None


def _keep_traceback(e: BaseException, folder: Path | None) -> Path | None:
    """Append the traceback to FOLDER/error.log; the path, or None when there is no folder or it cannot be written."""
    import time

    if folder is None:
        return None
    path = folder / "error.log"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"==== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} stepdistill {' '.join(sys.argv[1:])}\n")
            f.write("".join(traceback.format_exception(type(e), e, e.__traceback__)))
    except OSError:  # a full disk cannot take the traceback either: the line still says what to do
        return None
    return path


def _fail(e: BaseException, args) -> int:
    known = describe_failure(e, args.command)
    folder = None if type(e).__name__ == "RunFolderError" else _run_folder(args)  # that folder is another run's
    kept = _keep_traceback(e, folder)
    if known is None:
        raise e  # a bug: the traceback is the report (kept in error.log as well)
    code, text = known
    if os.environ.get(DEBUG_ENV) == "1":
        traceback.print_exception(type(e), e, e.__traceback__)
    hint = f" (traceback in {kept})" if kept else f" ({DEBUG_ENV}=1 shows the traceback)"
    _print_error(text + hint)
    return code


def _one_line(e: BaseException) -> str:
    # One line, whatever the message holds (YAML and hub errors come with line breaks).
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip())


def _print_error(text: str) -> None:
    print(f"stepdistill: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
