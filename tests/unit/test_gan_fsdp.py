"""GAN features read from a sharded net (model.shard=fsdp2): the read must not leave FSDP2's root mid-forward, and a
gradient through the features (dmd's generator GAN loss) must still flow. One process (gloo, world 1) is enough to see
FSDP2's state; tests/tiny/test_shard.py runs two."""

from __future__ import annotations

import pytest
import torch

from stepdistill.core.denoiser import Denoiser
from stepdistill.core.schedule import NoiseSchedule
from stepdistill.methods.gan import mid_block_features
from stepdistill.models.tiny import tiny_configs

torch.set_num_threads(1)


@pytest.fixture
def sharded_unet(tmp_path):
    import torch.distributed as dist
    from diffusers import UNet2DConditionModel
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    pytest.importorskip("torch.distributed.fsdp")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**tiny_configs("sd15")["unet"]).requires_grad_(False)
        mesh = init_device_mesh("cpu", (1,))
        for unit in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
            fully_shard(unit, mesh=mesh)
        fully_shard(unet, mesh=mesh)
        yield unet
    finally:
        dist.destroy_process_group()


def test_two_feature_reads_leave_the_sharded_root_idle(sharded_unet):
    from stepdistill.core.denoiser import Cond

    unet = sharded_unet
    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000})
    den = Denoiser(unet, schedule)
    size = unet.config.sample_size
    cond = Cond(torch.randn(2, 4, unet.config.cross_attention_dim))
    state = unet._get_fsdp_state()
    x = torch.randn(2, unet.config.in_channels, size, size)
    for _ in range(2):  # two consecutive reads with a gradient through them, as two GAN generator updates make
        x_in = x.clone().requires_grad_(True)
        feats = mid_block_features(den, x_in, torch.tensor([10, 500]), cond)
        assert feats.ndim == 4 and torch.isfinite(feats).all()
        (grad,) = torch.autograd.grad(feats.square().sum(), x_in)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # FSDP2's root finished its iteration: nothing claims a forward in flight, its own parameters are resharded.
        assert state._state_ctx.iter_forward_root is None
        group = state._fsdp_param_group
        assert group is None or not group.is_unsharded
    # ... and a whole forward afterwards still runs.
    assert torch.isfinite(den.raw(x, torch.tensor([10, 500]), cond)).all()
