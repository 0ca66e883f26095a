"""Generation for evaluation: prompts -> PNG images + manifest, sharded over processes and resumable.

Output folder:
  images/<id>.png                          one image per prompt id (PNG: FID is sensitive to JPEG)
  manifest.part-RRRRR-of-WWWWW.jsonl       what each process finished: {"id", "prompt", "seed", "file"}
  manifest.jsonl                           all parts merged in prompt order, written once every id is done
  generation.json                          what generated the images (model, recipe, steps, cfg) and images/s

A manifest line is appended only after its PNG has been renamed into place, so a killed run never lists a
broken image; rerunning the same command regenerates whatever is not listed. Batches have fixed boundaries
and a partly done batch is regenerated whole, so a resumed run writes the same pixels as an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from stepdistill.core.io import atomic_write, atomic_write_text

from .prompts import PromptRecord, shard

# generate_fn(prompts, seeds) -> one image per prompt; image i must depend only on (prompts[i], seeds[i]).
GenerateFn = Callable[[list[str], list[int]], Sequence]

MANIFEST = "manifest.jsonl"
IMAGES_DIR = "images"
GENERATION_INFO = "generation.json"


def _part_path(out_dir: Path, rank: int, world: int) -> Path:
    return out_dir / f"manifest.part-{rank:05d}-of-{world:05d}.jsonl"


def _read_jsonl(path: Path) -> list[dict]:
    """Complete JSON lines of a manifest; a line cut short by a kill is ignored."""
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def finished_entries(out_dir) -> dict[str, dict]:
    """Every listed image whose file exists, by id, from the merged manifest and all part manifests."""
    out_dir = Path(out_dir)
    entries: dict[str, dict] = {}
    for path in sorted(out_dir.glob("manifest*.jsonl")):
        for entry in _read_jsonl(path):
            if (out_dir / entry["file"]).is_file():
                entries[entry["id"]] = entry
    return entries


def read_manifest(out_dir) -> list[dict]:
    """The merged manifest of a finished generation folder: [{"id", "prompt", "seed", "file"}, ...]."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST} in {out_dir}: generation has not finished there; rerun `stepdistill eval generate` "
            "with the same arguments to complete it"
        )
    return _read_jsonl(path)


def _check_same_prompts(done: dict[str, dict], records: list[PromptRecord], out_dir: Path) -> None:
    by_id = {r.id: r for r in records}
    for entry in done.values():
        r = by_id.get(entry["id"])
        if r is not None and (r.prompt != entry["prompt"] or r.seed != entry["seed"]):
            raise ValueError(
                f"{out_dir} already holds image {entry['id']!r} for another prompt or seed "
                f"({entry['prompt']!r}, seed {entry['seed']}); write to a new output folder"
            )


def _clean_part(path: Path) -> None:
    """Drop a half-written last line left by a kill, so new lines start on a line of their own."""
    if path.is_file():
        atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in _read_jsonl(path)))


def save_png(image, path: Path) -> None:
    """Write a PNG under a temporary name and rename it into place, so `path` is never a partial file."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(image)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def process_state():
    """accelerate's process state (rank, world size, device) under `accelerate launch` or torchrun."""
    import torch
    from accelerate import PartialState

    # Without cpu=True accelerate ignores a multi-process launch on a machine without GPUs.
    return PartialState(cpu=not torch.cuda.is_available())


def _process_layout(rank: int | None, world: int | None):
    """(rank, world, wait_for_everyone): given explicitly, or from accelerate's process state."""
    if rank is not None and world is not None:
        return rank, world, (lambda: None)
    state = process_state()
    return state.process_index, state.num_processes, state.wait_for_everyone


def _merge_manifest(out_dir: Path, records: list[PromptRecord]) -> list[dict]:
    done = finished_entries(out_dir)
    missing = [r.id for r in records if r.id not in done]
    if missing:
        raise RuntimeError(
            f"{len(missing)} prompts have no image in {out_dir} (first: {missing[:3]}); a process stopped early: "
            "rerun the same command to finish them"
        )
    merged = [done[r.id] for r in records]
    atomic_write_text(out_dir / MANIFEST, "".join(json.dumps(e) + "\n" for e in merged))
    return merged


def _generate_shard(generate_fn, my_records, out_dir, part, done, batch_size, progress) -> tuple[int, float]:
    from tqdm.auto import tqdm

    n_done = sum(r.id in done for r in my_records)
    bar = tqdm(total=len(my_records), initial=n_done, unit="img", desc="generating", disable=not progress)
    n_new, seconds = 0, 0.0
    with part.open("a", encoding="utf-8") as manifest:
        for start in range(0, len(my_records), batch_size):
            batch = my_records[start : start + batch_size]
            todo = [i for i, r in enumerate(batch) if r.id not in done]
            if not todo:
                continue
            t0 = time.perf_counter()
            images = list(generate_fn([r.prompt for r in batch], [r.seed for r in batch]))
            if len(images) != len(batch):
                raise RuntimeError(f"the generator returned {len(images)} images for {len(batch)} prompts")
            for i in todo:
                r = batch[i]
                rel = f"{IMAGES_DIR}/{r.id}.png"
                save_png(images[i], out_dir / rel)
                manifest.write(json.dumps({"id": r.id, "prompt": r.prompt, "seed": r.seed, "file": rel}) + "\n")
                manifest.flush()
            seconds += time.perf_counter() - t0
            n_new += len(todo)
            bar.update(len(todo))
    bar.close()
    return n_new, seconds


def generate_images(
    generate_fn: GenerateFn,
    records: list[PromptRecord],
    out_dir,
    batch_size: int = 8,
    info: dict | None = None,
    rank: int | None = None,
    world: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate one PNG per prompt record into out_dir (resuming if it exists); returns generation.json's content.

    Each process (rank of world, from accelerate unless given) generates a contiguous shard of `records`;
    the main process then merges the manifests and checks that every id is present exactly once.
    """
    out_dir = Path(out_dir)
    (out_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    rank, world, wait_for_everyone = _process_layout(rank, world)
    done = finished_entries(out_dir)
    _check_same_prompts(done, records, out_dir)
    part = _part_path(out_dir, rank, world)
    _clean_part(part)

    n_new, seconds = _generate_shard(
        generate_fn, shard(records, rank, world), out_dir, part, done, batch_size, progress and rank == 0
    )
    timing = out_dir / f".timing.part-{rank:05d}-of-{world:05d}.json"
    atomic_write_text(timing, json.dumps({"images": n_new, "seconds": seconds}))
    wait_for_everyone()
    if rank != 0:
        return {}
    _merge_manifest(out_dir, records)
    return _write_generation_info(out_dir, records, batch_size, world, info or {})


def _write_generation_info(out_dir: Path, records, batch_size: int, world: int, info: dict) -> dict:
    timing_files = list(out_dir.glob(f".timing.part-*-of-{world:05d}.json"))
    timings = [json.loads(p.read_text()) for p in timing_files]
    images = sum(t["images"] for t in timings)
    seconds = max((t["seconds"] for t in timings), default=0.0)
    previous = out_dir / GENERATION_INFO
    if images == 0 and previous.is_file():
        # A rerun of a finished folder generated nothing: keep the throughput that was measured.
        old = json.loads(previous.read_text())
        images, rate = old.get("images_generated_last_session", 0), old.get("images_per_s")
    else:
        rate = images / seconds if seconds > 0 else None
    record = {
        **info,
        "n_images": len(records),
        "batch_size": batch_size,
        "world_size": world,
        "seed_rule": "one seed per prompt (file's seed, else base_seed + position), independent of batching",
        "image_format": "png",
        # images/s of the last session only (a resumed run times the images it generated itself).
        "images_generated_last_session": images,
        "images_per_s": rate,
    }
    for p in timing_files:
        p.unlink()
    atomic_write_text(out_dir / GENERATION_INFO, json.dumps(record, indent=2))
    return record


def teacher_generate_fn(pipe, steps: int, guidance_scale: float, height=None, width=None, **pipe_kwargs):
    """A GenerateFn over a diffusers text-to-image pipeline: one CPU generator per prompt (batch-independent noise)."""
    import torch

    def generate(prompts: list[str], seeds: list[int]):
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = pipe(
            prompt=prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=height, width=width,
            generator=generators, output_type="pil", **pipe_kwargs,
        )
        return out.images

    return generate


def student_generate_fn(pipe, recipe, generate: Callable | None = None):
    """A GenerateFn over a student pipeline and its recipe, through `pipelines.generate` (or `generate`).

    One CPU generator per prompt, as for the teacher, so a prompt's image does not depend on its batch.
    """
    import torch

    if generate is None:
        from stepdistill import pipelines

        generate = pipelines.generate

    def generate_batch(prompts: list[str], seeds: list[int]):
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        out = generate(pipe, recipe, prompts, seeds[0], generator=generators)
        return getattr(out, "images", out)

    return generate_batch


def load_teacher(base: str, dtype: str = "fp16", device=None):
    """A plain diffusers text-to-image pipeline for a teacher (local folder or hub id), progress bars off."""
    from diffusers import AutoPipelineForText2Image

    from stepdistill.core.dtypes import dtype_from_name, dtype_kwargs

    try:
        pipe = AutoPipelineForText2Image.from_pretrained(base, **dtype_kwargs(dtype_from_name(dtype)))
    except OSError as e:
        raise FileNotFoundError(
            f"no diffusers model at {base!r}: pass --base a local diffusers folder, or download the hub id on a "
            "connected machine first (huggingface-cli download ID) and set HF_HUB_OFFLINE=1"
        ) from e
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device) if device is not None else pipe


def run_generation(
    prompts,
    out_dir,
    base: str | None = None,
    lora=None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    base_seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    dtype: str = "fp16",
    name: str | None = None,
    training_step: int | None = None,
    progress: bool = True,
) -> dict:
    """Generate a prompt file with a teacher (`base`, steps, cfg) or a student (`lora` + its recipe) into out_dir."""
    from .prompts import load_prompts

    records = load_prompts(prompts, limit=limit, base_seed=base_seed)
    device = process_state().device
    info = {"name": name, "prompts": str(prompts), "height": height, "width": width, "dtype": dtype,
            "uint8_rule": "round (diffusers numpy_to_pil)", "training_step": training_step}
    if lora is None:
        if base is None or steps is None or guidance_scale is None:
            raise ValueError(
                "a teacher run needs --base, --steps and --guidance-scale (published SD1.5 FIDs use 50 steps with "
                "cfg 3; DMD2's SDXL teacher uses cfg 6)"
            )
        pipe = load_teacher(base, dtype, device)
        generate_fn = teacher_generate_fn(pipe, steps, guidance_scale, height, width)
        info.update(model=base, role="teacher", method="teacher", steps=steps, guidance_scale=guidance_scale)
    else:
        from stepdistill import pipelines
        from stepdistill.core.dtypes import dtype_from_name
        from stepdistill.core.recipe import Recipe

        if height is not None or width is not None:
            raise ValueError("a student samples at its recipe's resolution: drop --height/--width")
        recipe = Recipe.load(lora).with_steps(steps)
        pipe = pipelines.load(base, lora, device=device, dtype=dtype_from_name(dtype))
        pipe.set_progress_bar_config(disable=True)
        generate_fn = student_generate_fn(pipe, recipe)
        info.update(model=str(lora), base=base or recipe.base_model, role="student", method=recipe.method,
                    steps=recipe.num_inference_steps, guidance_scale=recipe.guidance_scale,
                    training_step=training_step if training_step is not None else recipe.training_steps,
                    recipe=recipe.to_dict())
    return generate_images(generate_fn, records, out_dir, batch_size=batch_size, info=info, progress=progress)
