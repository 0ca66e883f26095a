"""Discrete noise schedule of a DDPM-trained teacher: q(x_t | x0) = N(alpha_t x0, sigma_t^2 I)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose sqrt(alpha_bar) is shifted to 0 at t = T and rescaled to keep t = 1 (Lin et al. 2023, Alg. 1)."""
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    alphas_bar = root**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_bar over the teacher's training timesteps, kept in float64 on the CPU."""

    alphas_cumprod: torch.Tensor
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}: "
                "fix the teacher's scheduler_config.json"
            )

    @classmethod
    def from_scheduler_config(cls, config) -> NoiseSchedule:
        """Build from a diffusers scheduler config (beta_start, beta_end, beta_schedule, ...)."""
        config = dict(config)
        T = int(config.get("num_train_timesteps", 1000))
        beta_start = float(config.get("beta_start", 0.00085))
        beta_end = float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if config.get("trained_betas") is not None:
            betas = torch.tensor(config["trained_betas"], dtype=torch.float64)
        elif kind == "linear":
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"beta_schedule {kind!r} is not supported: use 'linear' or 'scaled_linear'")
        prediction_type = config.get("prediction_type", "epsilon")
        if config.get("rescale_betas_zero_snr", False):
            if prediction_type == "epsilon":
                raise ValueError(
                    "scheduler config sets rescale_betas_zero_snr with prediction_type 'epsilon': at zero terminal "
                    "SNR x0 = (x_t - sigma eps) / alpha divides by alpha_T = 0; use a v_prediction teacher "
                    "(Lin et al. 2023 sec. 3.2) or set rescale_betas_zero_snr false"
                )
            betas = rescale_zero_terminal_snr(betas)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod, prediction_type)

    def table(self, device) -> torch.Tensor:
        """alphas_cumprod on `device`, copied there once (a copy per call is a host-to-device transfer each time)."""
        return self._on(device)[0]

    def _on(self, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alphas_cumprod, alpha table, sigma table) on `device`, made once per device: alpha_t = sqrt(alpha_bar_t)
        and sigma_t = sqrt(1 - alpha_bar_t) computed once, not per call, with one more entry at the END for t = -1
        (clean data: alpha 1, sigma 0), which a tensor index of -1 reads (tensor indexing wraps negative indices),
        so a lookup is one index per table, without a clamp, a comparison and a select per call."""
        device = torch.device(device)
        tables = self.__dict__.setdefault("_tables", {})  # frozen dataclass: a cache beside the fields
        if device not in tables:
            abar = self.alphas_cumprod
            one, zero = torch.ones(1, dtype=abar.dtype), torch.zeros(1, dtype=abar.dtype)
            tables[device] = tuple(v.to(device) for v in (abar, torch.cat([abar.sqrt(), one]),
                                                          torch.cat([(1.0 - abar).sqrt(), zero])))
        return tables[device]

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def alpha_sigma(self, t: torch.Tensor, ndim: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_t = sqrt(alpha_bar_t), sigma_t = sqrt(1 - alpha_bar_t), float64, shaped to broadcast over x.

        t = -1 stands for clean data (alpha 1, sigma 0): the end of every sampler.
        """
        t = torch.as_tensor(t).reshape(-1).long()
        _, alpha, sigma = self._on(t.device)
        shape = (-1,) + (1,) * (ndim - 1)
        return alpha[t].reshape(shape), sigma[t].reshape(shape)  # t = -1: the tables' last entry, clean data

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the network is told at t: the integer timestep itself (a flow schedule tells a scaled sigma)."""
        return t

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t x0 + sigma_t eps (DDPM eq. 4)."""
        alpha, sigma = self.alpha_sigma(t, x0.ndim)
        return (alpha * x0.double() + sigma * eps.double()).to(x0.dtype)
