"""The `disback` method on tiny SD1.5 / SDXL models: stage 1 records nodes, stage 2 really switches its target to
them (the released code's switch loads nothing), a rerun resumes across the stage boundary bit-identically, no
nodes is plain `dmd`, and the exported LoRA reproduces the student in a fresh diffusers pipeline."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from stepdistill.config import ConfigError, load_config
from stepdistill.core.denoiser import Cond, Denoiser, GuidedDenoiser
from stepdistill.core.lora import adapter_config, add_adapter
from stepdistill.core.recipe import Recipe
from stepdistill.export import diffusers_lora_metadata, load_diffusers_lora, save_diffusers_lora
from stepdistill.methods.disback import (
    BacktrackPath,
    NodeError,
    PlateauRule,
    drop_prompts,
    load_node,
    node_guidance_scale,
    probe_input,
)
from stepdistill.train.loop import Trainer

from .helpers import ROOT, assert_same_lora, lora_tensors, pipeline_latents, run_cli, student_latents, train_args

SD15 = "configs/tiny/disback_sd15.yaml"
# Three nodes, one iteration each: steps 1-3 record nodes 1-3; step 4 targets node 2, step 5 node 1, step 6 the teacher.
PATH3 = ("method.num_nodes=3", "method.interval=1", "method.steps_per_node=1", "loop.checkpoint_every=1")


def _config(preset, model, prompts, *sets):
    return load_config(ROOT / preset, [f"model.path={model}", f"data.prompts={prompts}", "loop.progress=false", *sets])


def _logs(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


def _manifest(run):
    return json.loads((run / "nodes" / "nodes.json").read_text())


# ---- the schedule and the small pieces, without a model ----------------------------------------------------------

def test_path_phases_nodes_and_fixed_walk():
    path = BacktrackPath(regression_steps=2, num_nodes=3, interval=4, steps_per_node=5)
    assert [path.stage(s) for s in (0, 1, 2, 13, 14, 100)] == [0, 0, 1, 1, 2, 2]
    assert [s for s in range(20) if path.node_done(s)] == [5, 9, 13]
    assert [path.node_done(s) for s in (5, 9, 13)] == [1, 2, 3]
    assert [path.fixed_target(s) for s in (14, 18, 19, 23, 24, 500)] == [2, 2, 1, 1, 0, 0]
    assert path.teacher_step == 24
    plain = BacktrackPath(regression_steps=2, num_nodes=0, interval=4, steps_per_node=5)
    assert plain.record_end == 0 and plain.stage(0) == 2 and plain.fixed_target(0) == 0  # the teacher alone


def test_plateau_rule_switches_when_the_loss_stops_falling():
    rule = PlateauRule(smoothing=0.0, tolerance=0.1, patience=2)
    assert [rule.update(v) for v in (1.0, 0.5, 0.3, 0.29, 0.28)] == [False, False, False, False, True]
    rule.reset()
    assert rule.ema is None and not rule.update(5.0)


def test_ramp_guidance_and_prompt_dropout():
    assert node_guidance_scale("ramp", 5.0, node=4, num_nodes=4) == 1.0
    assert node_guidance_scale("ramp", 5.0, node=2, num_nodes=4) == 3.0
    assert node_guidance_scale("ramp", 5.0, node=0, num_nodes=4) == 5.0
    assert node_guidance_scale("node", 5.0, node=3, num_nodes=4) == 5.0
    cond = Cond(torch.ones(3, 2, 4), {"text_embeds": torch.ones(3, 5), "time_ids": torch.ones(3, 6)})
    uncond = Cond(torch.zeros(3, 2, 4), {"text_embeds": torch.zeros(3, 5), "time_ids": torch.ones(3, 6) * 7})
    out = drop_prompts(cond, uncond, torch.tensor([False, True, False]))
    assert out.encoder_hidden_states[:, 0, 0].tolist() == [1, 0, 1]
    assert out.added_cond_kwargs["text_embeds"][:, 0].tolist() == [1, 0, 1]
    assert out.added_cond_kwargs["time_ids"][:, 0].tolist() == [1, 7, 1]


@pytest.mark.parametrize("sets, match", [
    (["method.switch=sometimes"], "method.switch"),
    (["method.node_guidance=teacher"], "method.node_guidance"),
    (["method.switch=adaptive", "method.generator_loss=sid"], "generator_loss=dmd"),
    (["method.prompt_dropout=1.0"], "prompt_dropout"),
    (["method.interval=0"], "interval"),
    (["method.lr_scale_after_teacher=0"], "lr_scale_after_teacher"),
    (["method.lr_scale_after_teacher=-0.5"], "lr_scale_after_teacher"),
])
def test_config_errors_say_which_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(ROOT / SD15, ["model.path=x", "data.prompts=y", *sets])


# ---- stage 1 then stage 2 on tiny SD1.5, straight and in legs --------------------------------------------------

@pytest.fixture(scope="module")
def straight(tiny_sd15_dir, prompts_file, tmp_path_factory):
    trainer = Trainer(_config(SD15, tiny_sd15_dir, prompts_file, *PATH3, "loop.max_steps=6"),
                      tmp_path_factory.mktemp("disback") / "straight")
    return trainer, trainer.run()


@pytest.fixture(scope="module")
def legs(tiny_sd15_dir, prompts_file, tmp_path_factory):
    """The same run in three legs: stop mid stage 1, stop in stage 2 with node 1 the next target, finish."""
    run = tmp_path_factory.mktemp("disback") / "legs"
    trainers, students = [], []
    for end in (2, 4, 6):
        trainer = Trainer(_config(SD15, tiny_sd15_dir, prompts_file, *PATH3, f"loop.max_steps={end}"), run)
        students.append(lora_tensors(trainer.run()))
        trainers.append(trainer)
    return trainers, run, students


def test_nodes_recorded_and_targets_logged(straight):
    trainer, _ = straight
    run = trainer.out
    lines = _logs(run)
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert [x["disback_stage"] for x in lines] == [1, 1, 1, 2, 2, 2]
    assert all("loss" not in x and "student_grad_norm" not in x and math.isfinite(x["aux_loss"]) for x in lines[:3])
    assert [x["target_node"] for x in lines[3:]] == [2, 1, 0]
    assert [x["target_since"] for x in lines[3:]] == [4, 5, 6]
    assert all(math.isfinite(x["dmd_loss"]) and x["nonfinite_steps"] == 0 for x in lines[3:])
    manifest = _manifest(run)
    assert [(n["node"], n["step"], n["file"]) for n in manifest["nodes"]] == [
        (1, 1, "node-01.safetensors"), (2, 2, "node-02.safetensors"), (3, 3, "node-03.safetensors")]
    assert manifest["fake_score_init"] == 3
    assert manifest["targets"] == [{"node": 2, "since_step": 4}, {"node": 1, "since_step": 5}, {"node": 0, "since_step": 6}]
    # The auxiliary score degrades away from the teacher node by node: every node differs from the previous one.
    nodes = [load_file(str(run / "nodes" / f"node-{j:02d}.safetensors")) for j in (1, 2, 3)]
    ups = [torch.cat([v.flatten() for k, v in sorted(n.items()) if "lora_B" in k]) for n in nodes]
    assert ups[0].abs().sum() > 0 and not torch.equal(ups[0], ups[1]) and not torch.equal(ups[1], ups[2])


def test_student_frozen_in_stage_1_and_trained_in_stage_2(legs, straight):
    after_stage_1 = [v for k, v in legs[2][0].items() if "lora_B" in k]
    assert after_stage_1 and all(v.abs().sum() == 0 for v in after_stage_1)  # G0: still the zero LoRA
    trained = [v for k, v in lora_tensors(straight[1]).items() if "lora_B" in k]
    assert all(v.abs().sum() > 0 for v in trained)


def test_target_is_the_node_file_and_not_the_teacher(legs, tiny_sd15_dir):
    """The acceptance test of the switch: at step 5 node 1 is the target; the target's prediction, and the "real"
    score the DM gradient uses, equal those of node-01.safetensors loaded on its own into a fresh UNet."""
    trainers, run, _ = legs
    trainer = trainers[1]  # stopped after step 4: its distiller is set up for step 5
    b = trainer.built
    distiller, nets = b.distiller, b.nets
    assert distiller.target_node == 1 and distiller.targets[-1] == {"node": 1, "since_step": 5}

    # node 1 loaded on its own: into a new adapter beside the others, and into a UNet fresh from disk
    node_file = run / "nodes" / "node-01.safetensors"
    rank, alpha, _ = adapter_config(nets.denoiser, "target")
    add_adapter(nets.denoiser, "node_1", rank, alpha, b.targets)
    load_node(nets.denoiser, nets.schedule, "node_1", node_file, probe_input(nets, b.ctx))
    node = Denoiser(nets.denoiser, nets.schedule, "node_1")
    fresh = UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet")
    add_adapter(fresh, "node_1", rank, alpha, b.targets)
    load_node(fresh, nets.schedule, "node_1", node_file, probe_input(nets, b.ctx))

    g = torch.Generator().manual_seed(11)
    cond = b.family.encode_prompts(b.data.prompts[:2])
    x_t = torch.randn((2, *b.ctx.latent_shape), generator=g)
    t = torch.tensor([700, 250])
    with torch.no_grad():
        target_out = nets.target.raw(x_t, t, cond)
        assert torch.equal(target_out, node.raw(x_t, t, cond))
        # (the trainer's UNet runs another attention backend than a plain diffusers one: equal up to rounding)
        assert (target_out - Denoiser(fresh, nets.schedule, "node_1").raw(x_t, t, cond)).abs().max() < 1e-5
        assert (target_out - nets.teacher.denoiser.raw(x_t, t, cond)).abs().max() > 1e-3
        # The DM gradient's "real" score: node 1 under the CFG policy (default `node`: both branches from the node).
        real = distiller._teacher(nets)(x_t, t, cond).x0
        assert torch.equal(real, GuidedDenoiser(node, nets.teacher.uncond, distiller.guidance_scale)(x_t, t, cond).x0)
        assert (real - nets.teacher(x_t, t, cond).x0).abs().max() > 1e-3


def test_resume_across_the_stage_boundary_is_bit_identical(legs, straight):
    trainers, run, _ = legs
    assert trainers[1].last_checkpoint.name == "step-000004"
    assert_same_lora(straight[1], run / "final")
    for j in (1, 2, 3):
        a = load_file(str(straight[0].out / "nodes" / f"node-{j:02d}.safetensors"))
        b = load_file(str(run / "nodes" / f"node-{j:02d}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "disback_stage", "target_node", "target_since", "loss", "aux_loss")
    assert [{k: x.get(k) for k in keys} for x in _logs(run)] == [{k: x.get(k) for k in keys} for x in _logs(straight[0].out)]
    assert _manifest(run) == _manifest(straight[0].out)


def test_student_lr_drops_at_the_switch_to_the_teacher_and_stays_dropped_after_resume(
        tiny_sd15_dir, prompts_file, tmp_path):
    """PATH3 targets the teacher from step 6. In legs ending at 5 (before the switch), 6 (just after) and 7, each
    resumed from the previous leg's checkpoint: the student runs at optim.lr until step 5 and at a quarter of it from
    step 6 on, in the resumed legs too; the critic keeps its rate."""
    run = tmp_path / "run"
    for end in (5, 6, 7):
        trainer = Trainer(_config(SD15, tiny_sd15_dir, prompts_file, *PATH3, "method.lr_scale_after_teacher=0.25",
                                  f"loop.max_steps={end}"), run)
        trainer.run()
    assert trainer.last_checkpoint.name == "step-000007"
    lines = _logs(run)
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert [x["target_node"] for x in lines[3:]] == [2, 1, 0, 0]
    assert [x["student_lr"] for x in lines[3:]] == pytest.approx([1e-3, 1e-3, 2.5e-4, 2.5e-4], rel=1e-12)
    assert all(x["critic_lr"] == pytest.approx(1e-3, rel=1e-12) for x in lines)
    # the optimizer the last leg resumed holds the lowered rate, not the one saved before the switch
    assert trainer.optimizers["student"].param_groups[0]["lr"] == pytest.approx(2.5e-4, rel=1e-12)


def test_resume_refuses_an_altered_node(legs, tiny_sd15_dir, prompts_file, tmp_path):
    run = legs[1]
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints" / "step-000006")  # resume from step 5, in stage 2
    node = copy / "nodes" / "node-02.safetensors"
    state, rank, alpha = load_diffusers_lora(node)
    save_diffusers_lora({k: v * 1.5 for k, v in state.items()}, tmp_path / "altered", rank, alpha)
    shutil.copy(tmp_path / "altered" / "pytorch_lora_weights.safetensors", node)
    trainer = Trainer(_config(SD15, tiny_sd15_dir, prompts_file, *PATH3, "loop.max_steps=6"), copy)
    with pytest.raises(NodeError, match="node-02.safetensors is missing or differs"):
        trainer.setup()


def test_node_loader_raises_on_mismatch_or_no_change(legs, tmp_path):
    """What the released code's strict=False load hid: keys that do not match, and a node that changes nothing."""
    trainers, run, _ = legs
    nets = trainers[1].built.nets
    node_file = run / "nodes" / "node-01.safetensors"
    state, rank, alpha = load_diffusers_lora(node_file)
    probe = probe_input(nets, trainers[1].built.ctx)

    def load(folder):
        load_node(nets.denoiser, nets.schedule, "target", folder / "pytorch_lora_weights.safetensors", probe)

    save_diffusers_lora(dict(sorted(state.items())[:-2]), tmp_path / "partial", rank, alpha)
    with pytest.raises(ValueError, match="missing keys"):
        load(tmp_path / "partial")
    # The released code's node: every key behind a DDP-style prefix, so a strict=False load matches none of them.
    save_file({f"unet.module.fake_unet.{k}": v for k, v in state.items()}, str(tmp_path / "prefixed.safetensors"),
              metadata=diffusers_lora_metadata(state, rank, alpha))
    with pytest.raises(ValueError, match=f"{len(state)} unexpected keys"):
        load_node(nets.denoiser, nets.schedule, "target", tmp_path / "prefixed.safetensors", probe)
    zero = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}
    save_diffusers_lora(zero, tmp_path / "zero", rank, alpha)
    with pytest.raises(NodeError, match="exactly the teacher's"):
        load(tmp_path / "zero")
    save_diffusers_lora(state, tmp_path / "alpha", rank, alpha * 2)
    with pytest.raises(NodeError, match="alpha"):
        load(tmp_path / "alpha")
    load_node(nets.denoiser, nets.schedule, "target", node_file, probe)  # and the real node loads


def test_fresh_diffusers_pipeline_reproduces_the_student(straight, tiny_sd15_dir):
    trainer, final = straight
    b = trainer.built
    prompt = b.data.prompts[0]
    ours, _, x_T = student_latents(b, prompt)
    recipe = Recipe.load(final)
    assert recipe.method == "disback" and recipe.timesteps == [999] and recipe.training_steps == 6
    theirs = pipeline_latents(StableDiffusionPipeline, tiny_sd15_dir, final, prompt, x_T)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()


# ---- the ablation: no nodes is plain dmd ------------------------------------------------------------------------

def test_no_nodes_is_plain_dmd_bit_for_bit(tiny_sd15_dir, prompts_file, tmp_path):
    """num_nodes=0: the target list is the teacher alone, and the same code path trains exactly what `dmd` does."""
    dmd = Trainer(_config("configs/tiny/dmd_sd15.yaml", tiny_sd15_dir, prompts_file), tmp_path / "dmd")
    disback = Trainer(_config(SD15, tiny_sd15_dir, prompts_file, "method.num_nodes=0"), tmp_path / "disback")
    assert dmd.cfg.method.critic_updates_per_student_update == disback.cfg.method.critic_updates_per_student_update
    assert_same_lora(dmd.run(), disback.run())
    lines = _logs(tmp_path / "disback")
    assert [x["target_node"] for x in lines] == [0, 0, 0] and [x["loss"] for x in lines] == [x["loss"] for x in _logs(tmp_path / "dmd")]
    assert not (tmp_path / "disback" / "nodes").exists()


# ---- the adaptive switch and SDXL -------------------------------------------------------------------------------

def test_adaptive_switch_moves_on_when_the_dm_loss_stalls(tiny_sd15_dir, prompts_file, tmp_path):
    # patience 1, tolerance 0.5: the second update against a node stalls unless its loss halves; the fixed rule
    # would keep each node for 50 updates.
    sets = ("method.num_nodes=2", "method.interval=1", "method.steps_per_node=50", "method.switch=adaptive",
            "method.switch_patience=1", "method.switch_tolerance=0.5", "loop.max_steps=6")
    Trainer(_config(SD15, tiny_sd15_dir, prompts_file, *sets), tmp_path / "run").run()
    targets = _manifest(tmp_path / "run")["targets"]
    assert targets[0] == {"node": 1, "since_step": 3}
    assert targets[1]["node"] == 0 and targets[1]["since_step"] <= 5


def test_sdxl_all_phases_and_fresh_pipeline_reproduces_the_student(tiny_sdxl_dir, prompts_file, tmp_path):
    """Regression warm-up, two recorded nodes, node 1 then the teacher; the export runs in StableDiffusionXLPipeline."""
    trainer = Trainer(_config("configs/tiny/disback_sdxl.yaml", tiny_sdxl_dir, prompts_file), tmp_path / "run")
    final = trainer.run()
    lines = _logs(tmp_path / "run")
    assert [x["disback_stage"] for x in lines] == [0, 1, 1, 2, 2]
    assert "regression_loss" in lines[0] and [x["target_node"] for x in lines[3:]] == [1, 0]
    assert all(x["nonfinite_steps"] == 0 for x in lines)
    # the target of step 4 was node 1, a rank-8 (critic rank) LoRA next to the rank-4 student
    assert adapter_config(trainer.built.nets.denoiser, "target")[:2] == (8, 8.0)
    assert adapter_config(trainer.built.nets.denoiser, "student")[:2] == (4, 2.0)

    b = trainer.built
    prompt = b.data.prompts[0]
    ours, _, x_T = student_latents(b, prompt)
    recipe = Recipe.load(final)
    assert recipe.family == "sdxl" and recipe.timesteps == [399]
    theirs = pipeline_latents(StableDiffusionXLPipeline, tiny_sdxl_dir, final, prompt, x_T)
    assert torch.allclose(ours.float(), theirs.float(), atol=1e-4), (ours - theirs).abs().max()


# ---- two processes through every stage (the preset's two steps never reach an intermediate node) -------------

@pytest.mark.slow
def test_two_processes_walk_the_same_nodes(tiny_sd15_dir, prompts_file, tmp_path):
    from .test_multiprocess import run_torchrun

    sets = ("method.num_nodes=2", "method.interval=1", "method.steps_per_node=1", "loop.max_steps=4",
            "optim.eps=1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_args(SD15, one, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=2"))
    run_torchrun(train_args(SD15, two, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=1"), nproc=2)
    assert _manifest(one)["targets"] == _manifest(two)["targets"]
    a, b = lora_tensors(one / "final"), lora_tensors(two / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-3), f"{k}: {(a[k] - b[k]).abs().max()}"
    for j in (1, 2):
        na = load_file(str(one / "nodes" / f"node-{j:02d}.safetensors"))
        nb = load_file(str(two / "nodes" / f"node-{j:02d}.safetensors"))
        assert all(torch.allclose(na[k], nb[k], atol=1e-5, rtol=1e-3) for k in na)
