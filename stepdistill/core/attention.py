"""One attention setting for training and inference: auto | sdpa | xformers | triton | math.

`resolve_backend` turns the setting into a concrete backend for a device and refuses one that cannot run there with
a message that says what to do; `set_attention_backend` installs the matching diffusers attention processor on every
Attention module of a model (UNet or VAE). Nothing falls back silently: auto logs what it picked.

auto on CUDA (with triton importable) is `measured`: each attention shape (batch, heads, lengths, head dim, dtype,
with or without gradients) runs whichever of our Triton kernel and PyTorch SDPA measured faster on this device the
first time the shape came by (core.triton_attention.FastestAttnProcessor; measured once per shape and process,
cached, logged). On the CPU auto is SDPA: the Triton kernel runs there only in its slow interpreter.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging
import os

import torch

from .attn_processor import SDPAAttnProcessor

log = logging.getLogger(__name__)

BACKENDS = ("auto", "sdpa", "xformers", "triton", "math")
# What auto resolves to on CUDA: triton or sdpa per shape, whichever measured faster (see the module docstring).
MEASURED = "measured"


def _device_type(device) -> str:
    return torch.device(device).type if device is not None else "cpu"


def _triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(name: str, device=None) -> str:
    """The concrete backend (sdpa | xformers | triton | math | measured) that `name` means on `device`, or a clear
    error."""
    if name not in BACKENDS:
        close = difflib.get_close_matches(str(name), BACKENDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown attention backend {name!r}{hint}: use one of {', '.join(BACKENDS)}")
    kind = _device_type(device)
    if name == "auto":
        return _resolve_auto(kind)
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ImportError("xformers is not installed: pip install stepdistill[xformers] or use attention=sdpa")
        if kind != "cuda":
            raise RuntimeError(f"attention=xformers needs a CUDA device, not {kind}: use attention=sdpa or math")
    if name == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ImportError("triton is not installed: pip install triton (Linux + CUDA) or use attention=sdpa")
        if kind != "cuda" and not _triton_interpret():
            raise RuntimeError(
                f"attention=triton needs a CUDA device, not {kind} (TRITON_INTERPRET=1 runs it slowly on the "
                "CPU, for tests): use attention=sdpa or math"
            )
    return name


def _resolve_auto(kind: str) -> str:
    if kind != "cuda":
        log.info("attention=auto picked sdpa on %s (the triton kernel runs only on CUDA; no per-shape measurement)",
                 kind)
        return "sdpa"
    if importlib.util.find_spec("triton") is None:
        log.info("attention=auto picked sdpa on cuda (triton is not installed, so there is nothing to measure)")
        return "sdpa"
    log.info("attention=auto on cuda: each attention shape runs triton or sdpa, whichever measures faster on this "
             "device at its first call (logged per shape)")
    return MEASURED


def attention_processor(backend: str):
    """A fresh diffusers attention processor for a concrete backend (see `resolve_backend`)."""
    from diffusers.models import attention_processor as ap

    if backend == "sdpa":
        return SDPAAttnProcessor()
    if backend == "math":
        return ap.AttnProcessor()
    if backend == "xformers":
        return ap.XFormersAttnProcessor()
    if backend == "triton":
        from .triton_attention import TritonAttnProcessor

        return TritonAttnProcessor()
    if backend == MEASURED:
        from .triton_attention import FastestAttnProcessor

        return FastestAttnProcessor()
    raise ValueError(f"{backend!r} is not a concrete attention backend: pass it through resolve_backend first")


def attention_modules(model: torch.nn.Module) -> list:
    """Every diffusers Attention module inside `model`."""
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def _model_device(model: torch.nn.Module):
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def head_dim(module) -> int:
    """Width of one attention head of a diffusers Attention module."""
    return module.to_q.out_features // module.heads


def _check_triton_head_dims(modules) -> None:
    from .triton_attention import MAX_HEAD_DIM

    widest = max((head_dim(m) for m in modules), default=0)
    if widest > MAX_HEAD_DIM:
        raise ValueError(
            f"this model has {widest}-wide attention heads (e.g. a VAE's mid block) and the triton kernel handles "
            f"up to {MAX_HEAD_DIM}: use attention=sdpa for this model"
        )


def set_attention_backend(model: torch.nn.Module, backend: str, device=None) -> str:
    """Install `backend`'s processor on every Attention module of `model`; returns the concrete backend used.

    device defaults to where the model's parameters are. Attention modules with added key/value
    projections (not used by SD1.5 / SDXL) keep a processor that supports them, so this refuses them.
    """
    resolved = resolve_backend(backend, device if device is not None else _model_device(model))
    modules = attention_modules(model)
    unsupported = [m for m in modules if getattr(m, "added_kv_proj_dim", None) is not None]
    if unsupported:
        raise ValueError(
            f"{len(unsupported)} attention modules use added key/value projections, which the {resolved} "
            "processor does not handle: leave this model's attention processors as diffusers set them"
        )
    if resolved == "triton":
        _check_triton_head_dims(modules)
    processor = attention_processor(resolved)
    for module in modules:
        module.set_processor(processor)
    log.debug("attention=%s on %d modules of %s", resolved, len(modules), type(model).__name__)
    return resolved
