"""The LRU prompt-embedding cache of generation (models/prompt_cache.py): hits return the stored tensors, entries are
keyed by encoder and resolution, misses in a batch are encoded together, and the cache stays within its size."""

from __future__ import annotations

import pytest
import torch

from stepdistill.core.denoiser import Cond
from stepdistill.models.prompt_cache import PromptCache


class CountingModel:
    """A family model stand-in: one text encoder module; each prompt encodes to a tensor derived from its text."""

    def __init__(self, offset: float = 0.0):
        self.text_encoders = [torch.nn.Linear(1, 1)]
        self.offset, self.calls = offset, []

    def encode_prompts(self, prompts, resolution=None):
        self.calls.append(list(prompts))
        rows = [torch.full((1, 3, 4), float(sum(map(ord, p))) + self.offset + (resolution or 0)) for p in prompts]
        pooled = torch.stack([r[0, 0] for r in rows])
        return Cond(torch.cat(rows), {"text_embeds": pooled})


def test_a_hit_returns_the_stored_tensors_without_encoding():
    model, cache = CountingModel(), PromptCache(maxsize=4)
    first = cache.encode(model, ["a cat"], 512)
    second = cache.encode(model, ["a cat"], 512)
    assert model.calls == [["a cat"]]
    assert second.encoder_hidden_states is first.encoder_hidden_states  # the stored tensor itself: no copy, no work
    torch.testing.assert_close(first.encoder_hidden_states, model.encode_prompts(["a cat"], 512).encoder_hidden_states)
    assert (cache.hits, cache.misses) == (1, 1)


def test_a_batch_encodes_only_its_misses_in_one_call_and_keeps_its_order():
    model, cache = CountingModel(), PromptCache()
    cache.encode(model, ["b"])
    out = cache.encode(model, ["a", "b", "c", "a"])
    assert model.calls == [["b"], ["a", "c"]]
    direct = model.encode_prompts(["a", "b", "c", "a"])
    assert torch.equal(out.encoder_hidden_states, direct.encoder_hidden_states)
    assert torch.equal(out.added_cond_kwargs["text_embeds"], direct.added_cond_kwargs["text_embeds"])


def test_entries_are_keyed_by_encoder_and_resolution():
    cache = PromptCache()
    one, other = CountingModel(0.0), CountingModel(1000.0)
    a = cache.encode(one, ["a cat"], 512)
    b = cache.encode(other, ["a cat"], 512)
    c = cache.encode(one, ["a cat"], 1024)  # SDXL's conditioning carries the size
    assert len(cache) == 3 and len(one.calls) == 2 and len(other.calls) == 1
    assert not torch.equal(a.encoder_hidden_states, b.encoder_hidden_states)
    assert not torch.equal(a.encoder_hidden_states, c.encoder_hidden_states)


def test_the_cache_is_bounded_and_evicts_the_least_recently_used():
    model, cache = CountingModel(), PromptCache(maxsize=2)
    cache.encode(model, ["a"])
    cache.encode(model, ["b"])
    cache.encode(model, ["a"])  # a is now the most recent
    cache.encode(model, ["c"])  # evicts b
    assert len(cache) == 2
    cache.encode(model, ["a"])
    cache.encode(model, ["b"])
    assert model.calls == [["a"], ["b"], ["c"], ["b"]]
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptCache(maxsize=0)


def test_stored_entries_are_copies_of_the_encoder_output():
    """An encoder run as a CUDA graph overwrites its output on the next call: the cache must own its tensors."""
    model, cache = CountingModel(), PromptCache()
    shared = torch.zeros(1, 3, 4)
    model.encode_prompts = lambda prompts, resolution=None: Cond(shared, None)
    out = cache.encode(model, ["x"])
    shared.fill_(7.0)  # what a graph replay does to its static output
    assert torch.equal(cache.encode(model, ["x"]).encoder_hidden_states, torch.zeros(1, 3, 4))
    assert out.encoder_hidden_states.data_ptr() != shared.data_ptr()


def test_a_tiny_sdxl_model_gives_the_same_conditioning_through_the_cache():
    from stepdistill.models.random_init import build_family_model

    torch.set_num_threads(1)
    model = build_family_model("sdxl", True, "tiny", "cpu", torch.float32)
    cache = PromptCache()
    prompts = ["a red circle", "a blue square"]
    direct = model.encode_prompts(prompts, 64)
    cached = cache.encode(model, prompts, 64)
    cache.encode(model, prompts[::-1], 64)
    again = cache.encode(model, prompts, 64)
    for out in (cached, again):
        torch.testing.assert_close(out.encoder_hidden_states, direct.encoder_hidden_states)
        for key, value in direct.added_cond_kwargs.items():
            torch.testing.assert_close(out.added_cond_kwargs[key], value)
    assert (cache.hits, cache.misses) == (4, 2)


def test_a_pipeline_with_the_cache_skips_the_text_encoder_for_a_repeated_prompt():
    """`stepdistill generate` puts the cache in front of the diffusers pipeline's encode_prompt."""
    from stepdistill.models.prompt_cache import cache_pipeline_prompts
    from stepdistill.models.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    pipe = build_tiny_pipeline("sd15")
    pipe.set_progress_bar_config(disable=True)
    runs = []
    pipe.text_encoder.register_forward_hook(lambda *_: runs.append(1))

    def sample(prompt, seed=0):
        return pipe(prompt, num_inference_steps=1, output_type="latent", guidance_scale=1.0,
                    generator=torch.Generator().manual_seed(seed)).images

    plain = sample("a red circle")
    cache = cache_pipeline_prompts(pipe)
    first, again = sample("a red circle"), sample("a red circle", seed=0)
    sample("a blue square")
    assert len(runs) == 3  # uncached, first cached call, the new prompt; the repeat ran no encoder
    assert (cache.hits, cache.misses) == (1, 2)
    torch.testing.assert_close(first, plain)
    torch.testing.assert_close(again, plain)
    embeds = torch.randn(1, 77, pipe.text_encoder.config.hidden_size)
    pipe(prompt_embeds=embeds, num_inference_steps=1, output_type="latent", guidance_scale=1.0)
    assert (cache.hits, cache.misses) == (1, 2)  # precomputed embeddings pass straight through
