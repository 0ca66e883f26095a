"""`accelerate launch` only starts the processes: with configs/accelerate/multi_gpu.yaml the loop's own data
parallelism runs (RANK / WORLD_SIZE / LOCAL_RANK picked up by loop.Dist, gloo on the CPU), and a config asking for
sharding stops with our message instead of running as something it is not (docs/scaling.md)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .helpers import ROOT, cli_env, lora_tensors, train_args
from .test_multiprocess import run_torchrun

CONFIG = "configs/tiny/lcm_sd15.yaml"


def accelerate_launch(config: str, args, nproc: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ROOT / "configs/accelerate" / config,
           "--num_processes", str(nproc), "--num_machines", "1", "--main_process_port", "0",
           "-m", "stepdistill.cli", *map(str, args)]
    return subprocess.run(cmd, check=False, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)


def test_fsdp_config_is_refused_with_what_to_use_instead(tiny_sd15_dir, prompts_file, tmp_path):
    proc = accelerate_launch("fsdp.yaml", train_args(CONFIG, tmp_path / "run", tiny_sd15_dir, prompts_file), 2)
    assert proc.returncode != 0
    assert "asks for FSDP, which stepdistill does not use" in proc.stderr
    assert "configs/accelerate/multi_gpu.yaml" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_multi_gpu_config_runs_the_same_training_as_torchrun(tiny_sd15_dir, prompts_file, tmp_path):
    """Bit-identical to torchrun, whose 2-process run equals 1 process with the combined batch
    (tests/tiny/test_multiprocess.py): accelerate adds nothing but the process start."""
    sets = ("loop.max_steps=2", "loop.checkpoint_every=2", "data.batch_size=1")
    via_torchrun, via_accelerate = tmp_path / "torchrun", tmp_path / "accelerate"
    run_torchrun(train_args(CONFIG, via_torchrun, tiny_sd15_dir, prompts_file, *sets), nproc=2)
    proc = accelerate_launch("multi_gpu.yaml", train_args(CONFIG, via_accelerate, tiny_sd15_dir, prompts_file, *sets), 2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Each process saved its own data order and random state: the loop ran with WORLD_SIZE=2.
    per_rank = sorted(p.name for p in (via_accelerate / "checkpoints" / "step-000002").iterdir() if "rank" in p.name)
    assert per_rank == ["rank-000.pt", "rank-001.pt"]
    a, b = lora_tensors(via_torchrun / "final"), lora_tensors(via_accelerate / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
