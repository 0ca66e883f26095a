"""Tiny SD3 and FLUX.1 pipelines built offline: saved folders load with the stock pipelines and generate, the
pipelines visit core.flow's sigmas and tell the transformer core.flow's timestep, and the T5 word tokenizer
round-trips."""

import numpy as np
import pytest
import torch

from stepdistill.core.flow import (
    image_seq_len,
    mu_from_config,
    network_timestep,
    scheduler_sigmas,
    uniform_sigmas,
)
from stepdistill.models.tiny import TINY_PROMPTS
from stepdistill.models.tiny_flow import (
    FLUX_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    build_t5_word_tokenizer,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    save_tiny_flux_pipeline,
    save_tiny_sd3_pipeline,
    tiny_flux_configs,
    tiny_sd3_configs,
)

torch.set_num_threads(1)

BUILDERS = {"sd3": (build_tiny_sd3_pipeline, save_tiny_sd3_pipeline, "StableDiffusion3Pipeline"),
            "flux": (build_tiny_flux_pipeline, save_tiny_flux_pipeline, "FluxPipeline")}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def saved(request, tmp_path_factory):
    build, save, _ = BUILDERS[request.param]
    folder = save(tmp_path_factory.mktemp(request.param) / "pipe", seed=3)
    return request.param, folder, build(seed=3)


def generate(pipe, size, steps=2, **kwargs):
    return pipe(TINY_PROMPTS[0], num_inference_steps=steps, height=size[0], width=size[1], output_type="np",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("size", [(32, 32), (64, 32)])
def test_saved_folder_loads_with_the_stock_pipeline_and_generates(saved, size, monkeypatch):
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, folder, in_memory = saved
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe).__name__ == BUILDERS[family][2]
    pipe.set_progress_bar_config(disable=True)
    in_memory.set_progress_bar_config(disable=True)
    images = generate(pipe, size)
    assert images.shape == (1, *size, 3) and np.isfinite(images).all()
    assert images.std() > 0  # a random-init decoder still draws something, not a constant
    np.testing.assert_allclose(images, generate(in_memory, size), atol=1e-5)  # the folder is the same pipeline


def test_tiny_pipelines_are_tiny_and_reproducible():
    for family, (build, _, _) in BUILDERS.items():
        a, b = build(seed=1), build(seed=1)
        total = 0
        for name, module in a.components.items():
            if isinstance(module, torch.nn.Module):
                params = dict(module.named_parameters())
                total += sum(p.numel() for p in params.values())
                other = dict(b.components[name].named_parameters())
                assert all(torch.equal(params[k], other[k]) for k in params), (family, name)
        assert total < 600_000, (family, total)
    # Overriding one part leaves the other parts' weights unchanged.
    base = build_tiny_flux_pipeline(seed=1)
    wider = build_tiny_flux_pipeline(seed=1, arch={"transformer": {"num_single_layers": 3}})
    assert torch.equal(base.vae.decoder.conv_out.weight, wider.vae.decoder.conv_out.weight)


def capture_transformer_calls(pipe):
    calls = []

    def hook(module, args, kwargs):
        calls.append({k: kwargs.get(k) for k in ("timestep", "guidance", "encoder_hidden_states", "pooled_projections",
                                                 "hidden_states", "txt_ids", "img_ids")})

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    pipe.set_progress_bar_config(disable=True)
    return calls


@pytest.mark.parametrize("steps", [1, 4])
def test_sd3_pipeline_visits_core_flow_sigmas(steps):
    pipe = build_tiny_sd3_pipeline()
    calls = capture_transformer_calls(pipe)
    generate(pipe, (32, 32), steps=steps, guidance_scale=1.0)
    sigmas = scheduler_sigmas(steps, SD3_SCHEDULER_CONFIG)
    told = torch.stack([c["timestep"][0] for c in calls]).double()
    assert torch.allclose(told, network_timestep(sigmas[:-1], 1000.0), atol=2e-4)  # SD3: t = 1000 sigma
    assert torch.allclose(pipe.scheduler.sigmas.double(), sigmas, atol=2e-7)
    # What a family's encode_prompt must reproduce: CLIP-L | CLIP-G hidden states padded to T5's width, then the
    # T5 sequence after them; pooled = both projections concatenated. Latents stay (B, 16, h, w).
    c = calls[0]
    assert c["encoder_hidden_states"].shape == (1, 77 + 256, 128)
    assert c["pooled_projections"].shape == (1, 16 + 40)
    assert c["hidden_states"].shape == (1, 16, 16, 16)


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("size", [(32, 32), (64, 64), (32, 64)])
def test_flux_pipeline_visits_core_flow_sigmas(steps, size):
    pipe = build_tiny_flux_pipeline()
    calls = capture_transformer_calls(pipe)
    generate(pipe, size, steps=steps, guidance_scale=3.5)
    n_tokens = image_seq_len(*size, vae_scale_factor=pipe.vae_scale_factor, patch_size=2)
    mu = mu_from_config(FLUX_SCHEDULER_CONFIG, n_tokens)
    sigmas = scheduler_sigmas(steps, FLUX_SCHEDULER_CONFIG, mu, uniform_sigmas(steps))
    told = torch.stack([c["timestep"][0] for c in calls]).double()
    assert torch.allclose(told, network_timestep(sigmas[:-1], 1.0), atol=2e-7)  # FLUX: t / 1000 = sigma
    assert torch.allclose(pipe.scheduler.sigmas.double(), sigmas, atol=2e-7)
    c = calls[0]
    assert c["guidance"].tolist() == [3.5]  # raw scale; the transformer multiplies by 1000
    # Packed latents: 2x2 patches of 16 channels -> (B, tokens, 64); rotary ids (row, col) per token, zeros for text.
    h, w = size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor
    assert c["hidden_states"].shape == (1, n_tokens, 64) and n_tokens == (h // 2) * (w // 2)
    assert c["img_ids"].shape == (n_tokens, 3) and c["img_ids"][-1].tolist() == [0, h // 2 - 1, w // 2 - 1]
    assert c["encoder_hidden_states"].shape == (1, 512, 64) and not c["txt_ids"].any()
    assert c["pooled_projections"].shape == (1, 32)


def test_t5_word_tokenizer_round_trips(tmp_path):
    from transformers import T5TokenizerFast

    tok = build_t5_word_tokenizer(model_max_length=16)
    ids = tok("a red cat").input_ids
    assert len(ids) == 4 and ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    assert tok.convert_ids_to_tokens(ids[:3]) == ["\u2581a", "\u2581red", "\u2581cat"]
    assert tok("zebra?").input_ids[-1] == 1  # unknown text splits into letters / <unk>, never raises
    tok.save_pretrained(tmp_path)
    again = T5TokenizerFast.from_pretrained(tmp_path)
    batch = again(TINY_PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids
    assert batch == tok(TINY_PROMPTS, padding="max_length", max_length=16, truncation=True).input_ids


def test_config_errors_say_what_to_do():
    with pytest.raises(ValueError, match="text_encoder_3.d_model"):
        tiny_sd3_configs(arch={"text_encoder_3": {"d_model": 64}})
    with pytest.raises(ValueError, match="axes_dims_rope"):
        tiny_flux_configs(arch={"transformer": {"attention_head_dim": 32}})
    with pytest.raises(ValueError, match="unknown parts"):
        tiny_flux_configs(arch={"text_encoder_3": {}})
