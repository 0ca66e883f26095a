"""model.compile (core/compile.py, train/build.py; issue 33): what each setting resolves to, which blocks a regional
compile covers, and that a denoiser compiled by region computes what the eager one computes (outputs and every LoRA
gradient) through the fused LoRA path, with no graph breaks inside a block.

Compiled here with the aot_eager backend (dynamo's tracing and AOT autograd's joint graph, without inductor's code
generation, which takes minutes on these CPUs); the inductor run is the slow test at the end.
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from stepdistill.bench import train as bench

from stepdistill.config import ConfigError, ModelConfig
from stepdistill.core.compile import compile_regions, compiled_mode
from stepdistill.core.denoiser import Denoiser, active_adapter, checkpoint_under_adapter
from stepdistill.core.lora import add_adapter, use_fused_lora
from stepdistill.models.random_init import build_family_model
from stepdistill.train import build as build_module
from stepdistill.train.build import resolve_compile

from .bench_rig import tiny_trainer

CHEAP = {"dynamic": False, "backend": "aot_eager"}
TOL = {"rtol": 1e-4, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ---- the setting ---------------------------------------------------------------------------------------------------

def test_auto_compiles_by_region_on_cuda_only_and_explicit_values_are_applied_or_refused(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_compile("auto", cuda)[0] == "regional"
    assert resolve_compile("auto", cpu)[0] == "off"
    mode, why = resolve_compile("auto", cuda, "fsdp2")
    assert mode == "off" and "fsdp2" in why
    for mode in ("off", "regional", "full"):
        assert resolve_compile(mode, cuda)[0] == mode
    monkeypatch.setattr(build_module, "_cxx_compiler", lambda: "g++")
    assert resolve_compile("regional", cpu)[0] == "regional"  # works on the CPU (slowly): applied, not ignored
    monkeypatch.setattr(build_module, "_cxx_compiler", lambda: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*model.compile=off"):
        resolve_compile("regional", cpu)


def test_config_reads_the_old_switch_and_refuses_unknown_values_and_fsdp2():
    assert ModelConfig().compile == "auto"
    for old, new in ((True, "regional"), (False, "off")):
        cfg = ModelConfig(compile=old)
        cfg.validate()
        assert cfg.compile == new
    with pytest.raises(ConfigError, match="model.compile must be one of"):
        ModelConfig(compile="regionl").validate()
    with pytest.raises(ConfigError, match="model.shard=fsdp2 with model.compile=regional"):
        ModelConfig(shard="fsdp2", compile="regional").validate()
    ModelConfig(shard="fsdp2").validate()  # auto: off under fsdp2, said in the log


# ---- the units -----------------------------------------------------------------------------------------------------

def _family(name):
    torch.manual_seed(0)
    return build_family_model(name, tiny=True, vae="full", device="cpu", dtype=torch.float32)


def test_regional_units_are_every_resnet_and_transformer_block_of_a_unet_and_the_blocks_of_a_dit():
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    sdxl = _family("sdxl")
    units = sdxl.compile_units()
    expected = [m for m in sdxl.unet.modules() if isinstance(m, (ResnetBlock2D, BasicTransformerBlock))]
    assert len(units) == len(expected) > 0 and {id(u) for u in units} == {id(m) for m in expected}
    flux = _family("flux")
    assert flux.compile_units() == [*flux.unet.transformer_blocks, *flux.unet.single_transformer_blocks]


# ---- same maths --------------------------------------------------------------------------------------------------

def _with_adapter(family, checkpointing: bool):
    net = family.unet
    add_adapter(net, "student", 4, 4.0, family.lora_targets("full"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if "lora_" in name:  # nonzero A and B: a fresh B = 0 would hide a wrong gradient of A
                p.copy_((0.05 if "lora_B" in name else 0.2) * torch.randn(p.shape, generator=g))
    use_fused_lora(net)
    if checkpointing:
        net.enable_gradient_checkpointing(checkpoint_under_adapter)
    return net


def _call(family, adapter, grad: bool):
    """One denoiser call (the family's own call: packing, ids, pooled text), its output and the LoRA and x gradients."""
    net = family.unet
    view = Denoiser(net, family.noise_schedule(), adapter, call=family.denoiser_call,
                    network_timestep=family.network_timestep)
    x = torch.randn(family.latent_shape(2), generator=torch.Generator().manual_seed(2)).requires_grad_(grad)
    cond = family.encode_prompts(["a red circle", "a blue square"])
    with torch.set_grad_enabled(grad):
        out = view.raw(x, torch.tensor([300, 700]), cond)
    if not grad:
        return out.detach(), {}
    out.square().mean().backward()
    grads = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}}
    net.zero_grad(set_to_none=True)
    return out.detach(), grads


def _same(result, reference):
    out, grads = result
    ref, ref_grads = reference
    torch.testing.assert_close(out, ref, **TOL)
    assert set(grads) == set(ref_grads)
    scale = max((g.abs().max() for g in ref_grads.values()), default=torch.tensor(1.0)).clamp(min=1e-12)
    for name, g in ref_grads.items():  # relative to the largest gradient (see test_fused_lora._close_grads)
        torch.testing.assert_close(grads[name] / scale, g / scale, **TOL, msg=lambda m, n=name: f"{n}: {m}")


ALL_CALLS = [(adapter, grad) for adapter in (None, "student") for grad in (False, True)]
# Dynamo traces every block shape once per adapter and grad mode: a minute or more per case on 2 loaded cores, so the
# default suite keeps one case (the student with grad: the fused LoRA forward and backward compiled) and the rest
# are opt-in (the teacher alone compiles in test_a_fused_lora_block_compiles_without_graph_breaks).
CASES = [
    pytest.param("sdxl", False, [("student", True)], id="sdxl-student-with-grad"),
    pytest.param("sdxl", True, ALL_CALLS, id="sdxl-checkpointing-all-calls", marks=pytest.mark.slow),
    pytest.param("flux", True, ALL_CALLS, id="flux-checkpointing-all-calls", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("family_name,checkpointing,calls", CASES)
def test_regional_compile_computes_the_eager_output_and_gradients(family_name, checkpointing, calls):
    """Teacher (adapters off) and student, with and without grad; with checkpointing the compiled block runs inside
    the checkpoint and is recomputed under the forward's adapter."""
    family = _family(family_name)
    net = _with_adapter(family, checkpointing)
    reference = {c: _call(family, *c) for c in calls}
    n = compile_regions(net, family.compile_units(), **CHEAP)
    assert n == len(family.compile_units()) and compiled_mode(net) == "regional"
    for c in calls:
        _same(_call(family, *c), reference[c])
    # Parameter names unchanged (compiled in place): checkpoints and exports see the same keys.
    assert all("_orig_mod" not in name for name, _ in net.named_parameters())


def test_a_fused_lora_block_compiles_without_graph_breaks():
    """torch._dynamo.explain on the first resnet and the first transformer block of the tiny SDXL UNet, called with the
    inputs the UNet gives them, under the student adapter with grad (the fused autograd functions) and as the teacher."""
    family = _family("sdxl")
    net = _with_adapter(family, False)
    units = family.compile_units()
    picked = {type(u).__name__: u for u in reversed(units)}  # the first of each class
    seen = {}
    handles = [u.register_forward_pre_hook(lambda m, a, k, name=name: seen.setdefault(name, (a, k)), with_kwargs=True)
               for name, u in picked.items()]
    _call(family, "student", False)
    for h in handles:
        h.remove()
    assert set(seen) == {"ResnetBlock2D", "BasicTransformerBlock"}
    for name, (args, kwargs) in seen.items():
        for adapter in ("student", None):
            with active_adapter(net, adapter):
                explained = torch._dynamo.explain(picked[name])(*args, **kwargs)
            assert explained.graph_break_count == 0, (name, adapter, explained.break_reasons)
            assert explained.graph_count == 1


@pytest.mark.slow
def test_training_iteration_with_regional_compile_equals_eager(monkeypatch):
    """One real tscd iteration (student with grad, teacher and EMA target without) through train/build.py's
    model.compile=regional: the same loss and gradient norm as eager, and the log says what was compiled."""
    sets = ["model.compile=off"]
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer("tscd", sets, out)
        reference = bench.run_iteration(trainer)
        trainer.close()
    monkeypatch.setattr(build_module, "COMPILE_OPTIONS", CHEAP)
    logged = []
    monkeypatch.setattr(build_module.log, "info", lambda msg, *a: logged.append(msg % a))
    with tempfile.TemporaryDirectory() as out:
        trainer = tiny_trainer("tscd", ["model.compile=regional"], out)
        logs = bench.run_iteration(trainer)
        trainer.close()
    assert trainer.built.compiled == "regional"
    assert any("torch.compile per block" in m and "ResnetBlock2D" in m for m in logged), logged
    for key in ("loss", "student_grad_norm"):
        assert logs[key] == pytest.approx(reference[key], rel=1e-4), key


@pytest.mark.slow
def test_regional_compile_with_inductor_equals_eager_on_the_cpu():
    """The real backend (inductor, C++ code generation on the CPU: minutes here)."""
    family = _family("sdxl")
    net = _with_adapter(family, True)
    reference = _call(family, "student", True)
    compile_regions(net, family.compile_units(), dynamic=False)
    _same(_call(family, "student", True), reference)
