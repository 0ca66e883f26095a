"""Export -> load into a fresh diffusers pipeline -> the same network, on the tiny SD1.5 and SDXL teachers.

Covers the three LoRA-file pitfalls of consistency.md sec. 4.7 (base_model.model prefix, mixed key styles,
missing alpha), the recipe, pipelines.load / generate (fused, merged, extra LoRAs, tiny VAE) and the custom
pipeline file.
"""

import json
import logging
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderTiny, DiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from stepdistill import pipelines
from stepdistill.core.denoiser import active_adapter
from stepdistill.core.lora import adapter_state_dict, add_adapter
from stepdistill.core.recipe import RECIPE_FILE, Recipe
from stepdistill.export import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    export_lora,
    load_diffusers_lora,
    merge_into_unet,
    save_diffusers_lora,
    save_kohya_lora,
)

RANK = 4
CUSTOM_PIPELINE = Path(pipelines.__file__).parent / "stepdistill_pipeline.py"
# The only warning a UNet-only LoRA may cause: diffusers notes that the text encoders got no LoRA keys.
BENIGN = "No LoRA keys associated to CLIPText"

torch.set_num_threads(1)


def base_dir(request, family):
    return request.getfixturevalue(f"tiny_{family}_dir")


def unet_inputs(unet):
    """Fixed UNet inputs; SDXL's added conditioning when the UNet has the text_time embedding."""
    g = torch.Generator().manual_seed(0)
    config = unet.config
    inputs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([999, 250]),
        encoder_hidden_states=torch.randn(2, 5, config.cross_attention_dim, generator=g),
    )
    if config.addition_embed_type == "text_time":
        n_time_ids = 6
        pooled = config.projection_class_embeddings_input_dim - n_time_ids * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, pooled, generator=g), "time_ids": torch.randn(2, n_time_ids, generator=g) * 100,
        }
    return inputs


@torch.no_grad()
def unet_out(unet, inputs):
    return unet(**inputs).sample


def train_like_lora(pipe, alpha, seed=0, name="student", targets="full"):
    """A student adapter with random, non-zero A and B (as after training); returns its canonical state."""
    params = add_adapter(pipe.unet, name, RANK, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter_state_dict(pipe.unet, name)


@pytest.fixture(params=["sd15", "sdxl"])
def family(request):
    return request.param


@pytest.fixture
def student(request, family):
    """(state, output under the adapter, output of the bare base) on the family's tiny teacher."""
    alpha = getattr(request, "param", 2)
    pipe = DiffusionPipeline.from_pretrained(base_dir(request, family))
    state = train_like_lora(pipe, alpha)
    inputs = unet_inputs(pipe.unet)
    with active_adapter(pipe.unet, "student"):
        ref = unet_out(pipe.unet, inputs)
    with active_adapter(pipe.unet, None):
        base = unet_out(pipe.unet, inputs)
    assert (ref - base).abs().max() > 1e-2  # the LoRA changes the network: the comparisons below mean something
    return state, alpha, ref, base


@contextmanager
def captured():
    """Collect diffusers/PEFT log records (warning and up) and Python warnings."""
    messages = []

    class Handler(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Handler(logging.WARNING)
    logging.getLogger("diffusers").addHandler(handler)
    logging.getLogger("peft").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
        logging.getLogger("peft").removeHandler(handler)
        messages.extend(str(w.message) for w in caught)


def assert_clean(messages):
    problems = [m for m in messages if not m.startswith(BENIGN)]
    assert not problems, problems


def lora_problems(messages):
    """Messages about LoRA weights that were not loaded (the benign text-encoder note aside)."""
    return [m for m in messages if ("unexpected" in m.lower() or "missing" in m.lower()) and not m.startswith(BENIGN)]


def recipe_for(base, family, alpha, **overrides):
    fields = dict(base_model=str(base), family=family, method="dmd", scheduler_class="TCDScheduler",
                  scheduler_config={"timestep_spacing": "trailing"}, num_inference_steps=2, guidance_scale=1.0,
                  eta=0.0, lora_rank=RANK, lora_alpha=alpha, training_steps=10)
    return Recipe(**{**fields, **overrides})


@pytest.mark.parametrize("student", [2, RANK], indirect=True, ids=["alpha2", "alpha=rank"])
def test_export_loads_into_fresh_pipeline_exactly(request, tmp_path, family, student):
    state, alpha, ref, _ = student
    save_diffusers_lora(state, tmp_path / "diffusers", RANK, alpha, targets="full")
    save_kohya_lora(state, tmp_path / "kohya" / KOHYA_WEIGHT_NAME, RANK, alpha)

    for fmt in ("diffusers", "kohya"):
        pipe = DiffusionPipeline.from_pretrained(base_dir(request, family))
        with captured() as messages:
            pipe.load_lora_weights(str(tmp_path / fmt), adapter_name="distilled")
        assert_clean(messages)
        out = unet_out(pipe.unet, unet_inputs(pipe.unet))
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=fmt)


SD15_ONLY = pytest.mark.parametrize("family", ["sd15"])  # format-level checks: one family is enough


@SD15_ONLY
def test_written_keys_rule_out_the_known_pitfalls(tmp_path, student):
    state, alpha, _, _ = student
    modules = {k.rsplit(".lora_", 1)[0] for k in state}

    path = save_diffusers_lora(state, tmp_path / "diffusers", RANK, alpha)
    written = load_file(path)
    assert set(written) == {f"unet.{k}" for k in state}
    for k in written:
        # (a) no PEFT wrapper prefix, (b) one key style only: never `lora.down` beside `lora_A`.
        assert "base_model" not in k and ".lora.down" not in k and ".lora.up" not in k
        assert k.endswith((".lora_A.weight", ".lora_B.weight"))
    # (c) alpha travels with the file, in the metadata diffusers reads.
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.r"] == RANK and meta["unet.lora_alpha"] == alpha
    assert sorted(meta["unet.target_modules"]) == sorted(modules)
    back, rank, alpha_back = load_diffusers_lora(tmp_path / "diffusers")
    assert (rank, alpha_back) == (RANK, alpha)
    assert all(torch.equal(back[k], state[k]) for k in state)

    written = load_file(save_kohya_lora(state, tmp_path / "kohya.safetensors", RANK, alpha))
    assert len(written) == 3 * len(modules)
    for module in modules:
        name = "lora_unet_" + module.replace(".", "_")
        assert torch.equal(written[f"{name}.lora_down.weight"], state[f"{module}.lora_A.weight"])
        assert torch.equal(written[f"{name}.lora_up.weight"], state[f"{module}.lora_B.weight"])
        assert written[f"{name}.alpha"].item() == alpha


@SD15_ONLY
def test_without_alpha_the_same_weights_load_at_the_wrong_scale(request, tmp_path, family, student):
    """Why the metadata matters (pitfall c): strip it and diffusers falls back to alpha = rank."""
    state, alpha, ref, _ = student
    path = save_diffusers_lora(state, tmp_path, RANK, alpha)
    save_file(load_file(path), path)
    pipe = DiffusionPipeline.from_pretrained(base_dir(request, family))
    pipe.load_lora_weights(str(tmp_path))
    assert (unet_out(pipe.unet, unet_inputs(pipe.unet)) - ref).abs().max() > 1e-2


@SD15_ONLY
def test_writers_refuse_non_canonical_state(tmp_path, student):
    state, alpha, _, _ = student
    with pytest.raises(ValueError, match="base_model.model"):
        save_diffusers_lora({f"base_model.model.{k}": v for k, v in state.items()}, tmp_path, RANK, alpha)
    mixed = {k.replace(".lora_A.", ".lora.down.") if "to_q" in k else k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="not canonical"):
        save_kohya_lora(mixed, tmp_path / "k.safetensors", RANK, alpha)
    with pytest.raises(ValueError, match="rank"):
        save_diffusers_lora(state, tmp_path, 8, alpha)
    with pytest.raises(ValueError, match="targets"):
        save_diffusers_lora(state, tmp_path, RANK, alpha, targets="attn")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_load_generate_fused_equals_unfused(request, tmp_path, family, student):
    state, alpha, ref, _ = student
    base = base_dir(request, family)
    save_diffusers_lora(state, tmp_path, RANK, alpha)
    recipe = recipe_for(base, family, alpha)
    recipe.save(tmp_path)

    with captured() as messages:
        pipe = pipelines.load(None, tmp_path)
    assert not lora_problems(messages) and not [m for m in messages if m.startswith(BENIGN)]
    assert type(pipe.scheduler).__name__ == "TCDScheduler" and pipe.scheduler.config.timestep_spacing == "trailing"
    torch.testing.assert_close(unet_out(pipe.unet, unet_inputs(pipe.unet)), ref, rtol=0, atol=1e-5)

    unfused = pipelines.load(base, tmp_path, lora_scale=0.5)
    fused = pipelines.load(base, tmp_path, lora_scale=0.5, fuse=True)
    assert not any(hasattr(m, "lora_A") for m in fused.unet.modules())  # really baked in, adapters gone
    a = pipelines.generate(unfused, recipe, ["a red cat", "a blue car"], seed=3, output_type="latent")
    b = pipelines.generate(fused, recipe, ["a red cat", "a blue car"], seed=3, output_type="latent")
    assert a.shape == (2, 4, 8, 8)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    full = pipelines.generate(pipe, recipe, ["a red cat", "a blue car"], seed=3, output_type="latent")
    assert (full - a).abs().max() > 1e-3  # lora_scale is applied

    images = pipelines.generate(pipe, recipe, "a red cat", seed=3)
    assert len(images) == 1 and images[0].size == (16, 16)


def test_custom_pipeline_file_matches_pipelines_load(request, tmp_path, monkeypatch, family, student):
    import diffusers.utils.dynamic_modules_utils as dynamic_modules

    # diffusers copies custom-pipeline files into its modules cache: keep that inside the test's folder.
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    state, alpha, _, _ = student
    base = base_dir(request, family)
    lora_dir = tmp_path / "lora"
    save_diffusers_lora(state, lora_dir, RANK, alpha)
    recipe = recipe_for(base, family, alpha, lora_scale=0.7, eta=0.3)
    recipe.save(lora_dir)

    expected = pipelines.generate(pipelines.load(None, lora_dir), recipe, ["a red cat"], seed=1, output_type="latent")
    pipe = DiffusionPipeline.from_pretrained(base, custom_pipeline=str(CUSTOM_PIPELINE), trust_remote_code=True)
    pipe.load_stepdistill(lora_dir)
    assert type(pipe.scheduler).__name__ == "TCDScheduler"
    out = pipe(["a red cat"], generator=torch.Generator().manual_seed(1), output_type="latent").images
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@SD15_ONLY
def test_merged_and_kohya_exports_of_a_run(request, tmp_path, family, student):
    state, alpha, ref, _ = student
    base = base_dir(request, family)
    final = tmp_path / "run" / "final"
    save_diffusers_lora(state, final, RANK, alpha)
    recipe = recipe_for(base, family, alpha)
    recipe.save(final)
    expected = pipelines.generate(pipelines.load(None, final), recipe, ["a red cat"], seed=0, output_type="latent")

    merged = export_lora(final, "merged", tmp_path / "merged")
    assert (merged / RECIPE_FILE).is_file() and (merged / "unet" / "config.json").is_file()
    unet = UNet2DConditionModel.from_pretrained(merged, subfolder="unet")
    torch.testing.assert_close(unet_out(unet, unet_inputs(unet)), ref, rtol=0, atol=1e-5)
    out = pipelines.generate(pipelines.load(None, merged), recipe, ["a red cat"], seed=0, output_type="latent")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)

    kohya = export_lora(final, "kohya", tmp_path / "kohya")
    assert {p.name for p in kohya.iterdir()} == {KOHYA_WEIGHT_NAME, RECIPE_FILE}
    out = pipelines.generate(pipelines.load(None, kohya), recipe, ["a red cat"], seed=0, output_type="latent")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    again = export_lora(final, "diffusers", tmp_path / "diffusers")
    assert {p.name for p in again.iterdir()} == {RECIPE_FILE, DIFFUSERS_WEIGHT_NAME}
    with pytest.raises(ValueError, match="format"):
        export_lora(final, "ckpt", tmp_path / "x")


def test_extra_lora_and_tiny_vae(request, tmp_path):
    base = base_dir(request, "sd15")
    pipe = DiffusionPipeline.from_pretrained(base)
    ours, style = train_like_lora(pipe, 2, seed=0), train_like_lora(pipe, 4, seed=1, name="style", targets="attn")
    save_diffusers_lora(ours, tmp_path / "ours", RANK, 2)
    save_diffusers_lora(style, tmp_path / "style", RANK, 4)
    recipe_for(base, "sd15", 2).save(tmp_path / "ours")

    # Reference: both LoRAs merged by hand into a clean UNet, the style LoRA at ratio 0.5.
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    merge_into_unet(unet, ours, RANK, 2)
    merge_into_unet(unet, style, RANK, 4, lora_scale=0.5)
    inputs = unet_inputs(pipe.unet)

    taesd = tmp_path / "taesd"
    AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
                    num_decoder_blocks=(1, 1), latent_channels=4).save_pretrained(taesd)
    loaded = pipelines.load(
        None, tmp_path / "ours", extra_loras=[(tmp_path / "style" / DIFFUSERS_WEIGHT_NAME, 0.5)], vae=taesd,
    )
    torch.testing.assert_close(unet_out(loaded.unet, inputs), unet_out(unet, inputs), rtol=0, atol=1e-5)
    assert isinstance(loaded.vae, AutoencoderTiny)
    images = pipelines.generate(loaded, Recipe.load(tmp_path / "ours"), ["a red cat"], seed=0)
    assert images[0].size == (16, 16)


def test_lora_for_another_base_is_a_clear_error(request, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(base_dir(request, "sd15"))
    state = train_like_lora(pipe, 2)
    save_diffusers_lora(state, tmp_path, RANK, 2)
    sdxl = base_dir(request, "sdxl")

    recipe_for(base_dir(request, "sd15"), "sd15", 2).save(tmp_path)
    with pytest.raises(ValueError, match="trained for sd15"):
        pipelines.load(sdxl, tmp_path)
    # Even when the recipe lies about the family, the keys and shapes give the LoRA away.
    recipe_for(sdxl, "sdxl", 2).save(tmp_path)
    with pytest.raises(ValueError, match="trained for sdxl .* does not fit"):
        pipelines.load(None, tmp_path)


def test_recipe_roundtrip_and_errors(tmp_path):
    recipe = recipe_for("some/base", "sd15", 2, timesteps=[999, 499], notes="2-step")
    recipe.save(tmp_path)
    loaded = Recipe.load(tmp_path)
    assert loaded == recipe and loaded.num_inference_steps == 2
    assert loaded.call_kwargs() == {"guidance_scale": 1.0, "eta": 0.0, "timesteps": [999, 499]}
    assert not [p for p in tmp_path.iterdir() if p.name != RECIPE_FILE]  # no temp files left

    with pytest.raises(FileNotFoundError, match="stepdistill.json"):
        Recipe.load(tmp_path / "nowhere")
    data = json.loads((tmp_path / RECIPE_FILE).read_text())
    for change, error in [({"format_version": 99}, "upgrade stepdistill"),
                          ({"scheduler_class": "TCDSchedular"}, "TCDScheduler"),
                          ({"guidance": 2.0}, "guidance_scale"),
                          ({"family": "sd4"}, "family")]:
        (tmp_path / RECIPE_FILE).write_text(json.dumps({**data, **change}))
        with pytest.raises(ValueError, match=error):
            Recipe.load(tmp_path)

    from diffusers import DDIMScheduler

    ddim = DDIMScheduler()
    with pytest.raises(ValueError, match="cannot take them"):
        recipe.call_kwargs(ddim)
    steps = recipe_for("b", "sd15", 2, scheduler_class="DDIMScheduler")
    assert steps.call_kwargs(ddim) == {"guidance_scale": 1.0, "eta": 0.0, "num_inference_steps": 2}
    assert isinstance(steps.make_scheduler(ddim.config), DDIMScheduler)


@pytest.mark.parametrize("returns_tuple", [True, False])
def test_lora_shapes_read_both_loader_return_styles(returns_tuple):
    """SD1.5/SDXL's lora_state_dict returns (state, alphas); SD3's and FLUX's return the state alone (an SD3 student's
    `eval toy --lora` failed with KeyError 0 on it)."""
    state = {"transformer.blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
             "transformer.blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4)}

    class Stub:
        def lora_state_dict(self, path):
            return (state, None) if returns_tuple else state

    assert pipelines._denoiser_lora_shapes(Stub(), "unused", "transformer") == {"blocks.0.attn.to_q": {"A": (4, 64), "B": (64, 4)}}
