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

from .lora import fused_linears

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


class SDPAAttnProcessor:
    """diffusers' AttnProcessor2_0 contract (self and cross attention, spatial / group norm, q/k norm, residual,
    output rescale, masks), without the ops that do nothing: AttnProcessor2_0 divides every output by
    `rescale_output_factor` (1.0 in every SD1.5 / SDXL UNet and VAE), a division forward and another backward per
    attention call. `attend` is the one step a subclass runs on another kernel (core.triton_attention)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        if encoder_hidden_states is not None and attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states, batch_size)
        head_dim = key.shape[-1]
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            hidden_states = self.attend(query, key, value, attn.scale)
        else:
            hidden_states = self.masked_attend(attn, query, key, value, attention_mask, batch_size)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        if attn.rescale_output_factor != 1.0:
            hidden_states = hidden_states / attn.rescale_output_factor
        return hidden_states

    def attend(self, query, key, value, scale: float) -> torch.Tensor:
        """softmax(q k^T scale) v over (B, H, L, D) heads."""
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scale)

    def masked_attend(self, attn, query, key, value, attention_mask, batch_size) -> torch.Tensor:
        mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch_size)
        mask = mask.view(batch_size, attn.heads, -1, mask.shape[-1])
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=attn.scale)


def project_heads(attn, hidden_states, encoder_hidden_states, batch_size: int):
    """q, k, v of one attention call in (B, H, L, D) heads. The projections that read one input (self-attention: all
    three; cross-attention: k and v, from the text) run as one fused projection where the fused LoRA path runs them
    (core.lora.fused_linears: one base GEMM, one LoRA node), else as one call each."""
    heads = attn.heads
    if encoder_hidden_states is None:
        qkv = fused_linears((attn.to_q, attn.to_k, attn.to_v), hidden_states)
        if qkv is not None:
            return _split_heads(qkv, batch_size, 3, heads)
        query, encoder_hidden_states = attn.to_q(hidden_states), hidden_states
    else:
        query = attn.to_q(hidden_states)
        kv = fused_linears((attn.to_k, attn.to_v), encoder_hidden_states)
        if kv is not None:
            key, value = _split_heads(kv, batch_size, 2, heads)
            return query.view(batch_size, -1, heads, key.shape[-1]).transpose(1, 2), key, value
    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // heads
    return tuple(x.view(batch_size, -1, heads, head_dim).transpose(1, 2) for x in (query, key, value))


def _split_heads(fused: torch.Tensor, batch_size: int, m: int, heads: int) -> tuple[torch.Tensor, ...]:
    """[B, L, m H D] (m projections side by side) -> m tensors (B, H, L, D): one view, one permute, one unbind."""
    head_dim = fused.shape[-1] // (m * heads)
    return fused.view(batch_size, -1, m, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)


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
