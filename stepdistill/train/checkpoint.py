"""Atomic, resumable checkpoints: DIR/checkpoints/step-NNNNNN/ is either complete or absent.

A checkpoint is written to a temporary sibling folder, marked complete last (complete.json, with the size and
sha256 of every file), then renamed into place, so a kill at any moment leaves the previous checkpoint intact.
Loading walks back from the newest checkpoint and skips, with a warning, any that is partial, truncated or
altered since it was written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import TrainingError
from .faults import maybe_kill

log = logging.getLogger(__name__)

COMPLETE = "complete.json"
TMP_PREFIX = ".tmp-step-"
_STEP_DIR = re.compile(r"step-(\d+)")


class CheckpointMismatch(TrainingError):
    """A complete checkpoint that this run cannot continue (e.g. another number of processes)."""


class CorruptCheckpoint(RuntimeError):
    """A checkpoint whose files do not match what complete.json recorded."""


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


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if fsync:  # on disk before complete.json says so (a power cut, unlike a kill, loses the page cache)
            os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _manifest(folder: Path) -> dict:
    """{file name: {"bytes", "sha256"}} of every file written so far, flushed to disk and read back."""
    return {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p, fsync=True)}
            for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE}


def save_checkpoint(root, step: int, shared: dict, per_rank: dict, rank: int, world: int, barrier, keep_last: int):
    """Write `shared` (rank 0) and every rank's `per_rank` state; publish atomically; rotate old checkpoints.

    On a write error (e.g. a full disk) rank 0 removes the half-written temp folder and re-raises; the previous
    checkpoints are untouched.
    """
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{TMP_PREFIX}{step:06d}"
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        torch.save(per_rank, tmp / f"rank-{rank:03d}.pt")
        barrier()
        if rank == 0:
            maybe_kill("checkpoint-write", step)
            torch.save(shared, tmp / "state.pt")
            meta = {"step": step, "world_size": world, "files": _manifest(tmp)}
            (tmp / COMPLETE).write_text(json.dumps(meta, indent=1))
            _fsync_dir(tmp)
            maybe_kill("checkpoint", step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
            _rotate(root, keep_last, final)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()
    return final


def _rotate(root: Path, keep_last: int, current: Path) -> None:
    """Keep `current` (just written and read back, so good) and the keep_last - 1 newest complete ones before it.

    Checkpoints newer than `current` (left by a timeline this run resumed away from, e.g. past a corrupt one) are
    neither counted nor deleted: reaching their step again overwrites them. Stale temp folders of killed writes go.
    """
    older = [d for d in list_checkpoints(root) if _step_of(d) < _step_of(current) and (d / COMPLETE).is_file()]
    for d in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(d, ignore_errors=True)
    for d in root.glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(d, ignore_errors=True)


def _step_of(d: Path) -> int:
    return int(_STEP_DIR.fullmatch(d.name).group(1))


def list_checkpoints(root) -> list[Path]:
    """step-N folders, oldest first (by step number, so step-1000000 sorts after step-999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if d.is_dir() and _STEP_DIR.fullmatch(d.name)), key=_step_of)


def verify(d: Path, world: int) -> dict:
    """complete.json of checkpoint `d` after checking every file against it; raises if anything is off."""
    meta = json.loads((d / COMPLETE).read_text())
    if meta.get("world_size", 1) != world:
        raise CheckpointMismatch(
            f"{d} was written by {meta.get('world_size')} processes and this run has {world}; "
            "resume with the same number of processes"
        )
    if meta.get("step") != _step_of(d):
        raise CorruptCheckpoint(f"complete.json says step {meta.get('step')}")
    # Every process checks every file, so all of them settle on the same checkpoint.
    for name, want in meta.get("files", {}).items():
        path = d / name
        if not path.is_file():
            raise CorruptCheckpoint(f"{name} is missing")
        if path.stat().st_size != want["bytes"]:
            raise CorruptCheckpoint(f"{name} has {path.stat().st_size} bytes, {want['bytes']} were written")
        if _sha256(path) != want["sha256"]:
            raise CorruptCheckpoint(f"{name} changed since it was written (sha256 differs)")
    return meta


def load_latest(root, rank: int, world: int, map_location="cpu"):
    """(shared, per_rank, path) of the newest complete, intact, readable checkpoint, or None."""
    for d in reversed(list_checkpoints(root)):
        try:
            verify(d, world)
            shared = torch.load(d / "state.pt", map_location=map_location, weights_only=False)
            per_rank = torch.load(d / f"rank-{rank:03d}.pt", map_location=map_location, weights_only=False)
            return shared, per_rank, d
        except CheckpointMismatch:
            raise
        except FileNotFoundError as e:
            reason = f"{Path(e.filename).name if e.filename else 'a file'} is missing"
            log.warning("checkpoint %s is partial (%s); trying the previous one", d, reason)
        except Exception as e:  # noqa: BLE001
            # Unpickling a damaged file can raise nearly anything (checkpoints from before complete.json listed
            # its files have no sha256 to catch it first); all of it means "not this one".
            log.warning("checkpoint %s is partial or corrupt (%s: %s); trying the previous one", d,
                        type(e).__name__, str(e)[:200])
    return None
