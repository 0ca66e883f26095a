"""Experiment tracking (`loop.report_to`): TensorBoard and Weights & Biases, through the libraries themselves.

log.jsonl stays the source of truth: a tracker sees the very records the loop writes there, plus the sample grids
and the resolved config. A tracker never stops a run: its first error is logged once and it is switched off, so
training goes on. A missing package is the one failure that stops the run, at start-up, not hours later.
Only rank 0 tracks.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import uuid
from pathlib import Path

from ..config import Config
from ..errors import ConfigError

log = logging.getLogger(__name__)

# tracker -> (module to import, pip extra that installs it)
REQUIREMENTS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id.txt"


def check_trackers(names) -> None:
    """Fail now, naming the extra to install, when a tracker's package is missing."""
    for name in names:
        module, extra = REQUIREMENTS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(
                f"loop.report_to={name} needs the {extra} package ({e}): pip install 'stepdistill[{extra}]', "
                f"or drop {name} from loop.report_to"
            ) from None


def learning_rates(optimizers: dict) -> dict:
    """{"student_lr": ..., "critic_lr": ...}: the rates this step used (warm-up included), for log.jsonl."""
    return {f"{phase}_lr": float(opt.param_groups[0]["lr"]) for phase, opt in optimizers.items()}


def scalars(record: dict) -> dict[str, float]:
    """The numbers of a log.jsonl record, step excluded (what a tracker plots)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def flat_config(cfg: Config) -> dict:
    """The resolved config as flat `section.key` hyperparameters (lists as text: trackers want scalars)."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)

    walk(cfg.to_dict(), "")
    return out


class TensorBoardBackend:
    name = "tensorboard"

    def __init__(self, run_dir: Path, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        from ..config import dump_config

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        # The hparams summaries go into this run's own event file (add_hparams would open a second run folder).
        for summary in hparams(flat_config(cfg), {}):
            self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", "```yaml\n" + dump_config(cfg) + "```", 0)
        self.writer.flush()

    def log_scalars(self, step: int, values: dict[str, float]):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_image(self, step: int, path: Path):
        import numpy as np
        from PIL import Image

        image = np.asarray(Image.open(path).convert("RGB"))
        self.writer.add_image("samples", image, step, dataformats="HWC")
        self.writer.flush()

    def close(self):
        self.writer.close()


class WandbBackend:
    name = "wandb"

    def __init__(self, run_dir: Path, cfg: Config):
        import wandb

        self.wandb = wandb
        # The same W&B run across restarts of the same run folder (a rerun resumes training, and so the curves).
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "stepdistill"), name=run_dir.name, id=run_id,
                              resume="allow", dir=str(run_dir), config=flat_config(cfg))

    def log_scalars(self, step: int, values: dict[str, float]):
        self.run.log(values, step=step)

    def log_image(self, step: int, path: Path):
        self.run.log({"samples": self.wandb.Image(str(path))}, step=step)

    def close(self):
        self.run.finish()


BACKENDS = {"tensorboard": TensorBoardBackend, "wandb": WandbBackend}


class Tracking:
    """The run's trackers; every call is safe: a failing tracker is reported once and dropped."""

    def __init__(self, backends=()):
        self.backends = list(backends)

    @classmethod
    def start(cls, cfg: Config, run_dir, rank: int) -> Tracking:
        names = cfg.loop.trackers
        check_trackers(names)  # on every rank: a missing package is a config error everywhere
        if rank != 0 or not names:
            return cls()
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        tracking = cls()
        for name in names:
            backend = tracking._call(name, BACKENDS[name], run_dir, cfg)
            if backend is not _FAILED:
                tracking.backends.append(backend)
        return tracking

    def log(self, record: dict):
        """One log.jsonl record (it holds "step")."""
        values = scalars(record)
        self._each("log_scalars", int(record["step"]), values)

    def log_image(self, step: int, path):
        self._each("log_image", step, Path(path))

    def close(self):
        self._each("close")
        self.backends = []

    def _each(self, method: str, *args):
        for backend in list(self.backends):
            if self._call(backend.name, getattr(backend, method), *args) is _FAILED:
                self.backends.remove(backend)

    @staticmethod
    def _call(name: str, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 (a tracker must never stop training; the error is reported)
            log.warning("tracker %s failed (%s: %s); it is off for the rest of this run, training goes on and "
                        "log.jsonl has every step", name, type(e).__name__, str(e).splitlines()[0][:300] if str(e) else "")
            return _FAILED


_FAILED = object()
