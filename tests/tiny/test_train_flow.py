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

from stepdistill.config import ConfigError, load_config
from stepdistill.core.lora import adapter_state_dict
from stepdistill.core.recipe import Recipe
from stepdistill.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, save_diffusers_lora, save_kohya_lora
from stepdistill.models.families.flux import FluxModel
from stepdistill.models.registry import get_family
from stepdistill.registry import get_method
from stepdistill.train.build import _families_with
from stepdistill.train.loop import Trainer

from .helpers import ROOT, student_latents

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
RUNS = {
    "dmd_sd3": ("sd3", "configs/tiny/dmd_sd3.yaml"),
    "dmd_sd3_4step": ("sd3", "configs/tiny/dmd_sd3_4step.yaml"),
    "tscd_sd3": ("sd3", "configs/tiny/tscd_sd3.yaml"),
    "dmd_flux": ("flux", "configs/tiny/dmd_flux.yaml"),
    "tscd_flux": ("flux", "configs/tiny/tscd_flux.yaml"),
}
PROMPT = "a red cat on the sea"

torch.set_num_threads(1)


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, prompts_file, tmp_path_factory):
    family, preset = RUNS[request.param]
    model = request.getfixturevalue(f"tiny_{family}_dir")
    cfg = load_config(ROOT / preset, [f"model.path={model}", f"data.prompts={prompts_file}", "loop.progress=false"])
    trainer = Trainer(cfg, tmp_path_factory.mktemp(request.param) / "run")
    return family, model, trainer, trainer.run()


def _applied_lora_layers(transformer) -> int:
    return sum(1 for m in transformer.modules() if hasattr(m, "lora_A") and len(m.lora_A))


def _fresh_pipeline(family, model, lora_dir, weight_name=None):
    pipe = PIPELINES[family].from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    recipe = Recipe.load(lora_dir)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_dir), weight_name=weight_name)
    return pipe, recipe


def _pipeline_latents(family, pipe, recipe, x_T):
    """The stock pipeline from the student's x_T, with the recipe's sigmas and guidance; latents in (B, C, h, w)."""
    h, w = x_T.shape[-2:]
    family_cls = get_family(family)
    size = h * pipe.vae_scale_factor
    out = pipe(prompt=[PROMPT], latents=family_cls.to_pipeline_latents(x_T.clone()), height=size, width=size,
               output_type="latent", generator=torch.Generator().manual_seed(7),
               **recipe.call_kwargs(pipe.scheduler)).images
    return family_cls.from_pipeline_latents(out, h, w)


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
    base = {n.replace(".base_layer", ""): p for n, p in trainer.built.nets.unet.state_dict().items() if "lora_" not in n}
    assert base.keys() == fresh.keys() and all(torch.equal(base[k], fresh[k]) for k in fresh)


def test_export_reproduces_the_student_in_a_stock_pipeline(trained):
    family, model, trainer, final = trained
    ours, _, x_T = student_latents(trainer.built, PROMPT)
    pipe, recipe = _fresh_pipeline(family, model, final)
    # Every LoRA module in the file became a LoRA layer of the transformer.
    modules = {k.rsplit(".lora_", 1)[0] for k in load_file(str(final / DIFFUSERS_WEIGHT_NAME))}
    assert _applied_lora_layers(pipe.transformer) == len(modules)
    theirs = _pipeline_latents(family, pipe, recipe, x_T)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()
    # ... and the LoRA matters: the bare base gives something else.
    bare = PIPELINES[family].from_pretrained(model)
    bare.set_progress_bar_config(disable=True)
    bare.scheduler = recipe.make_scheduler(bare.scheduler.config)
    assert (_pipeline_latents(family, bare, recipe, x_T) - theirs).abs().max() > 1e-4


def test_flux_kohya_file_loads_with_every_tensor_applied(trained, tmp_path):
    """The BFL kohya layout FluxPipeline converts: fused q|k|v and the MLPs of the double blocks. (diffusers splits
    single blocks' linear1 at FLUX.1's fixed widths, so that part is checked at those widths below.)"""
    family, model, trainer, final = trained
    if family != "flux":
        assert not (final / KOHYA_WEIGHT_NAME).exists()  # StableDiffusion3Pipeline loads no kohya layout
        return
    assert (final / KOHYA_WEIGHT_NAME).is_file()
    state = adapter_state_dict(trainer.built.nets.unet, "student")
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
    pipe_d, recipe = _fresh_pipeline(family, model, tmp_path / "d")
    pipe_k, _ = _fresh_pipeline(family, model, tmp_path / "k", weight_name=KOHYA_WEIGHT_NAME)
    modules = {k.rsplit(".lora_", 1)[0] for k in state}
    n_k, n_d = _applied_lora_layers(pipe_k.transformer), _applied_lora_layers(pipe_d.transformer)
    assert n_k == n_d == len(modules), (n_k, n_d, len(modules))
    x_T = torch.randn((1, *trainer.built.ctx.latent_shape), generator=torch.Generator().manual_seed(3))
    a, b = _pipeline_latents(family, pipe_d, recipe, x_T), _pipeline_latents(family, pipe_k, recipe, x_T)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


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
    ("dmd", {"gan": True}, "gan"), ("tscd", {"adv_weight": [0.1]}, "adv_weight"),
])
def test_methods_that_cannot_distil_a_flow_teacher_refuse_in_one_line(method, sets, why):
    spec = get_method(method)
    cfg = spec.config_cls(**sets) if sets else spec.config_cls()
    with pytest.raises(ConfigError, match=f"{why}.*cannot distil a 'flow' teacher: it supports the families sd15, sdxl") as err:
        spec.distiller_cls.check_parameterisation(cfg, "flow", _families_with)
    assert "\n" not in str(err.value)
    for ok in ("dmd", "tscd"):
        get_method(ok).distiller_cls.check_parameterisation(get_method(ok).config_cls(), "flow", _families_with)


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
