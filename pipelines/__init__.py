"""Inference recipes: base model + stepdistill LoRA + stepdistill.json -> a ready diffusers pipeline.

    pipe = pipelines.load(None, "runs/dmd_sd15/final")          # base from the recipe
    recipe = Recipe.load("runs/dmd_sd15/final")
    images = pipelines.generate(pipe, recipe, ["a photo of a cat"], seed=0)

This package consumes exported artifacts only (DESIGN.md sec. 2): it never imports stepdistill.train.

What differs per family (its diffusers pipeline class and how a base folder is recognised, its text encoders,
the denoiser's attribute and LoRA key prefix, how the base loads) is asked of the family registry
(stepdistill.models.registry): those are facts of the family, declared once in its models/families/ module, which
the library needs too (detection, export). A second, harness-side list of families would be the drift this
package must not have.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from stepdistill.core.dtypes import dtype_kwargs
from stepdistill.core.recipe import Recipe
from stepdistill.models.registry import family_for_pipeline, family_names, get_family, supported_pipelines

ADAPTER_NAME = "stepdistill"

# Log or warning text that means LoRA weights were dropped or left at their init while loading.
_DROPPED_WEIGHTS = ("unexpected", "missing", "inconsistency", "not found")

__all__ = ["Recipe", "check_lora_fits", "family_of", "generate", "load"]


def family_of(base, recipe: Recipe | None = None) -> str:
    """The family of a base model: from its model_index.json when it is a local folder, else from the recipe."""
    index = Path(base) / "model_index.json"
    if index.is_file():
        class_name = json.loads(index.read_text()).get("_class_name")
        family = family_for_pipeline(class_name)
        if family is None:
            raise ValueError(
                f"{base} holds a {class_name}, which stepdistill cannot load: use a base of family "
                f"{family_names()} ({supported_pipelines()})"
            )
        if recipe is not None and recipe.family != family.name:
            raise ValueError(
                f"this LoRA was trained for {recipe.family} ({recipe.base_model}), but {base} is a {class_name} "
                f"({family.name}): pass the {recipe.family} base model it was trained on"
            )
        return family.name
    if recipe is None:
        raise ValueError(f"cannot tell the family of {base!r} without a recipe: pass a local diffusers folder")
    return recipe.family


def _denoiser_lora_shapes(pipe, lora_dir, prefix: str = "unet") -> dict[str, dict[str, tuple]]:
    """module path -> {"A": shape, "B": shape} for the denoiser part (keys `prefix.`) of a LoRA file, any key style."""
    state = pipe.lora_state_dict(str(lora_dir))
    # The UNet pipelines' loaders return (state, network_alphas); SD3's and FLUX's the state alone.
    state = state if isinstance(state, dict) else state[0]
    modules: dict[str, dict[str, tuple]] = {}
    for key, value in state.items():
        if not key.startswith(f"{prefix}."):
            continue
        key = key.removeprefix(f"{prefix}.")
        module = key.split(".lora")[0]
        kind = "A" if (".lora_A." in key or ".lora.down." in key) else "B" if (".lora_B." in key or ".lora.up." in key) else None
        if kind is not None:
            modules.setdefault(module, {})[kind] = tuple(value.shape)
    return modules


def check_lora_fits(pipe, lora_dir, recipe: Recipe, base) -> None:
    """Raise when a LoRA's denoiser modules (UNet or transformer) are absent from the base's or have other shapes
    (another architecture)."""
    prefix = get_family(recipe.family).denoiser_prefix
    modules = _denoiser_lora_shapes(pipe, lora_dir, prefix)
    where = f"this LoRA was trained for {recipe.family} ({recipe.base_model}) and does not fit {base}"
    if not modules:
        raise ValueError(f"{lora_dir} has no {prefix} LoRA weights: export it again with `stepdistill export`")
    layers = dict(getattr(pipe, prefix).named_modules())
    absent = sorted(m for m in modules if m not in layers)
    if absent:
        raise ValueError(f"{where}: its {prefix} has no modules {absent[:3]} ({len(absent)} in all); use the base it was "
                         "trained on")
    for module, shapes in modules.items():
        weight = getattr(layers[module], "weight", None)
        if weight is None or set(shapes) != {"A", "B"}:
            raise ValueError(f"{where}: cannot apply the LoRA to {module}")
        delta_shape = (shapes["B"][0], *shapes["A"][1:])
        if delta_shape != tuple(weight.shape):
            raise ValueError(
                f"{where}: {module} has weight {tuple(weight.shape)} but the LoRA updates {delta_shape}; "
                "use the base it was trained on"
            )


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class _DropTextEncoderNotes(logging.Filter):
    """Our LoRAs are denoiser-only by design, so diffusers' note that a text encoder got no LoRA keys is noise."""

    def __init__(self, family: str):
        super().__init__()
        self.notes = tuple(f"found with the prefix='{name}'" for name, _, _, _ in get_family(family).text_parts)

    def filter(self, record):
        return not any(note in record.getMessage() for note in self.notes)


@contextmanager
def _strict_lora_loading(family: str, what: str):
    """Turn diffusers/PEFT warnings about dropped LoRA weights into an error; a partly loaded LoRA is a wrong model."""
    handler, notes = _Records(), _DropTextEncoderNotes(family)
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    # The note is logged by diffusers.loaders.lora_base; a logger's filters only see its own records.
    note_logger = logging.getLogger("diffusers.loaders.lora_base")
    note_logger.addFilter(notes)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
        note_logger.removeFilter(notes)
    problems = [m for m in handler.messages + [str(w.message) for w in caught]
                if any(s in m.lower() for s in _DROPPED_WEIGHTS)]
    if problems:
        raise ValueError(f"{what} did not load completely into the base denoiser: {problems[0][:500]}")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _load_vae(vae, dtype):
    """A VAE module, or a folder with an AutoencoderTiny / AutoencoderKL config (e.g. taesd, sdxl-vae-fp16-fix)."""
    if isinstance(vae, torch.nn.Module):
        return vae.to(dtype=dtype)
    import diffusers

    config = Path(vae) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"no VAE config at {config}: pass a diffusers VAE folder (e.g. a local copy of taesd)")
    class_name = json.loads(config.read_text()).get("_class_name", "")
    if class_name not in ("AutoencoderTiny", "AutoencoderKL"):
        raise ValueError(f"{vae} holds a {class_name!r}: pass an AutoencoderTiny or AutoencoderKL folder")
    return getattr(diffusers, class_name).from_pretrained(vae, **dtype_kwargs(dtype))


def _architecture(denoiser) -> dict:
    """A denoiser's config without diffusers' bookkeeping (`_class_name`, `_name_or_path`...): equal for a merged
    export and the base it was merged into."""
    return {k: v for k, v in denoiser.config.items() if not k.startswith("_")}


def _is_merged(lora_dir: Path, prefix: str = "unet") -> bool:
    """A `stepdistill export --format merged` folder: a full denoiser (in `prefix`/) instead of LoRA weights."""
    return (lora_dir / prefix / "config.json").is_file() and not any(lora_dir.glob("*.safetensors"))


def _load_extra(pipe, item, index: int) -> tuple[str, float]:
    """Load one extra LoRA ((path, ratio) or path; a folder or a .safetensors file) under its own adapter name."""
    path, ratio = (item, 1.0) if isinstance(item, (str, Path)) else item
    path, name = Path(path), f"extra_{index}"
    folder, weight_name = (path.parent, path.name) if path.is_file() else (path, None)
    with warnings.catch_warnings():
        # Several adapters on one denoiser is what the caller asked for.
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name=name)
    return name, float(ratio)


def load(base, lora_dir, device="cpu", dtype=torch.float32, fuse: bool = False, lora_scale: float | None = None,
         extra_loras: Sequence = (), vae=None):
    """A diffusers pipeline for a stepdistill export: base weights, the recipe's scheduler, the LoRA at its scale.

    base: local folder or hub id; None takes recipe.base_model. lora_scale: None takes recipe.lora_scale.
    extra_loras: (path, ratio) pairs (or paths, ratio 1) loaded beside ours, e.g. a style LoRA.
    fuse: bake all LoRAs into the weights (faster sampling; no more switching). vae: a replacement VAE
    (an AutoencoderTiny for fast previews), as a module or a local folder.
    """
    lora_dir = Path(lora_dir)
    recipe = Recipe.load(lora_dir)
    base = base or recipe.resolve_base()
    family = get_family(family_of(base, recipe))
    pipe = family.load_pipeline(base, dtype).to(device)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    recipe.call_kwargs(pipe.scheduler)  # fail now, not at the first prompt, if the scheduler cannot take the timesteps

    names, weights = [], []
    if _is_merged(lora_dir, family.denoiser_prefix):
        prefix = family.denoiser_prefix
        denoiser = family.denoiser_class.from_pretrained(lora_dir, subfolder=prefix, **dtype_kwargs(dtype))
        if _architecture(denoiser) != _architecture(getattr(pipe, prefix)):
            raise ValueError(f"the merged {prefix} in {lora_dir} was trained for {recipe.family} ({recipe.base_model}), "
                             f"not {base}")
        setattr(pipe, prefix, denoiser.to(device))
    else:
        check_lora_fits(pipe, lora_dir, recipe, base)
        try:
            with _strict_lora_loading(family.name, f"the LoRA in {lora_dir}"):
                pipe.load_lora_weights(str(lora_dir), adapter_name=ADAPTER_NAME)
        except (RuntimeError, KeyError) as e:
            raise ValueError(f"this LoRA was trained for {recipe.family} ({recipe.base_model}) and does not load "
                             f"into {base}: {e}") from e
        names.append(ADAPTER_NAME)
        weights.append(recipe.lora_scale if lora_scale is None else lora_scale)
    for i, item in enumerate(extra_loras):
        name, ratio = _load_extra(pipe, item, i)
        names.append(name)
        weights.append(ratio)

    if names:
        # A scalar weight per adapter scales every LoRA layer, convs included (consistency.md sec. 4.3).
        pipe.set_adapters(names, adapter_weights=weights)
        if fuse:
            pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
            pipe.unload_lora_weights()
    if vae is not None:
        pipe.vae = _load_vae(vae, dtype).to(device)
    return pipe


def generate(pipe, recipe: Recipe, prompts, seed: int, output_type: str = "pil", latents=None, generator=None):
    """Sample with the recipe's steps or timesteps, guidance and eta; returns PIL images (videos: frame lists) or latents.

    The default generator is a CPU torch.Generator seeded with `seed`, so a seed gives the same noise on every device.
    """
    if output_type not in ("pil", "latent", "pt", "np"):
        raise ValueError(f"output_type {output_type!r} is not supported: use 'pil', 'latent', 'pt' or 'np'")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if generator is None:
        generator = torch.Generator("cpu").manual_seed(seed)
    with _recipe_timesteps_intended(pipe.scheduler):
        out = pipe(prompt=prompts, generator=generator, latents=latents, output_type=output_type,
                   **recipe.call_kwargs(pipe.scheduler))
    # A video pipeline (WanPipeline) returns `frames`: one list of frames (PIL) or array per prompt.
    return out.frames if hasattr(out, "frames") else out.images


class _DropCustomTimestepWarning(logging.Filter):
    def filter(self, record):
        return "custom timestep schedule" not in record.getMessage()


@contextmanager
def _recipe_timesteps_intended(scheduler):
    """Silence the scheduler's "first timestep ... is not num_train_timesteps - 1" warning: a recipe's timesteps are
    the ones the student was distilled at (e.g. t0 = 399), not a mistake, and the warning came once per call."""
    logger = logging.getLogger(type(scheduler).__module__)
    quiet = _DropCustomTimestepWarning()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
