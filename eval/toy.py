"""Toy-world evaluation: toy FID, prompt alignment and speed of a teacher or a distilled student, on CPU.

    stepdistill eval toy --teacher --steps 25 --out teacher.json
    stepdistill eval toy --lora runs/dmd_toy/final --out student.json

Toy FID is the Frechet distance between judge features (stepdistill.metrics.toy_judge, penultimate layer) of the
generated images and of real toy images, computed with the same FeatureStats / frechet_distance as the real
harness (eval/fid.py). Alignment is the fraction of images whose judged layout, shapes, colours and sizes all
match their prompt. Prompts and seeds are fixed by `seed`, so two models evaluated with the same arguments
see the same prompts and the same initial noise.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..data.toy_world import IMAGE_SIZE, ToyWorld, to_float, toy_asset_path, toy_prompts
from ..metrics.diversity import density_coverage, precision_recall, total_variation
from ..metrics.fid import FeatureStats
from ..metrics.toy_judge import JUDGE_WEIGHTS, ToyJudge, load_judge, matches

# Guidance of the shipped teachers at their evaluation setting (25 steps of their own sampler: DDIM for SD1.5/SDXL,
# flow Euler for SD3 and FLUX; FLUX-toy has no guidance embedding and takes it as FluxPipeline's true CFG); see
# docs/toy_world.md. The flow teachers' 4.0 is SD1.5-toy's value (docs/toy_world.md has their sweeps).
TEACHER_GUIDANCE_SCALE = 4.0
TEACHER_GUIDANCE = {"sd15": TEACHER_GUIDANCE_SCALE, "sdxl": TEACHER_GUIDANCE_SCALE, "sd3": 4.0, "flux": 4.0}
TEACHER_STEPS = 25
REF_STATS_FILE = "judge_ref_stats.npz"
REF_N, REF_SEED = 10_000, 1_000_000  # real images for the reference statistics; a seed no prompt set uses

GenerateFn = Callable[[list[str], list[int]], object]
DIVERSITY_REAL_SEED = 2_000_000  # the real set that precision/recall and the attribute histograms compare against
BACKGROUND_BINS = 8  # background luminance histogram over [0, 255]: the attribute no caption states


def as_images(images) -> torch.Tensor:
    """What a generate_fn returns (PIL list, uint8 / float numpy, tensor) -> float [N, 3, 32, 32] in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images])
    if isinstance(images, np.ndarray):
        if images.dtype == np.uint8:
            return to_float(images)
        images = torch.from_numpy(images)
        if images.shape[-1] == 3:  # diffusers' output_type="np": float [N, H, W, 3] in [0, 1]
            return images.permute(0, 3, 1, 2).float() * 2 - 1
    return images.float()


def _judge_id(judge_dir: Path) -> str:
    return hashlib.sha256((judge_dir / JUDGE_WEIGHTS).read_bytes()).hexdigest()[:16]


def reference_stats(judge: ToyJudge | None = None, judge_dir=None, cache: bool = True) -> FeatureStats:
    """Judge-feature statistics of REF_N real toy images, cached beside the judge and keyed by its weights."""
    judge_dir = Path(judge_dir) if judge_dir is not None else toy_asset_path()
    judge = judge or load_judge(judge_dir)
    path = judge_dir / REF_STATS_FILE
    key = {"judge": _judge_id(judge_dir), "n": REF_N, "seed": REF_SEED}
    if path.is_file():
        stats = FeatureStats.load(path)
        if stats.meta == key:
            return stats
    stats = FeatureStats()
    for start in range(0, REF_N, 1000):
        images, _, _ = ToyWorld().sample(1000, seed=REF_SEED + start)
        stats.update(judge.features(images))
    stats.meta = key
    if cache:
        stats.save(path)
    return stats


def background_luminance(images: torch.Tensor) -> np.ndarray:
    """Per image, the luminance (0..255) of the median border pixel: the background, which objects rarely reach."""
    x = (images.float().clamp(-1, 1) * 0.5 + 0.5) * 255
    border = torch.cat([x[..., :2, :].flatten(2), x[..., -2:, :].flatten(2), x[..., :, :2].flatten(2),
                        x[..., :, -2:].flatten(2)], dim=2)  # [N, 3, P]
    rgb = border.median(dim=2).values
    return (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]).numpy()


def attribute_counts(images: torch.Tensor, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Histograms of what the prompt leaves free or the judge reads: background luminance, object sizes."""
    bins = np.minimum((background_luminance(images) / 256 * BACKGROUND_BINS).astype(int), BACKGROUND_BINS - 1)
    sizes = np.concatenate([labels[:, 3], labels[:, 6]])
    return {"background": np.bincount(bins, minlength=BACKGROUND_BINS),
            "size": np.bincount(sizes[sizes >= 0], minlength=2)}


def diversity(features: torch.Tensor, counts: dict, judge: ToyJudge, n_real: int) -> dict:
    """Precision, recall, density, coverage of judge features against n_real real toy images, and the total
    variation distance of each attribute histogram from the real one (judged the same way)."""
    real_images, _, _ = ToyWorld().sample(n_real, seed=DIVERSITY_REAL_SEED, as_float=True)
    real_features = judge.features(real_images)
    real_counts = attribute_counts(real_images, judge.predict(real_images))
    precision, recall = precision_recall(real_features, features)
    density, coverage = density_coverage(real_features, features)
    out = {"precision": precision, "recall": recall, "density": density, "coverage": coverage}
    out.update({f"{k}_tv": total_variation(counts[k], real_counts[k]) for k in counts})
    return out


def _another_world(shape: tuple) -> ValueError:
    """The judge reads 32x32 toy images: anything else is a model of another world (a LoRA of another base)."""
    return ValueError(f"the model makes {shape} images and the toy judge reads (3, {IMAGE_SIZE}, {IMAGE_SIZE}): eval "
                      "toy scores students of the shipped toy teachers (assets/toy/<family>); pass --base with the toy "
                      "teacher the LoRA was trained on")


def evaluate_toy(generate_fn: GenerateFn, n: int = 500, steps: int | None = None, seed: int = 0,
                 batch_size: int = 50, judge: ToyJudge | None = None, progress: bool = True) -> dict:
    """Generate n images for toy prompts and score them.

    Args:
        generate_fn: (prompts, seeds) -> images (float [-1, 1] [B, 3, 32, 32], uint8 arrays or PIL images);
            image i must depend only on prompts[i] and seeds[i].
        steps: recorded in the result (the generate_fn already uses it).
    Returns dict(toy_fid, alignment, precision, recall, density, coverage, background_tv, size_tv, images_per_s,
    n, steps, seed).
    """
    from tqdm.auto import tqdm

    judge = judge or load_judge()
    prompts = toy_prompts(n, seed)
    seeds = [seed * 1_000_003 + i for i in range(n)]
    stats, aligned, seconds = FeatureStats(keep_features=True), 0, 0.0
    counts = {}
    for start in tqdm(range(0, n, batch_size), desc="toy eval", disable=not progress):
        batch = slice(start, start + batch_size)
        tick = time.perf_counter()
        images = as_images(generate_fn(prompts[batch], seeds[batch]))
        seconds += time.perf_counter() - tick
        if tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise _another_world(tuple(images.shape[1:]))
        stats.update(judge.features(images))
        labels = judge.predict(images)
        aligned += int(matches(labels, prompts[batch]).sum())
        for k, v in attribute_counts(images.cpu(), labels).items():
            counts[k] = counts.get(k, 0) + v
    return {
        "toy_fid": stats.fid(reference_stats(judge)),
        "alignment": aligned / n,
        **diversity(torch.from_numpy(stats.features), counts, judge, n_real=n),
        "images_per_s": n / seconds,
        "n": n,
        "steps": steps,
        "seed": seed,
    }


def teacher_guidance(family: str) -> float:
    if family not in TEACHER_GUIDANCE:
        raise ValueError(f"no toy teacher for family {family!r}: the shipped ones are {sorted(TEACHER_GUIDANCE)}")
    return TEACHER_GUIDANCE[family]


def teacher_path(family: str, path=None) -> Path:
    """The toy teacher folder: `path` (e.g. a snapshot of a training run), checked to be a `family` toy teacher, or
    the shipped assets/toy/<family>."""
    if path is None:
        return toy_asset_path(family)
    path = Path(path)
    info = path / "toy_teacher.json"
    trained = json.loads(info.read_text()).get("family") if info.is_file() else None
    if trained is not None and trained != family:
        raise ValueError(f"{path} is a {trained} toy teacher: pass --family {trained}")
    return path


def teacher_pipeline(family: str = "sd15", device="cpu", path=None):
    """The toy teacher (assets/toy/<family>, or the folder `path`) as a diffusers pipeline with its own scheduler
    (DDIM for SD1.5/SDXL, FlowMatchEulerDiscreteScheduler for the flow families)."""
    from diffusers import DiffusionPipeline

    path = teacher_path(family, path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy teacher at {path}: train it with `stepdistill toy train-teacher --family {family}`")
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def with_timestep_spacing(scheduler, spacing: str):
    """The scheduler with another timestep_spacing: at 4 DDIM steps, leading (the toy teachers' own) runs 751, 501, 251,
    1 and trailing (the tscd students' recipe) 999, 749, 499, 249."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep spacing {spacing!r} is not one of {list(TIMESTEP_SPACINGS)}")
    if "timestep_spacing" not in scheduler.config:
        raise ValueError(f"the teacher's {type(scheduler).__name__} has no timestep_spacing: drop --timestep-spacing")
    return type(scheduler).from_config(scheduler.config, timestep_spacing=spacing)


def teacher_max_sequence_length(family: str, path=None) -> int | None:
    """The T5 length the toy teacher was trained at (its toy_teacher.json), to sample it at; None = no T5."""
    info = teacher_path(family, path) / "toy_teacher.json"
    if not info.is_file():
        return None
    return json.loads(info.read_text()).get("max_sequence_length")


def run_eval_toy(lora=None, teacher: bool = False, steps: int | None = None, n: int = 500, out=None,
                 guidance_scale: float | None = None, family: str = "sd15", seed: int = 0, batch_size: int = 50,
                 base=None, device="cpu", progress: bool = True, timestep_spacing: str | None = None,
                 teacher_dir=None) -> dict:
    """Evaluate the shipped toy teacher (teacher=True) or a student LoRA folder on the toy world; write JSON to out.

    Teacher: the shipped one, or the toy teacher folder teacher_dir (e.g. a training snapshot); its scheduler at
    `steps` (default 25) with guidance_scale (default TEACHER_GUIDANCE[family]) as the family samples a toy teacher
    (FamilyModel.toy_generate_kwargs: FLUX-toy takes it as true CFG);
    timestep_spacing (leading, trailing, linspace) replaces its scheduler's, e.g. to run it on a student's trailing
    schedule. Student: pipelines.load(base, lora) with its recipe; steps and guidance_scale override the recipe's.
    """
    from .generate import student_generate_fn, teacher_generate_fn

    if teacher == (lora is not None):
        raise ValueError("evaluate either the teacher (--teacher) or a student (--lora DIR), not both or neither")
    if teacher_dir is not None and not teacher:
        raise ValueError("--teacher-dir names a teacher to evaluate: add --teacher (a student runs on its recipe's base)")
    if teacher:
        from ..models.registry import get_family

        steps = steps or TEACHER_STEPS
        guidance_scale = teacher_guidance(family) if guidance_scale is None else guidance_scale
        pipe = teacher_pipeline(family, device, teacher_dir)
        if timestep_spacing is not None:
            pipe.scheduler = with_timestep_spacing(pipe.scheduler, timestep_spacing)
        length = teacher_max_sequence_length(family, teacher_dir)
        call = get_family(family).toy_generate_kwargs(guidance_scale, IMAGE_SIZE)
        generate_fn = teacher_generate_fn(pipe, steps, **call,
                                          **({} if length is None else {"max_sequence_length": length}))
        model = {"model": str(teacher_path(family, teacher_dir)), "family": family,
                 "scheduler": type(pipe.scheduler).__name__,
                 "guidance_scale": guidance_scale,
                 # DDIM's spacing; the SD3 teacher's flow scheduler has none.
                 **({k: pipe.scheduler.config[k] for k in ("timestep_spacing",) if k in pipe.scheduler.config}),
                 **({} if length is None else {"max_sequence_length": length})}
    else:
        if timestep_spacing is not None:
            raise ValueError("--timestep-spacing applies to the teacher: a student runs its recipe's scheduler")
        import dataclasses

        from .. import pipelines
        from ..pipelines import Recipe

        recipe = Recipe.load(lora)
        if recipe.height is not None and (recipe.height, recipe.width) != (IMAGE_SIZE, IMAGE_SIZE):
            raise _another_world((3, recipe.height, recipe.width))  # before generating a batch at that size
        changes = {}
        if steps is not None and steps != recipe.num_inference_steps:
            if recipe.timesteps is not None:
                raise ValueError(f"the recipe in {lora} fixes its timesteps {recipe.timesteps}: drop --steps")
            changes["num_inference_steps"] = steps
        if guidance_scale is not None:
            changes["guidance_scale"] = guidance_scale
        recipe = dataclasses.replace(recipe, **changes)
        pipe = pipelines.load(base, lora, device=device)
        pipe.set_progress_bar_config(disable=True)
        generate_fn = student_generate_fn(pipe, recipe)
        steps = recipe.num_inference_steps
        model = {"lora": str(lora), "base": str(base or recipe.base_model), "family": recipe.family,
                 "guidance_scale": recipe.guidance_scale}
    with torch.no_grad():
        result = evaluate_toy(generate_fn, n=n, steps=steps, seed=seed, batch_size=batch_size, progress=progress)
    result.update(model)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    return result
