"""SDXL's size conditioning (time_ids) follows model.resolution in every cond of a run, the recipe records it, and a
fresh pipeline called with the recipe conditions the same way (so it reproduces the student). Real images condition
with their own original size and crop (data.images.SIZE_FIELDS), in every network call on their latents."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from stepdistill.config import load_config
from stepdistill.core.recipe import Recipe
from stepdistill.data.images import read_image_folder
from stepdistill.models import load_family
from stepdistill.models.tiny import TINY_PROMPTS
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


# ---- real images: each its own original size and crop -------------------------------------------------------------

def test_real_image_time_ids_at_a_non_default_resolution(tiny_sdxl_dir):
    model = load_family(tiny_sdxl_dir)
    model.resolution = 512
    cond = model.encode_prompts(["a red cat", "a blue car"])
    real = model.with_image_sizes(cond, torch.tensor([[600, 1200, 0, 256], [900, 512, 100, 0]]))
    assert real.added_cond_kwargs["time_ids"].tolist() == [[600, 1200, 0, 256, 512, 512],
                                                           [900, 512, 100, 0, 512, 512]]
    assert real.encoder_hidden_states is cond.encoder_hidden_states
    assert real.added_cond_kwargs["text_embeds"] is cond.added_cond_kwargs["text_embeds"]
    assert_time_ids(cond, 512)  # generated samples keep (res, res, 0, 0, res, res)
    with pytest.raises(ValueError, match="one per real image"):
        model.with_image_sizes(cond, torch.zeros(3, 4, dtype=torch.long))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Four captioned images of different, mostly non-square sizes (width, height)."""
    root = tmp_path_factory.mktemp("images")
    for i, (w, h) in enumerate([(80, 40), (40, 96), (50, 36), (48, 48)]):
        Image.new("RGB", (w, h), (40 * i, 200, 90)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text(TINY_PROMPTS[i])
    return root


def _spied_run(config, sets, out, monkeypatch):
    """Train with a spy on the UNet: (time_ids of each call made inside an iteration, the run's image size rows)."""
    calls, inside = [], [False]
    setup, iteration = Trainer.setup, Trainer.iteration

    def spy(module, args, kwargs):
        if inside[0]:
            calls.append(kwargs["added_cond_kwargs"]["time_ids"].detach().cpu().long().tolist())

    def spied_setup(self, built=None):
        result = setup(self, built)
        self.built.nets.denoiser.register_forward_pre_hook(spy, with_kwargs=True)
        return result

    def spied_iteration(self, **kwargs):
        inside[0] = True
        try:
            return iteration(self, **kwargs)
        finally:
            inside[0] = False

    monkeypatch.setattr(Trainer, "setup", spied_setup)
    monkeypatch.setattr(Trainer, "iteration", spied_iteration)
    cfg = load_config(ROOT / config, [*sets, "loop.progress=false", "model.resolution=32"])
    trainer = Trainer(cfg, out)
    trainer.run()
    trainer.close()
    return calls


def _image_rows(folder, resolution=32):
    _, _, sizes, _ = read_image_folder(folder, resolution)
    return {tuple(r) + (resolution, resolution) for r in sizes.tolist()}


GENERATED = (32, 32, 0, 0, 32, 32)


def test_consistency_on_real_images_conditions_every_call_on_each_images_size(tiny_sdxl_dir, image_folder, tmp_path,
                                                                               monkeypatch):
    """LCM on real latents (streamed: StreamData's path): student, teacher (both CFG halves) and target all read the
    images' own rows, never the run's uncropped square."""
    rows = _image_rows(image_folder)
    assert GENERATED not in rows and len(rows) == 4
    calls = _spied_run("configs/tiny/lcm_sdxl.yaml", [
        f"model.path={tiny_sdxl_dir}", f"data.images={image_folder}", "data.cache=stream", "loop.max_steps=2"],
        tmp_path / "run", monkeypatch)
    assert len(calls) >= 6  # per step: teacher (2B rows), target, student
    for ids in calls:
        assert {tuple(r) for r in ids} <= rows, ids
    cfg_calls = [ids for ids in calls if len(ids) == 4]  # the teacher's CFG: cond rows, then uncond rows
    assert cfg_calls and all(ids[:2] == ids[2:] for ids in cfg_calls)


def test_dmd_gan_critic_gives_real_and_generated_rows_the_runs_conditioning(tiny_sdxl_dir, image_folder, tmp_path,
                                                                            monkeypatch):
    """DMD's GAN critic call holds B real rows then B generated rows, all with the run's ids (DMD2): with each image's
    own size ids on the real rows the head could tell real from fake by the time embedding alone. No call of a dmd
    run sees the images' size rows."""
    rows = _image_rows(image_folder)
    calls = _spied_run("configs/tiny/dmd_sdxl.yaml", [
        f"model.path={tiny_sdxl_dir}", f"data.images={image_folder}", "data.cache=memory", "method.gan=true",
        "method.regression_steps=0", "loop.max_steps=1"], tmp_path / "run", monkeypatch)
    assert not rows & {GENERATED}, "the images must differ in size from the run for this test to see anything"
    assert any(len(ids) == 4 for ids in calls), "no critic call of 2B rows"
    for ids in calls:
        assert all(tuple(r) == GENERATED for r in ids), ids


@pytest.mark.parametrize("method", ["dmd", "disback"])
def test_gan_critic_sees_real_and_fake_sides_alike_but_for_the_latents(tiny_sdxl_dir, image_folder, tmp_path, method):
    """Swapping which latents are real and which generated (each side keeping the batch's size rows) changes nothing
    the critic's feature call sees but the latents: the conditioning rows of both halves are the same."""
    from stepdistill.methods.base import Batch

    config = {"dmd": "configs/tiny/dmd_sdxl.yaml", "disback": "configs/tiny/disback_sdxl.yaml"}[method]
    cfg = load_config(ROOT / config, [f"model.path={tiny_sdxl_dir}", f"data.images={image_folder}", "data.cache=memory",
                                      "method.gan=true", "loop.progress=false", "model.resolution=32",
                                      *(["method.regression_steps=0"] if method == "dmd" else [])])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.setup()
    built = trainer.built
    distiller = built.distiller
    seen = []
    middle = distiller.features.middle

    def spy(net, x_t, t, cond):
        seen.append((x_t.detach().clone(), cond))
        return middle(net, x_t, t, cond)

    distiller.features.middle = spy
    if method == "disback":
        distiller._step = distiller.path.record_end  # its stage 2 is dmd's critic (stage 1 records the degradation path)
    prompts, cond, uncond, _, _ = built.data.next()
    n = len(prompts)
    shape = (n, *built.ctx.latent_shape)
    image_ids = torch.tensor([[48.0, 40.0, 3.0, 5.0, 32.0, 32.0]] * n)  # an image's own original size and crop
    real_cond = built.family.with_image_sizes(cond, image_ids[:, :4])
    a, b = torch.randn(shape, generator=torch.Generator().manual_seed(1)), torch.randn(shape)
    for real, fake in ((a, b), (b, a)):
        batch = Batch(cond=cond, uncond=uncond, prompts=prompts, latent_shape=shape, latents=real, real_cond=real_cond)
        distiller.critic_loss(built.nets, batch, fake)
    (x1, c1), (x2, c2) = seen
    for c in (c1, c2):
        time_ids = c.added_cond_kwargs["time_ids"]
        assert torch.equal(time_ids[:n], time_ids[n:]), time_ids  # real rows conditioned as the generated rows
        assert torch.equal(c.encoder_hidden_states[:n], c.encoder_hidden_states[n:])
        assert torch.equal(c.added_cond_kwargs["text_embeds"][:n], c.added_cond_kwargs["text_embeds"][n:])
    assert torch.equal(c1.added_cond_kwargs["time_ids"], c2.added_cond_kwargs["time_ids"])
    assert not torch.equal(x1, x2)  # ... while the latents did change sides
    trainer.close()
