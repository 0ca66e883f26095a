"""The wan family on a tiny stock WanPipeline (text to video): dmd at 4 steps (non-square, height x width as
WanPipeline's 480 x 832 default) and tscd with two segment stages train from the CLI on (B, C, frames, h, w) latents,
and the exported LoRA with its recipe (WanPipeline's UniPC scheduler at first order, step count, size, frames, prompt
length) reproduces the training-time student in the stock pipeline to 1e-4 (fp32); the training call's timestep and
sigmas are the pipeline's at every recipe step (fp32 and bf16)."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanPipeline

from stepdistill import pipelines
from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.core.solvers import trailing_timesteps
from stepdistill.export import DIFFUSERS_WEIGHT_NAME
from stepdistill.models import load_family
from stepdistill.models.tiny import save_tiny_pipeline
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


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "wan", family="wan", seed=0)


@pytest.fixture(scope="module", params=["dmd_wan_4step", "tscd_wan"])
def trained(request, wan_dir, prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    run_cli(train_args(f"configs/tiny/{request.param}.yaml", out, wan_dir, prompts_file))
    trainer = Trainer(load_config(out / "resolved_config.yaml", []), out)  # resumes the finished run: no update
    return trainer, trainer.run()


def _run(pipe, recipe, x_T):
    return pipe(prompt=[PROMPT], latents=x_T.clone(), output_type="latent", generator=torch.Generator().manual_seed(7),
                **recipe.call_kwargs(pipe.scheduler)).frames


def test_video_dmd_export_runs_as_the_student_in_the_stock_pipeline(trained, wan_dir):
    trainer, final = trained
    recipe = Recipe.load(final)
    # WanPipeline takes no sigmas: the recipe is its UniPC scheduler made first order (Euler) and the step count whose
    # trailing grid the student was trained on (tscd: the last stage's 2 segments).
    steps = 4 if recipe.method == "dmd" else 2
    assert recipe.sigmas is None and recipe.num_inference_steps == steps
    assert recipe.scheduler_class == "UniPCMultistepScheduler"
    assert {k: recipe.scheduler_config[k] for k in ("flow_shift", "solver_order", "disable_corrector")} == {
        "flow_shift": 3.0, "solver_order": 1, "disable_corrector": list(range(steps))}
    # dmd trains non-square (height x width), as WanPipeline's default 480 x 832; the recipe carries both sides.
    height, width = (16, 32) if recipe.method == "dmd" else (16, 16)
    assert recipe.size_conditioning == {"height": height, "width": width, "num_frames": 5}
    if recipe.method == "tscd":  # the first stage's export: 4 segments, WanPipeline's 4-step grid
        stage = Recipe.load(trainer.out / "stages" / "stage1-k4")
        assert stage.num_inference_steps == 4 and stage.scheduler_config["disable_corrector"] == [0, 1, 2, 3]
    ours, _, x_T = student_latents(trainer.built, PROMPT)
    assert x_T.shape == (1, 16, 3, height // 2, width // 2)  # (C, latent frames, h, w): one sample is the whole clip
    pipe, recipe = fresh_pipeline(WanPipeline, wan_dir, final)
    assert applied_lora_layers(pipe.transformer) == len(lora_file_modules(final / DIFFUSERS_WEIGHT_NAME)) > 0
    theirs = _run(pipe, recipe, x_T)
    torch.testing.assert_close(theirs.float(), ours.float(), atol=1e-4, rtol=1e-4)
    bare = WanPipeline.from_pretrained(wan_dir)
    bare.scheduler = recipe.make_scheduler(bare.scheduler.config)
    bare.set_progress_bar_config(disable=True)
    assert (_run(bare, recipe, x_T) - theirs).abs().max() > 1e-4
    # pipelines.load (what `stepdistill generate` uses) builds the same student.
    loaded = pipelines.load(None, final)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(loaded, recipe, x_T).float(), ours.float(), atol=1e-4, rtol=1e-4)


def test_bf16_student_output_equals_the_bf16_pipelines_at_every_recipe_timestep(trained, wan_dir):
    """Base and adapters in bf16: at each step of dmd's 4-step grid, the stock WanPipeline's transformer output equals
    the training-time student's on the same latents, to bf16 rounding (helpers). The old cast of 1000 sigma to bf16
    misses at t = 666."""
    trainer, final = trained
    if Recipe.load(final).num_inference_steps == 1:
        pytest.skip("one step: test_contract.py's tscd-wan case")
    visited = assert_bf16_student_equals_the_pipeline(trainer.built, wan_dir, final, PROMPT)
    assert visited == trainer.built.nets.schedule.grid(Recipe.load(final).num_inference_steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_training_call_sees_the_pipelines_sigmas_and_timesteps(wan_dir, dtype):
    """The stock WanPipeline's UniPC scheduler (first order) at k steps visits the training table's sigmas at the
    trailing timesteps, for every k that divides 1000, and tells the transformer the same int64 timestep, latents and
    text as the training call (a non-square clip)."""
    from stepdistill.core.denoiser import Denoiser

    model = load_family(wan_dir, dtype=dtype)
    model.resolution, model.frames, model.t5_max_length = (32, 16), 5, 16
    schedule = model.noise_schedule()
    for k in (1, 2, 4, 5, 8, 10, 20, 25, 40, 50):
        scheduler = Recipe(base_model=str(wan_dir), family="wan", method="dmd",
                           **schedule.pipeline_sampling(schedule.grid(k))).make_scheduler(model.scheduler_config)
        scheduler.set_timesteps(k)
        timesteps = torch.tensor(trailing_timesteps(k, 1000))
        assert torch.allclose(scheduler.sigmas[:-1].double(), schedule.sigma(timesteps), rtol=0, atol=1e-6), k
        assert torch.equal(scheduler.timesteps, schedule.pipeline_timestep(timesteps)), k
    timesteps = schedule.grid(4)
    assert timesteps == [999, 749, 499, 249]
    sampling = schedule.pipeline_sampling(timesteps)
    pipe = model.pipeline(Recipe(base_model=str(wan_dir), family="wan", method="dmd", **sampling).make_scheduler(
        model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    hook = model.unet.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        x_T = torch.randn((1, *model.latent_shape(1)[1:]), generator=torch.Generator().manual_seed(0))
        assert x_T.shape == (1, 16, 3, 16, 8)
        pipe(prompt=[PROMPT], latents=x_T, output_type="latent", guidance_scale=0.0, max_sequence_length=16,
             num_inference_steps=4, **model.size_conditioning())
        theirs, calls[:] = list(calls), []
        denoiser = Denoiser(model.unet, schedule, dtype=dtype, call=model.denoiser_call,
                            network_timestep=model.network_timestep)
        cond = model.encode_prompts([PROMPT])
        for t in timesteps:
            denoiser.raw(x_T, torch.tensor([t]), cond)
    finally:
        hook.remove()
    assert len(theirs) == len(calls) == 4
    for a, b in zip(calls, theirs):
        # WanPipeline hands the transformer its UniPC scheduler's int64 t, whatever the network's dtype.
        assert a["timestep"].dtype == b["timestep"].dtype == torch.int64
        assert torch.equal(a["timestep"], b["timestep"]), (a["timestep"], b["timestep"])
        assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"].to(dtype))
    assert torch.equal(calls[0]["hidden_states"], theirs[0]["hidden_states"])


def test_off_grid_timesteps_and_sizes_are_refused_in_one_line(wan_dir, prompts_file, tmp_path):
    from stepdistill.config import ConfigError

    # A dmd run whose 4 timesteps are not WanPipeline's 4-step grid stops before any update.
    cfg = load_config(ROOT / "configs/tiny/dmd_wan_4step.yaml", [f"model.path={wan_dir}", f"data.prompts={prompts_file}",
                                                               "loop.progress=false", "method.timesteps=[999, 666, 333, 0]"])
    with pytest.raises(ConfigError, match=r"method.timesteps=\[999, 749, 499, 249\]") as err:
        Trainer(cfg, tmp_path / "run").run()
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "checkpoints").exists()
    model = load_family(wan_dir)
    assert model.shard_units() == list(model.unet.blocks)  # FSDP2's units: WanTransformer3DModel's `blocks`
    schedule = model.noise_schedule()
    refusals = [(lambda: schedule.pipeline_sampling([999, 666, 333, 0]), r"method.timesteps=\[999, 749, 499, 249\]"),
                (lambda: schedule.grid(3), "a step count dividing 1000"),
                (lambda: model.latent_shape(1, (16, 24)), r"multiple of 16 x 16 .*model.resolution=\[16, 16\]"),
                (lambda: setattr(model, "frames", 6) or model.latent_shape(1, 16), "model.frames=5")]
    for call, message in refusals:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_resolution_is_a_side_or_height_and_width(wan_dir, prompts_file, tiny_sd15_dir, tmp_path):
    """model.resolution: one side (square) for every family, [height, width] where the family takes it (wan); a square
    family refuses a pair in one line, from the config or once an auto-detected model is loaded."""
    from stepdistill.config import ConfigError
    from stepdistill.models.base import normal_size

    base = [f"model.path={wan_dir}", f"data.prompts={prompts_file}"]
    assert load_config(ROOT / "configs/tiny/dmd_wan.yaml", [*base, "model.resolution=[16, 32]"]).model.resolution == [16, 32]
    assert load_config(ROOT / "configs/tiny/dmd_wan.yaml", [*base, "model.resolution=[16, 16]"]).model.resolution == 16
    assert normal_size([480, 832]) == (480, 832) and normal_size(480) == 480 and normal_size(0) is None
    with pytest.raises(ConfigError, match=r"sd15 trains square images.*\[height, width\] is for families such as wan"):
        load_config(ROOT / "configs/tiny/dmd_sd15.yaml", ["model.resolution=[16, 32]"])
    with pytest.raises(ConfigError, match="one side or \\[height, width\\]"):
        load_config(ROOT / "configs/tiny/dmd_wan.yaml", [*base, "model.resolution=[16, 32, 8]"])
    auto = load_config(ROOT / "configs/tiny/dmd_sd15.yaml", [f"model.path={tiny_sd15_dir}", f"data.prompts={prompts_file}",
                                                               "model.family=auto", "model.resolution=[16, 32]",
                                                               "loop.progress=false"])
    with pytest.raises(ConfigError, match="sd15 trains square images") as err:
        Trainer(auto, tmp_path / "run").run()
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "checkpoints").exists()


def test_generate_writes_an_animated_webp_and_the_frames(trained, tmp_path, monkeypatch):
    """`stepdistill generate` for a video LoRA: an animated WebP (Pillow, no system binary) plus one PNG per frame;
    the model card's snippet makes the same frames with the stock pipeline."""
    import numpy as np
    from PIL import Image

    from stepdistill.card import usage_snippet
    from stepdistill.generate import generate_image

    _, final = trained
    if Recipe.load(final).method != "dmd":
        pytest.skip("one run is enough for the file format")
    out = generate_image(final, PROMPT, tmp_path / "clip.webp", seed=0)
    with Image.open(out) as im:
        assert im.format == "WEBP" and getattr(im, "n_frames", 1) == 5 and im.size == (32, 16)  # width x height
    frames = sorted((tmp_path / "clip_frames").glob("*.png"))
    assert len(frames) == 5
    namespace = {}
    monkeypatch.chdir(tmp_path)
    exec(compile(usage_snippet(Recipe.load(final), str(final), prompt=PROMPT, seed=0), "README.md", "exec"), namespace)  # noqa: S102
    assert (tmp_path / "stepdistill.webp").is_file() and len(namespace["frames"]) == 5
    for ours, path in zip(namespace["frames"], frames):
        with Image.open(path) as theirs:
            assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    with pytest.raises(Exception, match="animated WebP"):
        generate_image(final, PROMPT, tmp_path / "clip.png", seed=0)


def test_gan_terms_refuse_video_in_one_line(wan_dir, prompts_file, tmp_path):
    """The discriminators read 2D maps (a UNet's mid block, an image transformer's token grid): on Wan's video DiT the
    GAN term refuses at start, in one line, before any update."""
    from stepdistill.config import ConfigError

    cfg = load_config(ROOT / "configs/tiny/dmd_wan.yaml", [f"model.path={wan_dir}", f"data.prompts={prompts_file}",
                                                    "loop.progress=false", "method.gan=true"])
    with pytest.raises((ValueError, ConfigError), match="cannot read a WanTransformer3DModel") as err:
        Trainer(cfg, tmp_path / "run").run()
    assert "\n" not in str(err.value) and not (tmp_path / "run" / "checkpoints").exists()


def test_comfyui_layout_loads_with_every_tensor_applied(trained, wan_dir):
    """`diffusion_model.blocks.N.self_attn.q...` (Wan's own names), which diffusers' Wan converter maps back."""
    from stepdistill.export import KOHYA_WEIGHT_NAME

    trainer, final = trained
    if Recipe.load(final).method != "dmd":
        pytest.skip("one run is enough for the file layout")
    _, _, x_T = student_latents(trainer.built, PROMPT)
    pipe_d, recipe = fresh_pipeline(WanPipeline, wan_dir, final)
    pipe_k, _ = fresh_pipeline(WanPipeline, wan_dir, final, weight_name=KOHYA_WEIGHT_NAME)
    modules = lora_file_modules(final / DIFFUSERS_WEIGHT_NAME)
    assert applied_lora_layers(pipe_k.transformer) == applied_lora_layers(pipe_d.transformer) == len(modules)
    torch.testing.assert_close(_run(pipe_k, recipe, x_T), _run(pipe_d, recipe, x_T), atol=1e-5, rtol=1e-5)
