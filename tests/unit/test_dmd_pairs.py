"""dmd's teacher ODE pairs are solved once per run: kept in the run folder and reused on resume unless the settings
they were solved with changed."""

from __future__ import annotations

import torch

from stepdistill.methods.dmd import load_or_solve_pairs


def _counting_solver():
    calls = []

    def solve():
        calls.append(1)
        return {"z": torch.full((2, 3), float(len(calls))), "x0": torch.zeros(2, 3), "prompt_index": torch.tensor([0, 1])}

    return solve, calls


def test_pairs_are_kept_and_reused(tmp_path):
    path, meta = tmp_path / "pairs.pt", {"n": 2, "teacher_steps": 25}
    solve, calls = _counting_solver()
    first = load_or_solve_pairs(path, meta, solve)
    again = load_or_solve_pairs(path, meta, solve)
    assert len(calls) == 1 and path.exists()
    assert torch.equal(first["z"], again["z"]) and again["meta"] == meta
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temp file, nothing left behind


def test_changed_settings_solve_again(tmp_path):
    path = tmp_path / "pairs.pt"
    solve, calls = _counting_solver()
    load_or_solve_pairs(path, {"n": 2, "teacher_steps": 25}, solve)
    redone = load_or_solve_pairs(path, {"n": 2, "teacher_steps": 10}, solve)
    assert len(calls) == 2 and float(redone["z"][0, 0]) == 2.0
    assert torch.load(path, weights_only=True)["meta"] == {"n": 2, "teacher_steps": 10}


def test_without_a_run_folder_nothing_is_written(tmp_path):
    solve, calls = _counting_solver()
    load_or_solve_pairs(None, {"n": 2}, solve)
    load_or_solve_pairs(None, {"n": 2}, solve)
    assert len(calls) == 2 and not list(tmp_path.iterdir())
