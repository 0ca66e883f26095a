"""Find which family a diffusers folder (or hub id) holds, and load it as a FamilyModel."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants

from ..errors import ModelError, ModelFileError
from .base import FamilyModel
from .registry import UnknownFamilyError, family_for_pipeline, get_family, supported_pipelines, unknown_family_message

# owner/name as the hub spells repository ids; a path starting with ".", "/" or "~" is always local.
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return env in {"1", "ON", "YES", "TRUE"} or bool(hub_constants.HF_HUB_OFFLINE)


def is_hub_id(path) -> bool:
    """True for a string like "org/name" that names no existing local path."""
    text = str(path)
    return not Path(text).expanduser().exists() and _HUB_ID.fullmatch(text) is not None


def _hub_error(path, err: Exception) -> ModelFileError:
    where = "the local Hugging Face cache (HF_HUB_OFFLINE=1)" if _hub_offline() else "the Hugging Face hub"
    return ModelFileError(
        f"no model at {path}: it is not a local folder, and loading it as a hub id from {where} failed "
        f"({type(err).__name__}: {err}). Pass model.path=... (a local diffusers folder or a hub id), or download "
        f"it first, e.g. `hf download {path}` on a machine with network access."
    )


def read_model_index(path) -> dict:
    """The pipeline's model_index.json, from a local folder or a hub id (local cache only when offline)."""
    local = Path(str(path)).expanduser()
    if local.is_dir():
        index = local / "model_index.json"
        if not index.is_file():
            raise ModelError(
                f"{path} is not a diffusers pipeline folder (no model_index.json). Supported pipelines: "
                f"{supported_pipelines()}. Save one with pipeline.save_pretrained(folder); a single-file checkpoint converts "
                "with StableDiffusion(XL)Pipeline.from_single_file(file).save_pretrained(folder)."
            )
        return json.loads(index.read_text())
    if local.exists():
        raise ModelError(
            f"{path} is a file, not a diffusers pipeline folder: convert it with "
            "StableDiffusion(XL)Pipeline.from_single_file(file).save_pretrained(folder) and pass model.path=folder"
        )
    if not is_hub_id(path):
        raise FileNotFoundError(f"no model at {path}: pass model.path=... (a local diffusers folder or a hub id)")
    from diffusers import DiffusionPipeline

    try:
        return dict(DiffusionPipeline.load_config(str(path), local_files_only=_hub_offline()))
    except Exception as err:  # the hub raises many error types (network, auth, missing entry); all mean "not here"
        raise _hub_error(path, err) from err


def detect_family(path) -> str:
    """The family's name (e.g. "sd15"), from the pipeline class named in the folder's model_index.json."""
    return _family_of(read_model_index(path), path)


def _family_of(index: dict, path) -> str:
    pipeline_class = index.get("_class_name")
    family = family_for_pipeline(pipeline_class)
    if family is None:
        raise ModelError(
            f"{path} holds a {pipeline_class} pipeline, which stepdistill does not support. "
            f"Supported pipelines: {supported_pipelines()}."
        )
    return family.name


def load_family(path, family: str = "auto", device="cpu", dtype=torch.float32, vae_dtype=None) -> FamilyModel:
    """Load the teacher at `path` (diffusers folder or hub id), frozen, as its family's FamilyModel.

    `family` "auto" detects it; a named family must match the folder. The VAE loads in `vae_dtype`, by
    default the family's rule (FamilyModel.default_vae_dtype: `dtype` for sd15, float32 for sdxl).
    """
    if family != "auto":
        try:
            get_family(family)
        except UnknownFamilyError:
            raise UnknownFamilyError(f"model.{unknown_family_message(family)} (or 'auto')") from None
    index = read_model_index(path)
    detected = _family_of(index, path)
    if family not in ("auto", detected):
        raise ModelError(
            f"model.family={family!r} but {path} holds a {detected} model ({index.get('_class_name')}): "
            f"set model.family=auto (or {detected!r}), or point model.path at a {family} model"
        )
    hub = is_hub_id(path)
    try:
        return get_family(detected).from_pretrained(
            str(path), device=device, dtype=dtype, vae_dtype=vae_dtype,
            local_files_only=hub and _hub_offline(), pipeline_config=index,
        )
    except OSError as err:
        if hub:
            raise _hub_error(path, err) from err
        raise
