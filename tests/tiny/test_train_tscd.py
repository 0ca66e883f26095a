"""TSCD end to end on tiny SD1.5 / SDXL models: the progressive run exports a LoRA per stage that a fresh diffusers
pipeline with the recipe's scheduler reproduces; the unified LoRA under TCDScheduler at 1-8 steps; the feedback LoRA;
resume across a stage boundary."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from stepdistill.config import ConfigError, load_config
from stepdistill.core.lora import adapter_state_dict
from stepdistill.core.recipe import Recipe
from stepdistill.export import load_diffusers_lora
from stepdistill.methods.consistency import start_from_lora
from stepdistill.train.loop import Trainer

from .helpers import ROOT, assert_same_lora, lora_tensors, pipeline_latents, run_cli, train_args

STAGES = ["stages/stage1-k8", "stages/stage2-k4", "stages/stage3-k2", "stages/stage4-k1"]
TCD_STEPS = (1, 2, 4, 8)


class RecordingTrainer(Trainer):
    """Records, at each export, the training-time sampler's output under that export's recipe (the live student)."""

    steps_for = {}  # export name -> step counts to record (default: the recipe's own)

    def setup(self):
        super().setup()
        self.recorded = {}
        b = self.built
        self.prompt = b.data.prompts[0]
        self.x_T = torch.randn((1, *b.ctx.latent_shape), generator=torch.Generator().manual_seed(3))

    def export_stage(self, name, recipe_overrides, step=None):
        out = super().export_stage(name, recipe_overrides, step=step)
        b, recipe = self.built, Recipe.load(out).to_dict()
        cond = b.family.encode_prompts([self.prompt])
        for steps in self.steps_for.get(name, (recipe["num_inference_steps"],)):
            self.recorded[name, steps] = b.distiller.sample(b.nets, cond, self.x_T, generator=torch.Generator().manual_seed(7),
                                                            steps=steps, **({"recipe": recipe} if "stages" in name else {}))
        return out


def _train(config, out, model, prompts, *sets, trainer_cls=RecordingTrainer):
    cfg = load_config(ROOT / config, [f"model.path={model}", f"data.prompts={prompts}", "loop.progress=false", *sets])
    trainer = trainer_cls(cfg, out)
    final = trainer.run()
    return trainer, final


@pytest.fixture(scope="module")
def progressive(tiny_sd15_dir, prompts_file, tmp_path_factory):
    """k = 8 -> 4 -> 2 -> 1, one step each, adversarial term from the second stage on."""
    out = tmp_path_factory.mktemp("tscd") / "run"
    return _train("configs/tiny/tscd_sd15.yaml", out, tiny_sd15_dir, prompts_file)


def test_progressive_run_exports_every_stage_with_its_recipe(progressive):
    trainer, final = progressive
    out = trainer.out
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["k"] for x in logs] == [8, 4, 2, 1]
    assert "adv_g_loss" not in logs[0] and all(x["adv_d_loss"] > 0 and "adv_g_loss" in x for x in logs[1:])
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    previous = None
    for name, k in zip(STAGES, (8, 4, 2, 1)):
        recipe = Recipe.load(out / name)
        assert (recipe.scheduler_class, recipe.num_inference_steps, recipe.guidance_scale) == ("DDIMScheduler", k, 0.0)
        assert recipe.scheduler_config["timestep_spacing"] == "trailing" and recipe.training_steps == STAGES.index(name) + 1
        tensors = lora_tensors(out / name)
        if previous is not None:  # each stage went on training from the previous one
            assert any(not torch.equal(tensors[key], previous[key]) for key in tensors)
        previous = tensors
    assert_same_lora(out / STAGES[-1], final)
    # The discriminator heads are saved with the run (they resume with it).
    assert "adv_heads" in trainer.built.distiller.state_dict()


@pytest.mark.parametrize("name", STAGES + ["final"])
def test_every_stage_lora_reproduces_the_training_time_sampler(progressive, tiny_sd15_dir, name):
    trainer, _ = progressive
    folder = trainer.out / name
    steps = Recipe.load(folder).num_inference_steps
    ours = trainer.recorded[name, steps]
    theirs = pipeline_latents(StableDiffusionPipeline, tiny_sd15_dir, folder, trainer.prompt, trainer.x_T, steps)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()
    b = trainer.built
    teacher_nets = b.nets.__class__(**{**b.nets.__dict__, "student": b.nets.teacher.denoiser})
    base = b.distiller.sample(teacher_nets, b.family.encode_prompts([trainer.prompt]), trainer.x_T, steps=steps)
    assert not torch.allclose(base.float(), theirs.float(), atol=1e-4)  # and the LoRA matters


@pytest.mark.slow  # two CLI runs (about a minute); the loop's own resume test runs by default
def test_resume_across_a_stage_boundary_is_bit_identical(progressive, tiny_sd15_dir, prompts_file, tmp_path):
    trainer, _ = progressive
    resumed = tmp_path / "resumed"
    args = train_args("configs/tiny/tscd_sd15.yaml", resumed, tiny_sd15_dir, prompts_file)
    killed = run_cli(args, check=False, STEPDISTILL_KILL_AT="step:3")
    assert killed.returncode != 0 and not (resumed / "final").exists()
    assert (resumed / STAGES[1]).is_dir() and not (resumed / STAGES[3]).exists()
    run_cli(args)
    for name in STAGES + ["final"]:
        assert_same_lora(trainer.out / name, resumed / name)


def test_start_from_lora_loads_a_stage_and_checks_its_rank(progressive):
    trainer, _ = progressive
    unet = trainer.built.nets.denoiser
    folder = trainer.out / STAGES[0]
    start_from_lora(unet, folder, adapter="target")
    state, _, _ = load_diffusers_lora(folder)
    live = adapter_state_dict(unet, "target")
    assert all(torch.equal(live[k], state[k].to(live[k].dtype)) for k in state)
    bigger = {k: torch.cat([v, v], dim=0 if k.endswith("lora_A.weight") else 1) for k, v in state.items()}
    from stepdistill.export import save_diffusers_lora

    other = trainer.out.parent / "rank8"
    save_diffusers_lora(bigger, other, 8, 8.0)
    with pytest.raises(ConfigError, match="lora.rank=8"):
        start_from_lora(unet, other)


def test_sdxl_progressive_run_end_to_end(tiny_sdxl_dir, prompts_file, tmp_path):
    trainer, _ = _train("configs/tiny/tscd_sdxl.yaml", tmp_path / "run", tiny_sdxl_dir, prompts_file)
    assert all((trainer.out / name / "pytorch_lora_weights.safetensors").is_file() for name in STAGES)
    for name in (STAGES[1], "final"):
        steps = Recipe.load(trainer.out / name).num_inference_steps
        theirs = pipeline_latents(StableDiffusionXLPipeline, tiny_sdxl_dir, trainer.out / name, trainer.prompt,
                                  trainer.x_T, steps)
        assert torch.allclose(trainer.recorded[name, steps].float(), theirs.float(), atol=1e-4)


@pytest.fixture(scope="module")
def unified(progressive, tiny_sd15_dir, prompts_file, tmp_path_factory):
    """The one-step unified LoRA (consistency + DMD, TCDScheduler), started from the progressive run's final LoRA."""
    _, tscd_final = progressive

    class Unified(RecordingTrainer):
        steps_for = {"final": TCD_STEPS}

    out = tmp_path_factory.mktemp("unified") / "run"
    return _train("configs/tiny/tscd_unified_sd15.yaml", out, tiny_sd15_dir, prompts_file, "loop.max_steps=2",
                  f"method.init_lora={tscd_final}", trainer_cls=Unified)


def test_unified_run_trains_the_fake_score_and_exports_a_tcd_recipe(unified):
    trainer, final = unified
    logs = [json.loads(x) for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert all(x["dm_loss"] >= 0 and x["fake_score_loss"] > 0 and x["critic_grad_norm"] > 0 for x in logs)
    recipe = Recipe.load(final)
    assert recipe.scheduler_class == "TCDScheduler" and recipe.eta == 0.3 and recipe.num_inference_steps == 1
    assert recipe.scheduler_config == {"original_inference_steps": 40}
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(trainer.built.nets.denoiser, "fake_score").items()
               if k.endswith("lora_B.weight"))


@pytest.mark.parametrize("steps", TCD_STEPS)
def test_unified_lora_runs_with_tcd_scheduler_at_1_to_8_steps(unified, tiny_sd15_dir, steps):
    trainer, final = unified
    theirs = pipeline_latents(StableDiffusionPipeline, tiny_sd15_dir, final, trainer.prompt, trainer.x_T, steps)
    ours = trainer.recorded["final", steps]
    assert torch.isfinite(theirs).all()
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()


def test_feedback_lora_raises_its_reward_and_keeps_the_base_recipe(progressive, tiny_sd15_dir, prompts_file, tmp_path):
    from stepdistill.metrics import reward_models

    def brightness(weights, device, clip_weights=""):
        return lambda images, prompts: images.mean(dim=(1, 2, 3))

    reward_models.register_reward_model("test_brightness", brightness, threshold=10.0)
    _, tscd_final = progressive
    sets = ("method.reward_model=test_brightness", f"method.init_lora={tscd_final}", "loop.max_steps=6",
            "optim.lr=1e-2")
    trainer, final = _train("configs/tiny/tscd_reward_sd15.yaml", tmp_path / "run", tiny_sd15_dir, prompts_file, *sets,
                            trainer_cls=Trainer)
    logs = [json.loads(x) for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert all(x["above_threshold"] == 0 and x["loss"] > 0 for x in logs)
    recipe, base_recipe = Recipe.load(final), Recipe.load(tscd_final)
    assert (recipe.method, recipe.scheduler_class, recipe.num_inference_steps) == ("reward", "DDIMScheduler", 1)
    assert recipe.scheduler_config == base_recipe.scheduler_config

    # The feedback LoRA's samples are brighter than the LoRA it started from, on the same prompts and noise.
    b = trainer.built
    cond = b.family.encode_prompts(b.data.prompts[:4])
    x_T = torch.randn((4, *b.ctx.latent_shape), generator=torch.Generator().manual_seed(0))
    after = b.family.decode(b.distiller.sample(b.nets, cond, x_T)).mean()
    start_from_lora(b.nets.denoiser, tscd_final)
    before = b.family.decode(b.distiller.sample(b.nets, cond, x_T)).mean()
    assert after > before + 1e-3, (before, after)


def test_exports_are_byte_identical_to_the_reference(progressive, unified):
    """Moving the package's files (issue 32) must not change what a run writes: the progressive run (GAN heads from
    its second stage) and the unified run (consistency + DM losses), same seed, same bytes."""
    from .helpers import assert_matches_reference

    assert_matches_reference("tscd_sd15_progressive", progressive[1])
    assert_matches_reference("tscd_unified_sd15", unified[1])
