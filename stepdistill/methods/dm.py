"""Distribution matching maths shared by dmd, disback, tscd_unified and reward: DMD's gradient (Yin et al., arXiv
2311.18828) and DMD2's surrogate loss (arXiv 2405.14867), SiD's generator loss (Zhou et al., arXiv 2404.04057), the
fake score's denoising loss, and the wrapper that takes a loss's gradient through frozen networks.

Pure functions of denoiser callables D(x_t, t, cond) -> (x0, eps), so the same code trains a UNet student and an
MLP against an analytic teacher (tests/toy/test_dmd_gaussian.py).
"""

from __future__ import annotations

import torch

from ..core.denoiser import denoise_together
from ..core.flow import dm_gradient, flow_matching_loss, shift_sigma
from ..core.param import target_of

# ---- the maths, for any denoiser callables ------------------------------------------------------------------

# DMD's gradient with its eq. 8 normaliser, (x0_fake - x0_teacher) / mean|x0 - x0_teacher| per sample: one
# implementation for DDPM and flow teachers alike, in core.
dmd_gradient = dm_gradient


def dm_surrogate_loss(x0, grad):
    """0.5 |x0 - sg(x0 - grad)|^2, averaged per sample: its gradient w.r.t. x0 is grad / numel (DMD2's DM loss)."""
    target = (x0 - grad).detach()
    return 0.5 * ((x0.double() - target.double()) ** 2).flatten(1).mean(1)


def dm_loss(x0, teacher, fake_score, cond, schedule, t, eps):
    """The distribution-matching loss: noise x0 to x_t, denoise with teacher and fake score (no grad, one batched
    call of both: core.denoiser.denoise_together), surrogate MSE."""
    with torch.no_grad():
        x_t = schedule.add_noise(x0.detach(), eps, t)
        out_teacher, out_fake = denoise_together([(teacher, x_t, t, cond), (fake_score, x_t, t, cond)])
        x0_teacher, x0_fake = out_teacher.x0, out_fake.x0
        grad = dmd_gradient(x0.detach().double(), x0_teacher, x0_fake)
    return dm_surrogate_loss(x0, grad)


def sid_loss(x0, x0_teacher, x0_fake, alpha: float = 1.2):
    """SiD's generator loss (arXiv 2404.04057; SiD's training/sid_loss.py) with DMD's normaliser, per-sample mean:
    (x0_teacher - x0_fake) . ((x0_teacher - x0) - alpha (x0_teacher - x0_fake)) / mean|x0 - x0_teacher|.

    With the denoisers held constant its gradient w.r.t. x0 is exactly dmd_gradient / numel; SiD differs by
    back-propagating through both denoisers and by the alpha term.
    """
    weight = (x0 - x0_teacher).detach().abs().flatten(1).mean(1).clamp(min=1e-5)
    diff = x0_teacher - x0_fake
    return (diff * ((x0_teacher - x0) - alpha * diff)).flatten(1).mean(1) / weight


def sid_generator_loss(x0, teacher, fake_score, cond, schedule, t, eps, alpha: float = 1.2):
    """SiD: noise x0 to x_t and keep the graph through teacher and fake score back to x0."""
    x_t = schedule.add_noise(x0, eps, t)
    return sid_loss(x0.double(), teacher(x_t, t, cond).x0, fake_score(x_t, t, cond).x0, alpha)


def fake_score_loss(fake_score, x0, cond, schedule, t, eps):
    """Denoising score matching on detached student samples, on the teacher's own target per sample: |eps_fake -
    eps|^2 for an eps teacher (DDPM eq. 14), |v_fake - v|^2 for a v-prediction one, so the fake score is trained
    with the weighting its base network was (DMD2 regresses the fake UNet on the teacher's prediction type); for a
    flow teacher, flow matching |v_fake(x_t, t) - (eps - x0)|^2 (the objective the teacher was trained with)."""
    x_t = schedule.add_noise(x0.detach(), eps, t)
    out = fake_score(x_t, t, cond)
    kind = schedule.prediction_type
    if kind == "flow":
        return flow_matching_loss(out.eps - out.x0, x0.detach(), eps)
    alpha, sigma = schedule.alpha_sigma(t, x0.ndim)
    pred = target_of(out.x0, out.eps, alpha, sigma, kind)
    return ((pred - target_of(x0.detach(), eps, alpha, sigma, kind)) ** 2).flatten(1).mean(1)


def dm_timestep_bounds(t_min: float, t_max: float, T: int) -> tuple[int, int]:
    """randint bounds of the DM term's t: [int(t_min T), int(t_max T)] inclusive, as DMD2 draws it ([20, 980])."""
    return int(t_min * T), min(int(t_max * T) + 1, T)


def shift_timesteps(t, shift: float, T: int, bounds: tuple[int, int]):
    """A drawn t (the DM term's, or the fake score's with critic_t_shift) reweighted as SD3 shifts its sigmas:
    t/T -> s (t/T) / (1 + (s - 1) t/T), rounded and kept in the randint bounds [lo, hi). s > 1 moves the draws toward
    high noise, s < 1 toward low noise, s = 1 returns t itself (the uniform draw of DMD2). Rectified-flow distillers
    draw this term's time from a shifted density (NVlabs FastGen's "shifted" sample_t). On a flow teacher with s = 1
    the uniform draw puts half of the DM term below sigma = 0.5; on SD1.5's DDPM schedule the same uniform t puts 35 %
    below the equivalent noise level (alpha_bar = 0.5); s = 2 on the flow teacher puts 33 %, s = 0.5 67 %."""
    if shift == 1.0:
        return t
    shifted = torch.round(T * shift_sigma(t.double() / T, shift)).long()
    return shifted.clamp(bounds[0], bounds[1] - 1)


def through_frozen_nets(loss_fn, x0):
    """loss_fn(x0) with its gradient w.r.t. x0 only: the value and d/dx0 of loss_fn, but no gradient for any parameter
    inside it (the fake score's belong to the critic phase), and its graph is freed before the student's backward."""
    x = x0.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = loss_fn(x)
        (grad,) = torch.autograd.grad(loss.sum(), x)
    linear = (x0 * grad).flatten(1).sum(1)
    return loss.detach() + linear - linear.detach()
