"""Two processes (torchrun, gloo) with batch B each train the same LoRA as one process with batch 2B.

This is what makes several adapters on one shared base safe under data parallelism: every trainable tensor's
gradient is averaged over processes in every update (loop.sync_gradients), and every random draw is made for
the global batch and sliced (NoiseSource), so the two runs see the same samples, noise and timesteps.
"""

from __future__ import annotations

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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", "0",
           "-m", "stepdistill.cli", *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_equal_one_with_the_combined_batch(method, tiny_sd15_dir, prompts_file, tmp_path):
    sets = ("loop.max_steps=2", "loop.checkpoint_every=2")
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(train_args(METHODS[method], one, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=2"))
    run_torchrun(train_args(METHODS[method], two, tiny_sd15_dir, prompts_file, *sets, "data.batch_size=1"), nproc=2)
    a, b = lora_tensors(one / "final"), lora_tensors(two / "final")
    assert a.keys() == b.keys()
    moved = 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-4), f"{k}: {(a[k] - b[k]).abs().max()}"
        moved += int("lora_B" in k and a[k].abs().sum() > 0)
    assert moved, "no adapter tensor was trained"
