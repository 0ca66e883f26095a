"""`stepdistill demo --quick` runs end to end on the shipped toy teacher and writes a readable report."""

import json

import torch

from stepdistill.cli import main


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
    assert len(metrics["curve"]) == 2
    report = (out / "report.md").read_text()
    assert "| teacher | 25 |" in report and "toy FID ratio" in report
