"""model.shard=fsdp2: the frozen base sharded over two processes (torchrun, gloo, CPU) trains the same LoRA as the
replicated base, and checkpoints resume across the setting in both directions (train/shard.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

from stepdistill.config import ConfigError, ModelConfig
from stepdistill.core.dist import Dist
from stepdistill.models.registry import get_family
from stepdistill.models.tiny import build_tiny_pipeline
from stepdistill.train.shard import shard_base

from .helpers import ROOT, cli_env, lora_tensors, run_cli, train_args

HOLDS = re.compile(r"rank (\d) of 2 holds (\d+) of (\d+) frozen base parameters")


def torchrun(args) -> str:
    """stderr of a 2-process run of the CLI (it must succeed)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "stepdistill.cli", *map(str, args)]
    proc = subprocess.run(cmd, check=False, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stderr


def assert_close_lora(a, b):
    ta, tb = lora_tensors(a), lora_tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        # Not bit-identical: an all-gathered weight can take another kernel path than the resident one.
        assert torch.allclose(ta[k], tb[k], atol=1e-6, rtol=1e-4), f"{k}: {(ta[k] - tb[k]).abs().max()}"


def resume_from(run, step_name: str, into):
    """A fresh run folder holding only `run`'s checkpoint `step_name`: rerunning into it resumes from there."""
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / step_name, into / "checkpoints" / step_name)


@pytest.mark.slow
@pytest.mark.parametrize("family, config", [("sd15", "configs/tiny/dmd_sd15.yaml"), ("sd3", "configs/tiny/dmd_sd3.yaml")])
def test_sharded_base_trains_the_same_lora_and_resumes_either_way(family, config, request, prompts_file, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}_dir")
    # Adam epsilon 1e-3 as in test_multiprocess: float rounding in near-zero gradients stays rounding.
    sets = ("loop.max_steps=3", "loop.checkpoint_every=2", "data.batch_size=1", "optim.eps=1e-3")
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    torchrun(train_args(config, plain, model, prompts_file, *sets))
    err = torchrun(train_args(config, sharded, model, prompts_file, *sets, "model.shard=fsdp2"))

    # Each process holds its half of the frozen base, and the halves make the whole.
    holds = {int(r): (int(h), int(w)) for r, h, w in HOLDS.findall(err)}
    assert sorted(holds) == [0, 1], err[-2000:]
    whole = holds[0][1]
    assert sum(h for h, _ in holds.values()) == whole
    assert all(h <= whole / 2 * 1.01 for h, _ in holds.values()), holds

    logs = [json.loads(x) for x in (sharded / "log.jsonl").read_text().splitlines()]
    assert logs and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert_close_lora(plain / "final", sharded / "final")
    assert any(v.abs().sum() > 0 for k, v in lora_tensors(sharded / "final").items() if "lora_B" in k)

    # A sharded checkpoint resumed without sharding, and a plain one resumed with it: the checkpoint is the same.
    for source, into, extra in ((sharded, tmp_path / "to_plain", ()), (plain, tmp_path / "to_sharded", ("model.shard=fsdp2",))):
        resume_from(source, "step-000002", into)
        err = torchrun(train_args(config, into, model, prompts_file, *sets, *extra))
        assert "resumed from" in err
        assert_close_lora(plain / "final", into / "final")


def test_sharding_a_single_process_is_refused(tiny_sd15_dir, prompts_file, tmp_path):
    unet = build_tiny_pipeline("sd15", seed=0).unet
    with pytest.raises(ConfigError, match="needs several processes.*torchrun"):
        shard_base(unet, list(unet.down_blocks), Dist(1, 0, "cpu"))
    proc = run_cli(train_args("configs/tiny/dmd_sd15.yaml", tmp_path / "run", tiny_sd15_dir, prompts_file,
                              "model.shard=fsdp2"), check=False)
    assert proc.returncode != 0 and "model.shard=fsdp2 needs several processes" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shard_setting_is_checked():
    with pytest.raises(ConfigError, match="model.shard must be one of"):
        ModelConfig(path="x", shard="fsdp").validate()
    with pytest.raises(ConfigError, match="model.shard=fsdp2 with model.compile=regional"):
        ModelConfig(path="x", shard="fsdp2", compile=True).validate()


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3", "flux"])
def test_shard_units_are_distinct_blocks_holding_most_of_the_base(family):
    """A family's shard units are separate submodules of the denoiser; what they leave (embeddings, in / out
    projections) goes to the root's group and is sharded too, so it only has to be the smaller part."""
    pipe = build_tiny_pipeline(family, seed=0)
    cls = get_family(family)
    net = getattr(pipe, cls.denoiser_prefix)
    model = cls(net, pipe.vae, [], [], {})
    units = model.shard_units()
    assert units and all(any(u is m for m in net.modules()) for u in units)
    per_unit = [{id(p) for p in u.parameters()} for u in units]
    inside = set().union(*per_unit)
    assert sum(map(len, per_unit)) == len(inside), "a unit nests inside another"
    if family == "flux":
        assert any(u is b for u in units for b in net.single_transformer_blocks)
    assert 2 * sum(p.numel() for p in net.parameters() if id(p) in inside) > sum(p.numel() for p in net.parameters())


@pytest.mark.slow
def test_two_gan_updates_under_sharding(tiny_sd15_dir, prompts_file, tmp_path):
    """dmd with the GAN head under model.shard=fsdp2: the head's feature reads stop the sharded forward early, twice
    per iteration (generator and critic), for two iterations; the run finishes with finite GAN losses."""
    out = tmp_path / "gan"
    torchrun(train_args("configs/tiny/dmd_sd15.yaml", out, tiny_sd15_dir, prompts_file, "method.gan=true",
                        "data.images=toy:8", "loop.max_steps=2", "data.batch_size=1", "method.regression_steps=0",
                        "model.shard=fsdp2"))
    logs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([r["gan_g_loss"], r["gan_d_loss"]])).all() for r in logs)
