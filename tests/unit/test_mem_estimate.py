"""`stepdistill bench memory` (bench/mem_estimate.py): one training iteration's GPU memory on fake tensors, checked on
the tiny SDXL model against what can be counted by hand: the weights on the GPU, AdamW's two fp32 moments per
trainable parameter, and the levers' direction (checkpointing lowers the activations, offloading removes the text
encoders' bytes). Each row builds and runs a dmd iteration twice on fake tensors: tens of seconds on 2 loaded cores,
so the lever comparison (three rows) is opt-in."""

from __future__ import annotations

import pytest
import torch
from stepdistill.bench.mem_estimate import Levers, estimate_row, table

from stepdistill.models.random_init import build_family_model


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _check_counts(r):
    static, peak = r["static"], r["peak"]
    assert static["Parameter"] + static["Buffer"] + static["Other"] == r["weight_bytes"]
    # fused AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter, and one fp32 step count per tensor
    assert peak["Optstate"] == 8 * r["trainable_params"] + 4 * r["trainable_tensors"]
    # at most one phase's gradients (student or fake score), fp32; none when the peak falls in a forward
    assert peak["Gradient"] <= 4 * r["trainable_params"]
    assert peak["Total"] > static["Total"] + peak["Optstate"]


def test_weights_and_optimizer_states_are_counted_exactly():
    r = estimate_row("dmd", "sdxl", Levers(True, True), 1, tiny=True)
    _check_counts(r)
    assert r["text_offloaded"] and "| sdxl |" in table([r])


@pytest.mark.slow
def test_levers_move_the_peak_the_way_they_should():
    # 128 px (16 x 16 latents): activations large enough next to the tiny weights for the levers to show
    none, ckpt, offload = (estimate_row("dmd", "sdxl", lev, 2, resolution=128, tiny=True)
                           for lev in (Levers(False, False), Levers(True, False), Levers(True, True)))
    for r in (none, ckpt, offload):
        _check_counts(r)

    def activations(r):
        return r["peak"]["Activation"] + r["peak"]["Temp"]

    assert activations(ckpt) < activations(none)
    text = build_family_model("sdxl", tiny=True, vae="tiny", device="cpu", dtype=torch.bfloat16).text_encoders
    text_bytes = sum(p.numel() * p.element_size() for e in text for p in [*e.parameters(), *e.buffers()])
    assert ckpt["weight_bytes"] - offload["weight_bytes"] == text_bytes > 0
    assert offload["text_offloaded"] and not ckpt["text_offloaded"]
