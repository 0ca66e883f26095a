"""`stepdistill generate`: one image from an exported LoRA and its recipe, through pipelines.load + pipelines.generate.

Whatever is wrong with the artifacts (a LoRA for another base, a recipe from a newer stepdistill, a scheduler this
diffusers lacks, a base model that is not there) comes back as a ModelError that says what to do, so the CLI
prints one line instead of a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .config import ConfigError
from .errors import ModelError, ModelFileError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def generate_image(lora, prompt: str, out, base=None, steps: int | None = None, seed: int = 0) -> Path:
    """Sample `prompt` with the LoRA folder's recipe (steps overridable) and write the image to `out`."""
    from stepdistill import pipelines

    out = Path(out)
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"--out {out} must end in one of {', '.join(IMAGE_SUFFIXES)}")
    recipe = _with_steps(_load_recipe(lora), steps)
    device, dtype = _device_and_dtype()
    try:
        pipe = pipelines.load(base, lora, device=device, dtype=dtype)
    except ModelError:
        raise
    except (ValueError, KeyError) as e:
        raise ModelError(f"cannot use the LoRA in {lora}: {e}") from e
    except OSError as e:
        where = base or recipe.base_model
        raise ModelFileError(f"could not load the base model {where} for the LoRA in {lora}: {e}. Pass --base with "
                             f"the local diffusers folder of the {recipe.family} model it was trained on") from e
    pipe.set_progress_bar_config(disable=True)
    image = pipelines.generate(pipe, recipe, [prompt], seed=seed)[0]
    return _save_atomically(image, out)


def _load_recipe(lora):
    from .core.recipe import Recipe

    try:
        return Recipe.load(lora)
    except FileNotFoundError:
        raise
    except (ValueError, TypeError) as e:
        # TypeError: a stepdistill.json with keys missing (Recipe's required fields).
        raise ModelError(f"cannot use the recipe in {lora}: {e}") from e


def _with_steps(recipe, steps: int | None):
    """The recipe with `steps` sampling steps; refused when the recipe fixes explicit timesteps."""
    if steps is None or steps == recipe.num_inference_steps:
        return recipe
    if recipe.timesteps is not None:
        raise ModelError(f"this LoRA's recipe fixes its timesteps {recipe.timesteps}: drop --steps")
    if steps < 1:
        raise ConfigError(f"--steps must be >= 1 (got {steps})")
    return dataclasses.replace(recipe, num_inference_steps=steps)


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
