"""A real CLIP BPE tokenizer over the project's own small word list, built offline.

Every listed word becomes one vocabulary entry ("cat</w>"), reached by a chain of BPE merges, so the tiny
teachers read prompts word by word exactly as SD reads them token by token. Text outside the list splits
into letter pieces of the listed words or maps to the unk token; it never raises.
"""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
END_OF_WORD = "</w>"

# The tiny teachers' default vocabulary: a few colours, objects, places and glue words.
TINY_WORDS = [
    "a", "an", "the", "of", "on", "in", "and", "with", "photo", "painting", "drawing", "small", "big",
    "red", "green", "blue", "yellow", "black", "white", "cat", "dog", "bird", "car", "house", "tree",
    "flower", "circle", "square", "triangle", "sky", "sea", "field", "city", "night", "day",
]


def _word_symbols(word: str) -> tuple[str, ...]:
    """CLIP's initial BPE split: one symbol per letter, the last one marked as the end of a word."""
    return tuple(word[:-1]) + (word[-1] + END_OF_WORD,)


def _bpe(symbols: tuple[str, ...], ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Apply BPE merges (lowest rank first, every occurrence left to right) until none applies."""
    while len(symbols) > 1:
        pairs = set(pairwise(symbols))
        best = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = tuple(merged)
    return symbols


def _check_words(words: list[str]) -> list[str]:
    words = list(dict.fromkeys(w.strip().lower() for w in words))
    if not words:
        raise ValueError("the word list is empty: pass at least one word")
    for w in words:
        if not re.fullmatch(r"[a-z]+", w):
            raise ValueError(
                f"word {w!r} cannot be one CLIP token: CLIP splits digits, spaces and punctuation into separate "
                "tokens, so use lowercase ASCII letters only"
            )
    return words


def word_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges under which every word of `words` encodes to the single token word + '</w>'.

    A merge appended later has the lowest priority, so it never changes how an earlier word is merged:
    each word only gains the merges it needs when it gets stuck.
    """
    words = _check_words(words)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _bpe(_word_symbols(word), ranks)
        while len(pieces) > 1:
            ranks[pieces[:2]] = len(ranks)
            pieces = _bpe(_word_symbols(word), ranks)
    merges = sorted(ranks, key=ranks.get)
    base = sorted({s for w in words for s in _word_symbols(w)})
    tokens = list(dict.fromkeys(base + [a + b for a, b in merges]))
    # The special tokens come last, as in CLIP, so the end-of-text id is the largest id.
    tokens += [UNK, BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def build_word_tokenizer(words: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """An in-memory CLIPTokenizer whose vocabulary is `words` (one token each) plus letters and specials."""
    vocab, merges = word_bpe(words)
    return CLIPTokenizer(
        vocab=vocab, merges=merges, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        model_max_length=model_max_length,
    )


def save_word_tokenizer(directory, words: list[str], model_max_length: int = 77) -> None:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, tokenizer.json, config) that loads offline."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = word_bpe(words)
    build_word_tokenizer(words, model_max_length).save_pretrained(directory)
    # vocab.json + merges.txt are what CLIP tokenizers of every transformers version can read.
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
