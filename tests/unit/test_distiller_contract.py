"""The Distiller contract (DESIGN.md sec. 3): every method subclasses `Distiller`, the builder and the loop use only
what that base class declares (no getattr / hasattr probing), run facts come in a typed RunContext, and a method
that implements `student_loss` alone trains through the real loop on the base class's defaults."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from stepdistill import registry
from stepdistill.config import MethodConfig, build_config
from stepdistill.core.recipe import Recipe
from stepdistill.methods.base import Distiller, LossOut, Nets, RunContext

ROOT = Path(__file__).resolve().parents[2]
# The code that drives a distiller: the builder, the loop, and the training benchmark (a harness over the loop).
DRIVERS = [ROOT / "stepdistill" / "train" / "build.py", ROOT / "stepdistill" / "train" / "loop.py",
           ROOT / "bench" / "train.py"]
# An expression that holds a distiller or its class: `distiller`, `b.distiller`, `spec.distiller_cls`, ...
HOLDS_A_DISTILLER = re.compile(r"(^|\.)distiller(_cls)?$")


def _distiller_uses(path: Path):
    """(kind, name, line) for each attribute read on a distiller, and each getattr / hasattr on one, in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and HOLDS_A_DISTILLER.search(ast.unparse(node.value)):
            yield "attribute", node.attr, node.lineno
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and node.args and HOLDS_A_DISTILLER.search(ast.unparse(node.args[0]))):
            yield node.func.id, ast.unparse(node), node.lineno


@pytest.mark.parametrize("name", registry.method_names())
def test_every_method_subclasses_the_base_class(name):
    assert issubclass(registry.get_method(name).distiller_cls, Distiller)


def test_drivers_use_only_declared_members_and_never_probe():
    """Everything the builder, loop and benchmark read on a distiller is declared (with a default) on Distiller."""
    seen, problems = set(), []
    for path in DRIVERS:
        for kind, what, line in _distiller_uses(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if kind != "attribute":
                problems.append(f"{where}: {what} (declare the member on Distiller and call it directly)")
            elif not hasattr(Distiller, what):
                problems.append(f"{where}: .{what} is not declared on stepdistill.methods.base.Distiller")
            else:
                seen.add(what)
    assert not problems, "\n".join(problems)
    # The check does see the loop's calls (it would pass vacuously if the pattern matched nothing).
    assert {"student_loss", "critic_loss", "after_step", "setup", "parameters", "recipe", "sample", "lr_scale"} <= seen


def test_run_facts_are_typed_fields_not_string_keys():
    assert "extra" not in {f.name for f in dataclasses.fields(Nets)}
    assert {"latent_shape", "uncond", "decode", "prompt_data", "run_dir", "max_steps", "dist"} <= {
        f.name for f in dataclasses.fields(RunContext)}
    for path in sorted((ROOT / "stepdistill").rglob("*.py")):
        assert "nets.extra" not in path.read_text(encoding="utf-8"), path


# ---- a method that implements student_loss alone -----------------------------------------------------------------

@dataclasses.dataclass
class OnlyStudentLossConfig(MethodConfig):
    name: str = "contract_only_student_loss"


class OnlyStudentLoss(Distiller):
    """The student's one-step x0 from noise, pulled towards zero: a loss, and nothing else."""

    def student_loss(self, nets, batch, step):
        x_T = batch.randn(*batch.latent_shape[1:], device=nets.device)
        t = torch.full((batch.size,), self.T - 1, dtype=torch.long, device=nets.device)
        loss = (nets.student(x_T, t, batch.cond).x0.float() ** 2).flatten(1).mean(1)
        return LossOut(loss, {"loss": float(loss.detach().mean())})


@pytest.fixture
def only_student_loss():
    name = OnlyStudentLossConfig.name
    registry.register_method(name, OnlyStudentLossConfig, OnlyStudentLoss)
    yield name
    registry._METHODS.pop(name)  # registered methods are parametrised over elsewhere: leave the registry as found


def test_base_class_defaults():
    d = OnlyStudentLoss(OnlyStudentLossConfig(), _schedule())
    assert d.critic_loss(None, None, None) is None and d.after_step(None, 0) == []
    assert d.parameters("student") == [] and d.parameters("critic") == []
    assert d.lr_scale("student") == 1.0 and d.lr_scale("critic") == 1.0
    assert d.state_dict() == {} and d.load_state_dict({}) is None
    assert d.extra_adapters == () and dict(d.trainable) == {"student": ("student",)}
    assert d.guidance_scale == 1.0 and d.critic_updates == 1
    assert d.recipe(None)["num_inference_steps"] == 1
    with pytest.raises(NotImplementedError, match="student_loss"):
        Distiller(OnlyStudentLossConfig(), _schedule()).student_loss(None, None, 0)


def test_a_method_with_only_student_loss_trains_through_the_real_loop(only_student_loss, tmp_path):
    from stepdistill.core.lora import adapter_state_dict
    from stepdistill.models.tiny import TINY_PROMPTS, save_tiny_pipeline
    from stepdistill.train.loop import Trainer

    model = save_tiny_pipeline(tmp_path / "sd15", family="sd15", seed=0)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(TINY_PROMPTS) + "\n")
    cfg = build_config({
        "method": {"name": only_student_loss},
        "model": {"path": str(model), "family": "sd15"},
        "data": {"prompts": str(prompts), "batch_size": 2},
        "lora": {"rank": 4, "alpha": 2},
        "optim": {"lr": 1e-3},
        "loop": {"max_steps": 2, "log_every": 1, "checkpoint_every": 2, "progress": False},
    })
    trainer = Trainer(cfg, tmp_path / "run")
    final = trainer.run()

    b = trainer.built
    assert isinstance(b.distiller, OnlyStudentLoss) and b.distiller.ctx is b.ctx
    assert b.ctx.run_dir == tmp_path / "run" and b.ctx.max_steps == 2 and b.ctx.prompt_data is b.data
    assert list(trainer.optimizers) == ["student"] and trainer.ratio == 1
    logs = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2] and all(r["nonfinite_steps"] == 0 for r in logs)
    assert any(v.abs().sum() > 0 for k, v in adapter_state_dict(b.nets.denoiser, "student").items() if "lora_B" in k)
    recipe = Recipe.load(final)
    assert recipe.method == only_student_loss and recipe.training_steps == 2 and recipe.num_inference_steps == 1
    trainer.write_samples(n=2)  # the base class's sample(), on the base class's recipe
    assert (tmp_path / "run" / "samples" / "step-000002.png").is_file()


def _schedule():
    from stepdistill.core.schedule import NoiseSchedule

    return NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000, "beta_start": 0.00085,
                                                "beta_end": 0.012, "beta_schedule": "scaled_linear"})
