"""Foundation end to end on tiny SD1.5 / SDXL models: train LCM-LoRA, export, reload in diffusers, resume."""

from __future__ import annotations

import json
import logging
import re
import warnings

import pytest
import torch
from diffusers import StableDiffusionPipeline

from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.export import KOHYA_WEIGHT_NAME
from stepdistill.train.loop import Trainer

from .helpers import ROOT, assert_base_unchanged, assert_same_lora, lora_tensors, run_cli, train_args

# What diffusers / peft say when a LoRA file's keys do not match the model.
KEY_PROBLEM = re.compile(r"(unexpected|missing|not found|incompatible)[_ ]?keys?|target modules", re.IGNORECASE)


@pytest.fixture(scope="module")
def trained(tiny_sd15_dir, prompts_file, tmp_path_factory):
    """A 3-step LCM run, kept in memory so the training-time student can be compared with the export."""
    out = tmp_path_factory.mktemp("lcm") / "run"
    cfg = load_config(ROOT / "configs/tiny/lcm_sd15.yaml", [
        f"model.path={tiny_sd15_dir}", f"data.prompts={prompts_file}", "loop.max_steps=3", "loop.progress=false",
        "loop.sample_every=3",
    ])
    trainer = Trainer(cfg, out)
    final = trainer.run()
    return trainer, final


def test_run_directory_contract(trained):
    trainer, final = trained
    out = trainer.out
    assert (out / "resolved_config.yaml").is_file()
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and all(x["loss"] >= 0 for x in lines)
    assert (out / "checkpoints" / "step-000003" / "complete.json").is_file()
    assert (out / "samples" / "step-000003.png").is_file()
    assert (final / "pytorch_lora_weights.safetensors").is_file() and (final / KOHYA_WEIGHT_NAME).is_file()
    recipe = Recipe.load(final)
    assert recipe.method == "lcm" and recipe.family == "sd15" and recipe.scheduler_class == "LCMScheduler"
    assert recipe.num_inference_steps == 4 and recipe.guidance_scale == 0.0
    assert recipe.lora_rank == 4 and recipe.lora_alpha == 2.0 and recipe.training_steps == 3


def test_adapters_changed_and_base_bit_identical(trained, tiny_sd15_dir):
    trainer, final = trained
    assert_base_unchanged(trainer.built.nets.denoiser, tiny_sd15_dir)
    lora = lora_tensors(final)
    ups = [v for k, v in lora.items() if "lora_B" in k]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # B starts at zero: non-zero means trained


def _fresh_pipeline_output(base, final, prompt, x_T, steps, weight_name=None):
    pipe = StableDiffusionPipeline.from_pretrained(base)
    recipe = Recipe.load(final)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.load_lora_weights(str(final), **({"weight_name": weight_name} if weight_name else {}))
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if KEY_PROBLEM.search(m)], messages
    kwargs = recipe.call_kwargs(pipe.scheduler)
    kwargs["num_inference_steps"] = steps
    return pipe(prompt=[prompt], latents=x_T.clone(), generator=torch.Generator().manual_seed(7),
                output_type="latent", **kwargs).images


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("weight_name", [None, KOHYA_WEIGHT_NAME])
def test_fresh_diffusers_pipeline_reproduces_the_student(trained, tiny_sd15_dir, steps, weight_name, caplog):
    trainer, final = trained
    b = trainer.built
    prompt = b.data.prompts[0]
    x_T = torch.randn((1, *b.ctx.latent_shape), generator=torch.Generator().manual_seed(3))
    ours = b.distiller.sample(b.nets, b.family.encode_prompts([prompt]), x_T, generator=torch.Generator().manual_seed(7), steps=steps)
    with caplog.at_level(logging.WARNING):
        theirs = _fresh_pipeline_output(tiny_sd15_dir, final, prompt, x_T, steps, weight_name)
    assert not [r for r in caplog.records if KEY_PROBLEM.search(r.getMessage())]
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()
    # and the LoRA matters: the base alone gives something else
    base_out = b.distiller.sample(b.nets.__class__(**{**b.nets.__dict__, "student": b.nets.teacher.denoiser}),
                                  b.family.encode_prompts([prompt]), x_T, generator=torch.Generator().manual_seed(7), steps=steps)
    assert not torch.allclose(base_out.float(), theirs.float(), atol=1e-4)


def test_sdxl_run_end_to_end(tiny_sdxl_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    run_cli(train_args("configs/tiny/lcm_sdxl.yaml", out, tiny_sdxl_dir, prompts_file, "loop.max_steps=2"))
    recipe = Recipe.load(out / "final")
    assert recipe.family == "sdxl"
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    pipe.load_lora_weights(str(out / "final"))
    img = pipe(prompt=["a red circle"], output_type="latent", generator=torch.Generator().manual_seed(0),
               **recipe.call_kwargs(pipe.scheduler)).images
    assert torch.isfinite(img).all()


def test_resume_after_kill_is_bit_identical(tiny_sd15_dir, prompts_file, tmp_path):
    sets = ("loop.max_steps=4", "loop.checkpoint_every=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_cli(train_args("configs/tiny/lcm_sd15.yaml", straight, tiny_sd15_dir, prompts_file, *sets))
    killed = run_cli(train_args("configs/tiny/lcm_sd15.yaml", resumed, tiny_sd15_dir, prompts_file, *sets),
                     check=False, STEPDISTILL_KILL_AT="step:3")
    assert killed.returncode != 0 and not (resumed / "final").exists()
    assert (resumed / "checkpoints" / "step-000002").is_dir()
    run_cli(train_args("configs/tiny/lcm_sd15.yaml", resumed, tiny_sd15_dir, prompts_file, *sets))
    assert_same_lora(straight / "final", resumed / "final")
