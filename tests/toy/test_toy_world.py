"""The toy world: deterministic data, shipped teachers that load and generate, a judge that reads images, toy FID."""

import numpy as np
import pytest
import torch

from stepdistill.data.toy_world import (
    COLOURS,
    LABEL_FIELDS,
    SHAPES,
    TOY_WORDS,
    ToyWorld,
    caption_from_label,
    parse_caption,
    to_float,
    to_uint8,
    toy_asset_path,
    toy_prompts,
)
from stepdistill.metrics.fid import FeatureStats
from stepdistill.metrics.toy_judge import load_judge, matches


@pytest.fixture(scope="module")
def judge():
    torch.set_num_threads(1)
    return load_judge()


@pytest.fixture(scope="module")
def real():
    return ToyWorld().sample(300, seed=123)


def test_generator_is_deterministic_and_seeded():
    world = ToyWorld()
    a, caps_a, labels_a = world.sample(32, seed=7)
    b, caps_b, labels_b = world.sample(32, seed=7)
    c, _, _ = world.sample(32, seed=8)
    assert a.dtype == np.uint8 and a.shape == (32, 32, 32, 3)
    assert np.array_equal(a, b) and caps_a == caps_b and np.array_equal(labels_a, labels_b)
    assert not np.array_equal(a, c)
    x, caps_x, _ = world.sample(32, seed=7, as_float=True)
    assert x.shape == (32, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert caps_x == caps_a and np.array_equal(to_uint8(x), a)


def test_world_covers_shapes_colours_layouts_and_backgrounds():
    images, captions, labels = ToyWorld().sample(500, seed=0)
    assert set(labels[:, 1]) == set(range(len(SHAPES))) and set(labels[:, 2]) == set(range(len(COLOURS)))
    assert len(COLOURS) >= 6 and {"circle", "square", "triangle"} <= set(SHAPES)
    assert set(labels[:, 0]) == set(range(7))
    singles = labels[:, 0] < 5
    assert 0.3 < singles.mean() < 0.5 and (labels[singles, 4:] == -1).all() and (labels[~singles, 4:] >= 0).all()
    corners = images[:, 0, 0].astype(int)  # top-left pixel: background (objects stay off the border)
    assert len({tuple(c // 32) for c in corners}) > 5
    assert all(set(c.split()) <= set(TOY_WORDS) for c in captions)


def test_captions_round_trip_and_errors():
    _, captions, labels = ToyWorld().sample(200, seed=1)
    for caption, label in zip(captions, labels):
        assert np.array_equal(parse_caption(caption), label)
        assert caption_from_label(label) == caption
    assert parse_caption("a small red circle above a large blue square").tolist() == [5, 0, 0, 0, 1, 2, 1]
    with pytest.raises(ValueError, match="colours"):
        parse_caption("a small pink circle on the left")
    assert toy_prompts(5, seed=2) == toy_prompts(5, seed=2) != toy_prompts(5, seed=3)


def test_judge_reads_real_images_and_rejects_shuffled_captions(judge, real):
    images, captions, labels = real
    assert judge.alignment(images, captions) > 0.97
    assert judge.alignment(to_float(images), labels) > 0.97
    shuffled = list(np.random.default_rng(0).permutation(captions))
    assert judge.alignment(images, shuffled) < 0.05
    predicted = judge.predict(images)
    assert predicted.shape == (len(images), len(LABEL_FIELDS))
    assert (matches(predicted, labels) == matches(predicted, captions)).all()


def test_toy_fid_of_a_set_with_itself_is_zero_and_separates_noise(judge, real):
    images = real[0]
    feats = judge.features(images)
    assert feats.shape == (len(images), judge.config["feature_dim"])
    same = FeatureStats().update(feats)
    assert abs(same.fid(FeatureStats().update(feats))) < 1e-6
    other = FeatureStats().update(judge.features(ToyWorld().sample(300, seed=321)[0]))
    noise = FeatureStats().update(judge.features(torch.rand(300, 3, 32, 32) * 2 - 1))
    assert same.fid(other) * 10 < same.fid(noise)


def test_evaluate_toy_scores_a_perfect_and_a_broken_generator(judge):
    from stepdistill.eval.toy import evaluate_toy

    def perfect(prompts, seeds):  # renders exactly what each prompt says
        labels = np.stack([parse_caption(p) for p in prompts])
        return to_float(ToyWorld().render(labels, seed=seeds[0]))

    def broken(prompts, seeds):
        return torch.zeros(len(prompts), 3, 32, 32)

    good = evaluate_toy(perfect, n=100, steps=1, batch_size=50, judge=judge, progress=False)
    bad = evaluate_toy(broken, n=100, steps=1, batch_size=50, judge=judge, progress=False)
    assert set(good) >= {"toy_fid", "alignment", "images_per_s", "n", "steps"}
    assert good["alignment"] > 0.95 and bad["alignment"] < 0.1
    assert good["toy_fid"] * 10 < bad["toy_fid"] and good["images_per_s"] > 0
    # Diversity: real renders cover the real set; a constant image has no recall and one background bin.
    assert good["precision"] > 0.8 and good["recall"] > 0.8 and good["coverage"] > 0.8
    assert bad["recall"] <= 0.05 and bad["coverage"] < 0.2  # a few real backgrounds are near black
    assert good["background_tv"] < 0.25 < bad["background_tv"]


class _GreyGreenWorld(ToyWorld):
    """Every background the same grey-green: what the collapsed one-step student paints."""

    def _background(self, rng, n):
        return np.broadcast_to(np.float32([96, 110, 92]), (n, self.image_size, self.image_size, 3)).copy()


def test_evaluation_sees_a_collapsed_background(judge):
    """Right content on one background for every image (the collapse of a mode-seeking student): alignment and
    precision stay high, and the background distance says what alignment alone does not."""
    from stepdistill.eval.toy import evaluate_toy

    def render_with(world):
        def generate(prompts, seeds):
            labels = np.stack([parse_caption(p) for p in prompts])
            return to_float(world.render(labels, seed=seeds[0]))
        return generate

    collapsed = evaluate_toy(render_with(_GreyGreenWorld()), n=200, steps=1, batch_size=100, judge=judge,
                             progress=False)
    normal = evaluate_toy(render_with(ToyWorld()), n=200, steps=1, batch_size=100, judge=judge, progress=False)
    assert collapsed["alignment"] > 0.8
    assert collapsed["background_tv"] > normal["background_tv"] + 0.3
    assert collapsed["recall"] < normal["recall"]


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_shipped_teacher_loads_and_generates(family):
    from diffusers import DiffusionPipeline

    from stepdistill.models.toy_recipe import TOY_FLOW_SHIFT

    torch.set_num_threads(1)
    path = toy_asset_path(family)
    pipe = DiffusionPipeline.from_pretrained(path)
    expected = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                "sd3": "StableDiffusion3Pipeline"}[family]
    assert type(pipe).__name__ == expected
    if family == "sd3":
        # A rectified flow on the SD1.5-toy VAE's 4-channel latents, sampled by SD3's flow Euler scheduler.
        assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
        assert pipe.scheduler.config.shift == TOY_FLOW_SHIFT
        assert pipe.transformer.config.in_channels == pipe.vae.config.latent_channels == 4
        assert pipe.vae.config.shift_factor == 0.0
        for word in TOY_WORDS:  # T5: one piece per word, then </s>
            assert len(pipe.tokenizer_3(word).input_ids) == 2
    else:
        assert pipe.scheduler.config.beta_schedule == "scaled_linear"
        assert pipe.scheduler.config.prediction_type == "epsilon"
    for word in TOY_WORDS:  # the project's own vocabulary: one token per word
        assert len(pipe.tokenizer(word).input_ids) == 3
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    images = pipe(["a large red circle in the middle", "a small blue square above a small yellow triangle"],
                  num_inference_steps=3, guidance_scale=3.0, generator=generator, output_type="np").images
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all() and images.std() > 0.05
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < 15 * 2**20


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_toy_teacher_recipe_runs_and_reloads(family, tmp_path):
    """A few steps of each family's recipe on a few images (the others reuse the shipped SD1.5-toy VAE): the folder
    reloads with the family's pipeline, its scheduler and toy_teacher.json, and generates as eval toy samples it."""
    import json

    from diffusers import DiffusionPipeline

    from stepdistill.models.registry import get_family
    from stepdistill.train.toy_teacher import train_toy_teacher

    torch.set_num_threads(1)
    vae = {"vae_steps": 2, "vae_batch_size": 4} if family == "sd15" else {"vae_from": toy_asset_path("sd15")}
    out = train_toy_teacher(tmp_path / family, family=family, steps=2, batch_size=4, num_images=16,
                            snapshot_every=1, keep_snapshots=True, progress=False, **vae)
    record = json.loads((out / "toy_teacher.json").read_text())
    assert record["family"] == family and record["steps_done"] == 2 and np.isfinite(record["final_loss"])
    # keep_snapshots: the step-1 EMA pipeline stays beside the final one, with its own record.
    assert json.loads((out / "snapshots" / "step-1" / "toy_teacher.json").read_text())["steps_done"] == 1
    # Training flushes subnormals (process-wide); it must hand the process back with IEEE subnormals intact.
    assert (torch.tensor([1e-39]) * 1.0).item() > 0
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == get_family(family).pipeline_class_name
    flow = family in ("sd3", "flux")
    assert (type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler") == flow
    assert (record.get("sigma_sampling") == "logit-normal(0, 1)") == flow
    assert record.get("max_sequence_length") == (16 if flow else None)  # the short T5 length, recorded
    if flow:  # a static shift of 1 (64 image tokens), FLUX's dynamic shifting off as in schnell's scheduler
        assert pipe.scheduler.config.shift == 1.0 and not pipe.scheduler.config.use_dynamic_shifting
    if family == "flux":  # schnell's layout: double- and single-stream blocks, packed 4-channel latents, no guidance
        config = pipe.transformer.config
        assert config.num_layers >= 1 and config.num_single_layers >= 1 and not config.guidance_embeds
        assert config.in_channels == 4 * pipe.vae.config.latent_channels
    call = get_family(family).toy_generate_kwargs(2.0, 32)
    images = pipe(["a large red circle in the middle"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                  output_type="np", **call, **({"max_sequence_length": 16} if flow else {})).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_toy_teacher_module_names_no_family():
    """train/toy_teacher.py trains every family through the FamilyModel.toy_* hooks: no family name appears in it."""
    import re
    from pathlib import Path

    from stepdistill.models.registry import family_names
    from stepdistill.train import toy_teacher as teacher

    source = Path(teacher.__file__).read_text()
    names = {*family_names(), "sd1.5", "sd 1.5", "stable diffusion 3"}
    found = sorted({n for n in names if re.search(rf"(?<![a-z0-9_]){re.escape(n)}(?![a-z0-9_])", source, re.IGNORECASE)})
    assert not found, f"train/toy_teacher.py names families {found}: move that code into the families' toy hooks"


def test_flux_toy_velocity_packs_latents_and_tells_sigma():
    """FLUX-toy's training call is FluxPipeline's: packed 2x2 latents, rotary ids, sigma (not 1000 sigma), no guidance,
    and the output unpacked to (B, C, h, w)."""
    from types import SimpleNamespace

    from stepdistill.models.families.flux import FluxModel, pack_latents, unpack_latents

    x_t, sigma = torch.randn(2, 4, 8, 8), torch.tensor([0.25, 0.75], dtype=torch.float64)
    seen = {}

    def net(**kw):
        seen.update(kw)
        return SimpleNamespace(sample=kw["hidden_states"] * 2)

    net.config = SimpleNamespace(guidance_embeds=False)
    hidden = torch.zeros(2, 5, 8)
    out = FluxModel.toy_velocity(net, x_t, sigma, hidden, {"pooled_projections": torch.zeros(2, 3)})
    torch.testing.assert_close(out, x_t * 2)
    torch.testing.assert_close(seen["hidden_states"], pack_latents(x_t))
    torch.testing.assert_close(unpack_latents(seen["hidden_states"], 8, 8), x_t)
    torch.testing.assert_close(seen["timestep"], sigma.float())
    assert seen["guidance"] is None and seen["img_ids"].shape == (16, 3) and seen["txt_ids"].shape == (5, 3)
    net.config.guidance_embeds = True
    with pytest.raises(ValueError, match="no guidance embedding"):
        FluxModel.toy_velocity(net, x_t, sigma, hidden, {"pooled_projections": torch.zeros(2, 3)})


def test_toy_teacher_options_are_checked_before_training(tmp_path):
    """Options the family's objective cannot take are one-line errors before any training: logit-normal sampling for
    an eps-prediction family, lr_final with a constant rate, snapshots kept without snapshot_every."""
    from stepdistill.config import ConfigError
    from stepdistill.train.toy_teacher import train_toy_teacher

    for kwargs, match in [({"family": "sd15", "timestep_sampling": "logit-normal"}, "for flow families"),
                          ({"family": "sd3", "lr_final": 0.1}, "no effect with a constant"),
                          ({"family": "sd3", "timestep_sampling": "uniform", "logit_normal": (0.0, 1.0)},
                           "uniform timestep sampling"),
                          ({"family": "sd3", "keep_snapshots": True}, "needs snapshot_every")]:
        with pytest.raises(ConfigError, match=match):
            train_toy_teacher(tmp_path, steps=1, num_images=4, **kwargs)


def test_toy_teacher_continues_from_a_folder(tmp_path):
    """init_from starts from a toy teacher's weights (a tiny rate keeps them); another family's folder is refused."""
    from safetensors.torch import load_file

    from stepdistill.config import ConfigError
    from stepdistill.train.toy_teacher import train_toy_teacher

    torch.set_num_threads(1)
    shipped = toy_asset_path("sd3")
    out = train_toy_teacher(tmp_path / "sd3", family="sd3", steps=1, batch_size=2, num_images=4, lr=1e-12,
                            init_from=shipped, progress=False)
    name = "transformer/diffusion_pytorch_model.safetensors"
    before, after = load_file(shipped / name), load_file(out / name)
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    with pytest.raises(ConfigError, match="is a sd3 toy teacher"):
        train_toy_teacher(tmp_path / "flux", family="flux", steps=1, num_images=4, init_from=shipped)


def test_toy_teacher_arch_overrides_are_built_recorded_and_kept_by_a_continued_run(tmp_path):
    """arch overrides the family's toy architecture (a wider SD3-toy transformer), is recorded in toy_teacher.json, and
    a run continued from that folder builds the same architecture without being told; another arch, an unknown part or
    an unknown config key is a one-line error."""
    import json

    from stepdistill.cli import _arch_arg
    from stepdistill.config import ConfigError
    from stepdistill.train.toy_teacher import train_toy_teacher

    torch.set_num_threads(1)
    wide = _arch_arg(["transformer.num_attention_heads=6", "transformer.num_layers=2"])
    assert wide == {"transformer": {"num_attention_heads": 6, "num_layers": 2}}
    common = {"family": "sd3", "steps": 1, "batch_size": 2, "num_images": 4, "progress": False,
              "vae_from": toy_asset_path("sd15")}
    first = train_toy_teacher(tmp_path / "wide", arch=wide, **common)
    config = json.loads((first / "transformer" / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_layers"]) == (6, 2)
    assert json.loads((first / "toy_teacher.json").read_text())["arch"] == wide
    again = train_toy_teacher(tmp_path / "again", init_from=first, **common)
    assert json.loads((again / "toy_teacher.json").read_text())["arch"] == wide
    with pytest.raises(ConfigError, match="drop arch"):
        train_toy_teacher(tmp_path / "x", init_from=first, arch={"transformer": {"num_layers": 3}}, **common)
    with pytest.raises(ConfigError, match="does not have"):
        train_toy_teacher(tmp_path / "x", arch={"unet": {"num_layers": 3}}, **common)
    with pytest.raises(ConfigError, match="no config key"):
        train_toy_teacher(tmp_path / "x", arch={"text_encoder_3": {"widthh": 3}}, **common)
    with pytest.raises(ConfigError, match="PART.KEY=VALUE"):
        _arch_arg(["num_layers=3"])


@pytest.mark.parametrize("family, length, match", [("sd3", 8, "truncates toy captions"),
                                                   ("sd15", 16, "no T5 encoder")])
def test_toy_teacher_t5_length_is_refused_when_it_cannot_apply(family, length, match, tmp_path):
    from stepdistill.config import ConfigError
    from stepdistill.train.toy_teacher import train_toy_teacher

    with pytest.raises(ConfigError, match=match):
        train_toy_teacher(tmp_path, family=family, steps=1, num_images=4, max_sequence_length=length)


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_shipped_toy_teacher_has_the_default_recipes_architecture(family):
    """Every shipped teacher's denoiser config has its family's toy_arch (SD3-toy and FLUX-toy: 6 heads of 16 since
    2026-12-07), so `stepdistill toy train-teacher --family F` with no --arch retrains the architecture that ships."""
    import json

    from stepdistill.models.registry import get_family

    family_cls = get_family(family)
    part = family_cls.denoiser_prefix
    config = json.loads((toy_asset_path(family) / part / "config.json").read_text())
    for key, value in family_cls.toy_arch[part].items():  # JSON reads a tuple back as a list
        assert config[key] == (list(value) if isinstance(value, tuple) else value), (family, key)


def test_shipped_sd3_toy_teacher_records_the_length_it_was_trained_at():
    from stepdistill.eval.toy import teacher_max_sequence_length

    assert teacher_max_sequence_length("sd3") == 16  # the shipped teacher was trained at the short default
    assert teacher_max_sequence_length("sd15") is None


def test_a_family_without_a_toy_recipe_is_refused(tmp_path, monkeypatch):
    from stepdistill.models.families.flux import FluxModel
    from stepdistill.train.toy_teacher import train_toy_teacher

    monkeypatch.setattr(FluxModel, "toy_arch", {})
    with pytest.raises(ValueError, match="no toy teacher recipe for family 'flux'"):
        train_toy_teacher(tmp_path, family="flux", steps=1)


def test_flow_loss_is_zero_for_the_exact_velocity():
    """The toy SD3 loss regresses v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps: a 'transformer' that returns
    exactly that velocity scores 0, one that returns x0 - eps does not; the transformer is told 1000 sigma."""
    from types import SimpleNamespace

    from stepdistill.models.families.sd3 import SD3Model
    from stepdistill.train.toy_teacher import flow_loss, logit_normal_sigmas

    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 8, 8, generator=gen), torch.randn(6, 4, 8, 8, generator=gen)
    sigma = logit_normal_sigmas(6, gen, shift=1.0)
    assert ((sigma > 0) & (sigma < 1)).all()
    seen = {}

    def exact(hidden_states, timestep, encoder_hidden_states, pooled_projections):
        seen["t"] = timestep
        s = sigma.float()[:, None, None, None]
        x0_back = (hidden_states - s * eps) / (1 - s)  # recover x0 from x_t to show x_t was built as stated
        return SimpleNamespace(sample=eps - x0_back)

    cond = {"pooled_projections": torch.zeros(6, 1)}

    def loss(net):
        return flow_loss(lambda x_t, s: SD3Model.toy_velocity(net, x_t, s, None, cond), x0, sigma, eps).item()

    assert loss(exact) < 1e-8
    torch.testing.assert_close(seen["t"], (1000 * sigma).float())
    assert loss(lambda **kw: SimpleNamespace(sample=x0 - eps)) > 1.0


@pytest.mark.slow
def test_teacher_alignment_at_25_steps():
    from stepdistill.eval.toy import run_eval_toy

    torch.set_num_threads(1)
    result = run_eval_toy(teacher=True, steps=25, n=500, progress=False)
    assert result["alignment"] >= 0.9


def test_teacher_timestep_spacing_is_the_students_schedule_on_request(tmp_path):
    """`eval toy --teacher --timestep-spacing trailing` runs the teacher on a tscd student's 4 steps (999 ... 249); the
    default stays its own leading schedule (751 ... 1); a student refuses the flag (it runs its recipe)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
    from stepdistill.eval.toy import run_eval_toy, toy_asset_path, with_timestep_spacing

    teacher = DDIMScheduler.from_pretrained(toy_asset_path("sd15"), subfolder="scheduler")
    for spacing, expected in (("leading", [751, 501, 251, 1]), ("trailing", [999, 749, 499, 249])):
        scheduler = with_timestep_spacing(teacher, spacing)
        scheduler.set_timesteps(4)
        assert scheduler.timesteps.tolist() == expected
    with pytest.raises(ValueError, match="not one of"):
        with_timestep_spacing(teacher, "uniform")
    with pytest.raises(ValueError, match="no timestep_spacing"):
        with_timestep_spacing(FlowMatchEulerDiscreteScheduler(), "trailing")
    with pytest.raises(ValueError, match="applies to the teacher"):
        run_eval_toy(lora=tmp_path, timestep_spacing="trailing", n=2, progress=False)


@pytest.mark.parametrize(("family", "spacing", "recorded"), [("sd15", "trailing", "trailing"), ("sd15", None, "leading"),
                                                            ("sd3", None, None)])
def test_teacher_result_records_its_spacing_and_the_flow_teacher_has_none(monkeypatch, family, spacing, recorded):
    """The result names the DDIM teacher's spacing; the SD3 teacher's flow scheduler has none (it once raised here)."""
    from stepdistill.eval import toy as evaluate

    monkeypatch.setattr(evaluate, "evaluate_toy", lambda *a, **k: {})
    result = evaluate.run_eval_toy(teacher=True, family=family, steps=2, n=2, timestep_spacing=spacing, progress=False)
    assert result.get("timestep_spacing") == recorded


def test_eval_toy_samples_a_teacher_folder_with_its_familys_cfg(tmp_path, monkeypatch):
    """`eval toy --teacher --teacher-dir DIR --family flux`: the folder (e.g. a training snapshot) is sampled at its
    recorded T5 length with FluxPipeline's true CFG against "" (FLUX-toy has no guidance embedding); a folder of
    another family is refused."""
    from stepdistill.eval import generate
    from stepdistill.eval import toy as evaluate

    from stepdistill.train.toy_teacher import train_toy_teacher

    torch.set_num_threads(1)
    out = train_toy_teacher(tmp_path / "flux", family="flux", steps=1, batch_size=2, num_images=4,
                            vae_from=toy_asset_path("sd15"), progress=False)
    seen, real = {}, generate.teacher_generate_fn

    def spy(pipe, steps, **kwargs):
        seen.update(kwargs)
        return real(pipe, steps, **kwargs)

    def one_batch(generate_fn, **kw):
        return {"images": evaluate.as_images(generate_fn(["a large red circle in the middle"], [0]))}

    monkeypatch.setattr(generate, "teacher_generate_fn", spy)
    monkeypatch.setattr(evaluate, "evaluate_toy", one_batch)
    result = evaluate.run_eval_toy(teacher=True, family="flux", teacher_dir=out, steps=2, n=1, guidance_scale=3.0,
                                   progress=False)
    assert result["model"] == str(out) and result["max_sequence_length"] == 16 and result["guidance_scale"] == 3.0
    assert seen["true_cfg_scale"] == 3.0 and seen["negative_prompt"] == "" and seen["height"] == seen["width"] == 32
    assert result["images"].shape == (1, 3, 32, 32) and torch.isfinite(result["images"]).all()
    with pytest.raises(ValueError, match="is a flux toy teacher"):
        evaluate.run_eval_toy(teacher=True, family="sd3", teacher_dir=out, n=1, progress=False)


# One update of each flow family's toy presets on its shipped teacher, then eval toy's own student path: the recipe
# must sample the judge's 32 px images (FLUX's recipe once lost its size: FluxPipeline sampled the student at 256 px).
@pytest.mark.parametrize("preset", ["dmd_1step_flux", "tscd_4step_sd3"])
def test_flow_toy_preset_trains_on_its_shipped_teacher_and_eval_toy_samples_it(preset, tmp_path, monkeypatch):
    from pathlib import Path

    from stepdistill.eval import toy as evaluate

    from stepdistill.config import load_config
    from stepdistill.train.loop import Trainer

    root = Path(__file__).resolve().parents[2]
    torch.set_num_threads(1)
    monkeypatch.chdir(root)  # the presets name their teacher as assets/toy/<family>
    cfg = load_config(root / "configs" / "toy" / f"{preset}.yaml", [
        "loop.max_steps=1", "loop.progress=false", "data.images=toy:8", "data.batch_size=2",
        *(["method.regression_weight=0", "method.regression_steps=0"] if preset.startswith("dmd") else [])])
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()
    trainer.close()

    def one_batch(generate_fn, steps=None, **kw):
        return {"images": evaluate.as_images(generate_fn(["a large red circle in the middle"], [0])), "steps": steps}

    monkeypatch.setattr(evaluate, "evaluate_toy", one_batch)
    result = evaluate.run_eval_toy(lora=final, n=1, progress=False)
    assert result["images"].shape == (1, 3, 32, 32) and torch.isfinite(result["images"]).all()
    assert result["steps"] == (1 if preset.startswith("dmd") else 4) and result["family"] == cfg.model.family
