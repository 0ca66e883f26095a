"""Training-time samplers that visit exactly the steps a diffusers scheduler would, so a student can be checked
against the exported pipeline: LCMScheduler (consistency multistep, fresh noise between steps),
DDIMScheduler (deterministic, eta = 0) and TCDScheduler (strategic stochastic sampling), and `recipe_sample`,
which runs whichever of them an inference recipe (stepdistill.json) names; on a flow schedule, DDIM is
FlowMatchEulerDiscreteScheduler's Euler (a recipe with `sigmas`)."""

from __future__ import annotations

import torch

from .solvers import (
    ddim_step,
    lcm_boundary_scalings,
    lcm_inference_timesteps,
    noise_forward,
    tcd_intermediate,
    tcd_timesteps,
    trailing_timesteps,
)


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
def ddim_sample(denoiser, x_T, timesteps, cond, schedule, final_t: int = -1, step_ratio: int | None = None):
    """Deterministic DDIM over `timesteps` (descending), ending at final_t (-1 = clean data, set_alpha_to_one).

    step_ratio: DDIMScheduler's own rule for the next timestep, t - T // n (below 0: final_t), which differs from
    the next listed timestep when n does not divide T; None steps from one listed timestep to the next.
    """
    x = x_T
    n = x.shape[0]
    if step_ratio is None:
        nexts = list(timesteps[1:]) + [final_t]
    else:
        nexts = [t - step_ratio if t - step_ratio >= 0 else final_t for t in timesteps]
    for t, t_next in zip(timesteps, nexts):
        out = denoiser(x, torch.full((n,), int(t), device=x.device, dtype=torch.long), cond)
        alpha, sigma = schedule.alpha_sigma(torch.full((n,), int(t_next)), x.ndim)
        x = ddim_step(out.x0, out.eps, alpha.to(x.device), sigma.to(x.device)).to(x_T.dtype)
    return x


def tcd_sample(denoiser, x_T, timesteps, cond, schedule, eta: float = 0.3, generator=None, return_x0: bool = False):
    """TCD's strategic stochastic sampling (Zheng et al. 2024, sec. 4.3; diffusers TCDScheduler.step).

    Each step jumps with DDIM from t to s = floor((1 - eta) t_next), then noises forward from s to t_next; the
    last step stops at s = 0 (alpha_0 < 1, as the scheduler does) without noise. eta = 0 is deterministic DDIM.
    With return_x0, also the last step's x0 prediction (the image before the scheduler's alpha_0 step): (x, x0).
    Autograd as the caller has it (recipe_sample turns it off; tscd_unified's DM term backpropagates through it).
    """
    x = x_T
    n = x.shape[0]
    for i, t in enumerate(timesteps):
        last = i + 1 == len(timesteps)
        t_next = 0 if last else int(timesteps[i + 1])
        s = tcd_intermediate(t_next, eta)
        out = denoiser(x, torch.full((n,), int(t), device=x.device, dtype=torch.long), cond)
        alpha_s, sigma_s = schedule.alpha_sigma(torch.full((n,), s), x.ndim)
        x_s = ddim_step(out.x0, out.eps, alpha_s.to(x.device), sigma_s.to(x.device))
        if eta > 0 and not last:
            alpha_next, _ = schedule.alpha_sigma(torch.full((n,), t_next), x.ndim)
            x_s = noise_forward(x_s, alpha_s.to(x.device), alpha_next.to(x.device), _noise_like(x, generator))
        x = x_s.to(x_T.dtype)
    return (x, out.x0) if return_x0 else x


def recipe_timesteps(recipe, steps: int | None = None, T: int = 1000) -> list[int]:
    """The timesteps the recipe's diffusers scheduler visits at `steps` (default: the recipe's own)."""
    config = recipe.get("scheduler_config") or {}
    if recipe.get("timesteps"):
        if steps is not None and steps != len(recipe["timesteps"]):
            raise ValueError(f"the recipe fixes its timesteps {recipe['timesteps']}: sample with steps=None")
        return [int(t) for t in recipe["timesteps"]]
    name = recipe["scheduler_class"]
    if recipe.get("sigmas"):
        if name != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(f"a recipe with sigmas samples with FlowMatchEulerDiscreteScheduler, not {name}")
        if steps is not None and steps != len(recipe["sigmas"]):
            raise ValueError(f"the recipe fixes its sigmas {recipe['sigmas']}: sample with steps=None")
        # sigma_t = shift((t + 1) / T): core.flow.FlowSchedule.unshifted_sigmas read backwards.
        return [round(u * T) - 1 for u in recipe["sigmas"]]
    n = steps or recipe["num_inference_steps"]
    if name == "DDIMScheduler":
        if config.get("timestep_spacing") != "trailing":
            raise ValueError("the training-time DDIM sampler follows timestep_spacing='trailing' only: put it in the "
                             "recipe's scheduler_config")
        return trailing_timesteps(n, T)
    if name == "LCMScheduler":
        return lcm_inference_timesteps(n, config.get("original_inference_steps", 50), T)
    if name == "TCDScheduler":
        return tcd_timesteps(n, config.get("original_inference_steps", 50), T)
    raise ValueError(f"no training-time sampler for {name}: use DDIMScheduler (trailing), LCMScheduler or TCDScheduler")


# Flow schedulers a step-count recipe (no sigmas, no timesteps) may name: FlowMatchEuler, or UniPC at first order.
STEP_COUNT_FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler")


@torch.no_grad()
def recipe_sample(denoiser, x_T, cond, schedule, recipe, generator=None, steps: int | None = None):
    """Sample as the recipe's diffusers scheduler would (recipe: the dict a distiller's recipe() returns)."""
    T = schedule.num_train_timesteps
    config = recipe.get("scheduler_config") or {}
    name = recipe["scheduler_class"]
    if name in STEP_COUNT_FLOW_SCHEDULERS and not recipe.get("sigmas") and not recipe.get("timesteps"):
        # A pipeline driven by its step count alone (WanPipeline): the schedule knows that count's grid, and the
        # recipe's first-order step there is the Euler (= DDIM) step.
        if name == "UniPCMultistepScheduler" and (config.get("solver_order") != 1 or not config.get("use_flow_sigmas")):
            raise ValueError("no training-time sampler for a multistep UniPC recipe: use solver_order=1 on flow sigmas")
        return ddim_sample(denoiser, x_T, schedule.grid(steps or recipe["num_inference_steps"]), cond, schedule,
                           final_t=-1)
    timesteps = recipe_timesteps(recipe, steps, T)
    if name == "FlowMatchEulerDiscreteScheduler":
        if config.get("stochastic_sampling"):
            raise ValueError("no training-time sampler for stochastic_sampling: use deterministic Euler")
        # On a flow schedule (alpha = 1 - sigma) a DDIM step in (x0, eps) is exactly the scheduler's Euler step.
        return ddim_sample(denoiser, x_T, timesteps, cond, schedule, final_t=-1)
    if name == "DDIMScheduler":
        final_t = -1 if config.get("set_alpha_to_one", True) else 0
        return ddim_sample(denoiser, x_T, timesteps, cond, schedule, final_t, step_ratio=T // len(timesteps))
    if name == "LCMScheduler":
        return lcm_sample(denoiser, x_T, timesteps, cond, schedule, generator)
    return tcd_sample(denoiser, x_T, timesteps, cond, schedule, recipe.get("eta", 0.0), generator)
