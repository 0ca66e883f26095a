"""Write a trained adapter in the formats other tools load: diffusers (PEFT keys + metadata), kohya, merged UNet.

Every writer takes a canonical adapter state dict (stepdistill.core.lora.adapter_state_dict) and writes one
key style only, so the pitfalls measured in consistency.md sec. 4.7 cannot happen: no `base_model.model.`
prefix, no mix of `lora.down` and `lora_A` keys, and alpha always stored (metadata or `.alpha` tensors).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .core.dtypes import dtype_kwargs
from .core.io import atomic_dir, atomic_write
from .core.lora import check_canonical_keys, resolve_targets
from .core.lora_layout import (  # noqa: F401 (the file names and layouts are part of this module's interface)
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    kohya_layout_tensors,
    kohya_module_name,
    lora_modules,
)
from .core.lora_layout import cast as _cast
from .core.recipe import Recipe

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# Key prefix of the denoiser's LoRA weights: the family's FamilyModel.denoiser_prefix ("unet" for SD1.5 and SDXL,
# the default here; "transformer" for DiT / flow families). diffusers routes keys to pipeline parts by it.
UNET_PREFIX = "unet"
FORMATS = ("diffusers", "kohya", "merged")


def _check_state(state: dict[str, torch.Tensor], rank: int, targets: Sequence[str] | str | None) -> None:
    """Canonical keys, one rank throughout, and (when given) every module covered by a target suffix."""
    check_canonical_keys(state)
    for k, v in state.items():
        dim = v.shape[0] if k.endswith(".lora_A.weight") else v.shape[1]
        if dim != rank:
            raise ValueError(f"{k} has rank {dim}, but rank={rank} was given: pass the adapter's rank")
    if targets is not None:
        suffixes = resolve_targets(targets)
        stray = [m for m in lora_modules(state) if not any(m == t or m.endswith("." + t) for t in suffixes)]
        if stray:
            raise ValueError(f"LoRA modules {stray[:3]} match none of the targets {suffixes}: pass the adapter's targets")


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """save_file to a temp name in the same folder, then os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, partial(save_file, {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                               metadata=metadata))
    return path


def diffusers_lora_metadata(state: dict[str, torch.Tensor], rank: int, alpha: float,
                            prefix: str = UNET_PREFIX) -> dict[str, str]:
    """safetensors metadata as diffusers' save_lora_weights(..., unet_lora_adapter_metadata=) writes it.

    diffusers rebuilds LoraConfig(**metadata) on load; without it alpha falls back to rank (sec. 4.7 case B).
    Exact module paths as target_modules make PEFT's config and the state dict agree, so loading warns nothing.
    """
    config = {"r": rank, "lora_alpha": alpha, "target_modules": lora_modules(state)}
    packed = {f"{prefix}.{k}": v for k, v in config.items()}
    return {"format": "pt", METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}


def save_diffusers_lora(state: dict[str, torch.Tensor], out_dir, rank: int, alpha: float,
                        targets: Sequence[str] | str | None = None, dtype: torch.dtype | None = None,
                        prefix: str = UNET_PREFIX, file: str | Path | None = None) -> Path:
    """out_dir/pytorch_lora_weights.safetensors (or `file`): `<prefix>.<module>.lora_A.weight` / `lora_B` keys + alpha
    metadata, written atomically."""
    _check_state(state, rank, targets)
    tensors = {f"{prefix}.{k}": _cast(v, dtype) for k, v in state.items()}
    metadata = diffusers_lora_metadata(state, rank, alpha, prefix)
    return _save_safetensors(tensors, Path(file) if file else Path(out_dir) / DIFFUSERS_WEIGHT_NAME, metadata)


def _metadata_prefix(config: dict) -> str:
    """The denoiser prefix a save_diffusers_lora metadata block was written with (`<prefix>.lora_alpha`)."""
    prefixes = [k.removesuffix(".lora_alpha") for k in config if k.endswith(".lora_alpha")]
    return prefixes[0] if len(prefixes) == 1 else UNET_PREFIX


def load_diffusers_lora(path) -> tuple[dict[str, torch.Tensor], int, float]:
    """Read a file written by save_diffusers_lora back into (canonical state, rank, alpha), whatever its prefix."""
    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no LoRA file at {path}: pass a folder that save_diffusers_lora wrote (e.g. RUN/final)")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if METADATA_KEY not in metadata:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata, so its alpha is unknown: re-export it with stepdistill")
        config = json.loads(metadata[METADATA_KEY])
        prefix = _metadata_prefix(config)
        state = {k.removeprefix(f"{prefix}."): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    rank, alpha = int(config[f"{prefix}.r"]), float(config[f"{prefix}.lora_alpha"])
    _check_state(state, rank, None)
    return state, rank, alpha


def save_kohya_lora(state: dict[str, torch.Tensor], path, rank: int, alpha: float,
                    dtype: torch.dtype | None = None, layout=None) -> Path:
    """One kohya file, in `layout(state, rank, alpha, dtype)`'s key layout (a family's kohya_tensors; default the UNet
    layout `lora_unet_<module>.lora_down.weight`, `.lora_up.weight`, `.alpha` for every module)."""
    _check_state(state, rank, None)
    tensors = (layout or kohya_layout_tensors)(state, rank, alpha, dtype)
    if tensors is None:
        raise ValueError("this model family's pipeline loads no kohya-format LoRA: export the diffusers format")
    metadata = {"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha))}
    return _save_safetensors(tensors, Path(path), metadata)


def lora_delta(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Delta W = (alpha / r) B A (LoRA, Hu et al. eq. 3); for a conv, A holds the kernel and B is 1x1."""
    delta = lora_B.flatten(1).float() @ lora_A.flatten(1).float()
    return scale * delta.reshape(lora_B.shape[0], *lora_A.shape[1:])


@torch.no_grad()
def merge_into_unet(unet, state: dict[str, torch.Tensor], rank: int, alpha: float, lora_scale: float = 1.0):
    """Add the LoRA into the weights of a plain diffusers UNet, in place; returns the UNet."""
    _check_state(state, rank, None)
    for module in lora_modules(state):
        try:
            layer = unet.get_submodule(module)
        except AttributeError:
            raise ValueError(f"the UNet has no module {module!r}: this LoRA was trained for another architecture")
        if hasattr(layer, "base_layer"):
            raise ValueError(f"{module} already carries a PEFT adapter: merge into a freshly loaded UNet")
        delta = lora_delta(state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"], lora_scale * alpha / rank)
        if delta.shape != layer.weight.shape:
            raise ValueError(
                f"{module}: LoRA gives a {tuple(delta.shape)} update for a {tuple(layer.weight.shape)} weight: "
                "this LoRA was trained for another architecture"
            )
        layer.weight.copy_((layer.weight.float() + delta.to(layer.weight.device)).to(layer.weight.dtype))
    return unet


def save_merged_unet(unet, state: dict[str, torch.Tensor], out_dir, rank: int, alpha: float,
                     lora_scale: float = 1.0) -> Path:
    """Merge the LoRA into `unet` (in place) and save it as a diffusers UNet folder, swapped in atomically."""
    merge_into_unet(unet, state, rank, alpha, lora_scale)
    with atomic_dir(out_dir) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def save_merged_pipeline(base: str, recipe: Recipe, state: dict[str, torch.Tensor], out_dir, rank: int, alpha: float,
                         prefix: str = UNET_PREFIX, dtype: torch.dtype | None = None) -> Path:
    """A complete diffusers pipeline folder: the base's parts, its denoiser with the LoRA merged in, and the recipe's
    scheduler, so `DiffusionPipeline.from_pretrained(out_dir)` loads it alone. Written atomically."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base, **dtype_kwargs(dtype))
    merge_into_unet(getattr(pipe, prefix), state, rank, alpha, recipe.lora_scale)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
    return Path(out_dir)


def export_lora(lora_dir, fmt: str, out_dir, base: str | None = None, dtype: torch.dtype | None = None) -> Path:
    """Convert a run's final folder (diffusers LoRA + stepdistill.json) to `fmt` in out_dir, recipe included.

    `merged` writes a whole pipeline folder: the base (`base`, or the recipe's base_model) with the LoRA merged into
    its denoiser (the recipe's family says which: unet/, transformer/) and the recipe's scheduler.
    """
    from .models.registry import get_family

    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}: use one of {FORMATS}")
    recipe = Recipe.load(lora_dir)
    family = get_family(recipe.family)
    state, rank, alpha = load_diffusers_lora(lora_dir)
    out_dir = Path(out_dir)
    if fmt == "diffusers":
        save_diffusers_lora(state, out_dir, rank, alpha, dtype=dtype, prefix=family.denoiser_prefix)
    elif fmt == "kohya":
        save_kohya_lora(state, out_dir / KOHYA_WEIGHT_NAME, rank, alpha, dtype=dtype, layout=family.kohya_tensors)
    else:
        save_merged_pipeline(base or recipe.resolve_base(), recipe, state, out_dir, rank, alpha,
                             prefix=family.denoiser_prefix, dtype=dtype)
    recipe.save(out_dir)
    return out_dir


def export_run(run, fmt: str, out) -> Path:
    """`stepdistill export`: a run's final LoRA (RUN/final) in format `fmt`, written to `out`, with its model card.

    The card is out/README.md: a README.md already there that stepdistill did not write is the user's, and the export
    is refused before anything is written, rather than overwrite it."""
    from .card import CARD_FILE, is_our_card, write_model_card

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file: pass a folder (it is created when missing)")
    if (out / CARD_FILE).is_file() and not is_our_card(out / CARD_FILE):
        raise ValueError(f"{out / CARD_FILE} exists and stepdistill did not write it; the export writes its model card "
                         "there, so pass another --out (nothing was written)")
    out = export_lora(Path(run) / "final", fmt, out)
    write_model_card(out, run_dir=run)
    return out
