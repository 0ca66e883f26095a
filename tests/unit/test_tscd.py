"""TSCD maths: segment tables, the consistency pair against a closed-form linear-Gaussian teacher, the TCD and
recipe samplers against diffusers' schedulers, the ReFL pieces and the reward-model interface."""

import numpy as np
import pytest
import torch

from stepdistill.config import ConfigError, load_config
from stepdistill.core.denoiser import DenoiserOut
from stepdistill.core.samplers import ddim_sample, recipe_sample, tcd_sample
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.core.solvers import (
    ddim_step,
    noise_forward,
    noise_forward_path,
    segment_boundaries,
    segment_start,
    tcd_timesteps,
    trailing_timesteps,
)
from stepdistill.methods.base import Batch, Nets, NoiseSource
from stepdistill.methods.consistency import (
    ConsistencyDistiller,
    LCMConfig,
    TSCDConfig,
    UnifiedConfig,
    stage_bounds,
)
from stepdistill.methods.gan import hinge_discriminator_loss, hinge_generator_loss
from stepdistill.methods.reward import denoise_to, refl_hinge
from stepdistill.metrics.reward_models import (
    REWARD_MODELS,
    RewardUnavailable,
    judge_alignment_probability,
    load_reward_model,
)

SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
MU, S = 0.3, 0.5  # data x0 ~ N(MU, S^2) in one dimension


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_scheduler_config(SD_SCHEDULER)


# ---- segments -------------------------------------------------------------------------------------------------

# k -> (segment starts, the timestep each segment's consistency map lands on, top segment first)
SEGMENT_TABLE = {
    1: ([0], [-1]),
    2: ([0, 500], [499, -1]),
    4: ([0, 250, 500, 750], [749, 499, 249, -1]),
    8: ([0, 125, 250, 375, 500, 625, 750, 875], [874, 749, 624, 499, 374, 249, 124, -1]),
}


@pytest.mark.parametrize("k", sorted(SEGMENT_TABLE))
def test_segment_boundaries_and_end_points_table(k):
    starts, ends = SEGMENT_TABLE[k]
    assert segment_boundaries(k) == starts
    # Every t of a segment maps to the same end point: the next step of the k-step trailing DDIM sampler.
    t = torch.arange(1000)
    got = segment_start(t, k)
    for j, start in enumerate(starts):
        width = 1000 // k
        assert set(got[start : start + width].tolist()) == {ends[len(starts) - 1 - j]}
    assert ends == trailing_timesteps(k)[1:] + [-1]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_segment_end_points_lie_on_the_grid_and_the_tcd_schedule(k):
    from diffusers import TCDScheduler

    grid = set(range(24, 1000, 25))  # N = 40: (1..40) * 25 - 1
    assert all(e in grid for e in SEGMENT_TABLE[k][1] if e >= 0)
    tcd = TCDScheduler(**SD_SCHEDULER, original_inference_steps=40)
    tcd.set_timesteps(k)
    assert tcd.timesteps.tolist() == tcd_timesteps(k, 40) == trailing_timesteps(k)


def test_tcd_timesteps_match_diffusers_on_other_grids():
    from diffusers import TCDScheduler

    for original in (50, 20):
        for n in range(1, 9):
            s = TCDScheduler(**SD_SCHEDULER, original_inference_steps=original)
            s.set_timesteps(n)
            assert s.timesteps.tolist() == tcd_timesteps(n, original), (original, n)


def test_stage_bounds_and_config_checks():
    assert stage_bounds([8, 4, 2, 1], [], 10) == [2, 4, 6, 10]
    assert stage_bounds([8, 4], [3, 5], 10) == [3, 8]
    with pytest.raises(ConfigError, match="multiple of"):
        TSCDConfig(segments=[8], num_ddim_timesteps=50).validate()
    with pytest.raises(ConfigError, match="one entry per"):
        TSCDConfig(adv_weight=[0.1]).validate()
    with pytest.raises(ConfigError, match="not a folder"):
        TSCDConfig(init_lora="/no/such/run/final").validate()
    LCMConfig().validate()  # one segment on LCM's grid of 50
    UnifiedConfig().validate()
    # The DM term's sample follows the recipe's steps (dm_steps 0); above one step it takes DDIM steps, so TCD's eta is 0.
    assert UnifiedConfig(inference_steps=4, tcd_eta=0.0).dm_sample_steps == 4
    assert UnifiedConfig(inference_steps=4, dm_steps=1).dm_sample_steps == 1
    with pytest.raises(ConfigError, match="set method.tcd_eta=0"):
        UnifiedConfig(inference_steps=4).validate()
    with pytest.raises(ConfigError, match="method.dm_steps must be in"):
        UnifiedConfig(dm_steps=-1).validate()
    # dm_weight: one weight for every stage, or one per stage; a run with no DM term at all is tscd.
    assert UnifiedConfig(segments=[8, 4], dm_weight=[0.0, 0.1]).dm_weight_of(0) == 0.0
    assert UnifiedConfig(segments=[8, 4], dm_weight=[0.5]).dm_weight_of(1) == 0.5
    with pytest.raises(ConfigError, match="one per method.segments entry"):
        UnifiedConfig(segments=[8, 4, 2], dm_weight=[0.0, 0.1]).validate()
    with pytest.raises(ConfigError, match="use method.name=tscd"):
        UnifiedConfig(segments=[8, 4], dm_weight=[0.0, 0.0]).validate()
    for bad in (0.0, -0.5, float("inf")):
        with pytest.raises(ConfigError, match="method.dm_lr_scale must be a finite number > 0"):
            UnifiedConfig(dm_lr_scale=bad).validate()
    UnifiedConfig(dm_guidance_scale=1.0).validate()  # 1 = the conditional score alone
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="method.dm_guidance_scale must be a finite number >= 0"):
            UnifiedConfig(dm_guidance_scale=bad).validate()


@pytest.mark.parametrize("preset", ["hyper", "pcm4", "lcm", "unified"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_presets_are_the_same_method(preset, family):
    from pathlib import Path

    cfg = load_config(Path(__file__).parents[2] / f"configs/tscd/{family}_{preset}.yaml", ["data.prompts=x"])
    expected = {"hyper": ("tscd", [8, 4, 2, 1]), "pcm4": ("tscd", [4]), "lcm": ("lcm", [1]), "unified": ("tscd_unified", [1])}
    assert (cfg.method.name, cfg.method.segments) == expected[preset]
    assert isinstance(cfg.method, TSCDConfig)


# ---- the consistency pair against a closed form -------------------------------------------------------------

class GaussianDenoiser:
    """E[x0 | x_t] for x0 ~ N(MU, S^2) in closed form; the teacher (CFG scale ignored: one class)."""

    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, x_t, t, cond, guidance_scale=None):
        alpha, sigma = self.schedule.alpha_sigma(t, x_t.ndim)
        v = alpha**2 * S**2 + sigma**2
        d = x_t.double() - alpha * MU
        return DenoiserOut(MU + alpha * S**2 * d / v, sigma * d / v)


def teacher_ode_endpoint(teacher, schedule, x_t, t, t_end, delta):
    """The teacher's DDIM solve of the ODE on the skipping grid from t down to t_end (per sample, in a loop)."""
    out = []
    for x, ti, te in zip(x_t, t.tolist(), t_end.tolist()):
        x = x[None].double()
        while ti > te:
            nxt = max(ti - delta, te)
            d = teacher(x, torch.tensor([ti]), None)
            a, s = schedule.alpha_sigma(torch.tensor([nxt]), x.ndim)
            x, ti = ddim_step(d.x0, d.eps, a, s), nxt
        out.append(x[0])
    return torch.stack(out)


class ExactConsistencyStudent:
    """The ideal k-segment student for this teacher: its DDIM jump from t to the segment's end lands exactly on the
    teacher's ODE endpoint. (x0, eps) solve alpha_b x0 + sigma_b eps = endpoint with eps = (x_t - alpha_t x0) / sigma_t.

    Everything is affine in x_t here, so this is closed form. Note that the analytic denoiser itself is not a
    consistent student: one long DDIM jump with the exact E[x0 | x_t] is exact only for point-mass data, so for a
    Gaussian it misses the teacher's multi-step solve (test_wrong_students_have_a_positive_loss).
    """

    def __init__(self, teacher, schedule, k, delta):
        self.teacher, self.schedule, self.k, self.delta = teacher, schedule, k, delta

    def __call__(self, x_t, t, cond):
        t = torch.as_tensor(t).reshape(-1).expand(x_t.shape[0])
        t_b = segment_start(t, self.k)
        x_b = teacher_ode_endpoint(self.teacher, self.schedule, x_t, t, t_b, self.delta)
        a_t, s_t = self.schedule.alpha_sigma(t, x_t.ndim)
        a_b, s_b = self.schedule.alpha_sigma(t_b, x_t.ndim)
        x0 = (x_b - s_b / s_t * x_t.double()) / (a_b - s_b * a_t / s_t)
        return DenoiserOut(x0, (x_t.double() - a_t * x0) / s_t)


def _pair(schedule, student, k, n=64, seed=0, end_point="edge"):
    cfg = TSCDConfig(segments=[k], num_ddim_timesteps=40, end_point=end_point, target="online")
    distiller = ConsistencyDistiller(cfg, schedule)
    teacher = GaussianDenoiser(schedule)
    nets = Nets(denoiser=None, schedule=schedule, teacher=teacher, student=student)
    g = torch.Generator().manual_seed(seed)
    x0 = MU + S * torch.randn(n, 1, 1, 1, generator=g, dtype=torch.float64)
    batch = Batch(cond=None, uncond=None, prompts=[""] * n, latent_shape=(n, 1, 1, 1), latents=x0,
                  noise=NoiseSource(torch.Generator().manual_seed(seed + 1)))
    pred, target, t_end = distiller.consistency_pair(nets, batch, k, grad=False)
    # Recompute x_t and t from the same draws to compare with the closed form.
    replay = NoiseSource(torch.Generator().manual_seed(seed + 1))
    t = distiller.grid[replay.randint(0, len(distiller.grid), n)]
    return distiller, pred, target, t_end, t


@pytest.mark.parametrize("k", [1, 4, 8])
def test_exact_student_has_zero_loss_and_its_target_is_the_teacher_ode_endpoint(schedule, k):
    teacher = GaussianDenoiser(schedule)
    student = ExactConsistencyStudent(teacher, schedule, k, delta=25)
    distiller, pred, target, t_end, t = _pair(schedule, student, k)
    assert torch.equal(t_end, segment_start(t, k))
    loss = distiller.distance(pred, target)
    assert loss.max() < 1e-10
    # The target (teacher step, then the student from t') is the teacher's own ODE solve from t to the end point.
    g = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(len(t), 1, 1, 1, generator=g, dtype=torch.float64)
    replay = NoiseSource(torch.Generator().manual_seed(1))
    replay.randint(0, 40, len(t))
    eps = replay.randn(len(t), 1, 1, 1).double()
    x_t = schedule.add_noise(x0, eps, t)
    endpoint = teacher_ode_endpoint(teacher, schedule, x_t, t, t_end, 25)
    assert torch.allclose(target, endpoint, atol=1e-9)


@pytest.mark.parametrize("k", [1, 4])
def test_wrong_students_have_a_positive_loss(schedule, k):
    teacher = GaussianDenoiser(schedule)
    exact = ExactConsistencyStudent(teacher, schedule, k, delta=25)

    def biased(x_t, t, cond):
        out = exact(x_t, t, cond)
        return DenoiserOut(out.x0 + 0.05, out.eps)

    for student in (teacher, biased):  # the teacher itself: one long DDIM jump is not its own ODE solve
        distiller, pred, target, _, _ = _pair(schedule, student, k)
        assert distiller.distance(pred, target).mean() > 1e-6


def test_random_end_points_stay_inside_the_segment(schedule):
    teacher = GaussianDenoiser(schedule)
    _, _, _, t_end, t = _pair(schedule, teacher, 4, n=512, end_point="random")
    t_b = segment_start(t, 4)
    assert (t_end >= t_b).all() and (t_end <= torch.maximum(t - 25, t_b)).all()
    assert len(set(t_end.tolist())) > 20


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([-2.0, 0.5])
    assert torch.equal(hinge_discriminator_loss(real, fake), torch.tensor([0.0, 2.5]))
    assert torch.equal(hinge_generator_loss(fake), torch.tensor([3.0, 0.5]))


def test_hinge_is_taken_per_location_of_every_head_then_averaged():
    """PCM's discriminator: a real map [2, -2] averages to logit 0 (hinge 1), but its locations give (0 + 3) / 2."""
    real = [torch.tensor([[2.0, -2.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])]
    fake = [torch.tensor([[-1.0, -1.0]]), torch.tensor([[-3.0, 1.0, -1.0, -1.0]])]
    # head 1: real (0 + 3) / 2 + fake 0 = 1.5; head 2: real 0 + fake (0 + 2 + 0 + 0) / 4 = 0.5; heads averaged: 1.0
    assert torch.allclose(hinge_discriminator_loss(real, fake), torch.tensor([1.0]))
    # generator: head 1 (2 + 2) / 2 = 2, head 2 (4 + 0 + 2 + 2) / 4 = 2
    assert torch.allclose(hinge_generator_loss(fake), torch.tensor([2.0]))
    averaged_first = torch.relu(1 - torch.tensor(0.0)) + torch.relu(1 + torch.tensor(-1.0))
    assert hinge_discriminator_loss(real[:1], fake[:1]).item() != averaged_first.item()


# ---- samplers against diffusers -------------------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_tcd_sample_matches_tcd_scheduler(schedule, eta, n):
    from diffusers import TCDScheduler

    den = GaussianDenoiser(schedule)
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ours = tcd_sample(den, x_T, tcd_timesteps(n, 40), None, schedule, eta, torch.Generator().manual_seed(5))

    scheduler = TCDScheduler(**SD_SCHEDULER, original_inference_steps=40)
    scheduler.set_timesteps(n)
    x, g = x_T.clone(), torch.Generator().manual_seed(5)
    for t in scheduler.timesteps:
        eps = den(x, t.reshape(1), None).eps.float()
        x = scheduler.step(eps, t, x, eta=eta, generator=g).prev_sample
    assert torch.allclose(ours, x, atol=1e-5), (ours - x).abs().max()


@pytest.mark.parametrize("n", [1, 3, 4])
def test_recipe_sample_matches_trailing_ddim_scheduler(schedule, n):
    from diffusers import DDIMScheduler

    den = GaussianDenoiser(schedule)
    x_T = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    recipe = {"scheduler_class": "DDIMScheduler", "num_inference_steps": n, "timesteps": None,
              "scheduler_config": {"timestep_spacing": "trailing", "set_alpha_to_one": True, "clip_sample": False}}
    ours = recipe_sample(den, x_T, None, schedule, recipe)
    scheduler = DDIMScheduler(**SD_SCHEDULER, **recipe["scheduler_config"])
    scheduler.set_timesteps(n)
    x = x_T.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(den(x, t.reshape(1), None).eps.float(), t, x).prev_sample
    assert torch.allclose(ours, x, atol=1e-5)


# ---- ReFL and reward models -----------------------------------------------------------------------------------

def test_denoise_to_stops_each_sample_at_its_own_timestep(schedule):
    den = GaussianDenoiser(schedule)
    x_T = torch.randn(4, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = torch.tensor([999, 700, 500, 201])
    grid = trailing_timesteps(4)
    x = denoise_to(den, x_T, t, grid, None, schedule)
    assert torch.equal(x[0], x_T[0])
    for i in range(1, 4):
        steps = [s for s in grid if s > t[i]]
        expected = ddim_sample(den, x_T[i : i + 1], steps, None, schedule, final_t=int(t[i]))
        assert torch.allclose(x[i : i + 1], expected, atol=1e-10)


def test_refl_hinge_only_pushes_below_threshold():
    r = torch.tensor([0.2, 0.9, 1.5], requires_grad=True)
    loss = refl_hinge(r, 1.0)
    loss.sum().backward()
    assert torch.allclose(loss.detach(), torch.tensor([0.8, 0.1, 0.0]))
    assert r.grad.tolist() == [-1.0, -1.0, 0.0]


def test_toy_judge_reward_reads_alignment_and_is_differentiable():
    from stepdistill.data.toy_world import ToyWorld, to_float
    from stepdistill.metrics.toy_judge import load_judge

    torch.set_num_threads(1)
    images, captions, _ = ToyWorld().sample(64, seed=11)
    reward = load_reward_model("toy_judge")
    x = to_float(images).requires_grad_(True)
    right = reward(x, captions)
    wrong = reward(x, captions[1:] + captions[:1])
    assert right.mean() > 0.8 and wrong.mean() < 0.2
    right.sum().backward()
    assert x.grad.abs().sum() > 0
    # The probability agrees with the judge's own reading: high exactly where its argmax matches.
    from stepdistill.metrics.toy_judge import matches

    judge = load_judge()
    agree = matches(judge.predict(images), captions)
    assert np.mean((right.detach().numpy() > 0.5) == agree) > 0.95
    labels = torch.full((2, 7), -1)
    assert torch.allclose(judge_alignment_probability(judge, x[:2].detach(), labels), torch.ones(2))


def test_real_reward_models_fail_with_what_to_do(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_optional(name, *args, **kwargs):
        if name in ("ImageReward", "open_clip"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_optional)
    with pytest.raises(RewardUnavailable, match="pip install image-reward"):
        load_reward_model("imagereward")
    with pytest.raises(RewardUnavailable, match="pip install"):
        load_reward_model("hpsv2", "HPS_v2.1_compressed.pt")
    with pytest.raises(RewardUnavailable, match="sac\\+logos\\+ava1-l14-linearMSE.pth"):
        load_reward_model("aesthetic", "")
    with pytest.raises(ConfigError, match="unknown reward model"):
        load_reward_model("pickscore")
    assert {"toy_judge", "imagereward", "aesthetic", "hpsv2"} <= set(REWARD_MODELS)


def test_noise_forward_matches_the_marginal(schedule):
    # Noising x_s from s to t must give exactly q(x_t | x0) when x_s ~ q(x_s | x0): check mean and variance.
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    s, t = torch.tensor([300]), torch.tensor([800])
    a_s, _ = schedule.alpha_sigma(s, 2)
    a_t, sig_t = schedule.alpha_sigma(t, 2)
    x_s = schedule.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), s.expand(20000))
    x_t = noise_forward(x_s, a_s, a_t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert abs(x_t.mean() - a_t.item() * 0.7) < 0.02 and abs(x_t.std() - sig_t.item()) < 0.02


def test_noise_forward_path_is_ddpms_and_keeps_the_flow_marginal(schedule):
    """tscd's adversarial inputs on any teacher's path: DDPM's transition on DDPM, and on a rectified flow (SD3's
    shifted sigmas) x_s ~ q(x_s | x0) noised to t is q(x_t | x0) = N((1 - sigma_t) x0, sigma_t^2)."""
    from stepdistill.core.flow import FlowSchedule

    g = torch.Generator().manual_seed(3)
    x_s, z = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    s, t = torch.tensor([300]), torch.tensor([800])
    torch.testing.assert_close(noise_forward_path(x_s, *schedule.alpha_sigma(s, 2), *schedule.alpha_sigma(t, 2), z),
                               noise_forward(x_s, schedule.alpha_sigma(s, 2)[0], schedule.alpha_sigma(t, 2)[0], z))
    flow = FlowSchedule.from_scheduler_config({"num_train_timesteps": 1000, "shift": 3.0})
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    x_s = flow.add_noise(x0, torch.randn(x0.shape, generator=g, dtype=torch.float64), s.expand(20000))
    a_t, sig_t = flow.alpha_sigma(t, 2)
    x_t = noise_forward_path(x_s, *flow.alpha_sigma(s, 2), a_t, sig_t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert abs(a_t.item() + sig_t.item() - 1) < 1e-12
    assert abs(x_t.mean() - a_t.item() * 0.7) < 0.02 and abs(x_t.std() - sig_t.item()) < 0.02
    # From clean data (t_end = -1: sigma 0) it is add_noise itself.
    clean = noise_forward_path(x0[:3], *flow.alpha_sigma(torch.tensor([-1]), 2), a_t, sig_t, x0[:3])
    torch.testing.assert_close(clean, flow.add_noise(x0[:3], x0[:3], t.expand(3)))


def test_adversarial_real_side_is_the_data_marginal_with_adv_real_data(schedule):
    """adv_real=data: the discriminator's real side is the batch's latents noised from x0 to t_adv with the same
    draws as adv_real=target, so only the real side changes; the fake side and t_adv are the same in both."""
    n, k = 16, 4
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(n, 1, 2, 2, generator=g, dtype=torch.float64)
    pred, target = torch.randn_like(x0), torch.randn_like(x0)
    t_end = torch.randint(-1, 750, (n,), generator=g)
    nets = Nets(denoiser=None, schedule=schedule, teacher=None, student=None)

    def adv(real_side, latents=x0):
        cfg = TSCDConfig(segments=[k], adv_weight=[0.5], adv_real=real_side)
        cfg.validate()
        batch = Batch(cond=None, uncond=None, prompts=[""] * n, latent_shape=(n, 1, 2, 2), latents=latents,
                      noise=NoiseSource(torch.Generator().manual_seed(9)))
        return ConsistencyDistiller(cfg, schedule)._adv_inputs(nets, batch, pred, target, t_end, k)

    fake_t, real_t, t_adv = adv("target")
    fake_d, real_d, t_adv_d = adv("data")
    assert torch.equal(t_adv, t_adv_d) and torch.equal(fake_t, fake_d)
    assert not torch.allclose(real_t, real_d)  # only the real side changes
    assert ((t_adv > t_end) & (t_adv <= t_end + 1000 // k)).all()
    replay = NoiseSource(torch.Generator().manual_seed(9))
    replay.rand(n), replay.randn(n, 1, 2, 2)  # t_adv's draw, then the fake side's noise
    z_real = replay.randn(n, 1, 2, 2).double()
    torch.testing.assert_close(real_d, schedule.add_noise(x0, z_real, t_adv))
    with pytest.raises(ConfigError, match="data.images"):
        adv("data", latents=None)


def test_adv_real_is_checked():
    with pytest.raises(ConfigError, match="no effect without the adversarial term"):
        TSCDConfig(adv_real="data").validate()
    with pytest.raises(ConfigError, match="adv_real must be one of"):
        TSCDConfig(adv_weight=[0, 0, 0, 1.0], adv_real="teacher").validate()
    TSCDConfig(adv_weight=[0, 0, 0.1, 0.2], adv_real="data").validate()


def test_refl_window_stays_at_or_below_the_students_first_timestep(caplog):
    """A dmd student told t = 399 takes pure noise at 399: ReFL must not ask it for x0 at t > 399."""
    from stepdistill.config import ConfigError
    from stepdistill.methods.reward import refl_window

    assert refl_window(200, 600, 999) == (200, 600)
    with caplog.at_level("WARNING"):
        assert refl_window(200, 600, 399) == (200, 399)
    assert "t_max=600" in caplog.text
    with pytest.raises(ConfigError, match="t_min=500"):
        refl_window(500, 600, 399)


def test_third_party_reward_weights_never_unpickle_code(tmp_path, monkeypatch):
    from stepdistill.metrics.reward_models import RewardUnavailable, load_state_dict_safely

    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert torch.equal(load_state_dict_safely(plain)["state_dict"]["w"], torch.ones(2))

    class Payload:  # what a malicious checkpoint would carry: an object that runs code when unpickled
        def __reduce__(self):
            return (print, ("pickled code ran",))

    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": Payload()}, unsafe)
    with pytest.raises(RewardUnavailable, match="STEPDISTILL_TRUST_PICKLE"):
        load_state_dict_safely(unsafe)
    monkeypatch.setenv("STEPDISTILL_TRUST_PICKLE", "1")
    assert load_state_dict_safely(unsafe) == {"w": None}  # print(...) ran: the opt-in is what allows that
