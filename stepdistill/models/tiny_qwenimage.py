"""A tiny, randomly initialised Qwen-Image pipeline, built offline for tests.

A stock QwenImagePipeline over tiny parts laid out like the real ones: a QwenImageTransformer2DModel (MMDiT over 2x2
packed latents), an AutoencoderKLQwenImage (causal 3D VAE, per-channel latents mean / std), a Qwen2.5-VL text encoder
with a tiny vision tower the pipeline never runs, and a byte-level BPE Qwen2Tokenizer of our own whose vocabulary
holds every word of the pipeline's chat template as one token, so the template's system prefix is 34 tokens, the
number the pipeline drops (`prompt_template_encode_start_idx`), as with the real tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from .qwenimage_spec import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, QWENIMAGE_SCHEDULER_CONFIG, TINY_ARCH
from .tokenizer import TINY_WORDS, _bpe

__all__ = ["PROMPT_TEMPLATE", "PROMPT_TEMPLATE_DROP", "build_qwen_word_tokenizer", "build_tiny_qwenimage_pipeline",
           "save_tiny_qwenimage_pipeline", "tiny_qwenimage_configs"]

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Words of the chat template, one token each (so its system prefix is PROMPT_TEMPLATE_DROP tokens, as for Qwen's own).
_TEMPLATE_WORDS = ["system", "describe", "image", "by", "detailing", "color", "shape", "size", "texture", "quantity",
                   "text", "spatial", "relationships", "objects", "background", "user", "assistant"]


def _byte_words(words) -> list[str]:
    """Every word as its byte-level tokens: alone (after a newline or a special token) and after a space ('Ġ')."""
    out = []
    for w in words:
        for form in (w, w.capitalize()):
            out += [form, "\u0120" + form]
    return list(dict.fromkeys(out))


def build_qwen_word_tokenizer(words: list[str] | None = None, model_max_length: int = 32768) -> Qwen2Tokenizer:
    """A byte-level BPE Qwen2Tokenizer whose listed words are one token each; any other text splits into bytes.

    Merges are added only when a word gets stuck (tokenizer.word_bpe's rule), so no later word changes an earlier
    one's split. Specials follow Qwen: <|endoftext|> pads, <|im_start|> / <|im_end|> open and close chat turns.
    """
    words = list(dict.fromkeys(w.strip().lower() for w in (words or TINY_WORDS) + _TEMPLATE_WORDS))
    ranks: dict[tuple[str, str], int] = {}
    for token in _byte_words(words):
        pieces = _bpe(tuple(token), ranks)
        while len(pieces) > 1:
            ranks[pieces[:2]] = len(ranks)
            pieces = _bpe(tuple(token), ranks)
    merges = sorted(ranks, key=ranks.get)
    tokens = sorted(ByteLevel.alphabet()) + [a + b for a, b in merges]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    for special in SPECIALS:
        vocab[special] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=list(merges), unk_token=None,
                         model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": list(SPECIALS[1:])})
    return tok


def tiny_qwenimage_configs(arch: dict | None = None, tokenizer=None) -> dict[str, dict]:
    """Complete configs of every part: defaults, then `arch` overrides, then the keys that tie the parts together."""
    arch = arch or {}
    unknown = set(arch) - set(TINY_ARCH)
    if unknown:
        raise ValueError(f"arch has unknown parts {sorted(unknown)}: a tiny qwenimage pipeline has {sorted(TINY_ARCH)}")
    cfg = {part: {**TINY_ARCH[part], **arch.get(part, {})} for part in TINY_ARCH}
    tr, vae, te = cfg["transformer"], cfg["vae"], cfg["text_encoder"]
    if sum(tr["axes_dims_rope"]) != tr["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope {tuple(tr['axes_dims_rope'])} must sum to attention_head_dim "
                         f"({tr['attention_head_dim']}): the rotary embedding covers each head exactly")
    tok = tokenizer or build_qwen_word_tokenizer()
    vae.setdefault("latents_mean", [round(0.1 * (i - 8), 2) for i in range(vae["z_dim"])])
    vae.setdefault("latents_std", [round(0.5 + 0.1 * i, 2) for i in range(vae["z_dim"])])
    tr.setdefault("in_channels", 4 * vae["z_dim"])  # 2x2 patches packed into channels
    tr.setdefault("out_channels", vae["z_dim"])
    tr.setdefault("joint_attention_dim", te["hidden_size"])
    head = te["hidden_size"] // te["num_attention_heads"]
    te.setdefault("vocab_size", len(tok))
    te.setdefault("max_position_embeddings", 2048)
    # Qwen2.5-VL's multimodal rotary sections (temporal, height, width) split each head's half-width.
    te.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1000000.0,
                                      "mrope_section": [head // 2 - 2 * (head // 6), head // 6, head // 6]})
    te.setdefault("pad_token_id", tok.pad_token_id)
    te.setdefault("eos_token_id", tok.convert_tokens_to_ids("<|im_end|>"))
    te.setdefault("bos_token_id", tok.pad_token_id)
    return cfg


def _text_encoder(te: dict) -> Qwen2_5_VLForConditionalGeneration:
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": te["hidden_size"],
              "fullatt_block_indexes": [0]}
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=te, vision_config=vision))


def build_tiny_qwenimage_pipeline(seed: int = 0, words: list[str] | None = None, arch: dict | None = None) -> QwenImagePipeline:
    """A randomly initialised QwenImagePipeline in memory, identical for identical arguments."""
    tok = build_qwen_word_tokenizer(words)
    cfg = tiny_qwenimage_configs(arch, tok)
    builders = [("transformer", lambda c: QwenImageTransformer2DModel(**c)),
                ("vae", lambda c: AutoencoderKLQwenImage(**c)), ("text_encoder", _text_encoder)]
    parts = {}
    # Each part its own seed in a forked RNG: the caller's RNG is untouched, one part's override leaves the others.
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders):
            torch.manual_seed(seed + offset)
            parts[name] = build(cfg[name]).eval()
    return QwenImagePipeline(**parts, tokenizer=tok, scheduler=FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER_CONFIG))


def save_tiny_qwenimage_pipeline(directory, seed: int = 0, words: list[str] | None = None, arch: dict | None = None) -> Path:
    """Build a tiny Qwen-Image pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    directory = Path(directory)
    build_tiny_qwenimage_pipeline(seed, words, arch).save_pretrained(directory, safe_serialization=True)
    return directory
