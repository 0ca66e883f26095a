"""Rectified-flow maths of flow-matching teachers (SD3 / SD3.5, FLUX.1) as pure functions, float64 throughout.

x_t = (1 - sigma) x0 + sigma eps with sigma in [0, 1]; the transformer predicts the velocity v = eps - x0
(Esser et al. 2024, "Scaling Rectified Flow Transformers", sec. 2). Grids follow diffusers'
FlowMatchEulerDiscreteScheduler step for step, so a sampler here and a diffusers pipeline visit the same sigmas.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# FlowMatchEulerDiscreteScheduler options that change the grid in ways this module does not reproduce.
UNSUPPORTED_OPTIONS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                       "stochastic_sampling")


def as_sigma(sigma, ndim: int = 4) -> torch.Tensor:
    """sigma (a float or one value per sample) as float64, shaped (-1, 1, ..., 1) to broadcast over x."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma.reshape((-1,) + (1,) * (ndim - 1)) if sigma.ndim else sigma


# --- parameterisation ------------------------------------------------------------------------------------------

def add_noise(x0, eps, sigma):
    """x_t = (1 - sigma) x0 + sigma eps (rectified flow, Esser et al. eq. 2 with a_t = 1 - t, b_t = t)."""
    return (1.0 - sigma) * x0.double() + sigma * eps.double()


def velocity(x0, eps):
    """v = d x_t / d sigma = eps - x0: the flow-matching target (Esser et al. eq. 3, Lipman et al. 2023)."""
    return eps.double() - x0.double()


def x0_from_v(x_t, v, sigma):
    """x0 = x_t - sigma v."""
    return x_t.double() - sigma * v.double()


def eps_from_v(x_t, v, sigma):
    """eps = x_t + (1 - sigma) v."""
    return x_t.double() + (1.0 - sigma) * v.double()


def x0_eps_from_velocity(x_t, v, sigma):
    """(x0, eps) = (x_t - sigma v, x_t + (1 - sigma) v): a flow velocity read as both end points (the VP
    v-prediction counterpart is core.param.x0_eps_from_v)."""
    return x0_from_v(x_t, v, sigma), eps_from_v(x_t, v, sigma)


def v_from_x0(x_t, x0, sigma):
    """v = (x_t - x0) / sigma (undefined at sigma = 0, where x_t = x0)."""
    return (x_t.double() - x0.double()) / sigma


def v_from_eps(x_t, eps, sigma):
    """v = (eps - x_t) / (1 - sigma) (undefined at sigma = 1, where x_t = eps)."""
    return (eps.double() - x_t.double()) / (1.0 - sigma)


# --- sigma shifts and grids ----------------------------------------------------------------------------------

def shift_sigma(sigma, shift: float):
    """Static shift sigma' = s sigma / (1 + (s - 1) sigma) (Esser et al. eq. 23; SD3 / SD3.5 use s = 3)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def time_shift(sigma, mu: float, kind: str = "exponential", power: float = 1.0):
    """Dynamic shift: e^mu / (e^mu + (1/sigma - 1)^p) ('exponential', FLUX.1) or mu / (mu + (1/sigma - 1)^p)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigma - 1.0) ** power)
    if kind == "linear":
        return mu / (mu + (1.0 / sigma - 1.0) ** power)
    raise ValueError(f"time_shift_type {kind!r} is not supported: use 'exponential' or 'linear'")


def calculate_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15) -> float:
    """mu linear in the image token count: base_shift at base_seq_len, max_shift at max_seq_len (FLUX.1)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def mu_from_config(config, image_seq_len: int) -> float:
    """calculate_mu with a scheduler config's base/max sequence lengths and shifts, as the pipelines call it."""
    config = dict(config)
    return calculate_mu(image_seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                        config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def image_seq_len(height: int, width: int, vae_scale_factor: int = 8, patch_size: int = 2) -> int:
    """Image tokens of a height x width image: (H // (f p)) (W // (f p)) for VAE factor f and patch (or pack) size p."""
    return (height // (vae_scale_factor * patch_size)) * (width // (vae_scale_factor * patch_size))


def uniform_sigmas(n: int) -> np.ndarray:
    """linspace(1, 1/n, n): the unshifted sigmas FluxPipeline hands the scheduler when given none."""
    return np.linspace(1.0, 1.0 / n, n)


def _check_flow_config(config: dict) -> None:
    bad = [k for k in UNSUPPORTED_OPTIONS if config.get(k)]
    if bad:
        raise ValueError(f"scheduler options {bad} are not reproduced by stepdistill.core.flow: set them to false in "
                         "the teacher's scheduler_config.json, or pass explicit sigmas")


def scheduler_sigmas(n: int, config, mu: float | None = None, sigmas=None) -> torch.Tensor:
    """The n + 1 sigmas (last 0) of FlowMatchEulerDiscreteScheduler(**config).set_timesteps(n, sigmas=, mu=).

    Without `sigmas` the scheduler spaces n values evenly between its training grid's ends, which a static shift
    has already shifted once, and shifts them again (what StableDiffusion3Pipeline gets by default).
    """
    config = dict(config)
    _check_flow_config(config)
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError("this scheduler shifts sigmas by resolution (use_dynamic_shifting): pass mu, e.g. "
                         "mu_from_config(config, image_seq_len(height, width, ...))")
    if sigmas is None:
        sigma_max, sigma_min = 1.0, 1.0 / T
        if not dynamic:
            sigma_max, sigma_min = shift_sigma(sigma_max, shift), shift_sigma(sigma_min, shift)
        base = np.linspace(sigma_max, sigma_min, n)
    else:
        base = np.asarray(sigmas, dtype=np.float64)
    if dynamic:
        out = time_shift(base, mu, config.get("time_shift_type", "exponential"))
    else:
        out = shift_sigma(base, shift)
    if config.get("shift_terminal"):
        # Stretch so the last sigma lands on shift_terminal (LTX-Video's rule, as the scheduler applies it).
        one_minus = 1.0 - out
        out = 1.0 - one_minus / (one_minus[-1] / (1.0 - config["shift_terminal"]))
    return torch.cat([torch.as_tensor(out, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])


def scheduler_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The scheduler's timesteps t = sigma T for every sigma but the final 0."""
    return sigmas[:-1] * num_train_timesteps


def network_timestep(sigma, timestep_scale: float):
    """What the transformer is told at sigma: sigma * timestep_scale.

    SD3's pipeline passes the scheduler's t = sigma * 1000 (scale 1000); FLUX's passes t / 1000 = sigma (scale 1)
    and FluxTransformer2DModel multiplies by 1000 inside (its guidance input likewise: pass the raw scale, 3.5).
    """
    return torch.as_tensor(sigma, dtype=torch.float64) * timestep_scale


def scheduler_float32_timesteps(config, mu: float | None, T: int = 1000) -> torch.Tensor:
    """FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=(t + 1) / T for every t, mu=mu).timesteps, float32.

    The scheduler casts the given sigmas to float32 and shifts them in float32 NumPy arithmetic (weak Python scalars),
    then multiplies by T in float32 torch; every operation here is the scheduler's, in its order, so each value is
    bit-identical to what a pipeline given any subset of these sigmas tells the network.
    """
    config = dict(config)
    unshifted = (np.arange(1, T + 1, dtype=np.float64) / T).astype(np.float32)
    if config.get("use_dynamic_shifting"):
        if config.get("time_shift_type", "exponential") == "exponential":
            shifted = math.exp(mu) / (math.exp(mu) + (1 / unshifted - 1) ** 1.0)
        else:
            shifted = mu / (mu + (1 / unshifted - 1) ** 1.0)
    else:
        shift = float(config.get("shift", 1.0))
        shifted = shift * unshifted / (1 + (shift - 1) * unshifted)
    return torch.from_numpy(np.asarray(shifted)).to(torch.float32) * int(config.get("num_train_timesteps", T))


def norm_rescaled_cfg(v_cond, v_uncond, guidance_scale):
    """CFG, then each vector along the last axis rescaled to the conditional one's norm: c = v_u + w (v_c - v_u),
    v = c |v_c| / |c| (QwenImagePipeline's true CFG, per packed token). float64; a zero |c| counts as tiny."""
    v_cond, v_uncond = v_cond.double(), v_uncond.double()
    comb = v_uncond + guidance_scale * (v_cond - v_uncond)
    norm = comb.norm(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    return comb * (v_cond.norm(dim=-1, keepdim=True) / norm)


# --- sampling --------------------------------------------------------------------------------------------------

def euler_step(x_t, v, sigma, sigma_next):
    """x_{sigma'} = x_sigma + (sigma' - sigma) v (FlowMatchEulerDiscreteScheduler.step, deterministic)."""
    return x_t.double() + (sigma_next - sigma) * v.double()


@torch.no_grad()
def euler_sample(velocity_fn, x, sigmas):
    """Integrate dx/dsigma = v(x, sigma) with Euler steps along `sigmas` (descending, e.g. scheduler_sigmas(...)).

    velocity_fn(x_t, sigma) gets sigma as a float64 tensor with one value per sample; the result is float64.
    """
    x = x.double()
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        v = velocity_fn(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))
        x = euler_step(x, v, sigma, sigma_next)
    return x


# --- losses ----------------------------------------------------------------------------------------------------

def flow_matching_loss(v_pred, x0, eps):
    """|v_theta(x_t, sigma) - (eps - x0)|^2 per sample (conditional flow matching, Lipman et al. eq. 9)."""
    return ((v_pred.double() - velocity(x0, eps)) ** 2).flatten(1).mean(1)


def dm_gradient(x0, x0_real, x0_fake):
    """DMD's gradient with its eq. 8 normaliser: g = (x0_fake - x0_real) / mean|x0 - x0_real| per sample.

    The one implementation: methods.dmd.dmd_gradient is this function. Non-finite entries become 0.
    """
    x0, x0_real, x0_fake = x0.double(), x0_real.double(), x0_fake.double()
    weight = (x0 - x0_real).abs().flatten(1).mean(1).clamp(min=1e-12)
    grad = (x0_fake - x0_real) / weight.reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


def dm_gradient_from_v(x0, x_t, sigma, v_real, v_fake):
    """DMD's gradient for flow teachers: both velocities read as x0 = x_t - sigma v, then dm_gradient."""
    return dm_gradient(x0, x0_from_v(x_t, v_real, sigma), x0_from_v(x_t, v_fake, sigma))


# --- the schedule the methods see ------------------------------------------------------------------------------

class FlowSchedule:
    """A flow teacher seen through NoiseSchedule's interface: integer t in [0, T), t = -1 clean data.

    sigma_t = the teacher's shifted sigma of (t + 1) / T (FlowMatchEulerDiscreteScheduler's training table: t = T - 1
    is pure noise, sigma = 1) and alpha_t = 1 - sigma_t, so x_t = alpha_t x0 + sigma_t eps is the flow interpolation
    and a DDIM step in (x0, eps) is an exact Euler step. A pipeline handed the unshifted sigmas (t + 1) / T (see
    `unshifted_sigmas`) visits exactly these sigma_t.
    """

    prediction_type = "flow"

    def __init__(self, sigmas: torch.Tensor, timestep_scale: float = 1000.0, config: dict | None = None,
                 mu: float | None = None):
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64)  # sigmas[t], ascending in t
        self.timestep_scale = float(timestep_scale)
        self.config, self.mu = (dict(config) if config is not None else None), mu
        self._pipeline_timesteps = None

    @classmethod
    def from_scheduler_config(cls, config, mu: float | None = None, timestep_scale: float = 1000.0) -> FlowSchedule:
        """The training table of FlowMatchEulerDiscreteScheduler(**config), shifted as set_timesteps shifts at `mu`."""
        config = dict(config)
        if config.get("shift_terminal"):
            raise ValueError("shift_terminal is not supported for distillation: remove it from the scheduler config")
        T = int(config.get("num_train_timesteps", 1000))
        unshifted = np.arange(1, T + 1, dtype=np.float64) / T  # numpy: also under a fake-tensor mode (bench memory)
        sigmas = scheduler_sigmas(T, {k: v for k, v in config.items() if k != "stochastic_sampling"}, mu,
                                  sigmas=unshifted)[:-1]
        return cls(sigmas, timestep_scale, config, mu)

    @property
    def num_train_timesteps(self) -> int:
        return self.sigmas.numel()

    def _tables(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha table, sigma table) on `device`, made once per device (not a host-to-device copy per call), with one
        more entry at the END for t = -1 (clean data: alpha 1, sigma 0), which a tensor index of -1 reads (tensor
        indexing wraps negative indices): a lookup is one index, without a clamp, a comparison and a select."""
        device = torch.device(device)
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            sigma = torch.cat([self.sigmas, torch.zeros(1, dtype=self.sigmas.dtype)])
            cache[device] = ((1.0 - sigma).to(device), sigma.to(device))
        return cache[device]

    def sigma(self, t) -> torch.Tensor:
        """sigma_t per sample (float64, flat); 0 for t = -1."""
        t = torch.as_tensor(t).reshape(-1).long()
        return self._tables(t.device)[1][t]

    def alpha_sigma(self, t, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - sigma_t, sigma_t), float64, shaped to broadcast over x."""
        t = torch.as_tensor(t).reshape(-1).long()
        alpha, sigma = self._tables(t.device)
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha[t].reshape(shape), sigma[t].reshape(shape)

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = (1 - sigma_t) x0 + sigma_t eps (rectified flow)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return (alpha.to(x0.device) * x0.double() + sigma.to(x0.device) * eps.double()).to(x0.dtype)

    def network_timestep(self, t) -> torch.Tensor:
        """What the transformer is told at t: sigma_t * timestep_scale (SD3: 1000; FLUX: 1, it scales inside)."""
        return network_timestep(self.sigma(t), self.timestep_scale)

    def pipeline_timestep(self, t) -> torch.Tensor:
        """The float32 timestep a diffusers flow pipeline handed `unshifted_sigmas` has at t: its scheduler's t = T sigma,
        in the scheduler's own float32 arithmetic (float32(sigma_t) * T is 1 ulp off at half the t). 0 at t = -1."""
        if self._pipeline_timesteps is None:
            self._pipeline_timesteps = scheduler_float32_timesteps(self.config or {}, self.mu,
                                                                   self.num_train_timesteps)
        t = torch.as_tensor(t).reshape(-1).long()
        told = self._pipeline_timesteps.to(t.device)[t.clamp(min=0)]
        return torch.where(t < 0, torch.zeros_like(told), told)

    def grid(self, n: int) -> list[int]:
        """The t a pipeline visits when given only a step count n; a pipeline that takes sigmas needs none."""
        raise ValueError("a flow recipe without sigmas is for pipelines that take none (WanPipeline): give the "
                         "recipe's sigmas")

    def pipeline_sampling(self, timesteps) -> dict:
        """Recipe fields that make the family's stock pipeline visit sigma_t at these t: `sigmas=` before its shift. A
        pipeline that takes no `sigmas` (WanPipeline) overrides this with a scheduler config and a step count."""
        return {"scheduler_config": {}, "sigmas": self.unshifted_sigmas(timesteps), "num_inference_steps": len(timesteps)}

    def unshifted_sigmas(self, timesteps) -> list[float]:
        """The `sigmas=` a diffusers flow pipeline must get to visit sigma_t at these t: (t + 1) / T, before its shift."""
        return [(int(t) + 1) / self.num_train_timesteps for t in timesteps]
