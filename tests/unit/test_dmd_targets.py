"""dmd's fake score regresses on the teacher's own target (eps or v), and its DM term draws t from DMD2's inclusive
range [20, 980]."""

from __future__ import annotations

import pytest
import torch

from stepdistill.core.denoiser import Cond, DenoiserOut, GuidedDenoiser
from stepdistill.core.param import v_from_x0_eps, x0_eps_from_output
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.errors import ConfigError
from stepdistill.methods.base import Batch, Nets
from stepdistill.methods.dm import dm_timestep_bounds, fake_score_loss, shift_timesteps
from stepdistill.methods.dmd import DMDConfig, DMDDistiller

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


class RawNet:
    """A denoiser whose network output (eps, v or x0 by the schedule's prediction type) is a fixed tensor."""

    def __init__(self, schedule, output):
        self.schedule, self.output = schedule, output

    def __call__(self, x_t, t, cond, guidance_scale=None):
        alpha, sigma = self.schedule.alpha_sigma(t, x_t.ndim)
        return DenoiserOut(*x0_eps_from_output(self.output, x_t, alpha, sigma, self.schedule.prediction_type))


class RecordingNet(RawNet):
    """A RawNet that keeps every t it is called with (self.seen)."""

    def __init__(self, schedule, output):
        super().__init__(schedule, output)
        self.seen = []

    def __call__(self, x_t, t, cond, guidance_scale=None):
        self.seen.append(t.clone())
        return super().__call__(x_t, t, cond, guidance_scale)


def record_randint(monkeypatch) -> list:
    """Batch.randint, recorded: the returned list gets ((low, high), draw) for every call."""
    draws = []
    original = Batch.randint

    def recording(self, low, high, device=None):
        out = original(self, low, high, device)
        draws.append(((low, high), out.clone()))
        return out

    monkeypatch.setattr(Batch, "randint", recording)
    return draws


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fake_score_regresses_the_teachers_own_target(prediction_type):
    schedule = NoiseSchedule.from_scheduler_config({**SD, "prediction_type": prediction_type})
    g = torch.Generator().manual_seed(0)
    x0, eps, output = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([10, 500, 990])
    loss = fake_score_loss(RawNet(schedule, output), x0, None, schedule, t, eps)
    alpha, sigma = schedule.alpha_sigma(t)
    target = eps.double() if prediction_type == "epsilon" else v_from_x0_eps(x0, eps, alpha, sigma)
    expected = ((output.double() - target) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    if prediction_type == "v_prediction":
        # not the eps loss under another name: at t = 990 the two differ by a factor of about 1 / alpha_t^2
        eps_loss = ((RawNet(schedule, output)(schedule.add_noise(x0, eps, t), t, None).eps - eps.double()) ** 2)
        assert not torch.allclose(eps_loss.flatten(1).mean(1), expected)


def test_dm_timestep_bounds_include_the_upper_end():
    assert dm_timestep_bounds(0.02, 0.98, 1000) == (20, 981)  # DMD2: randint(min_step, max_step + 1)
    assert dm_timestep_bounds(0.0, 1.0, 1000) == (0, 1000)  # never past the last timestep


def test_dmd_student_loss_draws_t_up_to_980(monkeypatch):
    schedule = NoiseSchedule.from_scheduler_config(SD)
    distiller = DMDDistiller(DMDConfig(timesteps=[999], guidance_scale=1.0), schedule)
    net = RawNet(schedule, torch.zeros(1, 4, 2, 2))
    teacher = GuidedDenoiser(net, Cond(torch.zeros(1, 3, 8)), 1.0)  # the loop's teacher type (CFG off)
    nets = Nets(denoiser=None, schedule=schedule, teacher=teacher, student=net, fake_score=net)
    cond = Cond(torch.zeros(1, 3, 8))
    draws = record_randint(monkeypatch)
    distiller.student_loss(nets, Batch(cond, cond, ["p"], (1, 4, 2, 2)), step=0)
    assert (20, 981) in [bounds for bounds, _ in draws]


def test_dm_t_shift_moves_the_dm_term_toward_high_or_low_noise_and_keeps_its_bounds():
    bounds = dm_timestep_bounds(0.02, 0.98, 1000)
    t = torch.arange(*bounds)
    assert torch.equal(shift_timesteps(t, 1.0, 1000, bounds), t)  # DMD2's uniform draw, untouched
    for shift in (2.0, 3.0):
        shifted = shift_timesteps(t, shift, 1000, bounds)
        assert shifted.dtype == torch.long and int(shifted.min()) >= 20 and int(shifted.max()) <= 980
        assert bool((shifted[1:] >= shifted[:-1]).all())  # monotone: the shift reweights, never reorders
        assert bool((shifted >= t).all()) and float((shifted < 500).double().mean()) < 0.34  # uniform: 0.50
    low = shift_timesteps(t, 0.5, 1000, bounds)  # s < 1: toward low noise
    assert int(low.min()) >= 20 and bool((low <= t).all()) and float((low < 500).double().mean()) > 0.66
    # SD3's sigma shift at s = 3 sends t/T = 0.5 to 0.75.
    assert int(shift_timesteps(torch.tensor([500]), 3.0, 1000, bounds)) == 750


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_dm_t_shift_must_be_positive(shift):
    with pytest.raises(ConfigError, match="dm_t_shift"):
        DMDConfig(dm_t_shift=shift).validate()


def test_dmd_student_loss_feeds_the_shifted_t_to_the_dm_term(monkeypatch):
    """method.dm_t_shift reaches the DM term: the t its networks see is the uniform draw, shifted (methods.dm)."""
    schedule = NoiseSchedule.from_scheduler_config(SD)
    net = RawNet(schedule, torch.zeros(4, 4, 2, 2))
    fake = RecordingNet(schedule, torch.zeros(4, 4, 2, 2))
    cond = Cond(torch.zeros(4, 3, 8))
    draws = record_randint(monkeypatch)
    monkeypatch.setattr("stepdistill.methods.dm.denoise_together", lambda calls: [f(x, t, c) for f, x, t, c in calls])
    distiller = DMDDistiller(DMDConfig(timesteps=[999], guidance_scale=1.0, dm_t_shift=0.5), schedule)
    nets = Nets(denoiser=None, schedule=schedule, teacher=GuidedDenoiser(net, cond, 1.0), student=net, fake_score=fake)
    distiller.student_loss(nets, Batch(cond, cond, ["p"] * 4, (4, 4, 2, 2)), step=0)
    (uniform,) = [t for bounds, t in draws if bounds == (20, 981)]
    assert len(fake.seen) == 1 and torch.equal(fake.seen[0], shift_timesteps(uniform, 0.5, 1000, (20, 981)))


@pytest.mark.parametrize("shift", [0.0, -1.0])
def test_critic_t_shift_must_be_positive(shift):
    with pytest.raises(ConfigError, match="critic_t_shift"):
        DMDConfig(critic_t_shift=shift).validate()


@pytest.mark.parametrize("shift", [1.0, 0.5])
def test_critic_loss_trains_the_fake_score_at_the_shifted_t(monkeypatch, shift):
    """method.critic_t_shift reaches the fake score's denoising loss: its t is the U[0, T) draw, shifted (1 = as is)."""
    schedule = NoiseSchedule.from_scheduler_config(SD)
    fake = RecordingNet(schedule, torch.zeros(8, 4, 2, 2))
    cond = Cond(torch.zeros(8, 3, 8))
    draws = record_randint(monkeypatch)
    distiller = DMDDistiller(DMDConfig(timesteps=[999], critic_t_shift=shift), schedule)
    nets = Nets(denoiser=None, schedule=schedule, teacher=None, student=None, fake_score=fake)
    distiller.critic_loss(nets, Batch(cond, cond, ["p"] * 8, (8, 4, 2, 2)), torch.zeros(8, 4, 2, 2))
    (uniform,) = [t for bounds, t in draws if bounds == (0, 1000)]
    assert len(fake.seen) == 1 and torch.equal(fake.seen[0], shift_timesteps(uniform, shift, 1000, (0, 1000)))
    if shift != 1.0:
        assert not torch.equal(fake.seen[0], uniform)
