"""Core maths: schedule, parameterisations, grids, DDIM against closed forms, CFG."""

import math

import pytest
import torch

from stepdistill.core.denoiser import Cond, DenoiserOut, GuidedDenoiser, cfg_combine
from stepdistill.core.param import eps_from_x0, v_from_x0_eps, x0_eps_from_output, x0_eps_from_v, x0_from_eps
from stepdistill.core.samplers import ddim_sample
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.core.solvers import (
    lcm_boundary_scalings,
    lcm_inference_timesteps,
    leading_timesteps,
    segment_boundaries,
    segment_start,
    trailing_timesteps,
)

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.fixture
def schedule():
    return NoiseSchedule.from_scheduler_config(SD_SCHEDULER)


def test_schedule_matches_diffusers(schedule):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(**SD_SCHEDULER).alphas_cumprod.double()
    assert torch.allclose(schedule.alphas_cumprod, ref, rtol=1e-6)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([0, 500, 999]))
    assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(alpha))
    alpha, sigma = schedule.alpha_sigma(torch.tensor([-1]))
    assert alpha.item() == 1.0 and sigma.item() == 0.0


@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_zero_terminal_snr_matches_diffusers(beta_schedule):
    from diffusers import DDPMScheduler

    config = {**SD_SCHEDULER, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": True,
              "prediction_type": "v_prediction"}
    ours = NoiseSchedule.from_scheduler_config(config)
    ref = DDPMScheduler(**config).alphas_cumprod.double()
    # diffusers computes in float32, we in float64: equal to float32 precision near alpha_bar ~ 1e-6
    assert torch.allclose(ours.alphas_cumprod, ref, rtol=1e-4, atol=1e-9)
    assert ours.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-12)  # zero SNR at t = T
    with pytest.raises(ValueError, match="rescale_betas_zero_snr.*v_prediction"):
        NoiseSchedule.from_scheduler_config({**config, "prediction_type": "epsilon"})


def test_unknown_prediction_type_is_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        NoiseSchedule(torch.ones(10), "score")


@pytest.mark.parametrize("t", [0, 250, 999])
def test_parameterisation_round_trips(schedule, t):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    alpha, sigma = schedule.alpha_sigma(torch.tensor([t, t]))
    x_t = schedule.add_noise(x0, eps, torch.tensor([t, t])).double()
    assert torch.allclose(x0_from_eps(x_t, eps, alpha, sigma), x0.double(), atol=1e-6 / alpha.min().item())
    assert torch.allclose(eps_from_x0(x_t, x0, alpha, sigma), eps.double(), atol=1e-6)
    v = v_from_x0_eps(x0, eps, alpha, sigma)
    x0_v, eps_v = x0_eps_from_v(x_t, v, alpha, sigma)
    assert torch.allclose(x0_v, x0.double(), atol=1e-6) and torch.allclose(eps_v, eps.double(), atol=1e-6)
    for kind, out in (("epsilon", eps), ("sample", x0), ("v_prediction", v)):
        x0_o, eps_o = x0_eps_from_output(out, x_t, alpha, sigma, kind)
        assert torch.allclose(eps_o, eps.double(), atol=1e-5), kind


def test_x0_from_eps_is_float64_near_t999(schedule):
    # alpha_999 ~ 0.068: float32 arithmetic would lose digits dividing by it; the helpers work in float64.
    alpha, sigma = schedule.alpha_sigma(torch.tensor([999]))
    x0 = x0_from_eps(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), alpha, sigma)
    assert x0.dtype == torch.float64


def test_timestep_grids_match_diffusers():
    from diffusers import DDIMScheduler, LCMScheduler

    for n in (1, 2, 4, 8):
        s = DDIMScheduler(**SD_SCHEDULER, timestep_spacing="trailing")
        s.set_timesteps(n)
        assert s.timesteps.tolist() == trailing_timesteps(n)
        s = DDIMScheduler(**SD_SCHEDULER, timestep_spacing="leading", steps_offset=1)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == leading_timesteps(n)
        s = LCMScheduler(**SD_SCHEDULER)
        s.set_timesteps(n)
        assert s.timesteps.tolist() == lcm_inference_timesteps(n)


def test_segment_boundaries_table():
    assert segment_boundaries(1) == [0]
    assert segment_boundaries(4) == [0, 250, 500, 750]
    assert segment_boundaries(8) == [0, 125, 250, 375, 500, 625, 750, 875]
    with pytest.raises(ValueError):
        segment_boundaries(3)


def test_segment_start_lands_on_trailing_ddim_steps():
    # For every t, its segment's end point is the next trailing-DDIM timestep below it (or x0 = -1).
    for k in (1, 2, 4, 8):
        ts = trailing_timesteps(k)
        grid = ts + [-1]
        t = torch.arange(1000)
        starts = segment_start(t, k)
        for tt, st in zip(t.tolist(), starts.tolist()):
            expected = max(g for g in grid if g < tt) if tt > 0 else -1
            if tt in ts:  # a step of the k-step sampler maps to the following step
                expected = grid[ts.index(tt) + 1]
            assert st == expected, (k, tt, st, expected)


def test_lcm_boundary_scalings():
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([0, 999]))
    assert c_skip[0] == 1 and c_out[0] == 0
    assert c_skip[1] < 1e-8 and abs(c_out[1] - 1) < 1e-8


class GaussianDenoiser:
    """Exact denoiser for data x0 ~ N(mu, s^2 I): E[x0 | x_t] in closed form."""

    def __init__(self, schedule, mu, s):
        self.schedule, self.mu, self.s = schedule, mu, s

    def __call__(self, x_t, t, cond):
        alpha, sigma = self.schedule.alpha_sigma(t, x_t.ndim)
        v = alpha**2 * self.s**2 + sigma**2
        d = x_t.double() - alpha * self.mu
        x0 = self.mu + alpha * self.s**2 * d / v
        eps = sigma * d / v
        return DenoiserOut(x0, eps)


def test_ddim_is_exact_for_a_point_mass(schedule):
    # Data = a single point: E[x0|x_t] is exact, so even one DDIM step lands on it.
    den = GaussianDenoiser(schedule, mu=0.7, s=0.0)
    x_T = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    x0 = ddim_sample(den, x_T, [999], None, schedule)
    assert torch.allclose(x0, torch.full_like(x0, 0.7), atol=1e-10)


def test_ddim_converges_to_the_closed_form_ode_solution(schedule):
    # For Gaussian data the probability-flow ODE keeps z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2).
    mu, s = 0.3, 0.5
    den = GaussianDenoiser(schedule, mu, s)
    x_T = torch.randn(64, 1, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    alpha, sigma = schedule.alpha_sigma(torch.tensor([999]))
    z = (x_T - alpha * mu) / (alpha**2 * s**2 + sigma**2).sqrt()
    alpha0, sigma0 = schedule.alpha_sigma(torch.tensor([0]))
    exact = alpha0 * mu + (alpha0**2 * s**2 + sigma0**2).sqrt() * z  # the ODE's state at t = 0
    errors = []
    for n in (5, 50, 500):
        x0 = ddim_sample(den, x_T, trailing_timesteps(n), None, schedule, final_t=0)
        errors.append((x0 - exact).abs().max().item())
    # DDIM is a first-order ODE solver: 10x the steps, about 10x less error.
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5
    assert errors[2] < 0.02


def test_cfg_formula_and_batched_call(schedule):
    assert torch.allclose(cfg_combine(torch.tensor(3.0), torch.tensor(1.0), 2.5), torch.tensor(6.0))

    class Linear:
        """A fake denoiser whose output depends on the conditioning, to check which half is which."""

        def __init__(self):
            self.calls = 0

        def __call__(self, x_t, t, cond):
            self.calls += 1
            e = cond.encoder_hidden_states.mean(dim=(1, 2)).double().reshape(-1, 1, 1, 1)
            return DenoiserOut(x_t.double() + e, x_t.double() - e)

    inner = Linear()
    cond = Cond(torch.full((2, 3, 4), 2.0))
    uncond = Cond(torch.zeros(1, 3, 4))
    guided = GuidedDenoiser(inner, uncond, guidance_scale=7.5)
    x = torch.zeros(2, 1, 2, 2)
    out = guided(x, torch.tensor([10, 10]), cond)
    assert inner.calls == 1  # conditional and unconditional halves in one batched call
    assert torch.allclose(out.x0, torch.full_like(out.x0, 0 + 7.5 * 2.0))
    assert torch.allclose(out.eps, torch.full_like(out.eps, 0 - 7.5 * 2.0))
    w = torch.tensor([1.0, 3.0])
    out = guided(x, torch.tensor([10, 10]), cond, guidance_scale=w)
    assert math.isclose(out.x0[0].mean().item(), 2.0) and math.isclose(out.x0[1].mean().item(), 6.0)


def test_recipe_with_steps_is_the_one_way_to_change_steps():
    """Recipe.with_steps: generate, eval generate and the demo all change a recipe's steps through it (issue 32)."""
    from stepdistill.core.recipe import Recipe
    from stepdistill.errors import ConfigError, ModelError

    free = Recipe(base_model="b", family="sd15", method="tscd", scheduler_class="DDIMScheduler", num_inference_steps=4)
    assert free.with_steps(None) is free and free.with_steps(4) is free
    assert free.with_steps(2).num_inference_steps == 2 and free.num_inference_steps == 4
    with pytest.raises(ConfigError, match=">= 1"):
        free.with_steps(0)
    fixed = Recipe(base_model="b", family="sd15", method="dmd", scheduler_class="LCMScheduler", timesteps=[399],
                   num_inference_steps=1)
    with pytest.raises(ModelError, match=r"fixes its timesteps \[399\]: drop --steps"):
        fixed.with_steps(2)
    two = fixed.with_steps(2, respace=True)
    assert two.timesteps == [399, 199] and two.num_inference_steps == 2
    assert two.scheduler_config["original_inference_steps"] == 5  # the smallest LCM grid holding 399 and 199
    assert fixed.with_steps(4, respace=True).timesteps == [399, 299, 199, 99]
    # A Wan recipe (first-order UniPC, corrector off at each of its steps) keeps the corrector off at every new step.
    wan = Recipe(base_model="b", family="wan", method="dmd", scheduler_class="UniPCMultistepScheduler",
                 scheduler_config={"solver_order": 1, "disable_corrector": [0, 1, 2, 3]}, num_inference_steps=4)
    assert wan.with_steps(8).scheduler_config["disable_corrector"] == list(range(8))
