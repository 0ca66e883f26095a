"""optim.lr_schedule: the loop's rate after the warm-up, constant (the default) or annealed by a cosine to
optim.lr_final x the rate at loop.max_steps, for every optimizer phase."""

from __future__ import annotations

import itertools
import logging
import math
import re
import tempfile

import pytest
import torch

from stepdistill.config import load_config
from stepdistill.core.lr import lr_factor
from stepdistill.errors import ConfigError
from stepdistill.train import rundir

from .bench_rig import tiny_trainer


def test_cosine_anneals_the_student_and_fake_score_rates_to_lr_final_at_max_steps():
    """dmd over 4 updates at cosine, lr_final 0.1: update s runs at 0.1 + 0.9 (1 + cos(pi s / 4)) / 2 of each phase's
    base rate (the student's and the fake score's alike); the constant default keeps the base rate."""
    torch.set_num_threads(1)
    rates = {}
    for schedule in ("cosine", "constant"):
        sets = ["loop.max_steps=4", f"optim.lr_schedule={schedule}", "optim.critic_lr=2e-4"]
        sets += ["optim.lr_final=0.1"] if schedule == "cosine" else []
        with tempfile.TemporaryDirectory() as out:
            trainer = tiny_trainer("dmd", sets, out)
            base, rates[schedule] = dict(trainer.base_lrs), []
            for step in range(3):
                trainer.step = step
                trainer.iteration()
                rates[schedule].append({phase: opt.param_groups[0]["lr"] for phase, opt in trainer.optimizers.items()})
            trainer.close()
    assert set(base) == {"student", "critic"} and base["critic"] == pytest.approx(2e-4)
    for step, got in enumerate(rates["cosine"]):
        factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / 4))
        assert got == pytest.approx({phase: factor * lr for phase, lr in base.items()}, rel=1e-12)
    assert rates["cosine"][2]["student"] == pytest.approx(0.55 * base["student"])
    assert all(got == base for got in rates["constant"])


def test_lr_factor_warms_up_then_decays_and_takes_no_warmup():
    cosine, constant = lr_factor("cosine", 1000, warmup=100, final=0.1), lr_factor("constant", 1000, warmup=100)
    assert cosine(0) == pytest.approx(0.01 * (0.1 + 0.9 * 0.5 * 2)) and constant(0) == pytest.approx(0.01)
    assert cosine(500) == pytest.approx(0.1 + 0.9 * 0.5) and constant(500) == 1.0
    assert cosine(1000) == pytest.approx(0.1) and cosine(2000) == pytest.approx(0.1)
    assert all(a >= b for a, b in itertools.pairwise(cosine(s) for s in range(100, 1001)))  # monotone after warm-up
    no_warmup = lr_factor("cosine", 10)
    assert no_warmup(0) == 1.0 and no_warmup(10) == 0.0 and lr_factor("constant", 10)(3) == 1.0


@pytest.mark.parametrize(("sets", "says"), [
    (["optim.lr_schedule=linear"], "optim.lr_schedule must be one of ['constant', 'cosine']"),
    (["optim.lr_final=0.1"], "optim.lr_final=0.1 has no effect with a constant learning rate"),
    (["optim.lr_schedule=cosine", "optim.lr_final=1.5"], "optim.lr_final=1.5 is a fraction of the peak rate"),
])
def test_a_schedule_that_cannot_run_or_has_no_effect_is_refused(sets, says):
    with pytest.raises(ConfigError, match="^" + re.escape(says)):
        load_config("configs/toy/dmd_1step.yaml", sets)


@pytest.mark.parametrize(("schedule", "old_steps", "warns"), [("cosine", 600, True), ("cosine", 900, False),
                                                              ("constant", 600, False)])
def test_a_cosine_rerun_with_another_length_says_its_curve_moved(schedule, old_steps, warns, caplog):
    """The rate anneals to loop.max_steps, so resuming a cosine run at another length is said; a constant rate
    (where a stopped run equals a shorter one) or the same length is silent."""
    new = {"optim": {"lr_schedule": schedule}, "loop": {"max_steps": 900}}
    with caplog.at_level(logging.WARNING, logger=rundir.log.name):
        rundir._warn_if_schedule_moves({"loop": {"max_steps": old_steps}}, new)
    said = [r.getMessage() for r in caplog.records]
    assert said == (["optim.lr_schedule=cosine: this run was started with loop.max_steps=600 and now anneals to 900, "
                     "so from the latest checkpoint on it is not the run a 900-step run would have been"] if warns
                    else [])
