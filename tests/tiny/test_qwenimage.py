"""The qwenimage family on a tiny stock QwenImagePipeline: dmd and tscd train from the CLI, the exported LoRA (diffusers
and ComfyUI layouts) loads into the stock pipeline with every tensor applied and reproduces the training-time student
with the recipe to 1e-4 (fp32); prompt encoding, sigmas and the transformer's timestep equal the pipeline's."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import QwenImagePipeline

from stepdistill import pipelines
from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from stepdistill.models import load_family
from stepdistill.models.tiny import TINY_PROMPTS, save_tiny_pipeline
from stepdistill.train.loop import Trainer

from .helpers import (
    ROOT,
    applied_lora_layers,
    assert_bf16_student_equals_the_pipeline,
    fresh_pipeline,
    lora_file_modules,
    run_cli,
    student_latents,
    train_args,
)

torch.set_num_threads(1)
PROMPT = "a red cat on the sea"
EIGHT_STEPS = [999, 874, 749, 624, 499, 374, 249, 124]  # trailing_timesteps(8, 1000)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "qwenimage", family="qwenimage", seed=0)


@pytest.fixture(scope="module", params=["dmd", "tscd"])
def trained(request, qwen_dir, prompts_file, tmp_path_factory):
    """A CLI run of the method's tiny preset; then the same command in-process, which resumes the finished run (no
    update) and so holds the trained student."""
    out = tmp_path_factory.mktemp(request.param) / "run"
    run_cli(train_args(f"configs/tiny/{request.param}_qwenimage.yaml", out, qwen_dir, prompts_file))
    trainer = Trainer(load_config(out / "resolved_config.yaml", []), out)
    final = trainer.run()
    return request.param, trainer, final


def _run(pipe, recipe, x_T, family):
    kwargs = recipe.call_kwargs(pipe.scheduler)
    latents = pipe(prompt=[PROMPT], latents=family.to_pipeline_latents(x_T.clone()), output_type="latent",
                   generator=torch.Generator().manual_seed(7), **kwargs).images
    return family.from_pipeline_latents(latents, *x_T.shape[-2:])


def test_cli_run_exports_a_lora_the_stock_pipeline_runs_as_the_student(trained, qwen_dir):
    method, trainer, final = trained
    lines = [json.loads(x) for x in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert lines and all(x["nonfinite_steps"] == 0 and math.isfinite(x["loss"]) for x in lines)
    recipe = Recipe.load(final)
    assert recipe.family == "qwenimage" and recipe.scheduler_class == "FlowMatchEulerDiscreteScheduler"
    # The trained size and prompt length travel in the recipe (the pipeline's defaults are 1024 px and 512 tokens).
    assert recipe.size_conditioning == {"height": 16, "width": 16} and recipe.max_sequence_length == 16
    if method == "dmd":
        assert recipe.sigmas == [1.0]
    family = trainer.built.family
    ours, _, x_T = student_latents(trainer.built, PROMPT)
    pipe, recipe = fresh_pipeline(QwenImagePipeline, qwen_dir, final)
    assert applied_lora_layers(pipe.transformer) == len(lora_file_modules(final / DIFFUSERS_WEIGHT_NAME)) > 0
    theirs = _run(pipe, recipe, x_T, family)
    torch.testing.assert_close(theirs.float(), ours.float(), atol=1e-4, rtol=1e-4)
    # The LoRA matters: the bare base gives something else.
    bare = QwenImagePipeline.from_pretrained(qwen_dir)
    bare.scheduler = recipe.make_scheduler(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    assert (_run(bare, recipe, x_T, family) - theirs).abs().max() > 1e-4
    # pipelines.load (what `stepdistill generate` uses) builds the same student, at the trained size by default.
    loaded = pipelines.load(None, final)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(loaded, recipe, x_T, family).float(), ours.float(), atol=1e-4, rtol=1e-4)
    image = pipelines.generate(loaded, recipe, [PROMPT], seed=0)[0]
    assert image.size == (16, 16)


def test_comfyui_layout_loads_with_every_tensor_applied(trained, qwen_dir):
    """`diffusion_model.<module>.lora_down / lora_up / alpha`, which diffusers' Qwen converter maps back."""
    method, trainer, final = trained
    if method != "dmd":
        pytest.skip("one run is enough for the file layout")
    _, _, x_T = student_latents(trainer.built, PROMPT)
    pipe_d, recipe = fresh_pipeline(QwenImagePipeline, qwen_dir, final)
    pipe_k, _ = fresh_pipeline(QwenImagePipeline, qwen_dir, final, weight_name=KOHYA_WEIGHT_NAME)
    modules = lora_file_modules(final / DIFFUSERS_WEIGHT_NAME)
    assert applied_lora_layers(pipe_k.transformer) == applied_lora_layers(pipe_d.transformer) == len(modules)
    family = trainer.built.family
    torch.testing.assert_close(_run(pipe_k, recipe, x_T, family), _run(pipe_d, recipe, x_T, family), atol=1e-5,
                               rtol=1e-5)


@pytest.fixture(scope="module")
def eight_step(qwen_dir, prompts_file, tmp_path_factory):
    """An 8-step dmd student (one update): the multi-step Qwen-Image case of the bf16 tier (test_contract's tiny
    presets give one-step Qwen-Image recipes). Its steps 874 and 124 are where the pipeline's bf16 timestep,
    bf16(bf16(1000 sigma) / 1000), differs from bf16(sigma); at 749, 499 and 249 the two agree."""
    cfg = load_config(ROOT / "configs/tiny/dmd_qwenimage.yaml", [
        f"model.path={qwen_dir}", f"data.prompts={prompts_file}", "loop.progress=false", "loop.max_steps=1",
        f"method.timesteps={EIGHT_STEPS}".replace(" ", "")])
    trainer = Trainer(cfg, tmp_path_factory.mktemp("dmd_8step") / "run")
    try:
        return trainer, trainer.run()
    finally:
        trainer.close()


def test_bf16_eight_step_student_equals_the_bf16_pipeline_at_every_recipe_timestep(eight_step, qwen_dir):
    """Base and adapters in bf16: at each of the 8 steps the stock QwenImagePipeline's transformer output equals the
    training-time student's on the same latents and text, to bf16 rounding (helpers). Telling the network bf16(sigma)
    instead of the pipeline's bf16(bf16(1000 sigma) / 1000) misses at t = 874 and 124."""
    trainer, final = eight_step
    assert assert_bf16_student_equals_the_pipeline(trainer.built, qwen_dir, final, PROMPT) == EIGHT_STEPS


def test_prompt_encoding_equals_the_pipelines_encode_prompt(qwen_dir):
    from stepdistill.models.families.qwenimage import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP

    model = load_family(qwen_dir)
    # Our tokenizer splits the template's system turn into exactly the tokens the pipeline drops, as Qwen's own does.
    system_turn = PROMPT_TEMPLATE.split("{}")[0]
    assert len(model.tokenizers[0](system_turn).input_ids) == PROMPT_TEMPLATE_DROP == 34
    model.t5_max_length = 20
    pipe = model.pipeline()
    cond = model.encode_prompts(TINY_PROMPTS[:3])
    embeds, mask = pipe.encode_prompt(TINY_PROMPTS[:3], max_sequence_length=20)
    n = embeds.shape[1]
    # The pipeline pads to the batch's longest prompt, we to max_sequence_length: the same tokens, then masked zeros.
    assert torch.equal(cond.encoder_hidden_states[:, :n], embeds)
    assert not cond.encoder_hidden_states[:, n:].any()
    assert torch.equal(cond.added_cond_kwargs["encoder_hidden_states_mask"][:, :n], mask)
    assert not cond.added_cond_kwargs["encoder_hidden_states_mask"][:, n:].any()
    empty, _ = pipe.encode_prompt([""], max_sequence_length=20)
    assert empty.shape[1] == 5  # the template's closing tokens only
    assert torch.equal(model.empty_cond(1).encoder_hidden_states[:, :5], empty)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_call_sees_the_pipelines_sigmas_and_timesteps(qwen_dir, dtype):
    """At every step of an 8-step recipe: the scheduler's sigmas are the training table's, and the transformer gets the
    same timestep, packed latents, text, mask and img_shapes from the training call as from the stock pipeline. (At
    t = 874 and 124 the pipeline's bf16 timestep, bf16(1000 sigma) / 1000, differs from bf16(sigma).)"""
    from stepdistill.core.denoiser import Denoiser
    from stepdistill.core.solvers import trailing_timesteps
    from stepdistill.methods.base import flow_euler_recipe

    model = load_family(qwen_dir, dtype=dtype)
    model.resolution, model.t5_max_length = 16, 16
    schedule = model.noise_schedule()
    timesteps = trailing_timesteps(8, 1000)
    recipe = Recipe(base_model=str(qwen_dir), family="qwenimage", method="dmd",
                    **flow_euler_recipe(schedule, timesteps, model), size_conditioning=model.size_conditioning(),
                    max_sequence_length=16)
    pipe = model.pipeline(recipe.make_scheduler(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        x_T = torch.randn((1, *model.latent_shape(1)[1:]), generator=torch.Generator().manual_seed(0))
        pipe(prompt=[PROMPT], latents=model.to_pipeline_latents(x_T).to(dtype), output_type="latent",
             **recipe.call_kwargs(pipe.scheduler))
        theirs, calls[:] = list(calls), []
        assert torch.allclose(pipe.scheduler.sigmas[:-1].double(), schedule.sigma(torch.tensor(timesteps)), atol=1e-6)
        denoiser = Denoiser(model.unet, schedule, dtype=dtype, call=model.denoiser_call,
                            network_timestep=model.network_timestep)
        cond = model.encode_prompts([PROMPT])
        for t in timesteps:
            denoiser.raw(x_T, torch.tensor([t]), cond)
    finally:
        hook.remove()
    assert len(theirs) == len(calls) == 8
    for t, a, b in zip(timesteps, calls, theirs):
        assert a["timestep"].dtype == b["timestep"].dtype == dtype
        if dtype != torch.float32:  # both round the same float32 t: bit-equal
            assert torch.equal(a["timestep"], b["timestep"]), (t, a["timestep"], b["timestep"])
        else:  # the pipeline shifts its sigmas in float32 arithmetic, the table in float64: within 2 float32 ulps
            torch.testing.assert_close(a["timestep"], b["timestep"], rtol=2**-22, atol=0)
        assert a["img_shapes"] == b["img_shapes"] == [[(1, 4, 4)]]
        n = b["encoder_hidden_states"].shape[1]
        assert torch.equal(a["encoder_hidden_states"][:, :n], b["encoder_hidden_states"])
    assert torch.equal(calls[0]["hidden_states"], theirs[0]["hidden_states"])  # the packed x_T, same layout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_cfg_is_the_pipelines_true_cfg(qwen_dir, prompts_file, dtype):
    """The teacher the builder hands every method (dmd's real score, tscd's guided ODE step) guides as
    QwenImagePipeline(true_cfg_scale=w, negative_prompt="") does: comb = v_u + w (v_c - v_u), rescaled per packed token
    to |v_c| / |comb|. Compared with the velocity the stock pipeline hands its scheduler at the same sigma and latents."""
    from stepdistill.methods.base import flow_euler_recipe
    from stepdistill.train.build import build

    from .helpers import ROOT

    w, t = 4.0, 749
    cfg = load_config(ROOT / "configs/tiny/dmd_qwenimage.yaml", [f"model.path={qwen_dir}", f"data.prompts={prompts_file}",
                      f"model.dtype={'bf16' if dtype == torch.bfloat16 else 'fp32'}", "loop.progress=false"])
    built = build(cfg, torch.device("cpu"), progress=False)
    model, schedule = built.family, built.nets.schedule
    x_t = torch.randn((1, *built.ctx.latent_shape), generator=torch.Generator().manual_seed(0))
    ours = built.nets.teacher(x_t, torch.tensor([t]), model.encode_prompts([PROMPT]), guidance_scale=w)
    v_ours = ours.eps - ours.x0

    pipe = QwenImagePipeline.from_pretrained(qwen_dir, torch_dtype=dtype)
    recipe = Recipe(base_model=str(qwen_dir), family="qwenimage", method="dmd", **flow_euler_recipe(schedule, [t], model),
                    size_conditioning=model.size_conditioning(), max_sequence_length=16)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    seen, step = [], pipe.scheduler.step
    pipe.scheduler.step = lambda out, *a, **k: (seen.append(out.clone()), step(out, *a, **k))[1]
    kwargs = {**recipe.call_kwargs(pipe.scheduler), "guidance_scale": None}
    pipe(prompt=[PROMPT], negative_prompt="", true_cfg_scale=w, latents=model.to_pipeline_latents(x_t).to(dtype),
         output_type="latent", **kwargs)
    assert torch.isclose(pipe.scheduler.sigmas[0].double(), schedule.sigma(t)[0], atol=1e-6)
    v_pipe = model.from_pipeline_latents(seen[0], *x_t.shape[-2:]).double()
    # fp32: the two runs differ only in batching and the text padding the mask hides; bf16: the pipeline guides and
    # rescales in bf16 (each of its 2 w + 1 terms rounds to 2^-8 relative), we in float64 from bf16 network outputs.
    scale = float(v_pipe.abs().max())
    atol = 1e-5 * scale if dtype == torch.float32 else (2 * w + 1) * 2**-8 * scale
    torch.testing.assert_close(v_ours, v_pipe, rtol=0, atol=atol)
    if dtype == torch.float32:
        # Plain CFG (what the teacher did before) is another velocity, by over 1e3 x the fp32 tolerance here (in bf16 the
        # tiny model's rescale, about 2 % of |v|, is within the pipeline's own bf16 rounding, so only fp32 can tell).
        plain = built.nets.teacher.with_scale(w)
        plain.rule = None
        linear = plain(x_t, torch.tensor([t]), model.encode_prompts([PROMPT]))
        assert (linear.eps - linear.x0 - v_pipe).abs().max() > 100 * atol
