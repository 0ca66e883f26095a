"""Network passes per update (issue 21): the counter hook, and each pass merged away keeps the maths.

Every merge is checked against what ran before it: the same draws, the calls made one by one (the old code path),
same values and gradients to float tolerance; and the merged iteration logs what the unmerged one logs.
"""

from __future__ import annotations

import dataclasses
import tempfile

import pytest
import torch
from stepdistill.bench import train as bench

from stepdistill.core import denoiser as denoiser_module
from stepdistill.core.denoiser import denoise_together
from stepdistill.core.passes import Pass, PassCounter
from stepdistill.methods import consistency, dm, gan
from stepdistill.methods.base import Batch, NoiseSource
from stepdistill.methods.gan import gan_discriminator_loss, mid_block_features

from .bench_rig import tiny_trainer
from .tolerances import max_fan_in, reduction_atol


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _trainer(method, sets, out):
    trainer = tiny_trainer(method, sets, out)
    # Fresh adapters equal the base (B = 0): give every adapter its own nonzero weights, or a mix-up would not show.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in trainer.built.nets.denoiser.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


@pytest.fixture(scope="module")
def dmd_gan():
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("dmd", ["method.gan=true"], out)
        yield trainer
        trainer.close()


def _batch(trainer, seed):
    b = trainer.built
    prompts, cond, uncond, latents, _ = b.data.next("cpu")
    return Batch(cond=cond, uncond=uncond, prompts=prompts, latent_shape=(len(prompts), *b.ctx.latent_shape),
                 latents=latents, noise=NoiseSource(torch.Generator().manual_seed(seed)))


def test_counter_records_adapter_batch_grad_and_early_stops(dmd_gan):
    nets = dmd_gan.built.nets
    x = torch.randn(3, *dmd_gan.built.ctx.latent_shape)
    cond = dmd_gan.built.data.cond.index([0, 1, 2])
    t = torch.full((3,), 500)
    with PassCounter(nets.denoiser) as c:
        with torch.no_grad():
            nets.teacher.denoiser(x, t, cond)
        nets.student(x, t, cond)
        with torch.no_grad():
            mid_block_features(nets.fake_score, x, t, cond)
    assert c.passes == [Pass(None, 3, False), Pass("student", 3, True), Pass("fake_score", 3, False, full=False)]
    assert c.summary()["forward_rows"] == 9 and c.summary()["grad_rows"] == 3


def test_denoise_together_equals_the_calls_one_by_one_in_one_forward(dmd_gan):
    """Teacher with per-sample CFG (2B rows, base) + fake score + student, one mixed-adapter call."""
    nets = dmd_gan.built.nets
    x = torch.randn(2, *dmd_gan.built.ctx.latent_shape)
    cond = dmd_gan.built.data.cond.index([0, 1])
    t = torch.tensor([999, 250])
    teacher = nets.teacher.with_scale(torch.tensor([1.75, 4.0]))
    calls = [(teacher, x, t, cond), (nets.fake_score, x, t, cond), (nets.student, x, t, cond)]
    with torch.no_grad():
        one_by_one = [d(*args) for d, *args in calls]
        with PassCounter(nets.denoiser) as c:
            together = denoise_together(calls)
    assert [(p.adapter, p.batch) for p in c.passes] == [("base+fake_score+student", 8)]
    # The network ran in float32 at another batch size: every layer's sums may round in another order. x0 at t = 999
    # is eps / alpha (alpha ~ 0.07), so its scale, not eps's, sets its tolerance.
    fan = max_fan_in(nets.denoiser)
    for a, b in zip(together, one_by_one):
        for name in ("x0", "eps"):
            want = getattr(b, name)
            atol = reduction_atol(torch.float32, fan, float(want.abs().max()))
            torch.testing.assert_close(getattr(a, name), want, rtol=0, atol=atol, msg=name)
    # the outputs differ between adapters by far more than the tolerance, so a mix-up of rows would have shown
    assert (one_by_one[1].x0 - one_by_one[2].x0).abs().max() > 10 * reduction_atol(
        torch.float32, fan, float(one_by_one[2].x0.abs().max()))
    # the adapter flags are as they were
    layers = denoiser_module.lora_layers(nets.denoiser)
    assert not any(m._disable_adapters for m in layers) and not any(m._forward_pre_hooks for m in layers)


def test_denoise_together_falls_back_where_it_cannot_merge(dmd_gan):
    nets = dmd_gan.built.nets
    x = torch.randn(2, *dmd_gan.built.ctx.latent_shape)
    cond = dmd_gan.built.data.cond.index([0, 1])
    t = torch.tensor([999, 250])

    def plain(x_t, t, cond):  # a callable without a plan (e.g. DisBack's teacher_uncond policy)
        return nets.teacher.denoiser(x_t, t, cond)

    with PassCounter(nets.denoiser) as c:
        denoise_together([(plain, x, t, cond), (nets.fake_score, x, t, cond)])  # grad on, no plan
    assert len(c.passes) == 2


def _assert_close_in_norm(new, old, rtol=1e-4):
    """Gradients summed over one batch of 2B rows instead of two of B: float32 sums in another order, so compare all
    gradients as one vector (elementwise, entries near zero carry the rounding)."""
    a, b = torch.cat([g.flatten() for g in new]), torch.cat([g.flatten() for g in old])
    assert float(b.norm()) > 0
    assert float((a - b).norm()) <= rtol * float(b.norm())


def test_gan_critic_logits_of_real_and_fake_in_one_call_keep_values_and_gradients(dmd_gan):
    d, nets = dmd_gan.built.distiller, dmd_gan.built.nets
    batch = _batch(dmd_gan, 3)
    real = batch.latents
    fake = torch.randn_like(real).double()
    params = [*d.head.parameters(), *[p for n, p in nets.denoiser.named_parameters() if ".fake_score." in n]]

    def run(together: bool):
        batch.noise = NoiseSource(torch.Generator().manual_seed(7))
        if together:
            logits = d._logits(nets, [(real, batch.cond), (fake, batch.cond)], batch)
        else:  # the calls as they ran before: real first, then fake, each its own draws
            logits = [d._logits(nets, [(real, batch.cond)], batch)[0], d._logits(nets, [(fake, batch.cond)], batch)[0]]
        loss = gan_discriminator_loss(*logits).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    loss_new, grads_new = run(True)
    loss_old, grads_old = run(False)
    fan = max(max_fan_in(nets.denoiser), max_fan_in(d.head))
    torch.testing.assert_close(loss_new, loss_old, rtol=0, atol=reduction_atol(torch.float32, fan, float(loss_old.abs().max())))
    _assert_close_in_norm(grads_new, grads_old)


def test_tscd_discriminator_reads_real_and_fake_in_one_teacher_call():
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("tscd", ["method.adv_weight=[0.1,0.1,0.1,0.1]"], out)
        d, nets = trainer.built.distiller, trainer.built.nets
        batch = _batch(trainer, 5)
        real = batch.latents.double()
        fake = torch.randn_like(real)
        t_adv = torch.tensor([300, 700])
        with PassCounter(nets.denoiser) as c:
            new = d._discriminator_loss(nets, batch, (fake, real, t_adv)).loss
        assert [(p.adapter, p.batch, p.full) for p in c.passes] == [(None, 4, False)]
        with torch.no_grad():  # the two calls as they ran before
            feats_real = gan.teacher_features(nets.teacher.denoiser, real, t_adv, batch.cond)
            feats_fake = gan.teacher_features(nets.teacher.denoiser, fake, t_adv, batch.cond)
        old = gan.hinge_discriminator_loss(d.head(feats_real), d.head(feats_fake))
        fan = max(max_fan_in(nets.denoiser), max_fan_in(d.head))
        torch.testing.assert_close(new, old, rtol=0, atol=reduction_atol(torch.float32, fan, float(old.detach().abs().max())))
        g_new = torch.autograd.grad(new.sum(), list(d.head.parameters()))
        g_old = torch.autograd.grad(old.sum(), list(d.head.parameters()))
        _assert_close_in_norm(g_new, g_old)
        trainer.close()


def _merged_and_before(monkeypatch, method, owner, name, before):
    """(logs, UNet passes) of one real iteration as the code runs now, then with owner.name patched to `before` (the
    code path before the calls were merged)."""
    runs = []
    for merged in (True, False):
        with monkeypatch.context() as m:
            if not merged:
                m.setattr(owner, name, before)
            with tempfile.TemporaryDirectory() as out:
                trainer = _trainer(method, [], out)
                with PassCounter(trainer.built.nets.denoiser) as c:
                    logs = bench.run_iteration(trainer)
                trainer.close()
        runs.append((logs, list(c.passes)))
    return runs


@pytest.mark.parametrize("method", ["dmd", "tscd_unified"])
def test_iteration_with_teacher_and_fake_score_in_one_call_logs_what_the_separate_calls_did(method, monkeypatch):
    """One real iteration, merged (now) and with denoise_together made to call one by one (before): same losses and
    gradient norms, and one UNet call fewer per DM term."""
    def one_by_one(calls):
        return [d(*args) for d, *args in calls]

    (new, passes_new), (old, passes_old) = _merged_and_before(monkeypatch, method, dm, "denoise_together", one_by_one)
    assert len(passes_new) == len(passes_old) - 1
    for key in ("loss", "student_grad_norm", "critic_grad_norm"):
        assert new[key] == pytest.approx(old[key], rel=1e-4, abs=1e-9), key


def test_unified_one_step_sample_rides_in_the_consistency_student_call(monkeypatch):
    """tscd_unified: the student's consistency prediction at x_t and its one-step sample from z, one call of 2B rows
    with grad (before: two), same losses and gradient norms."""
    from stepdistill.methods.consistency import UnifiedDistiller

    def separate(self, nets, batch, step, extra=None):  # the code path before: never merge
        return consistency.ConsistencyDistiller._consistency_loss(self, nets, batch, step)

    (new, passes_new), (old, passes_old) = _merged_and_before(monkeypatch, "tscd_unified", UnifiedDistiller,
                                                              "_consistency_loss", separate)
    grad_new, grad_old = ([p for p in ps if p.adapter == "student" and p.grad] for ps in (passes_new, passes_old))
    assert [p.batch for p in grad_new] == [4] and [p.batch for p in grad_old] == [2, 2]
    for key in ("loss", "consistency_loss", "dm_loss", "student_grad_norm", "critic_grad_norm"):
        assert new[key] == pytest.approx(old[key], rel=1e-4, abs=1e-9), key


def test_unified_dm_term_on_the_recipes_multi_step_sample():
    """tscd_unified with a 4-step recipe (tcd_eta 0): the DM term's sample is the recipe's 4-step TCD sample from pure
    noise, the student called 4 times with grad (the gradient through every step), its x0 the last step's x0."""
    from stepdistill.core.samplers import tcd_sample
    from stepdistill.core.solvers import tcd_timesteps

    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("tscd_unified", ["method.inference_steps=4", "method.tcd_eta=0"], out)
        b = trainer.built
        batch = _batch(trainer, 0)
        with PassCounter(b.nets.denoiser) as c:
            x0 = b.distiller._dm_sample(b.nets, batch, grad=True)
        batch = dataclasses.replace(batch, noise=NoiseSource(torch.Generator().manual_seed(0)))  # the same draws again
        z = batch.randn(*batch.latent_shape[1:])
        with torch.no_grad():
            x, want = tcd_sample(b.nets.student, z, tcd_timesteps(4, 40), batch.cond, b.distiller.schedule, eta=0.0,
                                 return_x0=True)
        trainer.close()
    assert [(p.adapter, p.grad) for p in c.passes] == [("student", True)] * 4
    assert x0.requires_grad and torch.allclose(x0.detach(), want, atol=1e-5)
    assert not torch.allclose(x.float(), want.float())  # the returned x0 is not the scheduler's alpha_0-scaled last step


def test_unified_dm_weight_per_stage_leaves_consistency_stages_without_dm_or_fake_score():
    """tscd_unified with dm_weight [0, 0.1]: the first stage is consistency only (no DM term, no fake-score pass, no
    critic loss, no extra critic update); the second adds the DM term and trains the fake score in every critic
    update."""
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("tscd_unified", ["method.segments=[4,4]", "method.stage_steps=[2,2]",
                                            "method.dm_weight=[0,0.1]", "method.inference_steps=4",
                                            "method.tcd_eta=0", "loop.max_steps=4"], out)
        b = trainer.built
        stages = []
        for step in (0, 2):
            batch = _batch(trainer, step)
            with PassCounter(b.nets.denoiser) as c:
                student = b.distiller.student_loss(b.nets, batch, step)
                critic = b.distiller.critic_loss(b.nets, batch, student.critic_inputs)
                later = b.distiller.critic_loss(b.nets, _batch(trainer, 9), None)  # a later critic update (TTUR)
            stages.append((student, critic, later, {p.adapter for p in c.passes}))
        trainer.close()
    (s0, c0, later0, adapters0), (s1, c1, later1, adapters1) = stages
    assert "dm_loss" not in s0.logs and c0 is None and later0 is None and "fake_score" not in adapters0
    assert "fake_score_loss" in later1.logs
    assert "dm_loss" in s1.logs and "fake_score_loss" in c1.logs and "fake_score" in adapters1
    assert s1.loss.requires_grad and c1.loss.requires_grad


@pytest.mark.parametrize("scale", [2.0, None])
def test_unified_dm_term_real_score_at_dm_guidance_scale(scale, monkeypatch):
    """The DM term's real score is the teacher at method.dm_guidance_scale (the toy preset's 2); left null, it is
    the consistency term's per-sample w ~ U[guidance_min, guidance_max]."""
    seen = []
    real_dm_loss = consistency.dm_loss

    def spy(x0, teacher, *args):
        seen.append(teacher.guidance_scale)
        return real_dm_loss(x0, teacher, *args)

    monkeypatch.setattr(consistency, "dm_loss", spy)
    sets = ["method.inference_steps=4", "method.tcd_eta=0", "method.guidance_min=3", "method.guidance_max=8"]
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("tscd_unified", [*sets, f"method.dm_guidance_scale={'null' if scale is None else scale}"], out)
        b = trainer.built
        batch = _batch(trainer, 0)
        loss = b.distiller.student_loss(b.nets, batch, 0)
        trainer.close()
    assert "dm_loss" in loss.logs and len(seen) == 1
    if scale is not None:
        assert seen[0] == scale
    else:
        w = seen[0].flatten()
        assert len(w) == batch.size and ((w >= 3) & (w <= 8)).all() and w.unique().numel() > 1


def test_unified_dm_critic_warmup_fits_the_fake_score_before_the_student_moves():
    """method.dm_critic_warmup: in the first iterations of the stage where the DM term turns on, the student is
    frozen and the fake score alone trains on the student's samples (critic_updates_per_student_update updates each);
    then the student trains against a fake score that has fitted it, not the teacher."""
    from stepdistill.core.lora import adapter_parameters

    sets = ["method.segments=[2,1]", "method.stage_steps=[1,3]", "method.dm_weight=[0,1]",
            "method.dm_critic_warmup=2", "loop.max_steps=4"]
    with tempfile.TemporaryDirectory() as out:
        trainer = _trainer("tscd_unified", sets, out)
        unet, d = trainer.built.nets.denoiser, trainer.built.distiller
        d.ctx.max_steps = 4

        def weights(name):
            return [p.detach().clone() for p in adapter_parameters(unet, name).values()]

        moved = []
        for step in range(4):
            student, fake = weights("student"), weights("fake_score")
            logs = bench.run_iteration(trainer)
            moved.append((not all(torch.equal(a, b) for a, b in zip(student, weights("student"))),
                          not all(torch.equal(a, b) for a, b in zip(fake, weights("fake_score"))),
                          "dm_loss" in logs, "fake_score_loss" in logs))
        trainer.close()
    assert [d.in_critic_warmup(s) for s in range(4)] == [False, True, True, False]
    # (student moved, fake score moved, DM term, fake-score loss) per iteration: consistency stage, 2 warm-up, DM.
    assert moved == [(True, False, False, False), (False, True, False, True), (False, True, False, True),
                     (True, True, True, True)]


@pytest.mark.parametrize("sets, match", [
    (["method.dm_critic_warmup=-1"], "dm_critic_warmup must be >= 0"),
    (["method.segments=[2,1]", "method.stage_steps=[2,2]", "method.dm_weight=[0,1]", "method.dm_critic_warmup=2"],
     "leaves no student update"),
])
def test_unified_dm_critic_warmup_is_validated(sets, match):
    from stepdistill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=match):
        load_config(None, ["method.name=tscd_unified", *sets])
