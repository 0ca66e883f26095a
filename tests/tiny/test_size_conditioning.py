"""SDXL's size conditioning (time_ids) follows model.resolution in every cond of a run, the recipe records it, and a
fresh pipeline called with the recipe conditions the same way (so it reproduces the student)."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.models import load_family
from stepdistill.train.loop import Trainer

from .helpers import ROOT, pipeline_latents, student_latents


def ids(size):
    return [float(size), float(size), 0.0, 0.0, float(size), float(size)]


def assert_time_ids(cond, size):
    time_ids = cond.added_cond_kwargs["time_ids"]
    assert time_ids.tolist() == [ids(size)] * len(time_ids)


@pytest.mark.parametrize("force_zeros", [True, False])
def test_time_ids_follow_the_resolution(tiny_sdxl_dir, force_zeros):
    model = load_family(tiny_sdxl_dir)
    model.pipeline_config["force_zeros_for_empty_prompt"] = force_zeros
    assert model.resolution == model.native_resolution == 16  # tiny: 8 x 8 latents
    model.resolution = 512
    assert_time_ids(model.encode_prompts(["a red cat", "a blue car"]), 512)
    assert_time_ids(model.empty_cond(3), 512)
    assert_time_ids(model.encode_prompts(["a red cat"], resolution=256), 256)  # an explicit size wins
    assert model.latent_shape(1) == (1, 4, 256, 256)
    assert model.size_conditioning() == {"original_size": [512, 512], "crops_coords_top_left": [0, 0],
                                         "target_size": [512, 512]}


@pytest.fixture(scope="module")
def trained(tiny_sdxl_dir, prompts_file, tmp_path_factory):
    """One LCM update at 32 px (not the tiny model's native 16 px)."""
    cfg = load_config(ROOT / "configs/tiny/lcm_sdxl.yaml", [
        f"model.path={tiny_sdxl_dir}", f"data.prompts={prompts_file}", "loop.max_steps=1", "loop.progress=false",
        "model.resolution=32",
    ])
    trainer = Trainer(cfg, tmp_path_factory.mktemp("size") / "run")
    return trainer, trainer.run()


def test_run_conditions_every_branch_at_model_resolution(trained):
    trainer, final = trained
    b = trainer.built
    assert b.ctx.latent_shape == (4, 16, 16)
    assert_time_ids(b.data.cond, 32)  # student, fake score and teacher read the batch's cond
    assert_time_ids(b.data.uncond, 32)  # the unconditional branch of CFG
    assert_time_ids(b.ctx.uncond, 32)
    recipe = Recipe.load(final)
    assert recipe.size_conditioning == {"original_size": [32, 32], "crops_coords_top_left": [0, 0],
                                        "target_size": [32, 32]}
    kwargs = recipe.call_kwargs()
    assert kwargs["original_size"] == (32, 32) and kwargs["target_size"] == (32, 32)


def test_fresh_pipeline_with_the_recipe_reproduces_the_student(trained, tiny_sdxl_dir):
    trainer, final = trained
    b = trainer.built
    prompt = b.data.prompts[0]
    ours, _, x_T = student_latents(b, prompt)
    theirs = pipeline_latents(StableDiffusionXLPipeline, tiny_sdxl_dir, final, prompt, x_T, steps=4)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=0, atol=1e-4)
