"""The contract every registered method keeps on every registered family, parametrised from the two registries.

For each (method, family): the method's tiny preset trains through the real loop; the student adapter changed, the
frozen base is bit-identical, every logged loss is finite; the exported LoRA loads into a fresh diffusers pipeline
of that family and reproduces the training-time student; a run stopped after its first update and rerun gives the
same LoRA as the uninterrupted run; with the base and the adapters in bf16, the stock pipeline's denoiser output at
each step of the recipe equals the training-time student's. A new method or family is covered by adding its tiny
preset, nothing else.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from stepdistill.config import ConfigError, load_config
from stepdistill.models.loading import load_family
from stepdistill.models.registry import family_names, get_family
from stepdistill.models.tiny import save_tiny_pipeline
from stepdistill.registry import get_method, method_names
from stepdistill.train.loop import Trainer

from .helpers import (
    ROOT,
    assert_bf16_student_equals_the_pipeline,
    assert_same_lora,
    lora_tensors,
    pipeline_latents,
    student_latents,
)

torch.set_num_threads(1)
TINY = ROOT / "configs" / "tiny"


@functools.cache
def _tiny_presets() -> list[tuple[Path, dict]]:
    return [(p, yaml.safe_load(p.read_text())) for p in sorted(TINY.glob("*.yaml"))]


def tiny_preset(method: str, family: str) -> tuple[Path, list[str]] | None:
    """The method's tiny preset for `family` (its own file, else the method's preset with model.family set)."""
    presets = _tiny_presets()
    mine = [(p, d) for p, d in presets if d.get("method", {}).get("name") == method]
    for path, data in mine:
        if data.get("model", {}).get("family") == family:
            return path, []
    return (mine[0][0], [f"model.family={family}"]) if mine else None


COMBOS = [(m, f) for m in method_names() for f in family_names()]
CASES = [pytest.param(c, id=f"{c[0]}-{c[1]}") for c in COMBOS]
PROMPT = "a red circle"


def _accepts(method: str, family: str) -> bool:
    """Whether the method's tiny preset can distil the family's tiny teacher (built with the family's default
    scheduler config: a flow velocity, or SD's eps), as _refusal says at run time."""
    path, sets = tiny_preset(method, family)
    cfg = load_config(path, [*sets, "model.path=unused", "data.prompts=unused"])
    family_cls = get_family(family)
    kind = "flow" if "flow" in family_cls.parameterisations else \
        family_cls.default_scheduler_config.get("prediction_type", "epsilon")
    try:
        get_method(method).distiller_cls.check_parameterisation(cfg.method, kind)
    except ConfigError:
        return False
    return True


# The bf16 reproduction of every pair that trains. The SD1.5 / SDXL cases cost 2-6 s each beyond the shared training
# run (measured on the loaded 2-core machine, flow cases 1-2 s): those below opt in (slow); the default suite keeps
# every flow case and one case per method and per family (dmd / tscd on the flow families, disback-sdxl, lcm-sd15,
# reward-sdxl, tscd_unified-sd15; tests/tiny/test_train_dmd.py adds SD1.5 dmd at one and four steps).
BF16_SLOW = {("dmd", "sd15"), ("dmd", "sdxl"), ("disback", "sd15"), ("lcm", "sdxl"), ("reward", "sd15"),
             ("tscd", "sd15"), ("tscd", "sdxl"), ("tscd_unified", "sdxl")}
BF16_CASES = [pytest.param(c, id=f"{c[0]}-{c[1]}", marks=[pytest.mark.slow] if c in BF16_SLOW else [])
              for c in COMBOS if _accepts(*c)]


def test_every_method_has_a_tiny_preset():
    assert not [m for m in method_names() if tiny_preset(m, family_names()[0]) is None]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            made[family] = save_tiny_pipeline(tmp_path_factory.mktemp("base") / family, family=family, seed=0)
        return made[family]

    return get


@pytest.fixture(scope="module")
def reward_model():
    """The tiny world has no reward model: a differentiable brightness score stands in (method reward)."""
    from stepdistill.metrics import reward_models

    reward_models.register_reward_model("contract_brightness", lambda *a, **k: (lambda images, prompts: images.mean((1, 2, 3))),
                                        threshold=10.0)
    return "contract_brightness"


def _config(method, family, base, prompts, reward_model, *extra):
    path, sets = tiny_preset(method, family)
    sets = [*sets, f"model.path={base}", f"data.prompts={prompts}", "loop.progress=false", "loop.max_steps=2",
            "loop.checkpoint_every=1", "loop.sample_every=0", *extra]
    if get_method(method).config_cls().name == "reward":
        sets.append(f"method.reward_model={reward_model}")
    return load_config(path, sets)


def _base_state(family_cls, model_dir):
    return family_cls.denoiser_class.from_pretrained(model_dir, subfolder=family_cls.denoiser_prefix).state_dict()


def _refusal(cfg, base) -> str | None:
    """What the method, so configured, says about this family's teacher (None: it can distil it)."""
    family = load_family(base)
    parameterisation = family.noise_schedule(family.resolution).prediction_type
    try:
        get_method(cfg.method.name).distiller_cls.check_parameterisation(cfg.method, parameterisation)
    except ConfigError as e:
        return str(e)
    return None


@dataclass
class Run:
    """One (method, family) of the matrix: its config and base; refusal, or the trained run and its export."""

    method: str
    family: str
    cfg: object
    base: Path
    refusal: str | None = None
    trainer: Trainer | None = None
    final: Path | None = None


@pytest.fixture(scope="module")
def straight(request, bases, prompts_file, reward_model, tmp_path_factory):
    """The matrix case request.param, trained once (uninterrupted) for every test of it below; pytest runs a case's
    tests together and drops the run before the next case's."""
    method, family = request.param
    base = bases(family)
    cfg = _config(method, family, base, prompts_file, reward_model)
    run = Run(method, family, cfg, base, _refusal(cfg, base))
    if run.refusal is None:
        run.trainer = Trainer(cfg, tmp_path_factory.mktemp(f"{method}-{family}") / "straight")
        try:
            run.final = run.trainer.run()
        finally:
            run.trainer.close()
    return run


@pytest.mark.parametrize("straight", CASES, indirect=True)
def test_method_keeps_the_contract_on_family(straight, tmp_path):
    run = straight
    cfg, base, family_cls = run.cfg, run.base, get_family(run.family)
    assert _accepts(run.method, run.family) == (run.refusal is None)  # the bf16 matrix below leaves out the refusals

    # A method that cannot distil this kind of teacher refuses at start-up, in one line, before any work.
    if run.refusal is not None:
        with pytest.raises(ConfigError) as raised:
            Trainer(cfg, tmp_path / "refused").run()
        assert "cannot distil" in str(raised.value) and "\n" not in str(raised.value)
        assert not (tmp_path / "refused" / "checkpoints").exists()
        return
    built, final = run.trainer.built, run.final

    # The student adapter moved; the frozen base did not, by a single bit.
    assert any(t.abs().sum() > 0 for k, t in lora_tensors(final).items() if "lora_B" in k), "student LoRA B is zero"
    fresh = _base_state(family_cls, base)
    kept = {n.replace(".base_layer", ""): p for n, p in built.nets.denoiser.state_dict().items() if "lora_" not in n}
    assert kept.keys() == fresh.keys()
    assert all(torch.equal(kept[k], fresh[k]) for k in fresh), "a frozen base weight changed"

    # Every logged number is finite.
    for line in (run.trainer.out / "log.jsonl").read_text().splitlines():
        record = json.loads(line)
        bad = {k: v for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)}
        assert not bad, f"non-finite logs at step {record['step']}: {bad}"

    # The export, in a fresh pipeline with its recipe, is the training-time student.
    ours, _, x_T = student_latents(built, PROMPT)
    theirs = pipeline_latents(family_cls.pipeline_class, base, final, PROMPT, x_T)
    torch.testing.assert_close(theirs.float(), ours.float(), atol=1e-4, rtol=1e-4)

    # Stopped right after the first update's checkpoint, then the same run again: the same LoRA, bit for bit.
    resumed = tmp_path / "resumed"
    with pytest.raises(_Stop):
        _StopAfterFirstCheckpoint(cfg, resumed).run()
    assert not (resumed / "final").exists()
    again = Trainer(cfg, resumed)
    try:
        again.run()
    finally:
        again.close()
    # It resumed from the checkpoint rather than starting over: no update was logged twice.
    steps = [json.loads(line)["step"] for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert steps and len(steps) == len(set(steps)), steps
    assert_same_lora(final, resumed / "final")


@pytest.mark.parametrize("straight", BF16_CASES, indirect=True)
def test_bf16_student_output_equals_the_bf16_pipelines_at_every_recipe_timestep(straight):
    """The same export with the base and the adapters in bf16: at every step of its recipe the stock pipeline's
    denoiser output equals the training-time student's on the same latents (helpers.assert_bf16_student_equals_the_pipeline).
    The flow families' multi-step recipes are where a student told another timestep than its pipeline misses."""
    run = straight
    visited = assert_bf16_student_equals_the_pipeline(run.trainer.built, run.base, run.final, PROMPT)
    assert visited == sorted(set(visited), reverse=True), visited  # a sampler: from noise towards data


class _Stop(Exception):
    pass


class _StopAfterFirstCheckpoint(Trainer):
    """A run that dies once its first checkpoint is on disk (as a crash between updates would)."""

    def save_checkpoint(self):
        super().save_checkpoint()
        raise _Stop
