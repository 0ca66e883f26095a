"""The GAN term of DMD2 (arXiv 2405.14867 sec. 4.2): a small classifier on the fake score's intermediate features.

The fake score's network doubles as the discriminator's feature extractor: it runs on noisy latents (diffusion-GAN
style) up to the middle of the network and a conv head turns those features into one logit. The features are read
with forward hooks, so the network's own forward runs as it is, and the forward stops once they are read.

Where the features are read depends on the kind of network, not on the family (`feature_reader`): a UNet's mid block
(`UNetFeatures`), or a transformer's image tokens after its middle block, laid back on their latent grid
(`TokenFeatures`: SD3's MMDiT, FLUX's double- and single-stream blocks). tscd's discriminator reads several levels
through the same readers (`pyramid`), with one conv head per level (`FeatureHeads`, PCM's discriminator shape).

Two losses: DMD2's non-saturating logistic loss (`gan_*_loss`, one logit per sample) and PCM's hinge taken per
location of every head (`hinge_*_loss`, tscd's adversarial term).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class _FeaturesRead(Exception):
    """Raised by the last hook to stop the network once every feature it needs is read."""


def read_block_outputs(denoiser, x_t, t, cond, blocks, pick) -> list[torch.Tensor]:
    """pick(output) of each of `blocks` on (x_t, t, cond) under the denoiser's adapter, in order; the forward stops
    after the last one (the rest of the network is not needed), except on a sharded net (model.shard=fsdp2), which runs
    to its end: an exception out of FSDP2's forward leaves its root mid-forward (root parameters unsharded, the
    iteration state claiming a forward in flight), and its recovery, reset_iter_state(), reshards the blocks a
    gradient through the features still needs (the backward then fails on freed weights)."""
    feats = []
    stop = not _is_sharded(denoiser.unet)

    def keep(module, inputs, output):
        feats.append(pick(output))
        if stop and module is blocks[-1]:
            raise _FeaturesRead

    handles = [b.register_forward_hook(keep) for b in blocks]
    try:
        denoiser.raw(x_t, t, cond)
    except _FeaturesRead:
        return feats
    finally:
        for h in handles:
            h.remove()
    if len(feats) == len(blocks):
        return feats
    raise RuntimeError(f"the {type(denoiser.unet).__name__} returned without running the blocks the discriminator reads")


def _is_sharded(net) -> bool:
    """An FSDP2-sharded net (train/shard.py): its forward must run to its end."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(net, FSDPModule)


class UNetFeatures:
    """A UNet's features: its mid block's output (dmd's head); every down block's and the mid block's (tscd's heads)."""

    def __init__(self, unet):
        self.net = unet

    @staticmethod
    def _first(output):
        return output[0] if isinstance(output, tuple) else output

    def middle(self, denoiser, x_t, t, cond) -> torch.Tensor:
        return read_block_outputs(denoiser, x_t, t, cond, [self.net.mid_block], self._first)[0]

    def middle_shape(self, denoiser, latent_shape, cond) -> tuple[int, int]:
        return mid_block_shape(self.net, latent_shape)

    def head(self, denoiser, latent_shape, cond) -> nn.Module:
        """DMD2's classifier for `middle`'s features."""
        return MidBlockHead(*self.middle_shape(denoiser, latent_shape, cond))

    def pyramid(self, denoiser, x_t, t, cond) -> list[torch.Tensor]:
        return read_block_outputs(denoiser, x_t, t, cond, [*self.net.down_blocks, self.net.mid_block], self._first)

    def pyramid_channels(self) -> list[int]:
        channels = list(self.net.config.block_out_channels)
        return channels + [channels[-1]]


class TokenFeatures:
    """A transformer's features: the image tokens after a block, as a (B, D, h/p, w/p) map on the latent grid.

    The blocks are the network's in order (SD3: transformer_blocks; FLUX: the double-stream blocks, then the
    single-stream ones). The middle one is the GAN head's, as a UNet's mid block sits halfway through it; tscd's heads
    read up to PYRAMID_LEVELS blocks evenly spaced up to it (a UNet's down blocks and mid block)."""

    PYRAMID_LEVELS = 4

    def __init__(self, net):
        self.net = net
        self.blocks = [*net.transformer_blocks, *getattr(net, "single_transformer_blocks", [])]
        self.mid = (len(self.blocks) - 1) // 2
        n = min(self.PYRAMID_LEVELS, self.mid + 1)
        self.levels = sorted({(self.mid + 1) * (j + 1) // n - 1 for j in range(n)})

    def _read(self, denoiser, x_t, t, cond, blocks) -> list[torch.Tensor]:
        # The image token count is the first block's input length (after SD3's patch embedding or FLUX's packing).
        seen = {}

        def count(module, args, kwargs):
            seen["n"] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]).shape[1]

        def image_tokens(output):
            # Blocks return (text, image) tokens; FLUX's single-stream blocks of older diffusers one [text; image] tensor.
            return output[-1] if isinstance(output, tuple) else output[:, -seen["n"]:]

        handle = self.blocks[0].register_forward_pre_hook(count, with_kwargs=True)
        try:
            tokens = read_block_outputs(denoiser, x_t, t, cond, blocks, image_tokens)
        finally:
            handle.remove()
        return [tokens_to_map(x, x_t.shape[-2:]) for x in tokens]

    def middle(self, denoiser, x_t, t, cond) -> torch.Tensor:
        return self._read(denoiser, x_t, t, cond, [self.blocks[self.mid]])[0]

    @torch.no_grad()
    def middle_shape(self, denoiser, latent_shape, cond) -> tuple[int, int]:
        """(channels, side) of `middle`, read off one forward on a zero latent (the token grid depends on the patching)."""
        device = next(self.net.parameters()).device
        x = torch.zeros((1, *latent_shape), device=device)
        features = self.middle(denoiser, x, torch.zeros(1, dtype=torch.long, device=device), cond.index([0]))
        return features.shape[1], features.shape[-1]

    def head(self, denoiser, latent_shape, cond) -> nn.Module:
        """DMD2's classifier for `middle`'s features, after a projection to a narrower width."""
        return TokenHead(*self.middle_shape(denoiser, latent_shape, cond))

    def pyramid(self, denoiser, x_t, t, cond) -> list[torch.Tensor]:
        return self._read(denoiser, x_t, t, cond, [self.blocks[i] for i in self.levels])

    def pyramid_channels(self) -> list[int]:
        return [self.net.inner_dim] * len(self.levels)


def tokens_to_map(tokens: torch.Tensor, latent_hw) -> torch.Tensor:
    """(B, N, D) row-major image tokens of an (h, w) latent -> (B, D, h/p, w/p), p the tokens' patch side."""
    b, n, d = tokens.shape
    h, w = latent_hw
    p = math.isqrt(h * w // n)
    if p * p * n != h * w:
        raise RuntimeError(f"{n} image tokens do not tile a {h}x{w} latent with square patches")
    return tokens.transpose(1, 2).reshape(b, d, h // p, w // p)


def feature_reader(net) -> UNetFeatures | TokenFeatures:
    """Where a discriminator reads `net`: a UNet's mid block, or a transformer's blocks; by what the network has."""
    if hasattr(net, "mid_block") and hasattr(net, "down_blocks"):
        return UNetFeatures(net)
    if hasattr(net, "transformer_blocks"):
        return TokenFeatures(net)
    raise ValueError(f"the discriminator cannot read a {type(net).__name__}: it reads a UNet's mid block or a "
                     "transformer's blocks; turn the GAN term off (method.gan=false, method.adv_weight=[])")


def mid_block_features(denoiser, x_t, t, cond) -> torch.Tensor:
    """The output of `denoiser.unet.mid_block` on (x_t, t, cond), with the denoiser's adapter active."""
    return UNetFeatures(denoiser.unet).middle(denoiser, x_t, t, cond)


def mid_block_shape(unet, latent_shape) -> tuple[int, int]:
    """(channels, side) of the mid block's output for latents of shape (C, h, w): every down block but the last halves."""
    channels = unet.config.block_out_channels
    return channels[-1], latent_shape[-1] // 2 ** (len(channels) - 1)


# Channels per GroupNorm group in a discriminator head, at least. A head's last norm sees a 1x1 map (DMD2's head
# always; tscd's deepest head at small resolutions), where a group holds only its channels' values. With two, each
# normalises to about +-1, the sign of their difference, which the features' shared pattern fixes whatever the sample:
# the logit barely depends on the input, no gradient passes, and the discriminator sits at chance. Measured on the toy
# teacher's 64-channel mid block (real toy latents against the one-step student's, 300 Adam steps): logistic D loss
# 1.34 (2 ln 2 = 1.39) with two channels a group, 0.63 with eight (docs/dmd.md, "The GAN head").
MIN_GROUP_CHANNELS = 8


def head_norm(channels: int) -> nn.GroupNorm:
    """DMD2's 32 groups where the width allows it (40 channels a group on SD's 1280), fewer on a narrow head so that
    every group keeps MIN_GROUP_CHANNELS channels."""
    return nn.GroupNorm(math.gcd(32, max(channels // MIN_GROUP_CHANNELS, 1)), channels)


class MidBlockHead(nn.Module):
    """Bottleneck features -> one logit: [Conv 4x4 stride 2, GroupNorm, SiLU] down to 4x4, a conv over the rest, 1x1.

    The same shape of head as DMD2's classifier branch (about 52 M parameters on SD1.5's 8x8 bottleneck and
    105 M on SDXL's 32x32 one).
    """

    def __init__(self, channels: int, side: int):
        super().__init__()
        layers = []
        while side > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), head_norm(channels), nn.SiLU()]
            side //= 2
        layers += [nn.Conv2d(channels, channels, side), head_norm(channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features.float()).flatten(1).mean(1)


# A transformer's token width is 1536 (SD3.5 Medium) to 3072 (FLUX.1) at a 64x64 grid: MidBlockHead at that width
# would be 0.2 to 0.8 B parameters, so a 1x1 conv first projects the tokens to at most this many channels.
TOKEN_HEAD_WIDTH = 256


class TokenHead(nn.Module):
    """Token map (B, D, s, s) -> one logit: a 1x1 conv to min(D, TOKEN_HEAD_WIDTH) channels, then MidBlockHead.

    5.6 M parameters on SD3.5 Medium's 64x64 grid of 1536-wide tokens at 1024 px, 6.0 M on FLUX.1's 3072-wide ones."""

    def __init__(self, channels: int, side: int):
        super().__init__()
        width = min(channels, TOKEN_HEAD_WIDTH)
        self.project = nn.Conv2d(channels, width, 1)
        self.head = MidBlockHead(width, side)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(features.float()))


def gan_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating logistic D loss (Goodfellow et al. 2014): softplus(D(fake)) + softplus(-D(real)), per fake sample."""
    return F.softplus(logits_fake) + F.softplus(-logits_real).mean()


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: softplus(-D(G(z))) per sample."""
    return F.softplus(-logits_fake)


def _per_sample(maps) -> torch.Tensor:
    """Mean over every location of every head: a list of [B, L] maps (or one [B] / [B, L] tensor) -> [B]."""
    maps = [maps] if torch.is_tensor(maps) else list(maps)
    return torch.stack([m.reshape(m.shape[0], -1).mean(1) for m in maps]).mean(0)


def hinge_discriminator_loss(logits_real, logits_fake):
    """relu(1 - D(real)) + relu(1 + D(fake)) at each location of each head, then averaged per sample (Lim & Ye 2017;
    PCM's discriminator: the hinge is taken per location, so one confident location cannot cancel a wrong one)."""
    real = [logits_real] if torch.is_tensor(logits_real) else logits_real
    fake = [logits_fake] if torch.is_tensor(logits_fake) else logits_fake
    return _per_sample([torch.relu(1 - r) + torch.relu(1 + f) for r, f in zip(real, fake, strict=True)])


def hinge_generator_loss(logits_fake):
    """relu(1 - D(fake)) at each location of each head, averaged per sample (PCM's generator side of the hinge)."""
    fake = [logits_fake] if torch.is_tensor(logits_fake) else logits_fake
    return _per_sample([torch.relu(1 - f) for f in fake])


# ---- tscd's discriminator: heads on the frozen teacher's features -----------------------------------------------

def teacher_features(denoiser, x_t, t, cond) -> list[torch.Tensor]:
    """The discriminator's feature maps of `denoiser.unet` on (x_t, t, cond) under its adapter: a UNet's down blocks
    and mid block, or a transformer's image tokens after blocks evenly spaced up to its middle (methods.gan)."""
    return feature_reader(denoiser.unet).pyramid(denoiser, x_t, t, cond)


def feature_channels(unet) -> list[int]:
    """Channels of teacher_features."""
    return feature_reader(unet).pyramid_channels()


class FeatureHeads(nn.Module):
    """One small conv head per feature map (PCM's discriminator shape): conv 3x3, GroupNorm, SiLU, conv 1x1 -> a logit
    at every location. The hinge losses take each location of each head on its own (PCM), not their average."""

    def __init__(self, channels: list[int], width: int = 64):
        super().__init__()
        # head_norm keeps MIN_GROUP_CHANNELS channels a group: at 64 px the deepest full-size map is 1x1 (methods.gan).
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, width, 3, padding=1), head_norm(width), nn.SiLU(), nn.Conv2d(width, 1, 1))
            for c in channels
        )

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per head, the logits [B, h*w] of its feature map's locations."""
        return [head(f.float()).flatten(1) for head, f in zip(self.heads, feats, strict=True)]
