"""Tiny, randomly initialised SD3- and FLUX.1-architecture pipelines, built offline for tests.

Each is a stock diffusers pipeline (StableDiffusion3Pipeline, FluxPipeline) over tiny parts laid out like the real
ones: an MMDiT transformer, a 16-channel VAE with shift_factor and scaling_factor, CLIP encoders over the project's
word tokenizer and a T5 encoder over a word-level T5 tokenizer built here. `arch` overrides any config key of a part;
the keys that tie the parts together (text widths, pooled widths, channel counts, vocabulary sizes) are derived
unless given explicitly.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .flow_common import DEFAULT_ARCH, FLUX_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG
from .tokenizer import TINY_WORDS, build_word_tokenizer, save_word_tokenizer

# T5's SentencePiece marks a word start with this character.
T5_SPACE = "\u2581"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"

def build_t5_word_tokenizer(words: list[str] | None = None, model_max_length: int = 512) -> T5TokenizerFast:
    """A T5 (Unigram) tokenizer whose vocabulary is `words` as whole pieces, plus letters for anything else.

    Ids follow T5: <pad> 0, </s> 1, <unk> 2. A listed word is one piece ("▁cat"); other text splits into letters
    or maps to <unk>; it never raises. It saves to tokenizer.json and reloads offline with T5TokenizerFast.
    """
    words = list(dict.fromkeys(w.strip().lower() for w in (words or TINY_WORDS)))
    vocab = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (T5_SPACE, -2.0)]
    vocab += [(T5_SPACE + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in string.ascii_lowercase]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def _merge_arch(family: str, arch: dict | None) -> dict[str, dict]:
    defaults = DEFAULT_ARCH[family]
    arch = arch or {}
    unknown = set(arch) - set(defaults)
    if unknown:
        raise ValueError(f"arch has unknown parts {sorted(unknown)}: a tiny {family} pipeline has {sorted(defaults)}")
    return {part: {**defaults[part], **arch.get(part, {})} for part in defaults}


def _link_text_encoders(cfg: dict, clip_tok, t5_tok, model_max_length: int) -> None:
    for part, c in cfg.items():
        if part.startswith("text_encoder") and "d_model" in c:
            c.setdefault("vocab_size", len(t5_tok))
            c.setdefault("pad_token_id", t5_tok.pad_token_id)
            c.setdefault("eos_token_id", t5_tok.eos_token_id)
            c.setdefault("decoder_start_token_id", t5_tok.pad_token_id)
        elif part.startswith("text_encoder"):
            c.setdefault("vocab_size", len(clip_tok))
            c.setdefault("max_position_embeddings", model_max_length)
            c.setdefault("bos_token_id", clip_tok.bos_token_id)
            c.setdefault("eos_token_id", clip_tok.eos_token_id)
            c.setdefault("pad_token_id", clip_tok.pad_token_id)


def _link_vae(vae: dict, sample_size: int) -> None:
    n_blocks = len(vae["block_out_channels"])
    vae.setdefault("down_block_types", ("DownEncoderBlock2D",) * n_blocks)
    vae.setdefault("up_block_types", ("UpDecoderBlock2D",) * n_blocks)
    vae.setdefault("sample_size", sample_size * 2 ** (n_blocks - 1))


def tiny_sd3_configs(sample_size: int = 16, arch: dict | None = None, clip_tokenizer=None, t5_tokenizer=None,
                     model_max_length: int = 77) -> dict[str, dict]:
    """Complete configs of every SD3 part: defaults, then `arch` overrides, then the derived linking keys."""
    cfg = _merge_arch("sd3", arch)
    _link_text_encoders(cfg, clip_tokenizer or build_word_tokenizer(TINY_WORDS, model_max_length),
                        t5_tokenizer or build_t5_word_tokenizer(), model_max_length)
    _link_vae(cfg["vae"], sample_size)
    tr, te1, te2, te3 = cfg["transformer"], cfg["text_encoder"], cfg["text_encoder_2"], cfg["text_encoder_3"]
    clip_width = te1["hidden_size"] + te2["hidden_size"]
    if te3["d_model"] < clip_width:
        raise ValueError(f"SD3 pads the CLIP hidden states ({clip_width} wide) to T5's d_model ({te3['d_model']}): "
                         "make text_encoder_3.d_model at least the sum of the CLIP hidden sizes")
    tr.setdefault("sample_size", sample_size)
    tr.setdefault("in_channels", cfg["vae"]["latent_channels"])
    tr.setdefault("out_channels", cfg["vae"]["latent_channels"])
    tr.setdefault("joint_attention_dim", te3["d_model"])
    tr.setdefault("pooled_projection_dim", te1["projection_dim"] + te2["projection_dim"])
    # The joint blocks run the text stream at the image stream's width.
    tr.setdefault("caption_projection_dim", tr["num_attention_heads"] * tr["attention_head_dim"])
    return cfg


def tiny_flux_configs(sample_size: int = 16, arch: dict | None = None, clip_tokenizer=None, t5_tokenizer=None,
                      model_max_length: int = 77) -> dict[str, dict]:
    """Complete configs of every FLUX part: defaults, then `arch` overrides, then the derived linking keys."""
    cfg = _merge_arch("flux", arch)
    _link_text_encoders(cfg, clip_tokenizer or build_word_tokenizer(TINY_WORDS, model_max_length),
                        t5_tokenizer or build_t5_word_tokenizer(), model_max_length)
    _link_vae(cfg["vae"], sample_size)
    tr = cfg["transformer"]
    if sum(tr["axes_dims_rope"]) != tr["attention_head_dim"]:
        raise ValueError(f"axes_dims_rope {tuple(tr['axes_dims_rope'])} must sum to attention_head_dim "
                         f"({tr['attention_head_dim']}): the rotary embedding covers each head exactly")
    tr.setdefault("in_channels", 4 * cfg["vae"]["latent_channels"])  # 2x2 patches packed into channels
    tr.setdefault("joint_attention_dim", cfg["text_encoder_2"]["d_model"])
    tr.setdefault("pooled_projection_dim", cfg["text_encoder"]["hidden_size"])  # CLIP's pooler output
    return cfg


def _build_parts(builders, cfg: dict, seed: int) -> dict:
    # Each part gets its own seed inside a forked RNG: overriding one part leaves the others' weights unchanged,
    # and the caller's global RNG state is untouched.
    parts = {}
    with torch.random.fork_rng(devices=[]):
        for offset, (name, build) in enumerate(builders):
            torch.manual_seed(seed + offset)
            parts[name] = build(cfg[name]).eval()
    return parts


def _tokenizers(words, model_max_length, t5_max_length):
    return build_word_tokenizer(words or TINY_WORDS, model_max_length), build_t5_word_tokenizer(words, t5_max_length)


def build_tiny_sd3_pipeline(seed: int = 0, words: list[str] | None = None, sample_size: int = 16,
                            arch: dict | None = None, model_max_length: int = 77,
                            t5_max_length: int = 256) -> StableDiffusion3Pipeline:
    """A randomly initialised StableDiffusion3Pipeline in memory, identical for identical arguments."""
    clip_tok, t5_tok = _tokenizers(words, model_max_length, t5_max_length)
    cfg = tiny_sd3_configs(sample_size, arch, clip_tok, t5_tok, model_max_length)
    parts = _build_parts([
        ("transformer", lambda c: SD3Transformer2DModel(**c)),
        ("vae", lambda c: AutoencoderKL(**c)),
        ("text_encoder", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
        ("text_encoder_2", lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))),
        ("text_encoder_3", lambda c: T5EncoderModel(T5Config(**c))),
    ], cfg, seed)
    return StableDiffusion3Pipeline(
        **parts, tokenizer=clip_tok, tokenizer_2=clip_tok, tokenizer_3=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
    )


def build_tiny_flux_pipeline(seed: int = 0, words: list[str] | None = None, sample_size: int = 16,
                             arch: dict | None = None, model_max_length: int = 77,
                             t5_max_length: int = 512) -> FluxPipeline:
    """A randomly initialised FluxPipeline (guidance-embedded, as FLUX.1-dev) in memory, identical for identical
    arguments. arch={"transformer": {"guidance_embeds": False}} with a static-shift scheduler is schnell's layout."""
    clip_tok, t5_tok = _tokenizers(words, model_max_length, t5_max_length)
    cfg = tiny_flux_configs(sample_size, arch, clip_tok, t5_tok, model_max_length)
    parts = _build_parts([
        ("transformer", lambda c: FluxTransformer2DModel(**c)),
        ("vae", lambda c: AutoencoderKL(**c)),
        ("text_encoder", lambda c: CLIPTextModel(CLIPTextConfig(**c))),
        ("text_encoder_2", lambda c: T5EncoderModel(T5Config(**c))),
    ], cfg, seed)
    return FluxPipeline(
        **parts, tokenizer=clip_tok, tokenizer_2=t5_tok,
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
    )


def _save(pipe, directory, clip_dirs, words, model_max_length) -> Path:
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    # vocab.json + merges.txt next to tokenizer.json, so every transformers version's CLIPTokenizer loads it.
    for sub in clip_dirs:
        save_word_tokenizer(directory / sub, words or TINY_WORDS, model_max_length)
    return directory


def save_tiny_sd3_pipeline(directory, seed: int = 0, words: list[str] | None = None, sample_size: int = 16,
                           arch: dict | None = None, model_max_length: int = 77, t5_max_length: int = 256) -> Path:
    """Build a tiny SD3 pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    pipe = build_tiny_sd3_pipeline(seed, words, sample_size, arch, model_max_length, t5_max_length)
    return _save(pipe, directory, ("tokenizer", "tokenizer_2"), words, model_max_length)


def save_tiny_flux_pipeline(directory, seed: int = 0, words: list[str] | None = None, sample_size: int = 16,
                            arch: dict | None = None, model_max_length: int = 77, t5_max_length: int = 512) -> Path:
    """Build a tiny FLUX pipeline and save it as a diffusers folder that from_pretrained loads offline."""
    pipe = build_tiny_flux_pipeline(seed, words, sample_size, arch, model_max_length, t5_max_length)
    return _save(pipe, directory, ("tokenizer",), words, model_max_length)
