"""The GAN term of DMD2 (arXiv 2405.14867 sec. 4.2): a small classifier on the fake score's mid-block features.

The fake score's UNet doubles as the discriminator's feature extractor: its encoder and mid block run on noisy
latents (diffusion-GAN style) and a conv head turns the bottleneck into one logit. The features are read with a
forward hook on `unet.mid_block`, so the UNet's own forward is used as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _MidBlockReached(Exception):
    """Raised by the hook to stop the UNet after its mid block: the up blocks are not needed for the logit."""

    def __init__(self, features):
        super().__init__()
        self.features = features


def mid_block_features(denoiser, x_t, t, cond) -> torch.Tensor:
    """The output of `denoiser.unet.mid_block` on (x_t, t, cond), with the denoiser's adapter active."""

    def stop(module, inputs, output):
        raise _MidBlockReached(output)

    handle = denoiser.unet.mid_block.register_forward_hook(stop)
    try:
        denoiser.raw(x_t, t, cond)
    except _MidBlockReached as reached:
        return reached.features
    finally:
        handle.remove()
    raise RuntimeError("the UNet returned without running its mid_block: the GAN head needs a UNet with a mid block")


def mid_block_shape(unet, latent_shape) -> tuple[int, int]:
    """(channels, side) of the mid block's output for latents of shape (C, h, w): every down block but the last halves."""
    channels = unet.config.block_out_channels
    return channels[-1], latent_shape[-1] // 2 ** (len(channels) - 1)


class MidBlockHead(nn.Module):
    """Bottleneck features -> one logit: [Conv 4x4 stride 2, GroupNorm, SiLU] down to 4x4, a conv over the rest, 1x1.

    The same shape of head as DMD2's classifier branch (about 52 M parameters on SD1.5's 8x8 bottleneck and
    105 M on SDXL's 32x32 one).
    """

    def __init__(self, channels: int, side: int):
        super().__init__()
        groups = math.gcd(32, channels)
        layers = []
        while side > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels), nn.SiLU()]
            side //= 2
        layers += [nn.Conv2d(channels, channels, side), nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic D loss (Goodfellow et al. 2014): softplus(D(fake)) + softplus(-D(real)), per fake sample."""
    return F.softplus(logits_fake) + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: softplus(-D(G(z))) per sample."""
    return F.softplus(-logits_fake)
