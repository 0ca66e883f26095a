"""`stepdistill bench train` on tiny models on the CPU: it runs the real loop, counts that iteration's FLOPs, and
its memory search and launcher checks behave; the full-size GPU run is tests/gpu/test_train_gpu.py."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import pytest
import torch
from stepdistill.bench import train as bench

from stepdistill.config import ConfigError
from stepdistill.train import build as build_module
from stepdistill.train.loop import check_launcher

from .bench_rig import tiny_trainer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


_trainer = tiny_trainer


@pytest.fixture(scope="module")
def dmd_trainer():
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("dmd", [], out)
        yield trainer
        trainer.close()


def _lora(trainer, adapter):
    return {n: p.detach().clone() for n, p in trainer.built.nets.denoiser.named_parameters()
            if "lora_" in n and f".{adapter}." in n}


def _one_iteration(method, sets):
    """(trainer, logs) after one real iteration: the loss and gradient norms it logged."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(method, sets, out)
        return trainer, bench.run_iteration(trainer)


def _assert_same_maths(logs, reference):
    # Loss and gradient norms, not the updated weights: Adam's first step is about lr * sign(g), which turns
    # float rounding in near-zero gradients into lr-sized differences.
    for key in ("loss", "student_grad_norm"):
        assert logs[key] == pytest.approx(reference[key], rel=1e-4), key


# ---- the CLI on the tiny CPU models ----------------------------------------------------------------------------

def test_cli_counts_the_flops_of_the_real_iteration(tmp_path):
    parser = argparse.ArgumentParser()
    bench.add_bench_train_command(parser.add_subparsers(dest="command"))
    out = tmp_path / "rows.json"
    args = parser.parse_args([
        "train", "--method", "tscd", "--family", "sd15", "--tiny", "--device", "cpu", "--iters", "1", "--warmup",
        "0", "--levers", "baseline", "grad_ckpt", "--set", "lora.rank=4", "--out", str(out),
    ])
    args.func(args)
    base, ckpt = json.loads(out.read_text())
    assert (base["lever"], ckpt["lever"]) == ("baseline", "grad_ckpt")
    for r in (base, ckpt):
        total = r["flops_per_iteration"]
        assert r["device"].startswith("CPU") and r["batch"] == bench.TINY_BATCH and r["peak_mem_gb"] is None
        assert sum(r["flops_by_op"].values()) == total
        # Every counted FLOP is in the UNet: prompts and latents are cached, no text encoder or VAE runs per step.
        assert r["flops_by_module"] == {"UNet2DConditionModel": total}
        assert r["achieved_tflops"] == pytest.approx(total / (r["iteration_ms"] * 1e-3) / 1e12)
        assert r["utilisation"] == pytest.approx(r["achieved_tflops"] / r["ceiling_tflops"])
    # tscd per sample: teacher with CFG (2 forwards), EMA target (1), student forward and backward (about 1.2-1.5
    # with LoRA's weight gradients) -- in units of one teacher forward F.
    assert 5.0 < base["forwards_per_sample"] < 6.5
    # Gradient checkpointing recomputes the student's UNet blocks in the backward: about one more forward.
    assert 0.7 < ckpt["forwards_per_sample"] - base["forwards_per_sample"] < 1.1


def test_refuses_what_it_cannot_measure():
    with pytest.raises(ValueError, match="unknown lever"):
        bench.bench_one("tscd", "sd15", True, "cpu", 2, lever="fast")
    with pytest.raises(ValueError, match="none of the methods tscd has this option"):
        bench.bench_train(["tscd"], ["sd15"], tiny=True, device="cpu", overrides=["method.critic_updates_per_student_update=2"])
    with pytest.raises(ValueError, match="family 'sd4' is not supported"):
        bench.bench_train(["tscd"], ["sd4"], tiny=True, device="cpu")
    with pytest.raises(ValueError, match="method 'dmd2' is not registered"):
        bench.bench_config("dmd2", "sdxl", 4)
    with pytest.raises(ValueError, match="needs a square clip: pass --set model.resolution=N --set model.frames=F"):
        bench.bench_config("dmd", "wan", 2)


def test_a_video_family_benchmarks_at_the_clip_it_is_given():
    """Wan at its tiny presets' square clip (its 480 x 832 default is refused above); the fused-path equality test
    (tests/unit/test_fused_lora.py) trains it."""
    cfg = bench.bench_config("dmd", "wan", 2, ["model.resolution=16", "model.frames=5"])
    assert cfg.model.resolution == 16 and cfg.model.frames == 5 and cfg.data.images == bench.RANDOM_LATENTS


def test_method_overrides_go_only_to_methods_that_have_the_option():
    assert bench.applies("method.critic_updates_per_student_update=2", "dmd")
    assert not bench.applies("method.critic_updates_per_student_update=2", "tscd")
    assert bench.applies("model.compile=true", "tscd")
    cfg = bench.bench_config("dmd", "sdxl", 4, ["method.segments=[4]", "model.channels_last=true"])
    assert cfg.method.critic_updates_per_student_update == 5  # DMD2's SDXL recipe
    assert cfg.model.channels_last and cfg.data.images == bench.RANDOM_LATENTS


def test_a_shipped_preset_is_measured_as_written_on_random_init_models():
    preset, method, family = bench.read_preset(ROOT / "configs/dmd/sdxl_1step.yaml")
    cfg = bench.bench_config(method, family, preset["data"]["batch_size"], ["model.compile=true"], preset=preset)
    assert (cfg.method.name, cfg.model.family, cfg.data.batch_size) == ("dmd", "sdxl", 16)
    assert cfg.model.gradient_checkpointing and cfg.model.compile
    assert cfg.method.critic_updates_per_student_update == 5 and cfg.lora.rank == 64
    assert cfg.model.path == "random-init:sdxl" and cfg.data.images == bench.RANDOM_LATENTS


# ---- the real loop, its FLOPs, and the memory search -------------------------------------------------------------

def test_dmd_iteration_trains_both_adapters_and_flops_scale_with_batch(dmd_trainer):
    unet = dmd_trainer.built.nets.denoiser
    student, fake = _lora(dmd_trainer, "student"), _lora(dmd_trainer, "fake_score")
    base = unet.conv_in.weight.detach().clone()
    counts = {}
    for batch in (1, 2):
        dmd_trainer.built.data.batch_size = batch
        counts[batch] = bench.count_flops(lambda: bench.run_iteration(dmd_trainer), unet).total
    dmd_trainer.built.data.batch_size = 2
    assert all(not torch.equal(v, _lora(dmd_trainer, "student")[k]) for k, v in student.items() if "lora_B" in k)
    assert all(not torch.equal(v, _lora(dmd_trainer, "fake_score")[k]) for k, v in fake.items() if "lora_B" in k)
    assert torch.equal(unet.conv_in.weight, base)
    # Every pass is per sample: the FLOPs of an iteration are exactly linear in the batch.
    assert counts[2] == 2 * counts[1]
    # Student turn: generator forward and backward, teacher with CFG (2), fake score (1); critic turns: fake score
    # forward and backward twice, one fresh generator forward: about 12 teacher forwards F per sample.
    assert 10 < counts[1] / bench.unet_forward_flops(dmd_trainer) < 15


def test_largest_batch_doubles_then_bisects():
    for threshold in (0, 1, 5, 6, 7, 64, 100):
        tried = []

        def fits(b, threshold=threshold, tried=tried):
            tried.append(b)
            return b <= threshold

        assert bench.largest_batch(fits, limit=100) == threshold
        assert len(tried) <= 2 * 7 + 1  # log2(100) doublings and as many halvings
        assert max(tried) <= 100


def test_fits_recovers_from_out_of_memory(dmd_trainer, monkeypatch):
    params = [p for ps in dmd_trainer.built.params.values() for p in ps]

    def iteration():
        if dmd_trainer.built.data.batch_size > 3:
            for p in params:  # a backward that got this far before the allocator gave up
                p.grad = torch.ones_like(p)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return {}

    monkeypatch.setattr(dmd_trainer, "iteration", iteration)
    assert bench.largest_batch(lambda b: bench.fits(dmd_trainer, b), limit=64) == 3
    assert all(p.grad is None for p in params)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        bench.find_max_batch(dmd_trainer, 64)
    dmd_trainer.built.data.batch_size = 2


def test_channels_last_lever_lays_out_the_base_and_keeps_the_maths():
    _, reference = _one_iteration("tscd", [])
    trainer, logs = _one_iteration("tscd", ["model.channels_last=true"])
    assert trainer.built.nets.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    _assert_same_maths(logs, reference)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "regional"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compile_lever_keeps_one_graph_per_adapter(checkpointing, mode, monkeypatch):
    """Under torch.compile the teacher, student and fake score must not share a graph: dynamo has to guard on
    the PEFT layers' active-adapter flags. The eager backend traces like inductor, without code generation
    (still minutes on a loaded 2-core machine: dmd needs five graphs). With checkpointing, the recomputation
    in the backward must also run under the forward's adapter (core.denoiser.checkpoint_under_adapter)."""
    sets = [f"model.gradient_checkpointing={str(checkpointing).lower()}"]
    _, reference = _one_iteration("dmd", sets)
    monkeypatch.setattr(build_module, "COMPILE_OPTIONS", {"dynamic": False, "backend": "eager"})
    trainer, logs = _one_iteration("dmd", [*sets, f"model.compile={mode}"])
    assert trainer.built.compiled == mode
    assert (trainer.built.nets.denoiser._compiled_call_impl is not None) == (mode == "full")
    _assert_same_maths(logs, reference)
    assert logs["critic_grad_norm"] == pytest.approx(reference["critic_grad_norm"], rel=1e-4)


# ---- launchers -----------------------------------------------------------------------------------------------------

def _accelerate_env(config: str) -> dict:
    """The environment `accelerate launch --config_file configs/accelerate/<config>.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(
        ["--config_file", str(ROOT / "configs/accelerate" / f"{config}.yaml"), "-m", "stepdistill.cli", "train"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    return prepare_multi_gpu_env(args)


def test_shipped_accelerate_configs_launch_data_parallel_or_are_refused():
    cfg = bench.bench_config("tscd", "sd15", 2)
    for name in ("multi_gpu", "multi_node"):
        check_launcher(_accelerate_env(name), cfg)
    with pytest.raises(ConfigError, match="asks for FSDP.*multi_gpu.yaml"):
        check_launcher(_accelerate_env("fsdp"), cfg)
    with pytest.raises(ConfigError, match="asks for DeepSpeed.*multi_gpu.yaml"):
        check_launcher(_accelerate_env("deepspeed_zero2"), cfg)


def test_launcher_precision_and_dynamo_settings_are_not_ignored_silently():
    cfg = bench.bench_config("tscd", "sd15", 2)
    check_launcher({}, cfg)  # torchrun, or a plain process
    check_launcher({"ACCELERATE_MIXED_PRECISION": "bf16"}, cfg)  # what loop.mixed_precision=auto does on a GPU
    with pytest.raises(ConfigError, match="mixed_precision=fp16"):
        check_launcher({"ACCELERATE_MIXED_PRECISION": "fp16"}, cfg)
    cfg.loop.mixed_precision = "no"
    with pytest.raises(ConfigError, match="mixed_precision=bf16"):
        check_launcher({"ACCELERATE_MIXED_PRECISION": "bf16"}, cfg)
    with pytest.raises(ConfigError, match="model.compile=true"):
        check_launcher({"ACCELERATE_DYNAMO_BACKEND": "INDUCTOR"}, cfg)


def test_op_count_sees_aten_ops_and_every_kind_of_value_read():
    x = torch.arange(6.0)
    counter = bench.OpCount()
    with counter():
        y = x * 2 + 1
        float(y.sum())  # _local_scalar_dense
        y.tolist()  # no aten op on the CPU: counted where Python calls it
        y.nonzero()
    assert counter.total >= 6
    assert counter.reads() == {"_local_scalar_dense": 1, "tolist": 1, "nonzero": 1}


@pytest.mark.parametrize("method", ["lcm", "dmd"])
def test_an_iteration_reads_one_value_back_and_a_skip_reads_no_more(method):
    """Issue 33: the loop reads the update flags and logs in one transfer; the methods, the optimizer step and the
    non-finite check read nothing (each read is a sync on a GPU)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer(method, [], out)
        try:
            trainer.step = getattr(trainer.cfg.method, "regression_steps", 0)
            bench.run_iteration(trainer)
            counter = bench.count_ops(lambda: bench.run_iteration(trainer), trainer.built.nets.unet)
        finally:
            trainer.close()
    reads = counter.reads()
    reads.pop("tolist", None)  # the loop's one transfer (and the data order's, once per epoch)
    assert reads == {}, reads
    assert counter.ops["tolist"] <= 2
