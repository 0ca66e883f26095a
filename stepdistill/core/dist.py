"""The process group: its facts (world, rank, device) and the few collectives training needs.

One helper for the whole package: the loop averages gradients and logs with it, and methods that must take the
same decision on every process (DisBack's adaptive switch) average through it too. In a single process every
collective is a no-op.
"""

from __future__ import annotations

import os

import torch


class Dist:
    """World size, rank and device of this process, with barrier / all_mean_ / mean_logs / any."""

    def __init__(self, world: int = 1, rank: int = 0, device: torch.device | str = "cpu"):
        self.world, self.rank, self.device = world, rank, torch.device(device)

    @classmethod
    def from_env(cls) -> Dist:
        """The process group a launcher (torchrun, accelerate launch) describes in RANK / WORLD_SIZE / LOCAL_RANK,
        initialised on first use (nccl on GPUs, gloo on the CPU); a single process without them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        if world > 1 and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            if device.type == "cuda":
                torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend)
        return cls(world, rank, device)

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()

    def all_mean_(self, tensor):
        """Average `tensor` over processes, in place."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
            tensor /= self.world
        return tensor

    def all_sum_(self, tensor):
        """Sum `tensor` over processes, in place (e.g. disjoint shares of one result, zeros elsewhere)."""
        if self.world > 1:
            torch.distributed.all_reduce(tensor)
        return tensor

    def mean(self, value: float) -> float:
        """A scalar averaged over processes (float64), so that every process takes the same decision from it."""
        if self.world == 1:
            return value
        return float(self.all_mean_(torch.tensor([value], dtype=torch.float64, device=self.device)).item())

    def mean_logs(self, logs: dict) -> dict:
        """Average scalar logs over processes, so log.jsonl describes the global batch, not rank 0's share."""
        if self.world == 1 or not logs:
            return logs
        keys = sorted(logs)
        values = self.all_mean_(torch.tensor([float(logs[k]) for k in keys], dtype=torch.float64, device=self.device))
        return dict(zip(keys, values.tolist()))

    def any(self, flag: bool) -> bool:
        """True on every process when `flag` is true on any."""
        if self.world == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t)
        return bool(t.item() > 0)
