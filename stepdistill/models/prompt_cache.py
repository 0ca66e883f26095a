"""An LRU cache of encoded prompts for generation: a repeated prompt skips the text encoders.

Keyed by (encoder, prompt, resolution): the encoder is the family model's set of text encoders (a serial number per
module set, never reused, so a new model never reads an old one's entries), and the resolution is there because
SDXL's conditioning carries the image size. Entries hold one prompt each, so a batch mixes hits and misses and only
the misses are encoded (in one call).

Stored tensors are copies: an encoder run as a CUDA graph (torch.compile mode="reduce-overhead") overwrites its
output buffers on its next call. A single-prompt hit returns the stored Cond itself (no copy: the point of the
cache is a lookup that costs nothing on the device); callers must not write into it.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict

import torch

from ..core.denoiser import Cond

_serials = itertools.count()
_encoder_serials: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encoder_key(model) -> tuple[int, ...]:
    """Serial numbers of `model`'s text encoders (stable while they live, never given to another module)."""
    keys = []
    for encoder in model.text_encoders:
        if encoder not in _encoder_serials:
            _encoder_serials[encoder] = next(_serials)
        keys.append(_encoder_serials[encoder])
    return (*keys, getattr(model, "t5_max_length", None))


def _copy(cond: Cond) -> Cond:
    added = None if cond.added_cond_kwargs is None else {k: v.clone() for k, v in cond.added_cond_kwargs.items()}
    return Cond(cond.encoder_hidden_states.clone(), added)


class PromptCache:
    """Least-recently-used map (encoder, prompt, resolution) -> Cond of one prompt, at most `maxsize` entries."""

    def __init__(self, maxsize: int = 256):
        if maxsize < 1:
            raise ValueError(f"a prompt cache needs room for at least one prompt (maxsize={maxsize})")
        self.maxsize = maxsize
        self.hits = self.misses = 0
        self._entries: OrderedDict[tuple, Cond] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def encode(self, model, prompts, resolution: int | None = None) -> Cond:
        """model.encode_prompts(prompts, resolution), encoding only the prompts not cached yet."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encoder = encoder_key(model)
        keys = [(encoder, prompt, resolution) for prompt in prompts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._entries))
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh = {}
        if missing:
            with torch.no_grad():
                cond = model.encode_prompts([k[1] for k in missing], resolution)
            fresh = {k: _copy(cond.index(slice(i, i + 1))) for i, k in enumerate(missing)}
        conds = [fresh[k] if k in fresh else self._entries[k] for k in keys]
        for k in keys:  # most recent last; a batch's own entries are never evicted before it returns
            if k in fresh:
                self._entries[k] = fresh[k]
            self._entries.move_to_end(k)
        while len(self._entries) > self.maxsize:
            self._entries.popitem(last=False)
        out = conds[0]
        for cond in conds[1:]:
            out = out.cat(cond)
        return out


# ---------------------------------------------------------------------------------------------------------------
# The same cache in front of a diffusers pipeline's own encode_prompt (what `stepdistill generate` runs).
# ---------------------------------------------------------------------------------------------------------------

TEXT_ENCODER_ATTRS = ("text_encoder", "text_encoder_2", "text_encoder_3")


class _Uncacheable(Exception):
    pass


def _hashable(value):
    """A hashable form of an encode_prompt argument; tensors (precomputed embeddings) and other objects cannot key."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    raise _Uncacheable


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def cache_pipeline_prompts(pipe, maxsize: int = 64) -> PromptCache:
    """Put an LRU cache in front of `pipe.encode_prompt` (any diffusers text-to-image pipeline), keyed by the
    pipeline's text encoders and every argument of the call (prompt, device, images per prompt, guidance, negative
    prompt, LoRA scale...). A call with precomputed embeddings passes straight through. Returns the cache (hits,
    misses, clear()); a hit returns copies, so the pipeline may do what it likes with them.

    The key is the encoder modules, not their weights: load text-encoder LoRAs or change their scale by reloading the
    pipeline, or call clear(). stepdistill's own LoRAs never touch the text encoders.
    """
    cache = PromptCache(maxsize)
    original = pipe.encode_prompt
    encoders = tuple(e for e in (getattr(pipe, a, None) for a in TEXT_ENCODER_ATTRS) if e is not None)

    def encode_prompt(*args, **kwargs):
        try:
            key = (_hashable(args), _hashable(sorted(kwargs.items())))
        except _Uncacheable:
            return original(*args, **kwargs)
        key = (encoder_key(_Encoders(encoders)), key)
        entries = cache._entries
        if key in entries:
            cache.hits += 1
            entries.move_to_end(key)
            return _clone(entries[key])
        cache.misses += 1
        out = original(*args, **kwargs)
        entries[key] = _clone(out)
        while len(entries) > cache.maxsize:
            entries.popitem(last=False)
        return out

    pipe.encode_prompt = encode_prompt
    return cache


class _Encoders:
    """What encoder_key reads: the text encoder modules (a pipeline has no FamilyModel around them)."""

    def __init__(self, text_encoders):
        self.text_encoders = text_encoders
