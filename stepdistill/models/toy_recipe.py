"""The toy world's teachers, family by family: toy-size architectures and the training objectives the families' hooks
(FamilyModel.toy_*) hand to train.toy_teacher, which trains any family through those hooks alone.

Two objectives: Stable Diffusion's eps prediction on its DDPM schedule (sd15, sdxl), and the rectified flow of SD3 and
FLUX (v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps, sigma drawn logit-normal as SD3 trains, Esser et al. 2024).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core import flow
from ..errors import ConfigError

# The toy flow teachers' sampling shift. SD3 shifts by 3 at 1024 px (4096 latent tokens) and trained its 256 px stage
# (1024 tokens) unshifted (Esser et al. 2024, sec. 5.3.2: shift grows with resolution); the toy's 16x16 latents are 64
# tokens, so no shift. FLUX.1-schnell also samples with a static shift of 1 (no dynamic shifting).
TOY_FLOW_SHIFT = 1.0
# The T5 prompt length of the toy flow teachers (the pipeline's max_sequence_length): every toy caption fits (checked
# at training), and the joint attention does not spend its work on padding as at the pipelines' 256 / 512.
TOY_T5_LENGTH = 16

# The VAE every toy teacher shares (SDXL-, SD3- and FLUX-toy reuse SD1.5-toy's). It downsamples by 2 only
# (32x32x3 <-> 16x16x4): a downsampling-4 VAE (8x8x4 latents) blurred small shapes so much that the judge read only
# 12% of its reconstructions of real images right. It has no mid-block attention, so it is fully convolutional and
# can be trained on crops (train.toy_teacher.train_vae).
TOY_VAE = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8, "latent_channels": 4,
           "mid_block_add_attention": False}
# The flow pipelines decode latents / scaling_factor + shift_factor; the shared VAE has quant convs.
TOY_FLOW_VAE = {**TOY_VAE, "use_quant_conv": True, "use_post_quant_conv": True, "shift_factor": 0.0}
# Both UNets: three levels (16x16, 8x8, 4x4 latents) with attention only at 8x8 and 4x4, SDXL's own layout. On a
# CPU, attention over the 256 tokens of the 16x16 level cost two thirds of a training step (head dim 8), while the
# 8x8 level is fine enough for "left of" and "above"; the third level widens the receptive field cheaply.
TOY_UNET_LAYOUT = {
    "block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 16, "attention_head_dim": 8,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}

# SDXL's two CLIP encoders at toy size (SDXL-toy and SD3-toy): each one layer more than it needs, as both families read
# the penultimate layer.
TOY_CLIP_PAIR = {
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                     "projection_dim": 32},
    "text_encoder_2": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
                       "projection_dim": 32},
}

SAMPLINGS = ("uniform", "logit-normal")


# ---------------------------------------------------------------------------------------------------------
# eps prediction (DDPM families)


def denoising_loss(unet, schedule, x0, t, eps, encoder_hidden_states, added_cond_kwargs):
    """The eps-prediction loss E |eps_theta(x_t, t, c) - eps|^2 (DDPM eq. 14), x_t = alpha_t x0 + sigma_t eps."""
    x_t = schedule.add_noise(x0, eps, t)
    eps_hat = unet(x_t, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    return F.mse_loss(eps_hat, eps)


def ddpm_loss_fn(pipe, sampling: str | None, logit_normal: tuple[float, float] | None) -> Callable:
    """loss(x0, gen, hidden, added) of a DDPM family: t uniform over the training steps, then the noise (the order the
    shipped SD1.5/SDXL-toy teachers drew them in)."""
    from ..core.schedule import NoiseSchedule

    if sampling not in (None, "uniform") or logit_normal is not None:
        raise ConfigError(f"timestep sampling {sampling or 'logit-normal'!r} is for flow families: an eps-prediction "
                          "toy teacher draws t uniformly; drop the sampling options")
    schedule = NoiseSchedule.from_scheduler_config(pipe.scheduler.config)

    def loss(x0, gen, hidden, added):
        t = torch.randint(0, schedule.num_train_timesteps, (len(x0),), generator=gen)
        return denoising_loss(pipe.unet, schedule, x0, t, torch.randn(x0.shape, generator=gen), hidden, added)

    return loss


# ---------------------------------------------------------------------------------------------------------
# rectified flow (SD3, FLUX)


def logit_normal_sigmas(n: int, gen: torch.Generator, shift: float, mean: float = 0.0, std: float = 1.0):
    """sigma = shift(sigmoid(u)), u ~ N(mean, std): SD3's logit-normal timestep sampling (Esser et al. eq. 19),
    which spends the training on the middle of the path, then the scheduler's static shift (eq. 23)."""
    u = torch.sigmoid(mean + std * torch.randn(n, generator=gen, dtype=torch.float64))
    return flow.shift_sigma(u, shift)


def uniform_sigmas(n: int, gen: torch.Generator, shift: float):
    """sigma = shift(u), u ~ U(0, 1): plain rectified-flow sampling (Liu et al. 2022), the baseline SD3 improved on."""
    return flow.shift_sigma(torch.rand(n, generator=gen, dtype=torch.float64), shift)


def flow_loss(velocity_fn, x0, sigma, eps):
    """Rectified-flow loss |v_theta(x_t, sigma) - (eps - x0)|^2 at x_t = (1 - sigma) x0 + sigma eps; x_t in float32
    (the maths in float64). velocity_fn(x_t, sigma) is the family's transformer call."""
    x_t = flow.add_noise(x0, eps, flow.as_sigma(sigma)).float()
    return flow.flow_matching_loss(velocity_fn(x_t, sigma), x0, eps).mean()


def sampling_record(sampling: str | None, logit_normal: tuple[float, float] | None) -> str:
    """How a flow teacher draws sigma, as toy_teacher.json records it: logit-normal(0, 1) unless told otherwise."""
    sampling = sampling or "logit-normal"
    if sampling not in SAMPLINGS:
        raise ConfigError(f"timestep sampling {sampling!r} is not one of {list(SAMPLINGS)}")
    if sampling == "uniform":
        if logit_normal is not None:
            raise ConfigError("logit-normal mean/std were given with uniform timestep sampling: drop one of them")
        return "uniform"
    mean, std = logit_normal or (0.0, 1.0)
    if std <= 0:
        raise ConfigError(f"the logit-normal std must be positive, not {std}")
    return f"logit-normal({mean:g}, {std:g})"


def flow_loss_fn(pipe, velocity, sampling: str | None, logit_normal: tuple[float, float] | None) -> Callable:
    """loss(x0, gen, hidden, added) of a flow family: sigma (logit-normal or uniform, then the scheduler's shift),
    then the noise; velocity(net, x_t, sigma, hidden, added) is the family's transformer call."""
    kind = sampling_record(sampling, logit_normal)
    mean, std = logit_normal or (0.0, 1.0)
    shift = pipe.scheduler.config.shift
    net = pipe.transformer

    def loss(x0, gen, hidden, added):
        if kind == "uniform":
            sigma = uniform_sigmas(len(x0), gen, shift)
        else:
            sigma = logit_normal_sigmas(len(x0), gen, shift, mean, std)
        eps = torch.randn(x0.shape, generator=gen)
        return flow_loss(lambda x_t, s: velocity(net, x_t, s, hidden, added), x0, sigma, eps)

    return loss
