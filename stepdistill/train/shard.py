"""model.shard=fsdp2: the frozen base sharded over the processes with FSDP2, the LoRA adapters left whole.

Each of the family's blocks (`FamilyModel.shard_units`) and then the root get `fully_shard`: every process keeps
1/world of each frozen base tensor (a DTensor sharded on dim 0); a block's full weights are all-gathered just before
it runs (teacher, student, fake-score passes alike, and again in backward) and freed after it.

The LoRA tensors of every adapter are `ignored_params`: FSDP neither shards nor reduces them, so they stay plain
tensors on every process. Their gradients are then averaged exactly once, by the loop's own all-reduce
(loop.sync_gradients), as without sharding; the optimizer, gradient clipping, checkpoints (full tensors, same
format) and exports are unchanged, and adapter switching (peft's per-layer active adapter) only toggles flags on
layers whose base weight FSDP gathers on entry. Sharding the adapters, their gradients and AdamW moments too (about
6 GB on every process at FLUX.1-dev r64 by docs/memory.md sec. 7's estimate) would cost DTensor checkpoints and
optimizer states: not done.
"""

from __future__ import annotations

import logging

import torch

from ..config import ConfigError
from ..core.dist import Dist

log = logging.getLogger(__name__)


def is_lora(name: str) -> bool:
    return "lora_" in name


def require_processes(world: int) -> None:
    """Refuse a single process: there is nothing to split the base with, and silently ignoring the setting would not do."""
    if world == 1:
        raise ConfigError("model.shard=fsdp2 needs several processes (it splits the base between them) and this run has "
                          "one: launch with torchrun --nproc_per_node N (or accelerate launch), or set model.shard=none")


def shard_base(net: torch.nn.Module, units: list[torch.nn.Module], dist: Dist) -> None:
    """fully_shard each of `units` (blocks of `net`), then `net` itself; every LoRA tensor is left out."""
    require_processes(dist.world)
    if not units:
        raise ConfigError(f"model.shard=fsdp2: the {type(net).__name__} lists no blocks to shard (FamilyModel.shard_units)")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(dist.device.type, (dist.world,))
    lora = {p for n, p in net.named_parameters() if is_lora(n)}
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=lora)
    fully_shard(net, mesh=mesh, ignored_params=lora)
    held, whole = base_size(net)
    log.info("model.shard=fsdp2: rank %d of %d holds %d of %d frozen base parameters (%.2f of %.2f MiB)",
             dist.rank, dist.world, held[0], whole[0], held[1] / 2**20, whole[1] / 2**20)


def move_unsharded(family, device: torch.device) -> None:
    """Put on `device` what shard_base left where the family was loaded: the LoRA tensors (fully_shard moves only
    the tensors it manages to its mesh's device), the VAE and the text encoders."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        for t in (*family.unet.parameters(), *family.unet.buffers()):
            if not isinstance(t, DTensor) and t.device != device:
                t.data = t.data.to(device)
    family.vae.to(device)
    for encoder in family.text_encoders:
        encoder.to(device)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This process's part of `p`: the local shard of a DTensor, `p` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return p.to_local() if isinstance(p, DTensor) else p


def base_size(net: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """((elements, bytes) of the frozen base held by this process, (elements, bytes) of the whole base)."""
    held, whole = [0, 0], [0, 0]
    for n, p in net.named_parameters():
        if not is_lora(n):
            local = local_tensor(p)
            held[0], held[1] = held[0] + local.numel(), held[1] + local.numel() * local.element_size()
            whole[0], whole[1] = whole[0] + p.numel(), whole[1] + p.numel() * p.element_size()
    return tuple(held), tuple(whole)


def is_sharded(net: torch.nn.Module) -> bool:
    """True when `net` went through shard_base: its forward is then a collective every process must run."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(net, FSDPModule)
