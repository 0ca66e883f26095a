"""`stepdistill bench memory` (bench/mem_estimate.py): one training iteration's GPU memory on fake tensors, checked on
the tiny SDXL model against what can be counted by hand: the weights on the GPU, AdamW's two fp32 moments per
trainable parameter, and the levers' direction (checkpointing lowers the activations, offloading removes the text
encoders' bytes)."""

from __future__ import annotations

import pytest
import torch
from stepdistill.bench.mem_estimate import Levers, estimate_row, table

from stepdistill.models.random_init import build_family_model


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    return {lev: estimate_row("dmd", "sdxl", lev, 2, tiny=True)
            for lev in (Levers(False, False), Levers(True, False), Levers(True, True))}


def test_weights_and_optimizer_states_are_counted_exactly(rows):
    for r in rows.values():
        static, peak = r["static"], r["peak"]
        assert static["Parameter"] + static["Buffer"] + static["Other"] == r["weight_bytes"]
        # fused AdamW: exp_avg and exp_avg_sq in fp32 per trainable parameter, and one fp32 step count per tensor
        assert peak["Optstate"] == 8 * r["trainable_params"] + 4 * r["trainable_tensors"]
        # one phase's gradients at a time (student or fake score), fp32
        assert 0 < peak["Gradient"] <= 4 * r["trainable_params"]
        assert peak["Total"] > static["Total"] + peak["Optstate"]


def test_levers_move_the_peak_the_way_they_should(rows):
    none, ckpt, offload = rows[Levers(False, False)], rows[Levers(True, False)], rows[Levers(True, True)]

    def activations(r):
        return r["peak"]["Activation"] + r["peak"]["Temp"]

    assert activations(ckpt) < activations(none)
    text = build_family_model("sdxl", tiny=True, vae="tiny", device="cpu", dtype=torch.bfloat16).text_encoders
    text_bytes = sum(p.numel() * p.element_size() for e in text for p in [*e.parameters(), *e.buffers()])
    assert ckpt["weight_bytes"] - offload["weight_bytes"] == text_bytes > 0
    assert offload["text_offloaded"] and not ckpt["text_offloaded"]
    assert "| sdxl |" in table(list(rows.values()))
