"""Atomic, resumable checkpoints: DIR/checkpoints/step-NNNNNN/ is either complete or absent.

A checkpoint is written to a temporary sibling folder, marked complete last, then renamed into place, so a
kill at any moment leaves the previous checkpoint intact. Loading walks back from the newest checkpoint and
skips (with a warning) any that is partial or unreadable.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .faults import maybe_kill

log = logging.getLogger(__name__)

COMPLETE = "complete.json"


class CheckpointMismatch(RuntimeError):
    """A complete checkpoint that this run cannot continue (e.g. another number of processes)."""


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(root, step: int, shared: dict, per_rank: dict, rank: int, world: int, barrier, keep_last: int):
    """Write `shared` (rank 0) and every rank's `per_rank` state; publish atomically; rotate old checkpoints."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".tmp-step-{step:06d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(per_rank, tmp / f"rank-{rank:03d}.pt")
    barrier()
    if rank == 0:
        torch.save(shared, tmp / "state.pt")
        (tmp / COMPLETE).write_text(json.dumps({"step": step, "world_size": world}))
        _fsync_dir(tmp)
        maybe_kill("checkpoint", step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _rotate(root, keep_last)
    barrier()
    return final


def _rotate(root: Path, keep_last: int) -> None:
    # Only complete checkpoints count, so rotation can never remove the last good one.
    complete = [d for d in list_checkpoints(root) if (d / COMPLETE).is_file()]
    for d in complete[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def list_checkpoints(root) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("step-"))


def load_latest(root, rank: int, world: int, map_location="cpu"):
    """(shared, per_rank, path) of the newest complete, readable checkpoint, or None."""
    for d in reversed(list_checkpoints(root)):
        try:
            meta = json.loads((d / COMPLETE).read_text())
            if meta.get("world_size", 1) != world:
                raise CheckpointMismatch(
                    f"{d} was written by {meta.get('world_size')} processes and this run has {world}; "
                    "resume with the same number of processes"
                )
            shared = torch.load(d / "state.pt", map_location=map_location, weights_only=False)
            per_rank = torch.load(d / f"rank-{rank:03d}.pt", map_location=map_location, weights_only=False)
            return shared, per_rank, d
        except CheckpointMismatch:
            raise
        except (RuntimeError, OSError, EOFError, ValueError, KeyError, json.JSONDecodeError) as e:
            log.warning("checkpoint %s is partial or corrupt (%s); trying the previous one", d, type(e).__name__)
    return None
