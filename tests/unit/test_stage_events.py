"""What a method asks the loop for at a stage boundary: tscd_unified's fresh student optimizer where its DM term starts,
and its student rate there (method.dm_lr_scale)."""

from __future__ import annotations

import tempfile

import pytest
import torch

from stepdistill.methods.base import ResetOptimizer

from .bench_rig import tiny_trainer


def _state_size(opt):
    return sum(len(s) for s in opt.state.values())


def test_the_student_optimizer_starts_afresh_where_the_dm_term_starts():
    """dm_weight [0, 0.1, 0.1]: the end of stage 1 (consistency only) resets the student's Adam state and nothing
    else; the end of stage 2 (DM weight unchanged) resets nothing."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer("tscd_unified", ["method.segments=[4,4,4]", "method.stage_steps=[2,1,1]",
                                                "method.dm_weight=[0,0.1,0.1]", "method.inference_steps=4",
                                                "method.tcd_eta=0", "loop.max_steps=4"], out)
        b = trainer.built
        events = {step: b.distiller.after_step(b.nets, step) for step in range(4)}
        student, critic = trainer.optimizers["student"], trainer.optimizers["critic"]
        sizes = []
        for step in range(3):
            trainer.step = step
            trainer.iteration()
            sizes.append((_state_size(student), _state_size(critic)))
        trainer.close()
    resets = {step: [e for e in ev if isinstance(e, ResetOptimizer)] for step, ev in events.items()}
    assert resets == {0: [], 1: [ResetOptimizer("student")], 2: [], 3: []}
    (s0, c0), (s1, _), (s2, c2) = sizes
    assert s0 > 0 and s1 == 0 and s2 == s0  # cleared after step 1's update, filled again by step 2's
    assert c0 == 0 < c2  # the fake score trains from the DM stage on


def test_the_student_rate_in_a_dm_stage_is_optim_lr_times_dm_lr_scale():
    """dm_weight [0, 0.1], dm_lr_scale 0.25: the consistency stage's update at optim.lr, the DM stage's at a quarter of
    it; the critic (fake score) keeps its own rate."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer("tscd_unified", ["method.segments=[4,4]", "method.stage_steps=[1,1]",
                                                "method.dm_weight=[0,0.1]", "method.dm_lr_scale=0.25",
                                                "method.inference_steps=4", "method.tcd_eta=0", "loop.max_steps=2"], out)
        base, rates = dict(trainer.base_lrs), []
        for step in range(2):
            trainer.step = step
            trainer.iteration()
            rates.append({phase: opt.param_groups[0]["lr"] for phase, opt in trainer.optimizers.items()})
        trainer.close()
    assert rates[0]["student"] == base["student"]
    assert rates[1]["student"] == pytest.approx(0.25 * base["student"])
    assert rates[1]["critic"] == base["critic"]


@pytest.mark.parametrize(("max_steps", "says"), [(4, None), (3, "this run stops in stage 2; set loop.max_steps=4"),
                                                 (6, "the last stage gets 2 more updates")])
def test_a_run_whose_max_steps_disagree_with_its_stage_steps_says_so(max_steps, says, caplog):
    """method.stage_steps [2, 2] against loop.max_steps: equal is silent; shorter stops in a stage (fine when run in
    legs, but said); longer stretches the last stage beyond its stated length (said, with the fix)."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as out, caplog.at_level("WARNING", logger="stepdistill.methods.consistency"):
        trainer = tiny_trainer("tscd", ["method.segments=[4,2]", "method.stage_steps=[2,2]",
                                        f"loop.max_steps={max_steps}"], out)
        for step in range(2):  # the check runs once, after the first update
            trainer.built.distiller.after_step(trainer.built.nets, step)
        trainer.close()
    said = [r.getMessage() for r in caplog.records if "method.stage_steps" in r.getMessage()]
    assert said == [] if says is None else (len(said) == 1 and says in said[0])
