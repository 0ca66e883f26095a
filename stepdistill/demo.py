"""`stepdistill demo`: distil the shipped SD1.5-architecture toy teacher on CPU and report what it reached.

The demo trains in a few legs on one run directory (each leg resumes the last, so toy FID can be measured along
the way), then evaluates the teacher (25 steps, CFG) and the student (1, 2, 4 steps) on identical prompts and
seeds with the toy judge, and writes report.md, grid.png, curves.png and metrics.json.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)



@dataclass
class DemoBudget:
    legs: int  # toy-FID measurements along training
    max_steps: int | None  # None: the preset's loop.max_steps
    n_eval: int  # images per evaluation (final)
    n_curve: int  # images per evaluation along training
    grid_prompts: int = 6


# 300 student updates (the README gives the demo's measured time on 2 CPU cores); configs/toy/dmd_1step.yaml runs 600.
FULL = DemoBudget(legs=4, max_steps=300, n_eval=500, n_curve=200)
# One leg: each leg builds the run again (the toy images encoded, the models loaded), minutes on a loaded machine.
QUICK = DemoBudget(legs=1, max_steps=4, n_eval=16, n_curve=8, grid_prompts=3)
QUICK_REGRESSION = ["method.regression_pairs=16", "method.regression_teacher_steps=4"]
# A smoke run's data (presets on toy:N images): toy:5000 are 79 VAE-encoding chunks before the first step (the real latents
# are unused without a GAN term), and a batch of 16 makes each of 4 updates (3 critic updates each) seconds long.
QUICK_DATA = ["data.images=toy:256", "data.batch_size=4"]


def default_method() -> str:
    from .registry import method_names

    return "dmd" if "dmd" in method_names() else "lcm"


def preset_for(method: str) -> Path:
    from .resources import configs_dir

    path = configs_dir() / "toy" / f"{method}_1step.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no toy preset {path}: method {method!r} has no toy preset (configs/toy/)")
    return path


def _leg_ends(max_steps: int, legs: int) -> list[int]:
    return sorted({max(1, round(max_steps * (i + 1) / legs)) for i in range(legs)})


def teacher_fn(steps: int = 25):
    """The shipped toy teacher at its evaluation setting (DDIM, CFG) as a GenerateFn."""
    from stepdistill.eval.generate import teacher_generate_fn

    from .eval.toy import TEACHER_GUIDANCE_SCALE

    return teacher_generate_fn(_teacher_pipeline(), steps, TEACHER_GUIDANCE_SCALE)


@functools.lru_cache(maxsize=1)
def _teacher_pipeline():
    """Loaded once per demo: the table and the grid sample the same teacher."""
    from .eval.toy import teacher_pipeline

    return teacher_pipeline("sd15")


_STUDENT: dict = {}  # (folder, weights' mtime) -> (pipeline, the recipe's scheduler): one student pipeline at a time


def _student_pipeline(final: Path):
    """The exported student through pipelines.load, loaded once per export (seven samplings of the same LoRA in a
    demo); a leg that rewrites the LoRA changes its mtime, so the next call loads it again."""
    from stepdistill import pipelines

    from .core.lora_layout import DIFFUSERS_WEIGHT_NAME

    key = (str(Path(final).resolve()), (Path(final) / DIFFUSERS_WEIGHT_NAME).stat().st_mtime_ns)
    if key not in _STUDENT:
        _STUDENT.clear()
        pipe = pipelines.load(None, final)
        pipe.set_progress_bar_config(disable=True)
        _STUDENT[key] = (pipe, pipe.scheduler)
    return _STUDENT[key]


def student_fn(final: Path, steps: int):
    """The exported student through pipelines.load, at `steps` (Recipe.with_steps(respace=True): a one-step recipe's
    fixed timestep is kept as the first and the rest spaced evenly below)."""
    from stepdistill import pipelines
    from stepdistill.eval.generate import student_generate_fn

    from .core.recipe import Recipe

    recipe = Recipe.load(final)
    pipe, recipe_scheduler = _student_pipeline(final)
    scheduler = recipe_scheduler
    if steps != recipe.num_inference_steps:
        recipe = recipe.with_steps(steps, respace=True)
        scheduler = recipe.make_scheduler(recipe_scheduler.config)

    def generate(pipe, recipe, prompts, seed, generator=None):
        pipe.scheduler = scheduler  # the pipeline is shared: each GenerateFn brings its own steps
        return pipelines.generate(pipe, recipe, prompts, seed, generator=generator)

    return student_generate_fn(pipe, recipe, generate)


def run_demo(output_dir="demo_out", quick: bool = False, method: str | None = None) -> Path:
    from .config import load_config
    from .eval.toy import evaluate_toy
    from .train.loop import train

    start = time.perf_counter()
    budget = QUICK if quick else FULL
    method = method or default_method()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = [f"loop.max_steps={budget.max_steps}"] if budget.max_steps else []
    cfg = load_config(preset_for(method), overrides)
    if quick and cfg.data.images.startswith("toy:"):
        overrides += QUICK_DATA
        cfg = load_config(preset_for(method), overrides)
    if quick and (getattr(cfg.method, "regression_weight", 0) or getattr(cfg.method, "regression_steps", 0)):
        overrides += QUICK_REGRESSION  # 1024 teacher ODE solves would be most of a seconds-long smoke run
        cfg = load_config(preset_for(method), overrides)
    legs = _leg_ends(cfg.loop.max_steps, budget.legs)
    run_dir = out / "run"
    curve = []
    for end in legs:
        log.info("demo: training %s to step %d of %d", method, end, cfg.loop.max_steps)
        leg_cfg = load_config(preset_for(method), overrides + [f"loop.max_steps={end}", f"loop.checkpoint_every={legs[0]}"])
        final = train(leg_cfg, run_dir)
        with torch.no_grad():
            metrics = evaluate_toy(student_fn(final, steps=1), n=budget.n_curve, steps=1, seed=1, progress=False)
        curve.append({"step": end, **metrics})

    train_seconds = time.perf_counter() - start
    results = {"method": method, "config": str(preset_for(method)), "training_steps": cfg.loop.max_steps, "rows": []}
    with torch.no_grad():
        teacher = evaluate_toy(teacher_fn(25), n=budget.n_eval, steps=25, seed=0)
    results["rows"].append({"model": "teacher", **teacher})
    for steps in (1, 2, 4):
        with torch.no_grad():
            row = evaluate_toy(student_fn(final, steps), n=budget.n_eval, steps=steps, seed=0)
        results["rows"].append({"model": f"student ({method})", **row})
    results["curve"] = curve
    results["grid_prompts"] = write_grid(out / "grid.png", final, budget.grid_prompts)
    # Wall time of the whole demo; training includes the one-step evaluations of the curve.
    results["seconds"] = {"training_and_curve": round(train_seconds, 1),
                          "total": round(time.perf_counter() - start, 1)}
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    write_curves(out / "curves.png", run_dir / "log.jsonl", curve, results["rows"], cfg.loop.max_steps)
    report = out / "report.md"
    report.write_text(render_report(results, run_dir))
    return report


def render_report(results: dict, run_dir: Path) -> str:
    teacher = results["rows"][0]
    lines = [
        f"# stepdistill demo: {results['method']} on the toy world",
        "",
        (f"Teacher: the shipped SD1.5-architecture toy pipeline, 25 DDIM steps with CFG. Student: a LoRA trained by "
        f"`{results['method']}` for {results['training_steps']} student updates (`{Path(results['config']).name}`), "
        "sampled with the recipe written beside it. Same prompts and seeds for every row; "
        f"{teacher['n']} images each."),
        "",
        ("| model | steps | toy FID (lower is better) | alignment | precision | recall | coverage | background TV "
         "| images/s (CPU) |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['model']} | {row['steps']} | {row['toy_fid']:.2f} | {row['alignment']:.3f} | "
                     f"{row['precision']:.3f} | {row['recall']:.3f} | {row['coverage']:.3f} | "
                     f"{row['background_tv']:.3f} | {row['images_per_s']:.1f} |")
    one = next(r for r in results["rows"][1:] if r["steps"] == 1)
    lines += [
        "",
        (f"One-step student vs 25-step teacher: toy FID ratio {one['toy_fid'] / max(teacher['toy_fid'], 1e-9):.2f}x, "
        f"alignment ratio {one['alignment'] / max(teacher['alignment'], 1e-9):.2f}x, "
        f"recall ratio {one['recall'] / max(teacher['recall'], 1e-9):.2f}x."),
        "",
        ("Toy FID is the Frechet distance between judge features of generated and real toy images; alignment is the "
        "fraction of images whose judged shapes, colours and layout match the prompt. Precision and recall "
        "(Kynkaanniemi et al. 2019) and coverage (Naeem et al. 2020) compare judge features with as many real "
        "images: a mode-collapsed student keeps precision and loses recall and coverage. Background TV is the total "
        "variation distance of the background-luminance histogram from the real one (0 = same spread; the "
        "caption never states the background, so a student that paints one background for all shows here)."),
        "",
        "- `grid.png`: teacher (top row) and the student at 1, 2 and 4 steps, same prompts and seeds.",
        ("- `curves.png`: training loss, and the one-step toy FID of the exported LoRA along training on fewer images "
         "(so higher, by FID's finite-sample bias) with this table's one-step and teacher figures marked and labelled."),
        f"- `{run_dir.name}/final/`: the LoRA (`pytorch_lora_weights.safetensors`) and its recipe (`stepdistill.json`).",
        "",
        "Prompts of the grid's columns, left to right:",
        "",
        *[f"{i + 1}. {p}" for i, p in enumerate(results["grid_prompts"])],
        "",
        (f"Wall time: {results['seconds']['training_and_curve']:.0f} s training (with the curve's evaluations), "
        f"{results['seconds']['total']:.0f} s in all."),
        "",
    ]
    return "\n".join(lines)


@torch.no_grad()
def write_grid(path: Path, final: Path, n: int):
    from torchvision.utils import save_image

    from .data.toy_world import toy_prompts
    from .eval.toy import as_images

    prompts = toy_prompts(n, seed=123)
    seeds = list(range(n))
    rows = [as_images(teacher_fn(25)(prompts, seeds))]
    rows += [as_images(student_fn(final, s)(prompts, seeds)) for s in (1, 2, 4)]
    images = torch.cat([r.float().cpu() for r in rows]) * 0.5 + 0.5
    images = torch.nn.functional.interpolate(images.clamp(0, 1), scale_factor=4, mode="nearest")
    save_image(images, path, nrow=n, padding=2, pad_value=1.0)
    return prompts


def write_curves(path: Path, log_file: Path, curve: list[dict], rows: list[dict] | None = None,
                 last_step: int | None = None):
    """Training loss, and the one-step toy FID of the exported LoRA along training. The curve's points use fewer
    images (and eval seed 1) than the report's table, so they sit higher by the finite-sample bias of FID: the
    table's own one-step and teacher figures are drawn on the same axes and labelled with their n, so the picture
    shows both numbers a reader meets and says which is which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = [json.loads(x) for x in log_file.read_text().splitlines()] if log_file.is_file() else []
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot([x["step"] for x in logs], [x.get("loss", float("nan")) for x in logs])
    a.set(xlabel="student updates", ylabel="student loss", title="training loss")
    n = curve[0]["n"] if curve else 0
    b.plot([c["step"] for c in curve], [c["toy_fid"] for c in curve], marker="o",
           label=f"exported LoRA along training (n = {n}, eval seed 1)")
    one = next((r for r in rows or [] if r["steps"] == 1 and r["model"] != "teacher"), None)
    teacher = next((r for r in rows or [] if r["model"] == "teacher"), None)
    if one is not None and last_step is not None:
        b.plot([last_step], [one["toy_fid"]], marker="*", markersize=14, linestyle="none",
               label=f"report table: final LoRA (n = {one['n']}, eval seed 0) {one['toy_fid']:.1f}")
    if teacher is not None:
        b.axhline(teacher["toy_fid"], color="grey", linestyle="--",
                  label=f"report table: teacher, {teacher['steps']} steps (n = {teacher['n']}) {teacher['toy_fid']:.1f}")
    b.set(xlabel="student updates", ylabel="toy FID (1 step)", title="one-step toy FID")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
