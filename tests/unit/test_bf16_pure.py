"""bf16 end to end (`loop.mixed_precision=bf16_pure`, issue 33 item 2): the base and every activation in bf16 without
autocast, the LoRA term through the fused path from bf16 copies of the fp32 masters, losses reduced in fp32.

It must train what autocast trains, to bf16 rounding: each loss and gradient of one batch is compared with the fp32
run of the same draws, and must be about as close to it as the autocast run is (both are rounding noise on these
tiny random networks); and it must dispatch fewer ops per iteration than autocast (no cast chains around the norms).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from stepdistill.bench import train as bench

from stepdistill.config import ConfigError, build_config
from stepdistill.core.lora import lora_layer_modules
from stepdistill.train.build import base_dtype, precision_mode

PURE = ["model.dtype=bf16", "loop.mixed_precision=bf16_pure"]
AUTOCAST = ["model.dtype=bf16", "loop.mixed_precision=bf16"]
FP32 = ["model.dtype=fp32", "loop.mixed_precision='no'"]  # quoted: YAML reads a bare no as false


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(method, family, sets, out):
    cfg = bench.bench_config(method, family, 2, ["lora.rank=4", "method.critic_updates_per_student_update=1", *sets])
    torch.manual_seed(0)
    model = bench.bench_model(family, tiny=True, device="cpu", dtype=base_dtype(cfg, torch.device("cpu")))
    trainer = bench.make_trainer(cfg, model, bench.bench_data(cfg, model), out, "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # nonzero adapters: a fresh one has B = 0, where A's gradient vanishes
        for name, p in trainer.built.nets.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_((0.05 if "lora_B" in name else 0.2) * torch.randn(p.shape, generator=g))
    return trainer


def _losses_and_grads(method, family, sets):
    """The student loss (and the critic's) of one batch and every LoRA gradient, from fixed draws."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer(method, family, sets, out)
        try:
            b = trainer.built
            trainer.noise_generator.manual_seed(7)
            torch.manual_seed(7)
            (batch,) = trainer._batches()
            losses, grads, inputs = {}, {}, None
            step = getattr(trainer.cfg.method, "regression_steps", 0)
            for phase in ("student", "critic"):
                with trainer.autocast:
                    out_ = (b.distiller.student_loss(b.nets, batch, step) if phase == "student"
                            else b.distiller.critic_loss(b.nets, batch, inputs))
                if out_ is None:
                    continue
                inputs = out_.critic_inputs
                loss = out_.loss.float().mean()
                loss.backward()
                losses[phase] = float(loss.detach())
                grads[phase] = torch.cat([p.grad.float().flatten() for _, p in sorted(
                    (n, p) for n, p in b.nets.denoiser.named_parameters() if p.grad is not None)])
                for p in b.nets.denoiser.parameters():
                    p.grad = None
            return losses, grads
        finally:
            trainer.close()


@pytest.mark.parametrize("method,family", [("lcm", "sdxl"), ("dmd", "sd15"), ("tscd", "sd15")])
def test_pure_bf16_trains_what_autocast_trains_to_bf16_rounding(method, family):
    ref_losses, ref_grads = _losses_and_grads(method, family, FP32)
    auto_losses, auto_grads = _losses_and_grads(method, family, AUTOCAST)
    pure_losses, pure_grads = _losses_and_grads(method, family, PURE)
    assert set(pure_losses) == set(ref_losses) == set(auto_losses)
    for k, ref in ref_losses.items():
        ulp = 2**-8 * abs(ref)  # one bf16 ulp of the loss
        auto_err = abs(auto_losses[k] - ref)
        assert abs(pure_losses[k] - ref) <= 2 * auto_err + 4 * ulp, (k, pure_losses[k], auto_losses[k], ref)
    for phase, ref in ref_grads.items():
        assert ref.norm() > 0, f"{phase}: no gradient reached the adapters"
        auto_err = (auto_grads[phase] - ref).norm()
        pure_err = (pure_grads[phase] - ref).norm()
        # Both are bf16 rounding of the same maths: the same size of error, within a factor 2, not a larger one.
        assert pure_err <= 2 * auto_err + 0.01 * ref.norm(), (phase, float(pure_err), float(auto_err))


def test_pure_bf16_runs_the_fused_lora_path_in_bf16_without_autocast():
    """No layer falls back to PEFT's forward (which would compute the LoRA term in fp32), and no autocast is entered."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("lcm", "sd15", PURE, out)
        try:
            unet = trainer.built.nets.denoiser
            assert next(unet.parameters()).dtype == torch.bfloat16
            layers = lora_layer_modules(unet)
            peft_calls = []
            cls = type(layers[0])
            original = cls.forward

            def spy(self, *args, **kwargs):
                peft_calls.append(self)
                return original(self, *args, **kwargs)

            cls.forward = spy
            autocast_seen = []
            real_mm = torch.mm

            def mm(*args, **kwargs):
                autocast_seen.append(torch.is_autocast_enabled("cpu"))
                return real_mm(*args, **kwargs)

            try:
                torch.mm = mm
                bench.run_iteration(trainer)
            finally:
                cls.forward = original
                torch.mm = real_mm
            assert autocast_seen and not any(autocast_seen)
            assert not peft_calls, f"{len(peft_calls)} LoRA layer calls took PEFT's forward"
        finally:
            trainer.close()


def test_bf16_pure_needs_a_bf16_base_and_makes_auto_one():
    base = {"model": {"path": "x"}, "data": {"prompts": "p.txt"}, "method": {"name": "lcm"}}
    cfg = build_config({**base, "loop": {"mixed_precision": "bf16_pure"}})
    assert base_dtype(cfg, torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ConfigError, match="model.dtype=bf16"):
        build_config({**base, "model": {"path": "x", "dtype": "fp32"}, "loop": {"mixed_precision": "bf16_pure"}})


@pytest.mark.parametrize("model_sets, expected", [
    ({}, "bf16_pure"),  # the GPU default: level with fp32 on the toy world (docs/training-speed.md)
    ({"dtype": "bf16"}, "bf16_pure"),
    ({"dtype": "fp32"}, "bf16"),  # autocast over a base the user keeps in fp32
    ({"lora_kernel": "peft"}, "bf16"),  # PEFT's own forward: not the path the toy-world check measured
])
def test_auto_precision_is_bf16_end_to_end_on_a_gpu_and_off_on_the_cpu(model_sets, expected):
    cfg = build_config({"model": {"path": "x", **model_sets}, "data": {"prompts": "p.txt"}, "method": {"name": "lcm"}})
    assert cfg.loop.mixed_precision == "auto"
    cuda = torch.device("cuda")  # a device object only: nothing is allocated on it
    assert precision_mode(cfg, cuda) == expected
    assert base_dtype(cfg, cuda) == (torch.float32 if model_sets.get("dtype") == "fp32" else torch.bfloat16)
    assert precision_mode(cfg, torch.device("cpu")) == "no"
    assert base_dtype(cfg, torch.device("cpu")) == (torch.bfloat16 if model_sets.get("dtype") == "bf16" else torch.float32)
    cfg.loop.mixed_precision = "bf16"  # an explicit setting is kept as it is, on any device
    assert precision_mode(cfg, cuda) == precision_mode(cfg, torch.device("cpu")) == "bf16"


def _ops(method, family, sets) -> int:
    with tempfile.TemporaryDirectory() as out:
        cfg, model, data = bench.bench_run(method, family, True, "cpu", bench.TINY_BATCH, sets)
        trainer = bench.make_trainer(cfg, model, data, out, "cpu")
        try:
            for _ in range(2):
                bench.run_iteration(trainer)
            return bench.count_ops(lambda: bench.run_iteration(trainer), trainer.built.nets.unet).total
        finally:
            trainer.close()


# Aten ops of one tiny-SDXL iteration (bench train's run, batch 2) under bf16_pure, measured at the commit that set
# them (docs/training-speed.md) with ~3 % headroom: a regression guard on the op stream, not a timing.
MAX_OPS = {"lcm": 3300, "tscd": 3440}  # measured 3,212 and 3,337


@pytest.mark.parametrize("method", sorted(MAX_OPS))
def test_pure_bf16_iteration_dispatches_at_most_its_measured_op_count(method):
    pure = _ops(method, "sdxl", PURE)
    assert pure <= MAX_OPS[method], (method, pure)
