"""`stepdistill demo --quick` runs end to end on the shipped toy teacher and writes a readable report."""

import json

import torch

from stepdistill.cli import main
from stepdistill.core.solvers import multistep_timesteps


def test_demo_quick_end_to_end(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    for name in ("report.md", "grid.png", "curves.png", "metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["rows"]
    assert [r["steps"] for r in rows] == [25, 1, 2, 4]
    assert all(r["toy_fid"] >= 0 and 0 <= r["alignment"] <= 1 for r in rows)
    assert all(0 <= r[k] <= 1 for r in rows for k in ("precision", "recall", "coverage", "background_tv"))
    assert len(metrics["curve"]) == 1  # one training leg: the toy images are encoded once
    report = (out / "report.md").read_text()
    assert "| teacher | 25 |" in report and "toy FID ratio" in report and "recall ratio" in report


def test_more_steps_start_at_the_trained_timestep():
    """The demo's 2- and 4-step rows of a one-step student start at its training timestep and space evenly below."""
    assert multistep_timesteps(399, 2) == [399, 199]
    assert multistep_timesteps(399, 4) == [399, 299, 199, 99]
    assert multistep_timesteps(999, 2) == [999, 499]
    assert multistep_timesteps(999, 1) == [999]


def test_curves_label_the_curve_and_the_report_table_figures(tmp_path, monkeypatch):
    """curves.png shows the curve's n and the report table's one-step and teacher figures, each labelled with its n,
    so the two numbers a reader meets for the final student are both on the picture and told apart (issue 32)."""
    from matplotlib.figure import Figure

    from stepdistill.demo import write_curves

    seen = {}
    monkeypatch.setattr(Figure, "savefig", lambda fig, path, **kw: seen.update(
        labels=[t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]))
    curve = [{"step": 150, "toy_fid": 70.0, "n": 200}, {"step": 300, "toy_fid": 60.0, "n": 200}]
    rows = [{"model": "teacher", "steps": 25, "toy_fid": 36.2, "n": 500},
            {"model": "student (dmd)", "steps": 1, "toy_fid": 37.4, "n": 500}]
    write_curves(tmp_path / "curves.png", tmp_path / "no-log.jsonl", curve, rows, 300)
    labels = " | ".join(seen["labels"])
    assert "n = 200" in labels and "n = 500, eval seed 0) 37.4" in labels and "teacher, 25 steps (n = 500) 36.2" in labels
