"""Flow-matching maths: conversions, shifts, grids against FlowMatchEulerDiscreteScheduler, Euler against closed
forms on Gaussian data, and DMD's gradient on a 1-D Gaussian-mixture flow teacher."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stepdistill.core.flow import (
    add_noise,
    as_sigma,
    calculate_mu,
    dm_gradient,
    dm_gradient_from_v,
    eps_from_v,
    euler_sample,
    euler_step,
    flow_matching_loss,
    image_seq_len,
    mu_from_config,
    network_timestep,
    norm_rescaled_cfg,
    scheduler_sigmas,
    scheduler_timesteps,
    shift_sigma,
    time_shift,
    uniform_sigmas,
    v_from_eps,
    v_from_x0,
    velocity,
    x0_eps_from_velocity,
    x0_from_v,
)

torch.set_num_threads(1)

# The teachers' scheduler_config.json: SD3 / SD3.5 (static shift) and FLUX.1-dev (resolution-dependent shift).
SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
                  "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


# --- parameterisation ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sigma", [0.001, 0.25, 0.5, 0.9, 0.999])
def test_conversions_round_trip(sigma):
    g = torch.Generator().manual_seed(0)
    x0, eps = (torch.randn(2, 16, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    x_t = add_noise(x0, eps, sigma)
    v = velocity(x0, eps)
    assert torch.allclose(x0_from_v(x_t, v, sigma), x0, atol=1e-12)
    assert torch.allclose(eps_from_v(x_t, v, sigma), eps, atol=1e-12)
    assert torch.allclose(v_from_x0(x_t, x0, sigma), v, atol=1e-9)
    assert torch.allclose(v_from_eps(x_t, eps, sigma), v, atol=1e-9)
    x0_v, eps_v = x0_eps_from_velocity(x_t, v, sigma)
    assert torch.allclose(add_noise(x0_v, eps_v, sigma), x_t, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 1 - 1e-3), st.floats(-5, 5), st.floats(-5, 5))
def test_conversions_round_trip_any_sigma(sigma, x0, eps):
    x0, eps = torch.tensor([[x0]], dtype=torch.float64), torch.tensor([[eps]], dtype=torch.float64)
    x_t = add_noise(x0, eps, sigma)
    v = v_from_x0(x_t, x0, sigma)
    assert torch.allclose(v, eps - x0, atol=1e-9)
    assert torch.allclose(x0_from_v(x_t, v, sigma), x0, atol=1e-12)
    assert torch.allclose(eps_from_v(x_t, v, sigma), eps, atol=1e-9)


def test_per_sample_sigma_broadcasts_and_stays_float64():
    x0, eps = torch.zeros(3, 2, 2, 2), torch.ones(3, 2, 2, 2)
    sigma = as_sigma([0.0, 0.5, 1.0], x0.ndim)
    x_t = add_noise(x0, eps, sigma)
    assert x_t.dtype == torch.float64 and x_t[:, 0, 0, 0].tolist() == [0.0, 0.5, 1.0]
    assert flow_matching_loss(velocity(x0, eps), x0, eps).tolist() == [0.0, 0.0, 0.0]


# --- shifts and grids ------------------------------------------------------------------------------------------

def test_shifts_closed_forms():
    sigma = torch.linspace(0.01, 0.99, 9, dtype=torch.float64)
    assert torch.allclose(shift_sigma(sigma, 1.0), sigma)
    assert shift_sigma(0.5, 3.0) == 0.75 and shift_sigma(1.0, 3.0) == 1.0
    # exp-shift with mu = log s is the static shift s (the two rules agree at a fixed resolution).
    assert torch.allclose(time_shift(sigma, math.log(3.0)), shift_sigma(sigma, 3.0), atol=1e-12)
    assert calculate_mu(256) == pytest.approx(0.5) and calculate_mu(4096) == pytest.approx(1.15)
    with pytest.raises(ValueError, match="time_shift_type"):
        time_shift(sigma, 1.0, "cosine")


def test_mu_and_token_count_match_the_pipelines():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    # FLUX: 8x VAE, 2x2 packing; a 1024 px image is 64 x 64 = 4096 tokens.
    assert image_seq_len(1024, 1024) == 4096 and image_seq_len(512, 768) == 32 * 48
    for n_tokens in (64, 256, 1024, 4096, 7225):
        assert mu_from_config(FLUX_SCHEDULER, n_tokens) == pytest.approx(calculate_shift(n_tokens), abs=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 50])
def test_sd3_grid_matches_the_scheduler(n):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    s.set_timesteps(n)  # what StableDiffusion3Pipeline does without sigmas
    sigmas = scheduler_sigmas(n, SD3_SCHEDULER)
    assert len(sigmas) == n + 1 and sigmas[0] == 1.0 and sigmas[-1] == 0.0
    assert torch.allclose(s.sigmas.double(), sigmas, rtol=0, atol=2e-7)
    assert torch.allclose(s.timesteps.double(), scheduler_timesteps(sigmas), rtol=0, atol=2e-4)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 28, 50])
@pytest.mark.parametrize("size", [(256, 256), (512, 512), (768, 1360), (1024, 1024), (2048, 2048)])
def test_flux_grid_matches_the_scheduler(n, size):
    from diffusers import FlowMatchEulerDiscreteScheduler

    mu = mu_from_config(FLUX_SCHEDULER, image_seq_len(*size))
    s = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    s.set_timesteps(sigmas=uniform_sigmas(n), mu=mu)  # what FluxPipeline does
    sigmas = scheduler_sigmas(n, FLUX_SCHEDULER, mu, uniform_sigmas(n))
    assert torch.allclose(s.sigmas.double(), sigmas, rtol=0, atol=2e-7)
    assert torch.allclose(s.timesteps.double(), scheduler_timesteps(sigmas), rtol=0, atol=2e-4)


def test_custom_sigmas_and_terminal_shift_match_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    student = [1.0, 0.75, 0.5, 0.25]
    for config, mu in ((SD3_SCHEDULER, None), (FLUX_SCHEDULER, 0.8), ({**SD3_SCHEDULER, "shift_terminal": 0.1}, None)):
        s = FlowMatchEulerDiscreteScheduler(**config)
        s.set_timesteps(sigmas=student, mu=mu)
        assert torch.allclose(s.sigmas.double(), scheduler_sigmas(4, config, mu, student), atol=2e-7)


def test_grid_errors_say_what_to_do():
    with pytest.raises(ValueError, match="pass mu"):
        scheduler_sigmas(4, FLUX_SCHEDULER)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        scheduler_sigmas(4, {**SD3_SCHEDULER, "use_karras_sigmas": True})


def test_network_timestep():
    sigmas = scheduler_sigmas(4, SD3_SCHEDULER)
    assert torch.allclose(network_timestep(sigmas[:-1], 1000.0), scheduler_timesteps(sigmas))  # SD3: t = 1000 sigma
    assert torch.equal(network_timestep(sigmas, 1.0), sigmas)  # FLUX: t / 1000 = sigma


# --- Euler against closed forms on Gaussian data --------------------------------------------------------------

def gaussian_x0(x_t, sigma, mu, s):
    """E[x0 | x_t] for x0 ~ N(mu, s^2): x_t ~ N((1 - sigma) mu, (1 - sigma)^2 s^2 + sigma^2), Cov(x0, x_t) = (1 - sigma) s^2."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    return mu + (1 - sigma) * s**2 / var * (x_t - (1 - sigma) * mu)


def gaussian_velocity(mu, s):
    """v*(x, sigma) = E[eps - x0 | x_t = x] = (x - E[x0 | x]) / sigma, closed form for x0 ~ N(mu, s^2)."""
    def v(x_t, sigma):
        sigma = as_sigma(sigma, x_t.ndim)
        return (x_t - gaussian_x0(x_t, sigma, mu, s)) / sigma
    return v


def gaussian_flow_map(x_1, sigma, mu, s):
    """The ODE keeps z = (x - (1 - sigma) mu) / sqrt((1 - sigma)^2 s^2 + sigma^2): x_sigma from x_1 = noise."""
    return (1 - sigma) * mu + math.sqrt((1 - sigma) ** 2 * s**2 + sigma**2) * x_1


def test_euler_is_exact_on_straight_paths():
    # A point mass has straight trajectories (constant velocity): one Euler step from noise lands on the data.
    x_1 = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for n in (1, 3):
        x0 = euler_sample(gaussian_velocity(0.7, 0.0), x_1, scheduler_sigmas(n, SD3_SCHEDULER))
        assert torch.allclose(x0, torch.full_like(x0, 0.7), atol=1e-12)
    # The conditional path of one (x0, eps) pair is a straight line: Euler from any sigma to any sigma' is exact.
    x0, eps = torch.randn(2, 4, 4, dtype=torch.float64), torch.randn(2, 4, 4, dtype=torch.float64)
    x_t = add_noise(x0, eps, 0.8)
    assert torch.allclose(euler_step(x_t, velocity(x0, eps), 0.8, 0.3), add_noise(x0, eps, 0.3), atol=1e-12)


def test_euler_converges_to_the_closed_form_flow_map():
    mu, s = 0.3, 0.5
    x_1 = torch.randn(64, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = gaussian_flow_map(x_1, 0.0, mu, s)
    errors = []
    for n in (5, 50, 500):
        x0 = euler_sample(gaussian_velocity(mu, s), x_1, scheduler_sigmas(n, SD3_SCHEDULER))
        errors.append((x0 - exact).abs().max().item())
    # Euler is first order: 10x the steps, about 10x less error.
    assert errors[0] / errors[1] > 5 and errors[1] / errors[2] > 5
    assert errors[2] < 0.02


def test_euler_sample_steps_like_the_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    v = gaussian_velocity(0.3, 0.5)
    x_1 = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    mu = mu_from_config(FLUX_SCHEDULER, 1024)
    s = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    s.set_timesteps(sigmas=uniform_sigmas(4), mu=mu)
    x = x_1.clone()
    for t, sigma in zip(s.timesteps, s.sigmas[:-1]):
        x = s.step(v(x.double(), sigma.double().expand(8)).float(), t, x).prev_sample
    ours = euler_sample(v, x_1, scheduler_sigmas(4, FLUX_SCHEDULER, mu, uniform_sigmas(4)))
    assert torch.allclose(x.double(), ours, atol=1e-5)


# --- DMD's gradient on a 1-D Gaussian-mixture flow teacher ----------------------------------------------------

MIX_MEANS = torch.tensor([-1.0, 1.0], dtype=torch.float64)
MIX_STD = 0.3  # equal-weight components N(m_k, MIX_STD^2)


def mixture_x0(x_t, sigma, means, s):
    """E[x0 | x_t] for an equal-weight mixture of N(m_k, s^2): responsibilities times per-component Gaussian means."""
    var = (1 - sigma) ** 2 * s**2 + sigma**2
    d = x_t[..., None] - (1 - sigma[..., None]) * means
    resp = torch.softmax(-(d**2) / (2 * var[..., None]), dim=-1)
    return (resp * (means + ((1 - sigma) * s**2 / var)[..., None] * d)).sum(-1)


def wasserstein_1d(a, b):
    """W1 between equal-size 1-D samples: mean gap between sorted values."""
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


def distill_gaussian_student(sign: float, steps: int = 300, lr: float = 0.05):
    """A Gaussian student x0 = a + b z, its fake score the exact denoiser of N(a, b^2), trained by DMD's gradient."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    log_b = torch.tensor(math.log(0.2), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([a, log_b], lr=lr)
    z_eval = torch.randn(4000, generator=g, dtype=torch.float64)
    k = torch.randint(2, (4000,), generator=g)
    reference = MIX_MEANS[k] + MIX_STD * torch.randn(4000, generator=g, dtype=torch.float64)

    def distance():
        with torch.no_grad():
            return wasserstein_1d(a + log_b.exp() * z_eval, reference)

    start = distance()
    for _ in range(steps):
        # Rows are "images" of 16 i.i.d. coordinates, so the normaliser averages over them as over pixels.
        x0 = a + log_b.exp() * torch.randn(64, 16, generator=g, dtype=torch.float64)
        sigma = torch.rand(64, generator=g, dtype=torch.float64) * 0.96 + 0.02
        with torch.no_grad():
            eps = torch.randn(64, 16, generator=g, dtype=torch.float64)
            x_t = add_noise(x0, eps, as_sigma(sigma, 2))
            s2 = as_sigma(sigma, 2).expand_as(x_t)
            v_real = v_from_x0(x_t, mixture_x0(x_t, s2, MIX_MEANS, MIX_STD), s2)
            v_fake = v_from_x0(x_t, gaussian_x0(x_t, s2, a.detach(), log_b.detach().exp()), s2)
            grad = sign * dm_gradient_from_v(x0, x_t, s2, v_real, v_fake)
        loss = 0.5 * ((x0 - (x0 - grad).detach()) ** 2).mean()  # DMD2's surrogate: d loss / d x0 = grad / numel
        opt.zero_grad()
        loss.backward()
        opt.step()
    return start, distance(), a.item(), log_b.exp().item()


def test_dm_gradient_points_from_the_student_to_the_teacher():
    # A student far to the right of the teacher: the fake score's x0 lies right of the real one, the gradient is
    # positive, and descending it moves samples left.
    x0 = torch.full((4, 8), 3.0, dtype=torch.float64)
    x_t = add_noise(x0, torch.zeros_like(x0), 0.5)
    sigma = torch.full_like(x_t, 0.5)
    x0_real = mixture_x0(x_t, sigma, MIX_MEANS, MIX_STD)
    x0_fake = gaussian_x0(x_t, sigma, 3.0, 0.2)
    grad = dm_gradient(x0, x0_real, x0_fake)
    assert (grad > 0).all()
    assert torch.allclose(grad, dm_gradient_from_v(x0, x_t, sigma, v_from_x0(x_t, x0_real, sigma),
                                                   v_from_x0(x_t, x0_fake, sigma)))
    # Normalised per sample: mean |x0 - x0_real| is divided out, so scaling the gap scales nothing else.
    assert torch.allclose(dm_gradient(2 * x0, 2 * x0_real, 2 * x0_fake), grad)


def test_dm_gradient_moves_a_shifted_student_to_the_flow_teacher():
    start, end, a, b = distill_gaussian_student(+1.0)
    assert end < 0.2 * start, (start, end)
    # Mean near the mixture's 0, spread near its std 1.04 (a Gaussian cannot do better than moment matching).
    assert abs(a) < 0.2 and 0.7 < b < 1.3, (a, b)
    start_flipped, end_flipped, _, _ = distill_gaussian_student(-1.0, steps=30)
    assert end_flipped > start_flipped  # the flipped sign walks away: the test can fail


def test_uniform_sigmas_is_fluxs_default():
    assert np.allclose(uniform_sigmas(4), [1.0, 0.75, 0.5, 0.25])


def test_flow_schedule_is_the_schedulers_training_table_and_ddim_is_euler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from stepdistill.core.flow import FlowSchedule, euler_step
    from stepdistill.core.param import x0_eps_from_output
    from stepdistill.core.solvers import ddim_step

    config = {"num_train_timesteps": 1000, "shift": 3.0}
    schedule = FlowSchedule.from_scheduler_config(config)
    table = FlowMatchEulerDiscreteScheduler(**config).sigmas.double().flip(0)  # its init table, ascending in t
    assert torch.allclose(schedule.sigmas, table, atol=1e-6)
    assert schedule.prediction_type == "flow" and schedule.num_train_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    t, t_next = torch.tensor([799, 799]), torch.tensor([399, 399])
    alpha, sigma = schedule.alpha_sigma(t, 2)
    x0, eps = x0_eps_from_output(v, x_t, alpha, sigma, "flow")
    a_next, s_next = schedule.alpha_sigma(t_next, 2)
    torch.testing.assert_close(ddim_step(x0, eps, a_next, s_next), euler_step(x_t, v, sigma, s_next))
    assert schedule.unshifted_sigmas([999, 249]) == [1.0, 0.25]


def test_norm_rescaled_cfg_keeps_the_direction_and_takes_the_conditional_norm():
    """QwenImagePipeline's true CFG: each token's guided vector points along plain CFG's and has the conditional
    vector's length; at w = 1 it is the conditional vector."""
    g = torch.Generator().manual_seed(0)
    v_c, v_u = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    w = torch.tensor([4.0, 2.5]).reshape(-1, 1, 1)
    out = norm_rescaled_cfg(v_c, v_u, w)
    comb = (v_u + w * (v_c - v_u)).double()
    torch.testing.assert_close(out.norm(dim=-1), v_c.double().norm(dim=-1), rtol=1e-12, atol=0)
    cos = (out * comb).sum(-1) / (out.norm(dim=-1) * comb.norm(dim=-1))
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=1e-12)
    torch.testing.assert_close(norm_rescaled_cfg(v_c, v_u, 1.0), v_c.double(), rtol=1e-12, atol=1e-12)
