"""The model card (README.md) written beside every exported LoRA: Hub front matter, exact usage, training, figures.

The usage snippet sets the recipe's scheduler, steps or timesteps, guidance and eta exactly as
stepdistill.pipelines.load + generate do, so running it gives the image `stepdistill generate` gives (same seed).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

from .core.io import atomic_write, atomic_write_text
from .core.lora_layout import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from .core.recipe import RECIPE_FILE, Recipe

CARD_FILE = "README.md"
GRID_FILE = "samples.png"
METRICS_FILE = "metrics.json"
ADAPTER_NAME = "stepdistill"  # the adapter name pipelines.load gives the LoRA
EXAMPLE_PROMPT = "a photo of a cat"
# Training settings shown in the card (the full config is resolved_config.yaml in the run folder).
SETTINGS = ("model.resolution", "data.batch_size", "loop.grad_accum", "optim.lr", "optim.critic_lr",
            "optim.warmup_steps", "optim.lr_schedule", "optim.lr_final", "optim.grad_clip", "lora.rank", "lora.alpha",
            "lora.targets", "lora.critic_rank", "loop.mixed_precision", "seed")


def read_front_matter(readme) -> dict:
    """The YAML block between the leading `---` lines of a model card, or {} when there is none."""
    readme = Path(readme)
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def is_our_card(readme) -> bool:
    """True for a README.md that stepdistill wrote (its front matter carries the stepdistill tag)."""
    tags = read_front_matter(readme).get("tags") or []
    return isinstance(tags, list) and "stepdistill" in tags


# A Hub model id: `name` or `owner/name` (letters, digits, `-`, `_`, `.`), what the card's base_model may hold.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")


def hub_base_model(base: str) -> str | None:
    """The base as the Hub's `base_model` field takes it (a model id), or None for a local folder or a toy asset."""
    if Path(base).exists() or base.startswith("assets/") or not _HUB_ID.fullmatch(base) or ".." in base:
        return None
    return base


def base_license(base: str) -> str | None:
    """The license in the base model's own card (a local folder's README.md), when it states one."""
    value = read_front_matter(Path(base) / CARD_FILE).get("license")
    return str(value) if value else None


def _family_tag(family: str) -> str:
    """The Hub tag of the base's family (FamilyModel.hub_tag)."""
    from .models.registry import get_family

    return get_family(family).hub_tag or family


def front_matter(recipe: Recipe, kind: str = "diffusers") -> dict:
    meta = {}
    hub_id = hub_base_model(recipe.base_model)
    if hub_id:  # the Hub rejects a card whose base_model is not a model id: a local base is named in the text only
        meta["base_model"] = hub_id
        if kind == "merged":
            meta["base_model_relation"] = "merge"
    meta.update({
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["merged" if kind == "merged" else "lora", "text-to-image", "stepdistill", recipe.method, "diffusers",
                 _family_tag(recipe.family)],
    })
    license_ = base_license(recipe.resolve_base())
    if license_:
        meta["license"] = license_
    return meta


def _denoiser(recipe: Recipe) -> tuple[str, str]:
    """(class name, subfolder) of the recipe's family's denoiser: a merged export holds it (unet/, transformer/)."""
    from .models.registry import get_family

    family = get_family(recipe.family)
    return family.denoiser_class_name, family.denoiser_prefix


def _weights_kind(folder: Path, prefix: str = "unet") -> str:
    """diffusers | kohya | merged: what the export folder holds (the snippet loads that); `prefix`: the merged
    denoiser's subfolder."""
    if (folder / DIFFUSERS_WEIGHT_NAME).is_file():
        return "diffusers"
    if (folder / KOHYA_WEIGHT_NAME).is_file():
        return "kohya"
    if (folder / prefix / "config.json").is_file():
        return "merged"
    raise FileNotFoundError(f"{folder} holds no LoRA ({DIFFUSERS_WEIGHT_NAME} or {KOHYA_WEIGHT_NAME}) and no merged "
                            f"{prefix}/: export the run first (stepdistill export)")


def usage_snippet(recipe: Recipe, lora: str, kind: str = "diffusers", prompt: str = EXAMPLE_PROMPT, seed: int = 0) -> str:
    """Python that loads base + LoRA with the recipe's sampler and makes one image (`image`)."""
    scheduler_args = "".join(f", {k}={v!r}" for k, v in recipe.scheduler_config.items())
    steps = (f"timesteps={recipe.timesteps!r}" if recipe.timesteps is not None
             else f"sigmas={recipe.sigmas!r}" if recipe.sigmas is not None
             else f"num_inference_steps={recipe.num_inference_steps}")
    lines = ["import torch", f"from diffusers import DiffusionPipeline, {recipe.scheduler_class}", ""]
    if kind == "merged":
        lines += [
            f"model = {lora!r}  # this folder (base and LoRA merged, the recipe's scheduler), or its Hub repo",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            "",
            "pipe = DiffusionPipeline.from_pretrained(model).to(device)",
            f"pipe.scheduler = {recipe.scheduler_class}.from_config(pipe.scheduler.config{scheduler_args})",
        ]
    else:
        lines += [
            f"base = {recipe.resolve_base()!r}",
            f"lora = {lora!r}  # this folder, or the Hub repo it was pushed to",
            'device = "cuda" if torch.cuda.is_available() else "cpu"',
            "",
            "pipe = DiffusionPipeline.from_pretrained(base).to(device)",
            f"pipe.scheduler = {recipe.scheduler_class}.from_config(pipe.scheduler.config{scheduler_args})",
        ]
        weight = DIFFUSERS_WEIGHT_NAME if kind == "diffusers" else KOHYA_WEIGHT_NAME
        lines += [
            f"pipe.load_lora_weights(lora, weight_name={weight!r}, adapter_name={ADAPTER_NAME!r})",
            f"pipe.set_adapters([{ADAPTER_NAME!r}], adapter_weights=[{recipe.lora_scale!r}])",
        ]
    call = recipe.call_kwargs()
    # A video recipe (its size has num_frames) gets PIL frames and writes an animated WebP (Pillow, no system binary).
    video = "num_frames" in (recipe.size_conditioning or {})
    lines += [
        "frames = pipe(" if video else "image = pipe(",
        f"    {prompt!r},",
        f"    {steps},",
        f"    guidance_scale={recipe.guidance_scale!r},",
        *([f"    eta={recipe.eta!r},"] if "eta" in call else []),  # flow pipelines take no eta
        *([] if recipe.max_sequence_length is None else [f"    max_sequence_length={recipe.max_sequence_length!r},"]),
        *[f"    {k}={v!r},  # the trained size: the sigmas shift with it" for k, v in recipe.size_kwargs().items()],
        # The trained size (and frames) where the recipe has them as single values (Qwen-Image, Wan).
        *[f"    {k}={v!r}," for k, v in call.items() if k in (recipe.size_conditioning or {}) and not isinstance(v, tuple)],
        *(['    output_type="pil",'] if video else []),
        f'    generator=torch.Generator("cpu").manual_seed({seed}),',
        ").frames[0]" if video else ").images[0]",
        'frames[0].save("stepdistill.webp", save_all=True, append_images=frames[1:], duration=62, loop=0)' if video
        else 'image.save("stepdistill.png")',
    ]
    return "\n".join(lines) + "\n"


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def training_section(recipe: Recipe, config: dict) -> str:
    rows = [("method", recipe.method), ("training steps (student updates)", recipe.training_steps),
            ("LoRA rank / alpha", f"{recipe.lora_rank} / {recipe.lora_alpha:g}")]
    if config:
        rows += [(key, _get(config, key)) for key in SETTINGS if _get(config, key) is not None]
        method = {k: v for k, v in (config.get("method") or {}).items() if k != "name"}
        rows += [(f"method.{k}", json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in method.items()]
    table = "| setting | value |\n|---|---|\n" + "".join(f"| `{k}` | {v} |\n" for k, v in rows)
    return "## Training\n\n" + table


def _flat_numbers(data, prefix="") -> dict[str, float]:
    out = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(_flat_numbers(v, f"{prefix}{k}."))
    elif isinstance(data, (int, float)) and not isinstance(data, bool):
        out[prefix.rstrip(".")] = data
    return out


def metrics_section(metrics: dict) -> str:
    numbers = _flat_numbers(metrics)
    if not numbers:
        return ""
    rows = "".join(f"| `{k}` | {v:.6g} |\n" for k, v in numbers.items())
    return "## Evaluation\n\n| metric | value |\n|---|---|\n" + rows


def recipe_section(recipe: Recipe) -> str:
    steps = (f"timesteps {recipe.timesteps}" if recipe.timesteps is not None
             else f"sigmas {recipe.sigmas}" if recipe.sigmas is not None else f"{recipe.num_inference_steps} steps")
    return (
        "## Sampling recipe\n\n"
        f"`{recipe.scheduler_class}` ({json.dumps(recipe.scheduler_config)}), {steps}, guidance scale "
        f"{recipe.guidance_scale:g} (diffusers' convention: <= 1 runs without CFG), eta {recipe.eta:g}, LoRA scale "
        f"{recipe.lora_scale:g}. The same settings are in `{RECIPE_FILE}`; `stepdistill generate --lora FOLDER` "
        "reads them.\n"
    )


def _find_metrics(folder: Path, run_dir: Path | None) -> dict:
    for where in (folder, run_dir):
        if where is not None and (where / METRICS_FILE).is_file():
            try:
                return json.loads((where / METRICS_FILE).read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{where / METRICS_FILE} is not valid JSON ({e}): fix or remove it") from e
    return {}


def latest_grid(run_dir: Path | None) -> Path | None:
    """The run's last sample grid (samples/step-NNNNNN.png), if it wrote any."""
    if run_dir is None or not (run_dir / "samples").is_dir():
        return None
    grids = sorted((run_dir / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def _run_config(run_dir: Path | None) -> dict:
    path = run_dir / "resolved_config.yaml" if run_dir is not None else None
    if path is None or not path.is_file():
        return {}
    return yaml.safe_load(path.read_text()) or {}


def render_model_card(folder, run_dir=None, repo_id: str | None = None, lora_ref=None) -> str:
    """The card's text for the export in `folder` (recipe, weights), with the run's config, figures and grid.

    The snippet loads the LoRA from `repo_id` (pushed), else `lora_ref` (where the folder will live), else `folder`.
    """
    folder, run_dir = Path(folder), Path(run_dir) if run_dir is not None else None
    recipe = Recipe.load(folder)
    kind = _weights_kind(folder, _denoiser(recipe)[1])
    what = "merged model" if kind == "merged" else "LoRA"
    title = repo_id.split("/")[-1] if repo_id else f"{recipe.method} {what} for {recipe.base_model}"
    how = ("with its LoRA adapter merged into the base: a complete diffusers pipeline folder" if kind == "merged"
           else "as a LoRA adapter for a plain diffusers pipeline")
    parts = [
        "---\n" + yaml.safe_dump(front_matter(recipe, kind), sort_keys=False) + "---\n",
        (f"# {title}\n\nA {recipe.num_inference_steps}-step student of `{recipe.base_model}` ({recipe.family}), "
         f"distilled with stepdistill's `{recipe.method}` method, {how}.\n"),
        "## Usage\n\n```python\n" + usage_snippet(recipe, repo_id or str(lora_ref or folder), kind) + "```\n",
        recipe_section(recipe),
        training_section(recipe, _run_config(run_dir)),
    ]
    if kind != "merged" and (folder / KOHYA_WEIGHT_NAME).is_file():
        parts.append(f"`{KOHYA_WEIGHT_NAME}` holds the same LoRA in kohya format (ComfyUI, A1111 and other LoRA "
                     "loaders).\n")
    metrics = metrics_section(_find_metrics(folder, run_dir))
    if metrics:
        parts.append(metrics)
    if (folder / GRID_FILE).is_file():
        parts.append(f"## Samples\n\nThe run's last sample grid (fixed prompts and noise):\n\n![samples]({GRID_FILE})\n")
    return "\n".join(parts)


def write_model_card(folder, run_dir=None, repo_id: str | None = None, lora_ref=None) -> Path:
    """Copy the run's last sample grid beside the LoRA and write folder/README.md (both atomically).

    lora_ref: the folder's final path when it is written under a temporary name first (the trainer's exports).
    """
    folder = Path(folder)
    grid = latest_grid(Path(run_dir) if run_dir is not None else None)
    if grid is not None:
        atomic_write(folder / GRID_FILE, lambda tmp: shutil.copyfile(grid, tmp), suffix=".png")
    return atomic_write_text(folder / CARD_FILE, render_model_card(folder, run_dir, repo_id, lora_ref))
