"""The fused LoRA path (core/lora.py, issue 33) computes what PEFT's own forward computes: outputs, losses and every
gradient, layer by layer and through every method's losses on every family, in fp32 and in bf16 (base and autocast).

Each comparison runs the same draws twice on one built run, once per `model.lora_kernel`, with nonzero adapters (fresh
ones have B = 0, where the gradient of A vanishes and a mix-up would not show).
"""

from __future__ import annotations

import tempfile

import pytest
import torch
from stepdistill.bench import train as bench

from stepdistill.config import ConfigError
from stepdistill.core.denoiser import active_adapter, mixed_adapters
from stepdistill.core.lora import lora_layer_modules, use_fused_lora
from stepdistill.models.registry import family_names
from stepdistill.registry import method_names

BF16 = ["model.dtype=bf16", "loop.mixed_precision=bf16"]
# Float tolerances from the dtype: fp32 sums reordered (addmm with alpha vs. multiply then add); bf16 rounds the
# low-rank term once where PEFT rounds it three times (h B^T, * scale, + base): a few bf16 ulps of the result.
TOL = {"fp32": {"rtol": 1e-4, "atol": 1e-5}, "bf16": {"rtol": 5e-2, "atol": 5e-2}}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(method, family, sets, out):
    cfg = bench.bench_config(method, family, 2, ["lora.rank=4", *sets])
    torch.manual_seed(0)
    dtype = torch.bfloat16 if "model.dtype=bf16" in sets else torch.float32
    model = bench.bench_model(family, tiny=True, device="cpu", dtype=dtype)
    data = bench.bench_data(cfg, model)
    if method == "reward":  # the toy judge reads toy-world captions
        from stepdistill.data.prompts import PromptData

        data = PromptData.from_family(model, ["a small red circle on the left", "a large blue square at the top",
                                              "a small green triangle above a large red circle"],
                                      2, cfg.seed)
    trainer = bench.make_trainer(cfg, model, data, out, "cpu")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.built.nets.denoiser.named_parameters():
            if "lora_" in name:
                p.copy_((0.05 if "lora_B" in name else 0.2) * torch.randn(p.shape, generator=g))
    return trainer


def _grads(trainer) -> dict:
    return {n: p.grad.detach().clone() for n, p in trainer.built.nets.denoiser.named_parameters() if p.grad is not None}


def _losses_and_grads(trainer, kernel: str, step: int):
    """student_loss and critic_loss of one batch under `kernel`, from the same draws: (losses, grads per phase)."""
    b = trainer.built
    use_fused_lora(b.nets.denoiser, kernel == "fused")
    trainer.noise_generator.manual_seed(7)
    torch.manual_seed(7)
    b.data.load_state_dict({"epoch": 0, "position": 0})
    (batch,) = trainer._batches()
    losses, grads = {}, {}
    for phase in ("student", "critic"):
        with trainer.autocast:
            out = (b.distiller.student_loss(b.nets, batch, step) if phase == "student"
                   else b.distiller.critic_loss(b.nets, batch, losses.get("critic_inputs")))
        if out is None:
            continue
        loss = out.loss.float().mean()
        loss.backward()
        losses[phase] = loss.detach()
        losses["critic_inputs"] = out.critic_inputs
        grads[phase] = _grads(trainer)
        for p in b.nets.denoiser.parameters():
            p.grad = None
        for ps in b.params.values():
            for p in ps:
                p.grad = None
    losses.pop("critic_inputs", None)
    return losses, grads


def _close(a, b, tol, what):
    torch.testing.assert_close(a.float(), b.float(), **tol, msg=lambda m: f"{what}: {m}")


def _close_grads(grads: dict, ref: dict, tol, what):
    """Every gradient, relative to the largest of them: some adapters' gradients are rounding noise next to others'
    (a tiny random UNet's time embedding path), and no per-tensor scale is meaningful for those."""
    if not ref:
        return
    scale = max(g.float().abs().max() for g in ref.values()).clamp(min=1e-12)
    for name, g in ref.items():
        _close(grads[name] / scale, g / scale, tol, f"{what} grad {name}")


# Qwen-Image's tiny random-init model (a Qwen2.5-VL text encoder beside it) costs 40-120 s a case on 2 cores: its
# method x family cases are opt-in (pytest -m slow); its CLI runs (tests/tiny/test_qwenimage.py) train through the
# fused path in the default suite.
SLOW_FAMILIES = {"qwenimage"}
CASES = [pytest.param(m, f, marks=[pytest.mark.slow] if f in SLOW_FAMILIES else [], id=f"{m}-{f}")
         for m in method_names() for f in family_names()]


def _build_or_skip(method, family, sets, out):
    try:
        return _trainer(method, family, sets, out)
    except (ConfigError, ValueError) as e:
        # A method that refuses the family's parameterisation, a family without random-init benchmark models (the
        # flow transformers: tests/tiny/test_train_flow.py trains those), the reward method on non-toy prompts.
        pytest.skip(f"{method} on tiny {family} is not built here: {str(e)[:100]}")


def _run_both(method, family, sets):
    with tempfile.TemporaryDirectory() as out:
        trainer = _build_or_skip(method, family, sets, out)
        try:
            step = getattr(trainer.cfg.method, "regression_steps", 0)
            return _losses_and_grads(trainer, "peft", step), _losses_and_grads(trainer, "fused", step)
        finally:
            trainer.close()


def _flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.float().flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("method,family", CASES)
def test_fused_path_equals_peft_losses_and_every_gradient(method, family):
    """fp32: every loss and gradient element to float tolerance. bf16 (base and autocast): PEFT's own bf16 run is
    already far from fp32 on these tiny random networks (gradients ~30 % in norm), so the fused run must be as close
    to the fp32 reference as PEFT's bf16 run is (within a factor 2: both are rounding noise), not closer to PEFT's bf16 rounding than that rounding is to fp32."""
    (ref_losses, ref_grads), (losses, grads) = _run_both(method, family, [])
    assert ref_losses and set(losses) == set(ref_losses)
    for k in ref_losses:
        _close(losses[k], ref_losses[k], TOL["fp32"], f"{k} loss")
    for phase, ref in ref_grads.items():
        assert ref and set(grads[phase]) == set(ref), phase
        assert any(g.abs().sum() > 0 for g in ref.values()), f"{phase}: no gradient reached the adapters"
        _close_grads(grads[phase], ref, TOL["fp32"], phase)

    (peft16_losses, peft16_grads), (fused16_losses, fused16_grads) = _run_both(method, family, BF16)
    for k in ref_losses:
        eps = 2**-8 * abs(float(ref_losses[k]))  # one bf16 ulp of the loss
        peft_err = abs(float(peft16_losses[k]) - float(ref_losses[k]))
        assert abs(float(fused16_losses[k]) - float(ref_losses[k])) <= 1.5 * peft_err + 4 * eps, k
    for phase, ref in ref_grads.items():
        truth = _flat(ref)
        peft_err = (_flat(peft16_grads[phase]) - truth).norm()
        fused_err = (_flat(fused16_grads[phase]) - truth).norm()
        assert fused_err <= 2 * peft_err + 0.01 * truth.norm(), (phase, float(fused_err), float(peft_err))


# ---- layer level: outputs and gradients of one UNet call, every way the path is entered --------------------------


@pytest.fixture(scope="module")
def sdxl_tiny():
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("dmd", "sdxl", [], out)
        yield trainer
        trainer.close()


def _call(trainer, adapter, x, grad, autocast):
    b = trainer.built
    cond = b.data.cond.index([0, 1]).to("cpu")
    t = torch.tensor([300, 700])
    x = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16, enabled=autocast), \
            active_adapter(b.nets.denoiser, adapter):
        out = b.nets.student.call(b.nets.denoiser, x, t, cond)
    if not grad:
        return out.detach(), {}
    out.float().square().mean().backward()
    grads = {"x": x.grad, **_grads(trainer)}
    for p in b.nets.denoiser.parameters():
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("adapter", ["student", "fake_score", None])
def test_one_call_matches_peft_for_each_adapter_with_and_without_grad(sdxl_tiny, adapter, autocast):
    unet = sdxl_tiny.built.nets.denoiser
    x = torch.randn(2, *sdxl_tiny.built.ctx.latent_shape, generator=torch.Generator().manual_seed(3))
    tol = TOL["bf16" if autocast else "fp32"]
    for grad in (False, True):
        use_fused_lora(unet, False)
        ref, ref_grads = _call(sdxl_tiny, adapter, x, grad, autocast)
        use_fused_lora(unet)
        out, grads = _call(sdxl_tiny, adapter, x, grad, autocast)
        _close(out, ref, tol, f"output grad={grad}")
        assert set(grads) == set(ref_grads)
        _close_grads(grads, ref_grads, tol, f"grad={grad}")


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_mixed_adapter_call_matches_peft_per_sample_path(sdxl_tiny, autocast):
    """Teacher, student and fake score rows in one call: row slices (fused) against PEFT's list-indexed path."""
    unet = sdxl_tiny.built.nets.denoiser
    b = sdxl_tiny.built
    x = torch.randn(4, *b.ctx.latent_shape, generator=torch.Generator().manual_seed(4))
    cond = b.data.cond.index([0, 1, 0, 1]).to("cpu")
    t = torch.tensor([100, 300, 500, 900])
    names = [None, "student", "fake_score", "fake_score"]
    outs = []
    for fused in (False, True):
        use_fused_lora(unet, fused)
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast), mixed_adapters(unet, names):
            outs.append(b.nets.student.call(unet, x, t, cond))
    _close(outs[1], outs[0], TOL["bf16" if autocast else "fp32"], "mixed call")
    # Each row is its own adapter's output (not, say, every row under the first adapter).
    use_fused_lora(unet)
    with torch.no_grad(), active_adapter(unet, "student"):
        alone = b.nets.student.call(unet, x[1:2], t[1:2], cond.index([1]))
    _close(outs[1][1:2].float(), alone.float(), TOL["bf16" if autocast else "fp32"], "student row")


def test_compute_copies_follow_the_masters_once_per_change(sdxl_tiny):
    """bf16 copies of A and B are made once per change of the masters, and a change (in place) refreshes every stale
    layer's copies in ONE foreach copy, not a cast per tensor."""
    from stepdistill.core.lora import _compute_weights

    layers = lora_layer_modules(sdxl_tiny.built.nets.denoiser)
    layer = layers[0]
    first = _compute_weights(layer, "student", torch.bfloat16)
    counter = bench.OpCount()
    with counter():
        assert _compute_weights(layer, "student", torch.bfloat16)[0] is first[0]  # cached, no new cast
    assert counter.total == 0
    with torch.no_grad():
        for m in layers:
            m.lora_A["student"].weight.add_(1.0)
    counter = bench.OpCount()
    with counter():
        again = _compute_weights(layer, "student", torch.bfloat16)
        others = [_compute_weights(m, "student", torch.bfloat16) for m in layers[1:]]
    assert dict(counter.ops) == {"_foreach_copy_": 1}, dict(counter.ops)
    for m, copies in zip(layers, [again, *others]):
        torch.testing.assert_close(copies[0].float(), m.lora_A["student"].weight.bfloat16().float(), rtol=0, atol=0)
        if copies[2] is not None:  # a Linear's transpose: a view of the refreshed copy
            assert torch.equal(copies[2], copies[0].t())
    with torch.no_grad():
        for m in layers:
            m.lora_A["student"].weight.sub_(1.0)


def test_fused_path_leaves_parameter_names_and_state_dict_unchanged(sdxl_tiny):
    unet = sdxl_tiny.built.nets.denoiser
    use_fused_lora(unet, False)
    keys = list(unet.state_dict())
    assert use_fused_lora(unet) == len(lora_layer_modules(unet)) > 0
    assert list(unet.state_dict()) == keys


def test_unknown_lora_kernel_is_a_config_error():
    from stepdistill.config import build_config

    with pytest.raises(ConfigError, match="model.lora_kernel"):
        build_config({"method": {"name": "lcm"}, "model": {"lora_kernel": "triton"}})


def test_compute_copies_follow_the_loops_fused_optimizer_step():
    """torch's fused AdamW updates the fp32 masters without bumping their version counters: the loop bumps them, or
    the bf16 copies (keyed on those counters) would keep the first forward's weights for the whole run."""
    from stepdistill.core.lora import _compute_weights

    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("lcm", "sd15", BF16, out)
        try:
            assert trainer.optimizers["student"].defaults.get("fused")
            for _ in range(2):
                bench.run_iteration(trainer)
            layers = lora_layer_modules(trainer.built.nets.denoiser)
            moved = 0
            for layer in layers:
                A, B = layer.lora_A["student"].weight, layer.lora_B["student"].weight
                a, b = _compute_weights(layer, "student", torch.bfloat16)[:2]
                assert torch.equal(a, A.detach().bfloat16()) and torch.equal(b, B.detach().bfloat16())
                moved += int(b.abs().sum() > 0)
            assert moved, "no adapter moved"
        finally:
            trainer.close()
