"""The `dmd` method end to end on tiny SD1.5 / SDXL models: adapters train, the base does not, the export reproduces
the student in a fresh diffusers pipeline (one and four steps), a GAN run resumes exactly, and the GAN term's
gradients reach only their own phase."""

from __future__ import annotations

import json
import math
import shutil
from functools import partial

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from stepdistill.config import ConfigError, load_config
from stepdistill.core.denoiser import Denoiser, checkpoint_under_adapter
from stepdistill.core.lora import adapter_parameters, adapter_state_dict
from stepdistill.core.recipe import Recipe
from stepdistill.core.samplers import ddim_sample
from stepdistill.core.solvers import trailing_timesteps
from stepdistill.methods.dm import fake_score_loss
from stepdistill.methods.dmd import REGRESSION_PAIRS_FILE
from stepdistill.methods.gan import mid_block_features
from stepdistill.train.build import build
from stepdistill.train.loop import Trainer

from .helpers import (
    ROOT,
    assert_base_unchanged,
    assert_bf16_student_equals_the_pipeline,
    assert_gan_gradients_reach_only_their_phase,
    assert_same_lora,
    gan_batch,
    lora_tensors,
    pipeline_latents,
    randomise_lora_b,
    run_cli,
    student_latents,
    train_args,
)

RUNS = {
    # one step at t = 999, plain DMD loss
    "1step": ("configs/tiny/dmd_sd15.yaml", []),
    # four steps with backward simulation; also the SiD loss, a regression warm-up step, the regression term beside
    # the generator loss after it, and gradient checkpointing
    "4step": ("configs/tiny/dmd_sd15_4step.yaml",
              ["method.generator_loss=sid", "method.regression_steps=1", "method.regression_teacher_steps=3",
               "method.regression_pairs=5", "method.regression_weight=0.25", "model.gradient_checkpointing=true"]),
}


def _config(preset, model, prompts, *sets):
    return load_config(ROOT / preset, [f"model.path={model}", f"data.prompts={prompts}", "loop.progress=false", *sets])


@pytest.fixture(scope="module", params=sorted(RUNS))
def trained(request, tiny_sd15_dir, prompts_file, tmp_path_factory):
    preset, sets = RUNS[request.param]
    trainer = Trainer(_config(preset, tiny_sd15_dir, prompts_file, *sets), tmp_path_factory.mktemp("dmd") / "run")
    return trainer, trainer.run()


def test_losses_finite_and_recipe(trained):
    trainer, final = trained
    lines = [json.loads(x) for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for x in lines:
        assert x["nonfinite_steps"] == 0 and math.isfinite(x["loss"]) and math.isfinite(x["fake_score_loss"])
    timesteps = trainer.cfg.method.timesteps
    if len(timesteps) == 4:
        assert "regression_loss" in lines[0] and "sid_loss" in lines[1] and "sid_loss" in lines[2]
        assert "sid_loss" not in lines[0] and all("regression_loss" in x for x in lines[1:])
    else:
        assert all("dmd_loss" in x for x in lines)
    recipe = Recipe.load(final)
    assert recipe.method == "dmd" and recipe.scheduler_class == "LCMScheduler"
    assert recipe.timesteps == timesteps and recipe.num_inference_steps == len(timesteps)
    assert recipe.guidance_scale == 0.0 and recipe.training_steps == 3


def test_regression_pairs_are_the_teachers_solves(trained):
    """The pairs are solved once into the run folder, only when a regression term is on, and each is the teacher's
    CFG DDIM solve from its own noise and prompt."""
    trainer, _ = trained
    b, cfg = trainer.built, trainer.cfg.method
    path = trainer.out / REGRESSION_PAIRS_FILE
    if not (cfg.regression_steps or cfg.regression_weight):
        assert not path.exists()
        return
    pairs = torch.load(path, weights_only=True)
    assert pairs["z"].shape == pairs["x0"].shape == (5, *b.ctx.latent_shape)
    assert pairs["meta"]["n"] == 5 and pairs["meta"]["teacher_steps"] == 3
    cond = b.data.cond.index(pairs["prompt_index"][:2])
    teacher = partial(b.nets.teacher, guidance_scale=b.distiller.guidance_scale)
    again = ddim_sample(teacher, pairs["z"][:2].float(), trailing_timesteps(3, 1000), cond, b.nets.schedule)
    assert torch.allclose(again.half().float(), pairs["x0"][:2].float(), atol=1e-3)
    assert not torch.allclose(again, pairs["z"][:2].float(), atol=0.1)


def test_adapters_changed_and_base_bit_identical(trained, tiny_sd15_dir):
    trainer, final = trained
    assert_base_unchanged(trainer.built.nets.denoiser, tiny_sd15_dir)
    # lora_B starts at zero: non-zero means trained
    student_ups = [v for k, v in lora_tensors(final).items() if "lora_B" in k]
    fake_ups = [v for k, v in adapter_state_dict(trainer.built.nets.denoiser, "fake_score").items() if "lora_B" in k]
    assert student_ups and all(v.abs().sum() > 0 for v in student_ups)
    assert fake_ups and all(v.abs().sum() > 0 for v in fake_ups)


def test_fresh_diffusers_pipeline_reproduces_the_student(trained, tiny_sd15_dir):
    trainer, final = trained
    b = trainer.built
    prompt = b.data.prompts[0]
    ours, cond, x_T = student_latents(b, prompt)
    theirs = pipeline_latents(StableDiffusionPipeline, tiny_sd15_dir, final, prompt, x_T)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()
    # and the LoRA matters: the base alone gives something else
    base_nets = b.nets.__class__(**{**b.nets.__dict__, "student": b.nets.teacher.denoiser})
    base_out = b.distiller.sample(base_nets, cond, x_T, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(base_out.float(), theirs.float(), atol=1e-4)


def test_bf16_student_output_equals_the_bf16_pipelines_at_every_recipe_timestep(trained, tiny_sd15_dir):
    """Base and adapters in bf16: at each step of the recipe's LCMScheduler, the stock pipeline's UNet output equals
    the training-time student's on the same latents, timestep and text, to bf16 rounding (helpers). A DDPM UNet
    pipeline tells the network the integer t, so nothing is lost to bf16 arithmetic here (docs/flow.md has the flow
    families' case); both sides run the pipeline's attention kernel, which bf16 rounds differently from training's."""
    trainer, final = trained
    b = trainer.built
    assert assert_bf16_student_equals_the_pipeline(b, tiny_sd15_dir, final, b.data.prompts[0]) == list(b.distiller.timesteps)


def test_sdxl_run_end_to_end(tiny_sdxl_dir, prompts_file, tmp_path):
    """CLI train (one step at t = 399 after a regression warm-up step) -> plain SDXL pipeline with the recipe."""
    out = tmp_path / "run"
    run_cli(train_args("configs/tiny/dmd_sdxl.yaml", out, tiny_sdxl_dir, prompts_file))
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert "regression_loss" in lines[0] and "dmd_loss" in lines[1]
    assert all(math.isfinite(x["loss"]) and x["nonfinite_steps"] == 0 for x in lines)
    recipe = Recipe.load(out / "final")
    assert recipe.family == "sdxl" and recipe.timesteps == [399]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    kwargs = dict(prompt=["a red circle"], output_type="latent", **recipe.call_kwargs(pipe.scheduler))
    base = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(str(out / "final"))
    img = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert torch.isfinite(img).all() and not torch.allclose(img, base, atol=1e-4)


def test_gan_run_resumes_bit_identically(tiny_sd15_dir, prompts_file, tmp_path):
    """With the GAN on real latents (data.images=toy:8): four steps straight vs two, stop, two more. The student
    LoRA must be identical, so the GAN head, critic phases and noise are all restored."""
    preset = "configs/tiny/dmd_sd15.yaml"
    sets = ("loop.checkpoint_every=2", "method.gan=true", "data.images=toy:8")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    Trainer(_config(preset, tiny_sd15_dir, prompts_file, "loop.max_steps=4", *sets), straight).run()
    lines = [json.loads(x) for x in (straight / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(x["gan_g_loss"]) and math.isfinite(x["gan_d_loss"]) for x in lines)
    Trainer(_config(preset, tiny_sd15_dir, prompts_file, "loop.max_steps=2", *sets), resumed).run()
    shutil.rmtree(resumed / "final")
    Trainer(_config(preset, tiny_sd15_dir, prompts_file, "loop.max_steps=4", *sets), resumed).run()
    assert_same_lora(straight / "final", resumed / "final")


# ---- the GAN term, driven directly (real latents come with data.images) ----------------------------------------

@pytest.fixture(scope="module")
def gan_built(tiny_sd15_dir, prompts_file):
    cfg = _config("configs/tiny/dmd_sd15.yaml", tiny_sd15_dir, prompts_file, "method.gan=true")
    torch.manual_seed(0)
    built = build(cfg, torch.device("cpu"), progress=False)
    randomise_lora_b(built.nets.denoiser)
    return built


def test_gan_gradients_reach_only_their_phase(gan_built):
    assert_gan_gradients_reach_only_their_phase(gan_built)


def test_gan_without_real_latents_says_to_set_data_images(gan_built):
    with pytest.raises(ConfigError, match="data.images"):
        gan_built.distiller.critic_loss(gan_built.nets, gan_batch(gan_built, latents=False), None)


def test_gan_head_state_round_trips(gan_built):
    distiller = gan_built.distiller
    state = {k: v.clone() for k, v in distiller.state_dict()["gan_head"].items()}
    with torch.no_grad():
        for p in distiller.head.parameters():
            p.add_(1.0)
    distiller.load_state_dict({"gan_head": state})
    assert all(torch.equal(v, distiller.head.state_dict()[k]) for k, v in state.items())


def test_mid_block_features_are_the_full_forward_s(gan_built):
    nets = gan_built.nets
    batch = gan_batch(gan_built)
    x_t, t = torch.randn(batch.latent_shape), torch.full((batch.size,), 500)
    seen = []
    handle = nets.denoiser.mid_block.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        nets.fake_score.raw(x_t, t, batch.cond)
    finally:
        handle.remove()
    assert torch.equal(mid_block_features(nets.fake_score, x_t, t, batch.cond), seen[0])


def test_gradient_checkpointing_recomputes_under_the_right_adapter(gan_built):
    """The fake score's gradients must not depend on gradient checkpointing (backward recomputes blocks after
    active_adapter has switched back to another adapter)."""
    nets, schedule = gan_built.nets, gan_built.nets.schedule
    batch = gan_batch(gan_built)
    torch.manual_seed(1)
    x0, t = torch.randn(batch.latent_shape), torch.randint(0, 1000, (batch.size,))
    eps = torch.randn_like(x0)
    params = list(adapter_parameters(nets.denoiser, "fake_score").values())
    fake = Denoiser(nets.denoiser, schedule, "fake_score")

    def grads():
        loss = fake_score_loss(fake, x0, batch.cond, schedule, t, eps).sum()
        return torch.autograd.grad(loss, params)

    plain = grads()
    nets.denoiser.enable_gradient_checkpointing(checkpoint_under_adapter)
    try:
        checkpointed = grads()
    finally:
        nets.denoiser.disable_gradient_checkpointing()
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, checkpointed))


def test_one_step_export_is_byte_identical_to_the_reference(trained):
    """Moving the package's files (issue 32) must not change what a run writes: same seed, same bytes."""
    from .helpers import assert_matches_reference

    trainer, final = trained
    if len(trainer.cfg.method.timesteps) != 1:
        pytest.skip("the reference is the one-step run")
    assert_matches_reference("dmd_sd15_1step", final)
