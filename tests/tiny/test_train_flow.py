"""dmd and tscd on tiny flow-matching teachers (SD3, FLUX.1-dev): losses finite, adapters trained, base bit-identical,
and the exported LoRA + recipe reproduce the training-time student in a fresh stock StableDiffusion3Pipeline /
FluxPipeline with the recipe's FlowMatchEulerDiscreteScheduler. Every LoRA tensor in the files is applied (diffusers
and, for FLUX, the kohya / ComfyUI layout). Methods that cannot distil a flow teacher refuse in one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from safetensors.torch import load_file

from stepdistill import pipelines
from stepdistill.card import CARD_FILE
from stepdistill.config import ConfigError, load_config
from stepdistill.core.lora import adapter_state_dict
from stepdistill.core.recipe import Recipe
from stepdistill.export import (
    DIFFUSERS_WEIGHT_NAME,
    KOHYA_WEIGHT_NAME,
    export_lora,
    export_run,
    save_diffusers_lora,
    save_kohya_lora,
)
from stepdistill.models.families.flux import FluxModel
from stepdistill.registry import get_method
from stepdistill.train.build import _families_with
from stepdistill.train.loop import Trainer

from .helpers import (
    ROOT,
    applied_lora_layers,
    assert_bf16_student_equals_the_pipeline,
    fresh_pipeline,
    lora_file_modules,
    run_pipeline,
    student_latents,
)

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
RUNS = {
    "dmd_sd3": ("sd3", "configs/tiny/dmd_sd3.yaml"),
    "dmd_sd3_4step": ("sd3", "configs/tiny/dmd_sd3_4step.yaml"),
    "tscd_sd3": ("sd3", "configs/tiny/tscd_sd3.yaml"),
    "dmd_flux": ("flux", "configs/tiny/dmd_flux.yaml"),
    # A multi-step FLUX student: its timesteps below 1000 are where bf16 timestep arithmetic differs.
    "dmd_flux_4step": ("flux", "configs/tiny/dmd_flux.yaml", ["method.timesteps=[999,749,499,249]"]),
    "tscd_flux": ("flux", "configs/tiny/tscd_flux.yaml"),
    # A short T5 length (model.max_sequence_length): the recipe carries it to the stock pipeline call.
    "dmd_sd3_t5len8": ("sd3", "configs/tiny/dmd_sd3.yaml", ["model.max_sequence_length=8"]),
    "dmd_flux_t5len8": ("flux", "configs/tiny/dmd_flux.yaml", ["model.max_sequence_length=8"]),
}
PROMPT = "a red cat on the sea"

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, prompts_file, tmp_path_factory):
    family, preset, *sets = RUNS[request.param]
    model = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = load_config(ROOT / preset, [f"model.path={model}", f"data.prompts={prompts_file}", "loop.progress=false",
                                      *(sets[0] if sets else [])])
    trainer = Trainer(cfg, tmp_path_factory.mktemp(request.param) / "run")
    return family, model, trainer, trainer.run()


def test_losses_finite_recipe_and_base_unchanged(trained):
    family, model, trainer, final = trained
    lines = [json.loads(x) for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert lines and all(x["nonfinite_steps"] == 0 and math.isfinite(x["loss"]) for x in lines)
    recipe = Recipe.load(final)
    assert recipe.family == family and recipe.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    assert recipe.sigmas and recipe.sigmas[0] == 1.0 and recipe.timesteps is None
    assert recipe.guidance_scale == (3.5 if family == "flux" else 0.0)
    if recipe.method == "dmd":
        assert recipe.sigmas == [(t + 1) / 1000 for t in trainer.cfg.method.timesteps]
    # The LoRA trained (lora_B starts at 0), on MMDiT attention and feed-forward layers under the transformer prefix.
    tensors = load_file(str(final / DIFFUSERS_WEIGHT_NAME))
    assert all(k.startswith("transformer.") for k in tensors)
    assert any(v.abs().max() > 0 for k, v in tensors.items() if "lora_B" in k)
    assert any(".ff.net.2." in k for k in tensors) and any("add_q_proj" in k for k in tensors)
    # The frozen base is bit-identical to the folder's.
    fresh = type(trainer.built.family.unet).from_pretrained(model, subfolder="transformer").state_dict()
    base = {n.replace(".base_layer", ""): p for n, p in trainer.built.nets.denoiser.state_dict().items() if "lora_" not in n}
    assert base.keys() == fresh.keys() and all(torch.equal(base[k], fresh[k]) for k in fresh)


def test_export_reproduces_the_student_in_a_stock_pipeline(trained):
    family, model, trainer, final = trained
    ours, _, x_T = student_latents(trainer.built, PROMPT)
    pipe, recipe = fresh_pipeline(PIPELINES[family], model, final)
    # The T5 length trained at travels in the recipe (the configured one, else the family's default).
    assert recipe.max_sequence_length == (trainer.cfg.model.max_sequence_length or type(trainer.built.family).t5_max_length)
    # Every LoRA module in the file became a LoRA layer of the transformer.
    assert applied_lora_layers(pipe.transformer) == len(lora_file_modules(final / DIFFUSERS_WEIGHT_NAME))
    theirs = run_pipeline(pipe, recipe, PROMPT, x_T)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()
    # ... and the LoRA matters: the bare base gives something else.
    bare = PIPELINES[family].from_pretrained(model)
    bare.set_progress_bar_config(disable=True)
    bare.scheduler = recipe.make_scheduler(bare.scheduler.config)
    assert (run_pipeline(bare, recipe, PROMPT, x_T) - theirs).abs().max() > 1e-4


def test_bf16_student_output_equals_the_bf16_pipelines_at_every_recipe_timestep(trained):
    """Base and adapters in bf16: at each step of the recipe, the stock pipeline's transformer output equals the
    training-time student's on the same latents and text, to bf16 rounding (helpers). A student told another timestep
    than the pipeline tells it (the old bf16 cast of 1000 sigma) misses by 4-10 rounding units at t = 749 / 499."""
    _, model, trainer, final = trained
    visited = assert_bf16_student_equals_the_pipeline(trainer.built, model, final, PROMPT)
    assert visited == [round(u * 1000) - 1 for u in Recipe.load(final).sigmas]


def test_pipelines_load_fused_and_merged_export_reproduce_the_student(trained, tmp_path):
    """pipelines.load gives the family's stock pipeline with the recipe's scheduler, running the training-time student:
    with the LoRA loaded (every module of the file applied), fused into the weights, and from a `stepdistill export
    --format merged` folder (the merged transformer, no LoRA file)."""
    family, model, trainer, final = trained
    ours, _, x_T = student_latents(trainer.built, PROMPT)
    recipe = Recipe.load(final)
    merged = export_run(trainer.out, "merged", tmp_path / "merged")
    # A whole pipeline folder (issue 37): the merged transformer beside the base's other parts, no LoRA file.
    assert (merged / "transformer" / "config.json").is_file() and (merged / "model_index.json").is_file()
    assert not list(merged.glob("*.safetensors"))
    # Its model card loads the folder alone.
    assert "pipe = DiffusionPipeline.from_pretrained(model)" in (merged / CARD_FILE).read_text()
    loaded = {"lora": pipelines.load(model, final), "fused": pipelines.load(model, final, fuse=True),
              "merged": pipelines.load(None, merged)}
    assert applied_lora_layers(loaded["lora"].transformer) == len(lora_file_modules(final / DIFFUSERS_WEIGHT_NAME))
    for how, pipe in loaded.items():
        assert type(pipe) is PIPELINES[family] and type(pipe.scheduler).__name__ == recipe.scheduler_class, how
        if how != "lora":
            assert applied_lora_layers(pipe.transformer) == 0, how
        pipe.set_progress_bar_config(disable=True)
        theirs = run_pipeline(pipe, recipe, PROMPT, x_T)
        torch.testing.assert_close(theirs.float(), ours.float(), atol=1e-4, rtol=1e-4, msg=how)


def test_flux_kohya_file_loads_with_every_tensor_applied(trained, tmp_path):
    """The BFL kohya layout FluxPipeline converts: fused q|k|v and the MLPs of the double blocks. (diffusers splits
    single blocks' linear1 at FLUX.1's fixed widths, so that part is checked at those widths below.)"""
    family, model, trainer, final = trained
    if family != "flux":
        assert not (final / KOHYA_WEIGHT_NAME).exists()  # StableDiffusion3Pipeline loads no kohya layout
        with pytest.raises(ValueError, match="loads no kohya"):
            export_lora(final, "kohya", tmp_path / "kohya")
        return
    assert (final / KOHYA_WEIGHT_NAME).is_file()
    state = adapter_state_dict(trainer.built.nets.denoiser, "student")
    state = {k: v for k, v in state.items()
             if not any(f"single_transformer_blocks.{i}.{p}." in k for i in range(8)
                        for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))}
    rank, alpha = trainer.cfg.lora.rank, trainer.cfg.lora.effective_alpha
    save_diffusers_lora(state, tmp_path / "d", rank, alpha, prefix="transformer")
    save_kohya_lora(state, tmp_path / "k" / KOHYA_WEIGHT_NAME, rank, alpha, layout=FluxModel.kohya_tensors)
    Recipe.load(final).save(tmp_path / "d")
    Recipe.load(final).save(tmp_path / "k")
    kohya = load_file(str(tmp_path / "k" / KOHYA_WEIGHT_NAME))
    assert any("double_blocks_0_img_attn_qkv" in k for k in kohya) and any("double_blocks_0_txt_mlp_2" in k for k in kohya)
    pipe_d, recipe = fresh_pipeline(PIPELINES[family], model, tmp_path / "d")
    pipe_k, _ = fresh_pipeline(PIPELINES[family], model, tmp_path / "k", weight_name=KOHYA_WEIGHT_NAME)
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    n_k, n_d = applied_lora_layers(pipe_k.transformer), applied_lora_layers(pipe_d.transformer)
    assert n_k == n_d == len(modules), (n_k, n_d, len(modules))
    x_T = torch.randn((1, *trainer.built.ctx.latent_shape), generator=torch.Generator().manual_seed(3))
    a, b = run_pipeline(pipe_d, recipe, PROMPT, x_T), run_pipeline(pipe_k, recipe, PROMPT, x_T)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()
    # pipelines.load takes the kohya folder as it is (the one .safetensors in it), every tensor applied.
    pipe_l = pipelines.load(model, tmp_path / "k")
    pipe_l.set_progress_bar_config(disable=True)
    assert applied_lora_layers(pipe_l.transformer) == len(modules)
    c = run_pipeline(pipe_l, recipe, PROMPT, x_T)
    assert torch.allclose(a, c, atol=1e-5), (a - c).abs().max()


def test_flux_kohya_single_block_linear1_splits_back_exactly():
    """At FLUX.1's widths diffusers splits the fused linear1 (q|k|v|mlp) back into our four LoRAs, scale included."""
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    g, rank, alpha = torch.Generator().manual_seed(0), 2, 1.0
    widths = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    state = {}
    for part, out in widths.items():
        state[f"single_transformer_blocks.0.{part}.lora_A.weight"] = torch.randn(rank, 3072, generator=g)
        state[f"single_transformer_blocks.0.{part}.lora_B.weight"] = torch.randn(out, rank, generator=g)
    converted = _convert_kohya_flux_lora_to_diffusers(dict(FluxModel.kohya_tensors(state, rank, alpha)))
    for part in widths:
        key = f"transformer.single_transformer_blocks.0.{part}"
        delta = converted[f"{key}.lora_B.weight"] @ converted[f"{key}.lora_A.weight"]
        ours = (alpha / rank) * state[f"single_transformer_blocks.0.{part}.lora_B.weight"] @ \
            state[f"single_transformer_blocks.0.{part}.lora_A.weight"]
        torch.testing.assert_close(delta, ours)


@pytest.mark.parametrize("method, sets, why", [
    ("disback", {}, ""), ("reward", {}, ""), ("lcm", {}, "boundary=lcm"), ("tscd_unified", {}, ""),
])
def test_methods_that_cannot_distil_a_flow_teacher_refuse_in_one_line(method, sets, why):
    spec = get_method(method)
    cfg = spec.config_cls(**sets) if sets else spec.config_cls()
    with pytest.raises(ConfigError, match=f"{why}.*cannot distil a 'flow' teacher: it supports the families sd15, sdxl") as err:
        spec.distiller_cls.check_parameterisation(cfg, "flow", _families_with)
    assert "\n" not in str(err.value)
    # dmd's GAN head and tscd's adversarial term read a transformer's blocks too (tests/tiny/test_flow_gan.py).
    for ok, ok_sets in (("dmd", {}), ("tscd", {}), ("dmd", {"gan": True}), ("tscd", {"adv_weight": [0.1]})):
        spec = get_method(ok)
        spec.distiller_cls.check_parameterisation(spec.config_cls(**ok_sets), "flow", _families_with)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompt_encoding_equals_the_pipelines_encode_prompt(request, family):
    from stepdistill.models import load_family
    from stepdistill.models.tiny import TINY_PROMPTS

    model = load_family(request.getfixturevalue(f"tiny_{family}_dir"))
    pipe = model.pipeline()
    cond = model.encode_prompts(TINY_PROMPTS[:3])
    if family == "sd3":
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(TINY_PROMPTS[:3], None, None)
        empty = model.empty_cond(3)
        torch.testing.assert_close(empty.encoder_hidden_states, negative, rtol=0, atol=1e-6)
        torch.testing.assert_close(empty.added_cond_kwargs["pooled_projections"], negative_pooled, rtol=0, atol=1e-6)
    else:
        embeds, pooled, _ = pipe.encode_prompt(TINY_PROMPTS[:3], None)
    assert torch.equal(cond.encoder_hidden_states, embeds)
    assert torch.equal(cond.added_cond_kwargs["pooled_projections"], pooled)
    # The schedule the methods see: sigma_t = the scheduler's shifted training sigma, alpha = 1 - sigma.
    schedule = model.noise_schedule()
    alpha, sigma = schedule.alpha_sigma(torch.tensor([999, 499, -1]))
    assert sigma.flatten()[0] == 1.0 and sigma.flatten()[-1] == 0.0 and torch.equal(alpha + sigma, torch.ones_like(alpha))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_max_sequence_length_pads_t5_as_the_pipeline_call_does(request, family):
    """model.max_sequence_length: the instance's T5 length equals the pipeline's max_sequence_length argument."""
    from stepdistill.models import load_family
    from stepdistill.models.tiny import TINY_PROMPTS
    from stepdistill.train.build import _set_t5_length

    model = load_family(request.getfixturevalue(f"tiny_{family}_dir"))
    _set_t5_length(model, 8)
    pipe = model.pipeline()
    cond = model.encode_prompts(TINY_PROMPTS[:2])
    if family == "sd3":
        embeds, *_ = pipe.encode_prompt(TINY_PROMPTS[:2], None, None, max_sequence_length=8)
        assert cond.encoder_hidden_states.shape[1] == 77 + 8  # CLIP's 77 tokens, then T5's
    else:
        embeds, _, _ = pipe.encode_prompt(TINY_PROMPTS[:2], None, max_sequence_length=8)
        assert cond.encoder_hidden_states.shape[1] == 8
    assert torch.equal(cond.encoder_hidden_states, embeds)
    assert type(model).t5_max_length != 8  # the class default is untouched


def test_max_sequence_length_refused_for_a_family_without_t5(tiny_sd15_dir):
    from stepdistill.models import load_family
    from stepdistill.train.build import _set_t5_length

    with pytest.raises(ConfigError, match="encodes no T5"):
        _set_t5_length(load_family(tiny_sd15_dir), 8)


def test_flux_resolution_not_a_multiple_of_16_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="multiple of 16") as e:
        load_config(ROOT / "configs/tiny/dmd_flux.yaml", ["model.resolution=40"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("resolution", [256, 64])
def test_flux_student_records_its_size_and_generate_runs_at_it_with_the_trained_sigmas(
        tiny_flux_dir, prompts_file, tmp_path, monkeypatch, resolution):
    """FLUX's sigmas shift with the image size: a student trained at `resolution` writes it into stepdistill.json,
    and `stepdistill generate` (generate_image) calls FluxPipeline at that size, visiting the trained sigmas. 64 px
    is not the tiny pipeline's default size (256), so a call without the recipe's size would shift elsewhere."""
    from stepdistill.core.flow import image_seq_len, mu_from_config, scheduler_sigmas
    from stepdistill.generate import generate_image

    cfg = load_config(ROOT / "configs/tiny/dmd_flux.yaml", [
        f"model.path={tiny_flux_dir}", f"data.prompts={prompts_file}", "loop.progress=false", "loop.max_steps=1",
        "data.batch_size=1", "method.critic_updates_per_student_update=1", "method.timesteps=[999,499]",
        f"model.resolution={resolution}"])
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()
    trainer.close()
    recipe = json.loads((final / "stepdistill.json").read_text())
    assert (recipe["height"], recipe["width"]) == (resolution, resolution)
    assert f"height={resolution!r}," in (final / CARD_FILE).read_text()  # the model card's snippet passes it too
    seen = {}
    call = FluxPipeline.__call__

    def spy(pipe, *args, **kwargs):
        out = call(pipe, *args, **kwargs)
        seen.update(height=kwargs.get("height"), width=kwargs.get("width"), sigmas=pipe.scheduler.sigmas.double())
        return out

    monkeypatch.setattr(FluxPipeline, "__call__", spy)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    generate_image(final, PROMPT, tmp_path / "out.png", base=str(tiny_flux_dir))
    assert (seen["height"], seen["width"]) == (resolution, resolution)
    config = dict(trainer.built.family.scheduler_config)
    mu = mu_from_config(config, image_seq_len(resolution, resolution, trainer.built.family.vae_scale_factor, 2))
    trained = scheduler_sigmas(2, config, mu, recipe["sigmas"])
    torch.testing.assert_close(seen["sigmas"], trained, atol=1e-6, rtol=0)
    # ... which are the student's training sigmas at t = 999, 499.
    torch.testing.assert_close(trained[:-1], trainer.built.nets.schedule.sigma([999, 499]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method, sets, setting", [
    ("dmd", [], "method.guidance_scale"),
    ("tscd", [], "method.guidance_min"),
])
def test_guidance_distilled_teacher_defaults_to_cfg_1_and_refuses_more(tiny_flux_dir, prompts_file, tmp_path, method,
                                                                        sets, setting):
    """FLUX.1-dev's guidance embedding replaces CFG: every method's teacher scale defaults to 1 on it, and a scale
    above 1 is refused in one line naming the setting. (lcm's boundary and tscd_unified cannot distil a flow teacher.)"""
    from stepdistill.train.build import build

    base = [f"model.path={tiny_flux_dir}", f"data.prompts={prompts_file}", "loop.progress=false",
            "model.family=flux", "lora.rank=4", "loop.max_steps=2"]
    method_sets = {"dmd": ["method.name=dmd", "method.timesteps=[999]"], "tscd": ["method.name=tscd"]}[method]
    built = build(load_config(None, [*base, *method_sets, *sets]), torch.device("cpu"), 0, 1, progress=False)
    scales = built.distiller.cfg_scales()
    assert scales and all(w in (None, 1.0) for w in scales.values()), scales
    assert built.nets.teacher.guidance_scale == 1.0
    with pytest.raises(ConfigError, match=f"^{setting}=3: .*guidance-distilled.*set {setting}=1") as e:
        build(load_config(None, [*base, *method_sets, f"{setting}=3"]), torch.device("cpu"), 0, 1, progress=False)
    assert "\n" not in str(e.value)


def test_flux_recipe_keeps_the_trained_size_without_a_dynamic_shift(tiny_flux_dir, tmp_path):
    """FluxPipeline's default size is a fixed 128-latent side whatever the transformer: a schnell-layout teacher (no
    resolution-dependent shift, as the toy FLUX teacher) still needs the trained size in its students' recipes, or
    they are sampled at 256 px instead of the 32 px they learnt (eval toy refused such a student after generating)."""
    import shutil

    from stepdistill.models import load_family

    folder = tmp_path / "flux_fixed_shift"
    shutil.copytree(tiny_flux_dir, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "use_dynamic_shifting": False}))
    family = load_family(folder)
    assert not family.scheduler_config.get("use_dynamic_shifting")
    assert family.recipe_size(32) == {"height": 32, "width": 32}
    assert family.recipe_size() == {"height": family.resolution, "width": family.resolution}
