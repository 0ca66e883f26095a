"""Training-time samplers that visit exactly the steps a diffusers scheduler would, so a student can be checked
against the exported pipeline: LCMScheduler (consistency multistep, fresh noise between steps) and
DDIMScheduler (deterministic, eta = 0) with explicit timesteps."""

from __future__ import annotations

import torch

from .solvers import ddim_step, lcm_boundary_scalings


def _noise_like(x, generator):
    # Drawn exactly like diffusers' randn_tensor on the same generator, so pipeline and sampler agree.
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device)


@torch.no_grad()
def lcm_sample(denoiser, x_T, timesteps, cond, schedule, generator=None, boundary: bool = True):
    """Consistency multistep sampling (LCM Alg. 1): x0 = f(x_t, t); x_next = alpha_next x0 + sigma_next z."""
    x = x_T
    n = x.shape[0]
    for i, t in enumerate(timesteps):
        t_vec = torch.full((n,), int(t), device=x.device, dtype=torch.long)
        x0 = denoiser(x, t_vec, cond).x0
        if boundary:
            c_skip, c_out = lcm_boundary_scalings(t_vec.reshape(-1, *([1] * (x.ndim - 1))))
            x0 = c_skip * x.double() + c_out * x0
        if i + 1 < len(timesteps):
            alpha, sigma = schedule.alpha_sigma(torch.full((n,), int(timesteps[i + 1])), x.ndim)
            z = _noise_like(x, generator).double()
            x = (alpha.to(x.device) * x0 + sigma.to(x.device) * z).to(x_T.dtype)
        else:
            x = x0.to(x_T.dtype)
    return x


@torch.no_grad()
def ddim_sample(denoiser, x_T, timesteps, cond, schedule, final_t: int = -1):
    """Deterministic DDIM over `timesteps` (descending), ending at final_t (-1 = clean data, set_alpha_to_one)."""
    x = x_T
    n = x.shape[0]
    grid = list(timesteps) + [final_t]
    for t, t_next in zip(grid[:-1], grid[1:]):
        out = denoiser(x, torch.full((n,), int(t), device=x.device, dtype=torch.long), cond)
        alpha, sigma = schedule.alpha_sigma(torch.full((n,), int(t_next)), x.ndim)
        x = ddim_step(out.x0, out.eps, alpha.to(x.device), sigma.to(x.device)).to(x_T.dtype)
    return x
