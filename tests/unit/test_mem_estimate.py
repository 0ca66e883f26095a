"""`stepdistill bench memory` (bench/mem_estimate.py): one training iteration's GPU memory on fake tensors, checked on
the tiny SDXL model against what can be counted by hand: the weights on the GPU, AdamW's two fp32 moments per
trainable parameter, and the levers' direction (checkpointing lowers the activations, offloading removes the text
encoders' bytes). Each row builds and runs a dmd iteration twice on fake tensors: minutes on 2 loaded cores, so the
rows are opt-in (pytest -m slow); the default suite checks the tracker itself on a small network.""" 

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


def test_tracker_follows_a_frozen_base_called_twice_per_iteration_and_counts_exactly():
    """What the estimate adapts in MemTracker: one frozen network called several times per iteration (teacher,
    student, fake score), whose parameters take no gradient hook; and fake parameters cast with Module.to."""
    from stepdistill.bench.mem_estimate import _by_category, _castable, _tracker_class
    from torch._subclasses.fake_tensor import FakeTensorMode

    n, r = 256, 4
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, _castable(mode):
        base = torch.nn.Linear(n, n).to(torch.bfloat16).requires_grad_(False)
        lora = torch.nn.Parameter(torch.zeros(n, r))
        opt = torch.optim.AdamW([lora], fused=True)
        tracker = _tracker_class()()
        tracker.track_external(base, lora)
        x = torch.randn(64, n, dtype=torch.bfloat16)
        for _ in range(2):  # the first step creates AdamW's states; the second is the steady state
            with tracker:
                teacher = base(x)
                loss = (base(x).float() @ lora - teacher.float() @ lora).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        peak = _by_category(tracker.get_tracker_snapshot("peak"))
    assert peak["Parameter"] + peak["Other"] == (n * n + n) * 2 + n * r * 4
    assert peak["Optstate"] == 2 * n * r * 4 + 4  # exp_avg, exp_avg_sq and the step count, fp32
    assert peak["Gradient"] <= n * r * 4  # the peak falls in the forward, before the gradient exists
    assert peak["Activation"] >= 2 * 64 * n * 2  # both bf16 outputs of the base are alive together


@pytest.mark.slow
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
