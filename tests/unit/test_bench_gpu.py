"""`stepdistill bench gpu` rehearsed on tiny models on the CPU: every part runs in its own subprocess and writes its
JSON, the summary table is written (also when a part fails), the plan is printed without running anything."""

from __future__ import annotations

import importlib.util
import json

import pytest
from stepdistill.bench import gpu as bench_gpu
from stepdistill.bench.train import largest_batch

from stepdistill.cli import main


def test_tiny_run_writes_every_part_and_the_table(tmp_path, capsys):
    out = tmp_path / "gpu"
    main(["bench", "gpu", "--tiny", "--out", str(out), "--budget-s", "400"])
    for part in bench_gpu.PARTS:
        data = json.loads((out / f"{part}.json").read_text())
        assert data["status"] == "ok" and data["rows"], (part, data)
    train = json.loads((out / "train.json").read_text())
    assert {(r["method"], r["family"]) for r in train["rows"]} == set(bench_gpu.TRAIN_ROWS)
    assert all(r["passes"]["calls"] >= 3 for r in train["rows"])
    kernels = {r["kernel"] for r in json.loads((out / "attention.json").read_text())["rows"]}
    assert "sdpa" in kernels
    if importlib.util.find_spec("triton") is not None:
        assert "triton" in kernels  # in Triton's CPU interpreter
    attention = json.loads((out / "attention.json").read_text())
    if importlib.util.find_spec("xformers") is None:  # its row says why instead of staying empty
        missing = [r for r in attention["rows"] if r["kernel"] == "xformers"]
        assert missing and all("no wheel for torch" in r["unavailable"] for r in missing)
    _check_latency_rows(json.loads((out / "infer.json").read_text())["rows"])
    summary = (out / "summary.md").read_text()
    assert "## Goals" in summary and "| infer | ok |" in summary
    assert "## Generation" in summary and "why not n x one step" in summary and "prompt cache warm" in summary
    assert summary in capsys.readouterr().out


def _check_latency_rows(rows):
    """SDXL, SD1.5 and FLUX at 1 and 4 steps; text cold and warm, UNet, VAE, totals; a note on the step counts."""
    assert {(r["family"], r["steps"], r["vae"]) for r in rows} == {
        (f, n, v) for f, _, vaes in bench_gpu.INFER_CASES for n in (1, 4) for v in vaes}
    assert {r["family"] for r in rows} == {"sdxl", "sd15", "flux"}
    for r in rows:
        for key in ("text_ms", "text_warm_ms", "unet_ms", "vae_ms", "total_ms", "total_warm_ms"):
            assert r[key] > 0, (key, r)
        assert r["repeats"] >= 1 and r["note"]
        assert r["total_ms"] >= r["unet_ms"] + r["vae_ms"]
    four = [r for r in rows if r["steps"] == 4]
    assert all("x the one-step UNet" in r["note"] and "warm" in r["note"] for r in four)


def test_dry_run_prints_the_plan_within_the_budget(tmp_path, capsys):
    main(["bench", "gpu", "--dry-run", "--out", str(tmp_path / "x"), "--parts", "train", "infer", "--budget-s", "300"])
    text = capsys.readouterr().out
    assert "| train |" in text and "| infer |" in text and "attention" not in text
    assert not (tmp_path / "x").exists()
    steps = bench_gpu.plan(list(bench_gpu.PARTS), 420, tiny=False)
    assert sum(s["cap_s"] for s in steps) == pytest.approx(420)


def test_summary_is_written_when_a_part_breaks(tmp_path, monkeypatch):
    def fake(part, out, tiny, cap_s, memory_gb, log_file, only=()):
        if part == "train":
            raise RuntimeError("the part broke")
        return {"part": part, "status": "ok", "rows": [], "notes": []}

    monkeypatch.setattr(bench_gpu, "_run_subprocess", fake)
    with pytest.raises(RuntimeError):
        bench_gpu.bench_gpu(tmp_path, ["attention", "train", "infer"], tiny=True, budget_s=60, show=False)
    summary = (tmp_path / "summary.md").read_text()
    assert "| attention | ok |" in summary and "not measured" in summary


def test_largest_batch_can_start_near_the_answer():
    probes = []

    def fits(b):
        probes.append(b)
        return b <= 6

    assert largest_batch(fits, 32, start=4) == 6
    assert probes[0] == 4 and 1 not in probes
    assert largest_batch(lambda b: b <= 2, 32, start=4) == 2
    assert largest_batch(lambda b: False, 32, start=4) == 0


def test_only_reruns_the_named_sub_steps_and_refuses_unknown_ones(tmp_path):
    """--only: a second GPU run measures what the first one missed, and nothing it already has."""
    bench_gpu.bench_gpu(tmp_path, ["train"], tiny=True, budget_s=120, show=False, only=["tscd:sd15"])
    assert "sdxl:compiled" in bench_gpu.sub_steps(tiny=False) and "flux:eager" in bench_gpu.sub_steps(tiny=True)
    train = json.loads((tmp_path / "train.json").read_text())
    assert [(r["method"], r["family"]) for r in train["rows"]] == [("tscd", "sd15")]
    assert any("not asked for: dmd:sdxl" in n for n in train["notes"])
    with pytest.raises(ValueError, match="unknown --only step"):
        bench_gpu.bench_gpu(tmp_path, ["train"], tiny=True, budget_s=60, show=False, only=["tscd:sd9"])
