"""A run folder belongs to one run: a lock while it trains, and a reused folder checked before anything is written.

- `RunLock`: DIR/run.lock holds the holder's pid and host. A second run on the same folder refuses in one line; a
  lock whose pid is dead on this host (a SIGKILLed run) is taken over with a warning.
- `check_reuse`: a folder that already holds checkpoints or a final export was trained with some method, family,
  adapter shapes and base model. A config that differs in any of them cannot resume there (the checkpoint's tensors
  would not fit), so it is refused naming the setting, before resolved_config.yaml or anything else is rewritten.
- `trim_log`: log.jsonl after a resume holds each step once (records past the resumed step are dropped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path

import yaml

from ..config import Config
from ..errors import ConfigError
from ..resources import assets_dir

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
CONFIG_FILE = "resolved_config.yaml"
RUN_FILE = "run.json"  # the base model's fingerprint, recorded beside the config (which must stay a loadable config)
LOG_FILE = "log.jsonl"
ERROR_LOG = "error.log"

# What a resumed run must share with the run that wrote the folder: the checkpoint's tensors and the method's state
# are shaped by these. Other keys (lr, max_steps, seed, ...) may change on a rerun: the new value is recorded.
REUSE_KEYS = ("method.name", "model.family", "lora.rank", "lora.critic_rank", "lora.targets")


class RunFolderError(ConfigError):
    """The run folder cannot be used by this run (busy, or trained with another config); the message says what to do."""


# ---- the lock ---------------------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    # A killed process its parent has not reaped yet (a zombie) still answers kill(0): ask /proc where there is one.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


class RunLock:
    """An exclusive claim on a run folder, created atomically (O_EXCL) and removed by release()."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):  # a stale lock is removed, then claimed again (another run may claim it first)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse(me)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise RunFolderError(f"could not claim {self.path}: another run keeps claiming it; pass another --output-dir")

    def _take_over_or_refuse(self, me: dict) -> None:
        holder = _read_json(self.path)
        folder = self.path.parent
        if holder is None:
            # Empty or garbled: a holder between O_EXCL and its write, or a crash in that instant. Only the latter
            # lasts: give it a few seconds before calling it stale.
            if time.time() - _mtime(self.path) < 10:
                raise RunFolderError(f"{folder} is being claimed by another run right now: wait for it to finish, or "
                                     "pass another --output-dir")
            log.warning("%s is unreadable and old: taking the run folder over", self.path)
        elif holder.get("host") != me["host"]:
            raise RunFolderError(
                f"{folder} is in use by a run on host {holder.get('host')} (pid {holder.get('pid')}, since "
                f"{holder.get('since')}): wait for it, pass another --output-dir, or delete {self.path} if that run "
                "is gone")
        elif holder.get("pid") == me["pid"]:
            pass  # an earlier Trainer of this very process that was never closed: nothing runs there any more
        elif _alive(int(holder.get("pid", -1))):
            raise RunFolderError(
                f"{folder} is in use by another run (pid {holder.get('pid')} on this host, since {holder.get('since')}): "
                "wait for it to finish, or pass another --output-dir")
        else:
            log.warning("run folder %s was locked by pid %s, which is no longer running (killed?): taking it over",
                        folder, holder.get("pid"))
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def release(self) -> None:
        if self.held:
            holder = _read_json(self.path)
            if holder is not None and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


# ---- the base model's name and fingerprint ------------------------------------------------------------------------

def base_reference(path: str) -> str:
    """How recipes and cards name the base: the shipped toy asset by name (`assets/toy/sd15`, found from any
    folder), an absolute path for another local folder, else the hub id as given."""
    given = Path(path)
    if not given.exists():
        return str(path)
    resolved = given.resolve()
    shipped = assets_dir().resolve()
    if resolved.is_relative_to(shipped):
        return "assets/" + resolved.relative_to(shipped).as_posix()
    return str(resolved)


def base_fingerprint(path: str) -> str:
    """A local base's identity, cheap to compute: sha256 of model_index.json, every component's config.json, and of
    every weight file its size, first and last MiB (a safetensors header lists every tensor; retrained or re-initialised
    weights differ there). For a hub id, the id itself."""
    folder = Path(path)
    if not folder.is_dir():
        return f"hub:{path}"
    h = hashlib.sha256()
    files = [folder / "model_index.json", *folder.glob("*/config.json"), *folder.glob("*/*.safetensors"),
             *folder.glob("*/*.bin")]
    for f in sorted(p for p in files if p.is_file()):
        h.update(f.relative_to(folder).as_posix().encode())
        if f.suffix == ".json":
            h.update(f.read_bytes())
            continue
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE))
            fh.seek(max(0, size - _SAMPLE))
            h.update(fh.read(_SAMPLE))
    return h.hexdigest()


_SAMPLE = 1 << 20


# ---- a reused folder ----------------------------------------------------------------------------------------------

def _get(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def holds_a_run(run_dir: Path) -> bool:
    """True when the folder holds what a resume would build on: a checkpoint or a final export."""
    ckpts = run_dir / "checkpoints"
    has_ckpt = ckpts.is_dir() and any(d.name.startswith("step-") for d in ckpts.iterdir())
    return has_ckpt or (run_dir / "final").is_dir()


def check_reuse(cfg: Config, run_dir) -> None:
    """Refuse, in one line, a config that cannot continue the run already in `run_dir`; write nothing."""
    run_dir = Path(run_dir)
    recorded_file = run_dir / CONFIG_FILE
    if not recorded_file.is_file() or not holds_a_run(run_dir):
        return
    try:
        recorded = yaml.safe_load(recorded_file.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RunFolderError(f"{recorded_file} is damaged ({type(e).__name__}), so this folder's run cannot be checked: "
                             "pass another --output-dir") from None
    new = cfg.to_dict()
    for key in REUSE_KEYS:
        old, now = _get(recorded, key), _get(new, key)
        if key == "model.family" and "auto" in (old, now):
            continue  # detected from the base, whose fingerprint is checked below
        if old is not None and old != now:
            raise RunFolderError(
                f"{run_dir} holds a run trained with {key}={old}, and this config has {key}={now}: pass another "
                f"--output-dir for a new run, or --set {key}={old} to resume that one")
    _warn_if_schedule_moves(recorded, new)
    run_info = _read_json(run_dir / RUN_FILE) or {}
    old_print = run_info.get("base_fingerprint")
    if old_print and old_print != base_fingerprint(cfg.model.path):
        raise RunFolderError(
            f"{run_dir} holds a run trained on another base model ({run_info.get('base_model')}) than model.path="
            f"{cfg.model.path}: pass another --output-dir for a new run, or --set model.path="
            f"{run_info.get('base_model')} to resume that one")


def _warn_if_schedule_moves(recorded: dict, new: dict) -> None:
    """A cosine rate anneals to loop.max_steps, so a rerun with another length continues on a different curve."""
    old_steps, steps = _get(recorded, "loop.max_steps"), _get(new, "loop.max_steps")
    if _get(new, "optim.lr_schedule") == "cosine" and old_steps is not None and old_steps != steps:
        log.warning("optim.lr_schedule=cosine: this run was started with loop.max_steps=%s and now anneals to %s, so "
                    "from the latest checkpoint on it is not the run a %s-step run would have been", old_steps, steps,
                    steps)


def record_run(cfg: Config, run_dir) -> None:
    """resolved_config.yaml and run.json, written once the folder is claimed and checked."""
    from ..config import dump_config
    from ..core.io import atomic_write_text

    run_dir = Path(run_dir)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    info = {"base_model": base_reference(cfg.model.path), "base_fingerprint": base_fingerprint(cfg.model.path)}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=1) + "\n")


# ---- log.jsonl ---------------------------------------------------------------------------------------------------

def trim_log(run_dir, step: int) -> int:
    """Drop log.jsonl records past `step` (written after the checkpoint a resume starts from); returns how many."""
    from ..core.io import atomic_write_text

    path = Path(run_dir) / LOG_FILE
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            dropped += 1  # half a line from a kill mid-write
            continue
        if isinstance(record_step, int) and record_step > step:
            dropped += 1
        else:
            keep.append(line)
    if dropped:
        atomic_write_text(path, "".join(line + "\n" for line in keep))
    return dropped


def timestamp() -> str:
    """UTC wall time of a log record, ISO 8601 with milliseconds."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"
