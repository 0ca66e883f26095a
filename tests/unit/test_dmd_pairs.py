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


class _Share:
    """One process of a world of `world`, whose all_sum_ keeps its own share (the test adds the shares)."""

    def __init__(self, world, rank):
        self.world, self.rank, self.device = world, rank, torch.device("cpu")

    def all_sum_(self, tensor):
        return tensor


def test_pairs_are_split_across_processes_and_sum_to_the_single_process_set():
    """Each of W processes solves every W-th chunk (not all n pairs), with the same number of teacher calls (a
    sharded teacher's forward is a collective); the summed shares equal one process's set exactly."""
    from stepdistill.core.denoiser import Cond, DenoiserOut
    from stepdistill.core.schedule import NoiseSchedule
    from stepdistill.methods.dmd import solve_ode_pairs

    schedule = NoiseSchedule.from_scheduler_config({"num_train_timesteps": 1000})
    calls = []

    def teacher(x_t, t, cond):  # a Gaussian-like denoiser with a prompt-dependent mean
        calls.append(len(x_t))
        alpha, sigma = schedule.alpha_sigma(t, x_t.ndim)
        x0 = (alpha * x_t.double() + cond.encoder_hidden_states.mean((1, 2)).reshape(-1, 1, 1, 1)) / (1 + alpha)
        return DenoiserOut(x0, (x_t.double() - alpha * x0) / sigma)

    prompts = Cond(torch.randn(3, 2, 4))
    solve = lambda dist: solve_ode_pairs(teacher, prompts, 10, (2, 4, 4), 3, schedule, 0, "cpu", chunk=3,
                                         progress=False, dist=dist)
    whole = solve(None)
    single_calls, calls[:] = list(calls), []
    assert len(single_calls) == 4 * 3 and whole["x0"].abs().sum() > 0
    for world in (2, 3):  # 4 chunks: an even split, and one where two processes have a chunk fewer
        shares = []
        for rank in range(world):
            shares.append(solve(_Share(world, rank)))
            share_calls, calls[:] = list(calls), []
            assert len(share_calls) == 2 * 3  # ceil(4 chunks / W) chunk solves of 3 steps each, on every process
        summed = sum(share["x0"].float() for share in shares)
        assert torch.equal(summed.half(), whole["x0"]), world
        assert all(torch.equal(sh["z"], whole["z"]) and torch.equal(sh["prompt_index"], whole["prompt_index"])
                   for sh in shares)
