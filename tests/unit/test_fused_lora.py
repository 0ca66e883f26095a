"""The fused LoRA path (core/lora.py, issue 33) computes what PEFT's own forward computes: outputs, losses and every
gradient, layer by layer and through every method's losses on every family, in fp32 and in bf16 (base and autocast).

Each comparison runs the same draws twice on one built run, once per `model.lora_kernel`, with nonzero adapters (fresh
ones have B = 0, where the gradient of A vanishes and a mix-up would not show).
"""

from __future__ import annotations

import contextlib
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
# A whole loss's fp32 gradients, relative to the largest: fp32 itself is only this accurate on these tiny random
# networks. Against a float64 run of PEFT's path, lcm's student gradients are off by up to 1.1e-4 (sd15) and 2.0e-5
# (sdxl) of the largest in PEFT's own fp32 run; the fused path (its q/k/v projection one GEMM over the concatenated
# bases, another float order) by 6.1e-5 and 3.5e-5: both are rounding, and 1e-5 would test float order, not maths.
FP32_LOSS_GRADS = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


# A video family's default 480 x 832 x 81 frames is refused with image data (cropped square) and is large: its tiny
# presets' clip (configs/tiny/*_wan.yaml).
FAMILY_SETS = {"wan": ["model.resolution=16", "model.frames=5"]}


def _trainer(method, family, sets, out):
    cfg = bench.bench_config(method, family, 2, ["lora.rank=4", *FAMILY_SETS.get(family, []), *sets])
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
        # A method that refuses the family's parameterisation (the eps-only methods on the flow families), the reward
        # method on non-toy prompts. Every family is built: sd15, sdxl, sd3, flux, wan (its tiny clip), qwenimage.
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
        _close_grads(grads[phase], ref, FP32_LOSS_GRADS, phase)

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


# ---- q, k and v as one projection (core.lora.fused_linears, used by core.attn_processor.SDPAAttnProcessor) ---


@pytest.fixture(scope="module")
def sdxl_tiny_bf16():
    """A bf16 base without autocast, the low-rank term in bf16 too (loop.mixed_precision=bf16_pure)."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("dmd", "sdxl", ["model.dtype=bf16", "loop.mixed_precision=bf16_pure"], out)
        yield trainer
        trainer.close()


MODES = ["fp32", "bf16-autocast", "bf16-pure"]


def _qkv_layers(unet, kind: str):
    """The projections that read one input: self-attention's q, k, v or cross-attention's k, v (first of each)."""
    from stepdistill.core.attention import attention_modules

    attn = next(a for a in attention_modules(unet) if a.is_cross_attention == (kind == "cross"))
    return (attn.to_k, attn.to_v) if kind == "cross" else (attn.to_q, attn.to_k, attn.to_v)


def _project(layers, x, fused: bool, autocast: bool, weights):
    """[layer_1(x) | ... ] fused or one call each, and the gradients of a weighted sum for x and every LoRA master."""
    from stepdistill.core.lora import fused_linears

    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = fused_linears(layers, x) if fused else torch.cat([m(x) for m in layers], -1)
    assert y is not None, "the fused projection did not apply"
    masters = {f"{i}.{n}": p for i, m in enumerate(layers) for n, p in m.named_parameters() if "lora_" in n}
    grads = torch.autograd.grad((y.float() * weights).sum(), [x, *masters.values()], allow_unused=True)
    return y.detach(), dict(zip(["x", *masters], grads))


def _bf16_tol(terms: int) -> dict:
    """Relative to the largest element: `terms` bf16 roundings (2^-8 each) that differ between the two ways; a sum
    split into m partial products adds m roundings (the separate path rounds each projection's share of dx)."""
    return {"rtol": 0.0, "atol": terms * 2.0**-8}


@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("adapter,scale", [("student", None), ("student", 0.375), ("fake_score", None), (None, None)])
@pytest.mark.parametrize("mode", MODES)
def test_fused_qkv_equals_separate_projections_outputs_and_every_gradient(sdxl_tiny, sdxl_tiny_bf16, mode, adapter,
                                                                          scale, kind):
    """One fused projection against one call per layer (the per-layer fused path, itself tested against PEFT's):
    the output and the gradient of x and of every LoRA master (A and B of q, k, v), at the adapters' scale (1) and
    another; the teacher (adapters off) fuses the bare bases."""
    trainer = sdxl_tiny_bf16 if mode == "bf16-pure" else sdxl_tiny
    unet = trainer.built.nets.denoiser
    use_fused_lora(unet, low_precision=mode == "bf16-pure")
    layers = _qkv_layers(unet, kind)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, layers[0].in_features, generator=g).to(unet.dtype)
    weights = torch.randn(2, 7, sum(m.out_features for m in layers), generator=g)
    scaled = contextlib.ExitStack()
    if scale is not None:
        for m in layers:
            scaled.enter_context(_item(m.scaling, adapter, scale))
    with active_adapter(unet, adapter), scaled:
        ref, ref_grads = _project(layers, x, False, mode == "bf16-autocast", weights)
        out, grads = _project(layers, x, True, mode == "bf16-autocast", weights)
    assert out.dtype == ref.dtype
    assert {k for k, v in grads.items() if v is None} == {k for k, v in ref_grads.items() if v is None}
    trained = {k for k, v in ref_grads.items() if v is not None and k != "x"}
    if adapter is None:
        assert not trained  # the teacher: no adapter takes part
    else:
        assert len(trained) == 2 * len(layers) and all(f".{adapter}." in k for k in trained), trained
        assert all(ref_grads[k].abs().sum() > 0 for k in trained)
    m = len(layers)
    out_tol, grad_tol = (TOL["fp32"], TOL["fp32"]) if mode == "fp32" else (_bf16_tol(2), _bf16_tol(m + 2))
    scale = ref.float().abs().max()
    _close(out / scale, ref / scale, out_tol, "output")
    _close_grads({k: v for k, v in grads.items() if v is not None},
                 {k: v for k, v in ref_grads.items() if v is not None}, grad_tol, mode)


def _fuses(layers, x, autocast=False) -> bool:
    from stepdistill.core.lora import fused_linears

    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        return fused_linears(layers, x) is not None


@contextlib.contextmanager
def _changed(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def _fallbacks(unet, layers, x):
    """Each case where one of the layers alone would not take the fused path, or the layers would not take it the
    same way: (name, context manager, input). The base-only (teacher) cases are in the list too."""
    q, k, v = layers
    dropout = torch.nn.Dropout(0.0)
    wide = torch.nn.Linear(q.in_features, 2, bias=False), torch.nn.Linear(2, q.out_features, bias=False)
    return [
        ("PEFT's forward (use_fused_lora off)", lambda: _unfused(unet), x),
        ("a mixed-adapter call", lambda: mixed_adapters(unet, ["student", "fake_score"]), x),
        ("several active adapters", lambda: _changed(k, "_active_adapter", ["student", "fake_score"]), x),
        ("k on another adapter", lambda: _changed(k, "_active_adapter", ["fake_score"]), x),
        ("v as the bare base, q and k with the student", lambda: _changed(v, "_disable_adapters", True), x),
        ("a trainable base", lambda: _requires_grad(k.base_layer.weight), x),
        ("a trainable base, adapters off", lambda: _both(_requires_grad(k.base_layer.weight),
                                                         active_adapter(unet, None)), x),
        ("merged adapters", lambda: _changed(v, "merged_adapters", ["student"]), x),
        ("dropout", lambda: _item(v.lora_dropout, "student", dropout), x),
        ("another scale", lambda: _item(k.scaling, "student", 2.0 * k.scaling["student"]), x),
        ("another rank", lambda: _both(_item(v.lora_A, "student", wide[0]), _item(v.lora_B, "student", wide[1])), x),
        ("a forward hook", lambda: _hook(q), x),
        ("a forward hook, adapters off", lambda: _both(_hook(q), active_adapter(unet, None)), x),
        ("under torch.compile", lambda: _changed(torch.compiler, "is_compiling", lambda: True), x),
        ("fp32 adapters on a bf16 base without autocast or low_precision", lambda: _bf16_base(unet, layers),
         x.bfloat16()),
    ]


@contextlib.contextmanager
def _unfused(unet):
    use_fused_lora(unet, False)
    try:
        yield
    finally:
        use_fused_lora(unet)


@contextlib.contextmanager
def _requires_grad(p):
    p.requires_grad_(True)
    try:
        yield
    finally:
        p.requires_grad_(False)


@contextlib.contextmanager
def _both(a, b):
    with a, b:
        yield


@contextlib.contextmanager
def _item(container, key, value):
    saved = container[key]
    container[key] = value
    try:
        yield
    finally:
        container[key] = saved


@contextlib.contextmanager
def _hook(module):
    handle = module.register_forward_hook(lambda m, a, out: out)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _bf16_base(unet, layers):
    saved = [(m.base_layer.weight.data, m.base_layer.bias) for m in layers]
    for m in layers:
        m.base_layer.weight.data = m.base_layer.weight.data.bfloat16()
    try:
        yield
    finally:
        for m, (w, _) in zip(layers, saved):
            m.base_layer.weight.data = w


def test_fused_qkv_falls_back_to_one_call_each_wherever_one_layer_would_not_fuse(sdxl_tiny):
    """fused_linears answers None (the processor then calls q, k and v one by one, as before) in every case where a
    layer alone would take PEFT's forward or the mixed-adapter path, or the layers would not run alike."""
    unet = sdxl_tiny.built.nets.denoiser
    use_fused_lora(unet)
    layers = _qkv_layers(unet, "self")
    x = torch.randn(2, 5, layers[0].in_features, generator=torch.Generator().manual_seed(6))
    with active_adapter(unet, "student"):
        assert _fuses(layers, x) and _fuses(layers, x, autocast=True)
        for name, case, inp in _fallbacks(unet, layers, x):
            with case():
                assert not _fuses(layers, inp), name
            assert _fuses(layers, x), f"{name}: the case did not undo itself"
    with active_adapter(unet, None):
        assert _fuses(layers, x)  # the teacher: the bare bases, fused


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("adapter", ["student", None])
def test_attention_processor_runs_qkv_fused_and_computes_the_separate_result(sdxl_tiny, monkeypatch, adapter,
                                                                              autocast):
    """A whole UNet call (every self- and cross-attention): each attention call projects through ONE fused
    projection, with fewer aten ops forward and backward than one call per projection, and the same output and
    gradients as the processor with the fusion turned off."""
    from stepdistill.core import attention, attn_processor

    unet = sdxl_tiny.built.nets.denoiser
    use_fused_lora(unet)
    x = torch.randn(2, *sdxl_tiny.built.ctx.latent_shape, generator=torch.Generator().manual_seed(8))
    real, fused_calls = attn_processor.fused_linears, []

    def counted(layers, inp):
        out = real(layers, inp)
        fused_calls.append(out is not None)
        return out

    results, ops = {}, {}
    for fused in (False, True):
        monkeypatch.setattr(attn_processor, "fused_linears", counted if fused else lambda layers, inp: None)
        counter = bench.OpCount()
        with counter():
            results[fused] = _call(sdxl_tiny, adapter, x, True, autocast)
        ops[fused] = counter.total
    n_attention = len(attention.attention_modules(unet))
    assert len(fused_calls) == n_attention and all(fused_calls), fused_calls
    assert ops[True] < ops[False] - 10 * n_attention, ops
    tol = TOL["bf16" if autocast else "fp32"]
    _close(results[True][0], results[False][0], tol, "output")
    assert set(results[True][1]) == set(results[False][1])
    _close_grads(results[True][1], results[False][1], tol, "fused qkv")


def test_group_copies_are_the_layers_copies_refreshed_by_one_foreach_copy(sdxl_tiny):
    """The bf16 compute copies of a q/k/v group live in one buffer for A and one for B, each layer's own copies being
    views of them: a change of the masters is one foreach copy for the group and the layers alike."""
    from stepdistill.core.lora import _compute_weights, _group_lora

    unet = sdxl_tiny.built.nets.denoiser
    use_fused_lora(unet)
    layers = _qkv_layers(unet, "self")
    a_cat, a_cat_t, b3, b3_t = _group_lora(layers, "student", torch.bfloat16)
    for i, m in enumerate(layers):
        a, b = _compute_weights(m, "student", torch.bfloat16)[:2]
        assert a.data_ptr() == a_cat[i * a.shape[0]].data_ptr() and b.data_ptr() == b3[i].data_ptr()
        assert a.is_contiguous() and b.is_contiguous()  # the foreach kernel's fast path on a GPU
    with torch.no_grad():
        for m in layers:
            m.lora_B["student"].weight.add_(1.0)
    counter = bench.OpCount()
    with counter():
        again = _group_lora(layers, "student", torch.bfloat16)
    assert dict(counter.ops) == {"_foreach_copy_": 1}, dict(counter.ops)
    assert again[2] is b3
    expected = torch.stack([m.lora_B["student"].weight.detach().bfloat16() for m in layers])
    assert torch.equal(b3, expected) and torch.equal(a_cat_t, a_cat.t()) and torch.equal(b3_t, b3.transpose(1, 2))
    with torch.no_grad():
        for m in layers:
            m.lora_B["student"].weight.sub_(1.0)


def test_concatenated_bases_follow_a_change_of_the_base_weights(sdxl_tiny):
    """The cached concatenation of the frozen bases is made once, and made again when a base changes in place (a
    load: its version counter moves), so the fused projection never runs stale base weights."""
    from stepdistill.core.lora import fused_linears

    unet = sdxl_tiny.built.nets.denoiser
    use_fused_lora(unet)
    layers = _qkv_layers(unet, "self")
    x = torch.randn(2, 5, layers[0].in_features, generator=torch.Generator().manual_seed(9))
    with torch.no_grad(), active_adapter(unet, None):
        fused_linears(layers, x)
        cached = layers[0].__dict__["_stepdistill_concat"]
        first = next(iter(cached.values()))[1][0]
        fused_linears(layers, x)
        assert next(iter(cached.values()))[1][0] is first  # made once
        saved = layers[1].base_layer.weight.clone()
        layers[1].base_layer.weight.mul_(2.0)
        try:
            out = fused_linears(layers, x)
            torch.testing.assert_close(out, torch.cat([m(x) for m in layers], -1), rtol=1e-5, atol=1e-6)
        finally:
            layers[1].base_layer.weight.copy_(saved)
