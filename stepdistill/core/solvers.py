"""Timestep grids, segment boundaries and DDIM / consistency steps as pure functions.

Timesteps are integers in [0, T); t = -1 means clean data (alpha = 1). Grids follow diffusers'
DDIMScheduler so a sampler here and a diffusers pipeline visit the same timesteps.
"""

from __future__ import annotations

import math

import torch


def leading_timesteps(n: int, T: int = 1000, steps_offset: int = 1) -> list[int]:
    """DDIM 'leading' spacing: (0, T/n, 2T/n, ...) + offset, descending."""
    ratio = T // n
    return [i * ratio + steps_offset for i in reversed(range(n))]


def trailing_timesteps(n: int, T: int = 1000) -> list[int]:
    """DDIM 'trailing' spacing: round(T - j T/n) - 1 for j = 0..n-1 (always starts at T - 1)."""
    return [int(round(T - j * T / n)) - 1 for j in range(n)]


def lcm_origin_timesteps(original_steps: int = 50, T: int = 1000) -> list[int]:
    """LCM's skipping grid: (1..N) * (T // N) - 1, descending (LCMScheduler, original_inference_steps=N)."""
    ratio = T // original_steps
    return [i * ratio - 1 for i in range(original_steps, 0, -1)]


def lcm_inference_timesteps(n: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """The n timesteps LCMScheduler picks from its skipping grid (evenly by index, descending)."""
    origin = lcm_origin_timesteps(original_steps, T)
    idx = [int(math.floor(i * len(origin) / n)) for i in range(n)]
    return [origin[i] for i in idx]


def tcd_timesteps(n: int, original_steps: int = 50, T: int = 1000) -> list[int]:
    """TCDScheduler.set_timesteps(n): the same pick from the skipping grid as LCM's (Zheng et al. 2024, sec. 4.3).

    With original_steps a multiple of n (e.g. 40 for n in 1, 2, 4, 8) these are exactly the trailing-DDIM timesteps.
    """
    return lcm_inference_timesteps(n, original_steps, T)


def multistep_timesteps(t0: int, steps: int) -> list[int]:
    """`steps` timesteps from t0 down, evenly spaced: (999, 2) -> [999, 499]; (399, 4) -> [399, 299, 199, 99]."""
    stride = (t0 + 1) // steps
    return [t0 - i * stride for i in range(steps)]


def lcm_original_steps(timesteps, T: int = 1000) -> int:
    """The smallest LCMScheduler original_inference_steps whose grid holds every timestep (silences its warning)."""
    for n in range(1, T + 1):
        if T % n == 0 and all((t + 1) % (T // n) == 0 for t in timesteps):
            return n
    return 50


def segment_boundaries(k: int, T: int = 1000) -> list[int]:
    """Start timesteps of k equal segments of [0, T): 0, T/k, 2T/k, ... (Hyper-SD sec. 3.1)."""
    if k < 1 or T % k:
        raise ValueError(f"k={k} must be a positive divisor of T={T}")
    return [j * (T // k) for j in range(k)]


def segment_start(t: torch.Tensor, k: int, T: int = 1000) -> torch.Tensor:
    """t_b = floor(t / (T/k)) * (T/k): the lower edge of the segment holding t; -1 for the first segment.

    The first segment ends at clean data, so its start is reported as -1 (alpha = 1, the x0 end point),
    matching trailing DDIM at k steps, whose last step lands on x0.
    """
    width = T // k
    start = torch.div(t, width, rounding_mode="floor") * width
    return torch.where(start == 0, torch.full_like(start, -1), start - 1)


def ddim_step(x0, eps, alpha_next, sigma_next):
    """Deterministic DDIM (eta = 0): x_next = alpha_next x0 + sigma_next eps (Song et al. eq. 12)."""
    return alpha_next * x0 + sigma_next * eps


def noise_forward(x_s, alpha_s, alpha_t, z):
    """q(x_t | x_s) for t later than s: x_t = (alpha_t / alpha_s) x_s + sqrt(1 - (alpha_t / alpha_s)^2) z (DDPM eq. 4)."""
    ratio = alpha_t / alpha_s
    return ratio * x_s.double() + (1.0 - ratio**2).clamp(min=0).sqrt() * z.double()


def noise_forward_path(x_s, alpha_s, sigma_s, alpha_t, sigma_t, z):
    """q(x_t | x_s) on any Gaussian path x_t = alpha_t x0 + sigma_t eps, t later than s: with r = alpha_t / alpha_s,
    x_t = r x_s + sqrt(sigma_t^2 - r^2 sigma_s^2) z. On DDPM's (alpha^2 + sigma^2 = 1) this is noise_forward; on
    rectified flow (alpha = 1 - sigma) it is the forward transition of the flow's marginals."""
    ratio = alpha_t / alpha_s
    return ratio * x_s.double() + (sigma_t**2 - ratio**2 * sigma_s**2).clamp(min=0).sqrt() * z.double()


def tcd_intermediate(t_next: int, eta: float) -> int:
    """TCD's s = floor((1 - eta) t_next) (gamma = eta), computed as TCDScheduler.step does (float32 tensor maths)."""
    return int(torch.floor((1 - eta) * torch.tensor(int(t_next))).long())


def lcm_boundary_scalings(t: torch.Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0):
    """c_skip, c_out of LCM (Luo et al. eq. 6; diffusers LCMScheduler): f = c_skip x_t + c_out x0_hat."""
    s = t.double() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out
