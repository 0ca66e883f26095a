"""`stepdistill generate`: images from exported LoRAs and a recipe, through pipelines.load + pipelines.generate.

One image (--prompt, --out FILE.png), or a prompts file (--prompts, --n, --out DIR) for scripts: numbered PNGs and
a JSONL line per image with its prompt, seed, LoRAs and recipe.

Whatever is wrong with the artifacts (a LoRA for another base, a recipe from a newer stepdistill, a scheduler this
diffusers lacks, a base model that is not there) comes back as a ModelError that says what to do, so the CLI
prints one line instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError
from .errors import ModelError, ModelFileError
from .models.prompt_cache import cache_pipeline_prompts

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST_FILE = "images.jsonl"


def generate_image(lora, prompt: str, out, base=None, steps: int | None = None, seed: int = 0,
                   lora_weights=None) -> Path:
    """Sample `prompt` with the LoRA folder's recipe (steps overridable) and write the image to `out`.

    `lora` may be a list of folders: the first gives the recipe, the others are mixed in (`lora_weights`, one per LoRA).
    """
    from stepdistill import pipelines

    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--out {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    pipe, recipe, _ = load_pipeline(lora, base, steps, lora_weights)
    image = pipelines.generate(pipe, recipe, [prompt], seed=seed)[0]
    if isinstance(image, list):
        return save_video(image, out)
    return _save_atomically(image, out)


VIDEO_FPS = 16  # Wan's: diffusers' WanPipeline example exports at 16 frames per second


def save_video(frames, out: Path, fps: int = VIDEO_FPS) -> Path:
    """A video's frames as an animated WebP at `out` (Pillow only, no system binary) and as numbered PNGs in the folder
    OUT_frames/ beside it."""
    if out.suffix.lower() != ".webp":
        raise ConfigError(f"--out {out}: this LoRA makes videos, written as an animated WebP: pass --out FILE.webp")
    folder = out.with_name(out.stem + "_frames")
    folder.mkdir(parents=True, exist_ok=True)
    for i, frame in enumerate(frames):
        _save_atomically(frame, folder / f"{i:04d}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    from .core.io import atomic_write

    return atomic_write(out, lambda tmp: frames[0].save(tmp, format="WEBP", save_all=True, append_images=frames[1:],
                                                         duration=round(1000 / fps), loop=0, lossless=True),
                        suffix=".webp")


def generate_images(lora, prompts_file, out_dir, n: int = 1, batch_size: int = 4, seed: int = 0, base=None,
                    steps: int | None = None, lora_weights=None, progress: bool = True) -> Path:
    """`n` images per prompt of `prompts_file` as out_dir/NNNNNN.png, plus out_dir/images.jsonl (one line per image).

    Image i uses seed + i (its own CPU generator, whatever the batch), so `generate --prompt P --seed S` redoes it.
    Returns the JSONL path.
    """
    from tqdm.auto import tqdm

    from stepdistill import pipelines

    from .data.prompts import read_prompts

    if n < 1 or batch_size < 1:
        raise ConfigError(f"--n and --batch-size must be >= 1 (got {n} and {batch_size})")
    out_dir = Path(out_dir)
    if out_dir.suffix.lower() in IMAGE_SUFFIXES:
        raise ConfigError(f"with --prompts, --out is a folder for the numbered images, not {out_dir}")
    prompts, _ = read_prompts(prompts_file)
    jobs = [(i, prompt, seed + i) for i, prompt in enumerate(p for p in prompts for _ in range(n))]
    pipe, recipe, loras = load_pipeline(lora, base, steps, lora_weights)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_FILE
    with open(manifest, "w", encoding="utf-8") as f, tqdm(total=len(jobs), desc="generate", unit="img",
                                                          disable=not progress, dynamic_ncols=True) as bar:
        for start in range(0, len(jobs), batch_size):
            batch = jobs[start : start + batch_size]
            generators = [torch.Generator("cpu").manual_seed(s) for _, _, s in batch]
            images = pipelines.generate(pipe, recipe, [p for _, p, _ in batch], seed=batch[0][2], generator=generators)
            for (i, prompt, image_seed), image in zip(batch, images):
                path = (save_video(image, out_dir / f"{i:06d}.webp") if isinstance(image, list)
                        else _save_atomically(image, out_dir / f"{i:06d}.png"))
                record = {"file": path.name, "index": i, "prompt": prompt, "seed": image_seed, "loras": loras,
                          "recipe": recipe.to_dict()}
                f.write(json.dumps(record) + "\n")
            f.flush()  # a killed run keeps a manifest line for every image it wrote
            bar.update(len(batch))
    return manifest


def _lora_list(lora, lora_weights) -> list[tuple[str, float | None]]:
    """[(folder, weight)]: weight None for the first LoRA means its recipe's lora_scale; others default to 1."""
    loras = [str(lora)] if isinstance(lora, (str, Path)) else [str(x) for x in lora]
    if not loras:
        raise ConfigError("pass --lora FOLDER (the folder training exported, e.g. RUN/final)")
    if lora_weights:
        if len(lora_weights) != len(loras):
            raise ConfigError(f"{len(lora_weights)} --lora-weight values for {len(loras)} --lora folders: give one "
                              "weight per --lora, in the same order (or none)")
        return [(x, float(w)) for x, w in zip(loras, lora_weights)]
    return [(loras[0], None)] + [(x, 1.0) for x in loras[1:]]


def load_pipeline(lora, base=None, steps: int | None = None, lora_weights=None):
    """(pipeline, recipe, [{"path", "weight"}]): the first LoRA with its recipe, the others mixed in at their weights."""
    from stepdistill import pipelines

    loras = _lora_list(lora, lora_weights)
    main, scale = loras[0]
    recipe = _load_recipe(main).with_steps(steps)
    device, dtype = _device_and_dtype()
    try:
        pipe = pipelines.load(base, main, device=device, dtype=dtype, lora_scale=scale, extra_loras=loras[1:])
    except ModelError:
        raise
    except (ValueError, KeyError) as e:
        raise ModelError(f"cannot use the LoRA in {main}: {e}") from e
    except OSError as e:
        where = base or recipe.base_model
        raise ModelFileError(f"could not load the base model {where} for the LoRA in {main}: {e}. Pass --base with "
                             f"the local diffusers folder of the {recipe.family} model it was trained on") from e
    pipe.set_progress_bar_config(disable=True)
    # A prompt repeated (--n images per prompt, or generate_image called again) skips the text encoders.
    cache_pipeline_prompts(pipe)
    used = [{"path": path, "weight": recipe.lora_scale if weight is None else weight} for path, weight in loras]
    return pipe, recipe, used


def _load_recipe(lora):
    from .core.recipe import Recipe

    try:
        return Recipe.load(lora)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError) as e:
        # TypeError: a stepdistill.json with keys missing (Recipe's required fields).
        raise ModelError(f"cannot use the recipe in {lora}: {e}") from e


def _device_and_dtype() -> tuple[str, torch.dtype]:
    if not torch.cuda.is_available():
        return "cpu", torch.float32
    # bf16 where the GPU has it: fp16 overflows in the SDXL VAE.
    return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _save_atomically(image, out: Path) -> Path:
    """A killed run never leaves half an image under the real name (PIL reads the format from the suffix)."""
    from .core.io import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, image.save, suffix=out.suffix)
