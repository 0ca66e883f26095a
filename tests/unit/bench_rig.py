"""The tiny training benchmark rig shared by the bench and pass-count tests."""

from __future__ import annotations

import torch
from stepdistill.bench import train as bench

# Rank 4 on the 32/64-channel tiny UNet keeps LoRA's own matmuls small next to the base's, as rank 64 is on
# the full-size UNets; the F-unit bounds of test_bench_train rely on that.
TINY = ["lora.rank=4", "method.critic_updates_per_student_update=2"]


def tiny_trainer(method, sets, out):
    """A Trainer over the tiny SD1.5 random-init model, set up as `bench train --tiny` does."""
    cfg = bench.bench_config(method, "sd15", 2, [*TINY, *sets])
    torch.manual_seed(0)
    model = bench.bench_model("sd15", tiny=True, device="cpu", dtype=torch.float32)
    return bench.make_trainer(cfg, model, bench.bench_data(cfg, model), out, "cpu")
