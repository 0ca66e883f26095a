"""loop.report_to: parsing, the start-up error naming the extra, and a failing tracker that never stops a run."""

from __future__ import annotations

import logging

import pytest

from stepdistill.config import ConfigError, load_config
from stepdistill.train import tracking
from stepdistill.train.tracking import Tracking, check_trackers, scalars

BASE = ["method.name=lcm", "model.path=m", "data.prompts=p"]


@pytest.mark.parametrize(("value", "expected"), [
    ("none", []), ("tensorboard", ["tensorboard"]), ("[tensorboard,wandb]", ["tensorboard", "wandb"]),
    ("'tensorboard,wandb'", ["tensorboard", "wandb"]), ("[none]", []),
])
def test_report_to_values(value, expected):
    assert load_config(None, [*BASE, f"loop.report_to={value}"]).loop.trackers == expected


def test_report_to_default_is_none():
    assert load_config(None, BASE).loop.trackers == []


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match=r"loop.report_to must be one of \['none', 'tensorboard', 'wandb'\]"):
        load_config(None, [*BASE, "loop.report_to=mlflow"])


def test_missing_package_names_the_extra(monkeypatch):
    def no_module(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(tracking.importlib, "import_module", no_module)
    with pytest.raises(ConfigError, match=r"pip install 'stepdistill\[wandb\]'"):
        check_trackers(["wandb"])


def test_scalars_keep_numbers_only():
    assert scalars({"step": 3, "loss": 0.5, "nonfinite_steps": 0, "note": "x", "flag": True}) == {
        "loss": 0.5, "nonfinite_steps": 0.0}


class Broken:
    name = "broken"

    def __init__(self):
        self.calls = 0

    def log_scalars(self, step, values):
        self.calls += 1
        raise RuntimeError("disk full\nsecond line")

    def close(self):
        raise AssertionError("a dropped tracker is not closed")


class Recorder:
    name = "recorder"

    def __init__(self):
        self.seen = []

    def log_scalars(self, step, values):
        self.seen.append((step, values))

    def close(self):
        self.seen.append("closed")


def test_a_failing_tracker_is_reported_once_and_dropped(caplog):
    broken, good = Broken(), Recorder()
    t = Tracking([broken, good])
    with caplog.at_level(logging.WARNING):
        t.log({"step": 1, "loss": 1.0})
        t.log({"step": 2, "loss": 0.5})
        t.close()
    assert broken.calls == 1
    assert good.seen == [(1, {"loss": 1.0}), (2, {"loss": 0.5}), "closed"]
    warnings = [r.getMessage() for r in caplog.records if "tracker broken failed" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0] and "second line" not in warnings[0]
