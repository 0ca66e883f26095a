"""The discriminator heads' GroupNorm: every group keeps enough channels for the logit to depend on the features."""

import pytest
import torch

from stepdistill.methods import gan
from stepdistill.methods.gan import (
    MIN_GROUP_CHANNELS,
    FeatureHeads,
    MidBlockHead,
    TokenHead,
    gan_discriminator_loss,
    head_norm,
)


@pytest.mark.parametrize(("channels", "groups"), [(1280, 32), (256, 32), (64, 8), (32, 4), (4, 1)])
def test_head_norm_keeps_dmd2_groups_where_wide_and_enough_channels_a_group_where_narrow(channels, groups):
    norm = head_norm(channels)
    assert norm.num_groups == groups and channels // groups >= min(MIN_GROUP_CHANNELS, channels)


def test_every_head_norm_has_enough_channels_a_group():
    heads = [MidBlockHead(64, 4), MidBlockHead(1280, 8), TokenHead(32, 4), FeatureHeads([32, 64, 64, 64], 64)]
    norms = [m for h in heads for m in h.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(n.num_channels // n.num_groups >= MIN_GROUP_CHANNELS for n in norms)


def _separation_loss() -> float:
    """Logistic D loss after 150 Adam steps on 1x1-bottleneck features that share a strong pattern (as a UNet's mid
    block does across samples) and differ between real and fake by a small shift."""
    g = torch.Generator().manual_seed(0)
    shared, shift = 4.0 * torch.randn(64, 4, 4, generator=g), 0.5 * torch.randn(64, 4, 4, generator=g)
    torch.manual_seed(0)
    head = MidBlockHead(64, 4)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    for _ in range(150):
        noise = torch.randn(2, 32, 64, 4, 4, generator=g)
        loss = gan_discriminator_loss(head(shared + noise[0]), head(shared + shift + noise[1])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_mid_block_head_learns_on_a_1x1_map(monkeypatch):
    """The toy world's defect: with two channels a group (DMD2's 32 groups on a 64-channel bottleneck) the last norm
    outputs the sign of each pair, fixed by the shared pattern, so the head stayed at chance (2 ln 2)."""
    assert _separation_loss() < 0.1
    monkeypatch.setattr(gan, "MIN_GROUP_CHANNELS", 2)
    assert _separation_loss() == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-3)
