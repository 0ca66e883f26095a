"""loop.ema_decay: the exported student is the ramped moving average of the student adapter's iterates, not the last
iterate; it survives a kill (tests/tiny/test_reliability.py, dmd_ema) and bad values are refused."""

from __future__ import annotations

import pytest
import torch

from stepdistill.cli import main
from stepdistill.config import ConfigError, load_config
from stepdistill.core.ema import StudentEMA, ramped_decay

from .helpers import ROOT, lora_tensors, train_args

DMD = "configs/tiny/dmd_sd15.yaml"


def _norms(tensors) -> list[float]:
    return sorted(round(float(t.double().norm()), 5) for t in tensors)


def test_final_export_is_the_ramped_average_of_the_iterates(tiny_sd15_dir, prompts_file, tmp_path, monkeypatch):
    start, iterates = {}, []
    init, update = StudentEMA.__init__, StudentEMA.update

    def spy_init(self, live, decay):
        init(self, live, decay)
        start.update({k: p.detach().double().clone() for k, p in live.items()})

    def spy_update(self):
        iterates.append({k: p.detach().double().clone() for k, p in self.live.items()})
        update(self)

    monkeypatch.setattr(StudentEMA, "__init__", spy_init)
    monkeypatch.setattr(StudentEMA, "update", spy_update)
    out = tmp_path / "run"
    argv = train_args(DMD, out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.ema_decay=0.9")
    assert main([str(a) for a in argv]) == 0

    average = dict(start)
    for n, live in enumerate(iterates):
        d = ramped_decay(0.9, n)  # 0.1, 0.18, 0.25: the untrained start is forgotten at once
        average = {k: d * average[k] + (1 - d) * live[k] for k in average}
    exported = lora_tensors(out / "final").values()
    assert len(iterates) == 3
    assert _norms(exported) == _norms(average.values())
    assert _norms(exported) != _norms(iterates[-1].values())  # not the last iterate


def test_ramped_decay_reaches_the_configured_decay():
    assert ramped_decay(0.95, 0) == pytest.approx(0.1)
    assert ramped_decay(0.95, 1000) == 0.95


@pytest.mark.parametrize("value", ["1.0", "-0.1"])
def test_bad_ema_decay_is_refused(value):
    with pytest.raises(ConfigError, match="loop.ema_decay must be in"):
        load_config(ROOT / DMD, [f"loop.ema_decay={value}"])


def test_student_ema_refuses_a_state_of_another_model():
    ema = StudentEMA({"a": torch.zeros(2)}, 0.9)
    with pytest.raises(ValueError, match="lacks 1 adapter tensors"):
        ema.load_state_dict({"updates": 1, "shadow": {}})
