"""Two processes (torchrun, gloo) with batch B each train the same LoRA as one process with batch 2B.

This is what makes several adapters on one shared base safe under data parallelism: every trainable tensor's
gradient is averaged over processes in every update (loop.sync_gradients), and every random draw is made for
the global batch and sliced (NoiseSource), so the two runs see the same samples, noise and timesteps.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT, cli_env, lora_tensors, run_cli, train_args

METHODS = {"lcm": "configs/tiny/lcm_sd15.yaml"}
for _name, _cfg in (("dmd", "configs/tiny/dmd_sd15.yaml"), ("disback", "configs/tiny/disback_sd15.yaml"),
                    ("tscd", "configs/tiny/tscd_sd15.yaml")):
    if (ROOT / _cfg).is_file():
        METHODS[_name] = _cfg


def run_torchrun(args, nproc: int):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "stepdistill.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_equal_one_with_the_combined_batch(method, tiny_sd15_dir, prompts_file, tmp_path):
    # A larger Adam epsilon: with the default 1e-8, Adam's first updates are ~lr * sign(g), which turns float
    # rounding in near-zero gradients into lr-sized differences; the gradients themselves agree (checked below).
    sets = ("loop.max_steps=2", "loop.checkpoint_every=2", "loop.log_every=1", "optim.eps=1e-3")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_args(METHODS[method], one, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=2"))
    run_torchrun(train_args(METHODS[method], two, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=1"), nproc=2)
    a, b = lora_tensors(one / "final"), lora_tensors(two / "final")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-3), f"{k}: {(a[k] - b[k]).abs().max()}"
        moved += int("lora_B" in k and a[k].abs().sum() > 0)
    assert moved, "no adapter tensor was trained"
    logs_one = [json.loads(x) for x in (one / "log.jsonl").read_text().splitlines()]
    logs_two = [json.loads(x) for x in (two / "log.jsonl").read_text().splitlines()]
    for x, y in zip(logs_one, logs_two, strict=True):
        for key in ("loss", "student_grad_norm", "critic_grad_norm"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-4 * max(1.0, abs(x[key])), (key, x[key], y[key])
