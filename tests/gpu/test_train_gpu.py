"""Training throughput and memory of the real loop on full-size random-init SD1.5 (512 px) and SDXL (1024 px) UNets:
the table of docs/benchmarks.md, "Training throughput". Timings and utilisation are printed, never asserted
(run with `pytest -m gpu -s tests/gpu/test_train_gpu.py`); what is asserted is what the FLOP counter saw, that
the run fits in memory, and that the compile lever keeps the maths."""

from __future__ import annotations

import tempfile

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from stepdistill.bench import train as bench

GPU_MEMORY_GB = 80  # the H100 / A100-80GB budget of docs/scaling.md


def expected_forwards(method: str, ratio: int) -> float:
    """Teacher forwards F per sample of one iteration (docs/benchmarks.md, "FLOP accounting"), rank-64 LoRA:
    an adapted forward ~1.1 F, a backward through the frozen base into LoRA ~1.35 F."""
    student_turn = 1.1 + 1.35 + 2.0 + 1.1  # generator fwd + bwd, teacher with CFG, fake score
    if method == "tscd":
        return 2.0 + 1.1 + 1.1 + 1.35  # teacher with CFG, EMA target, student fwd + bwd
    critic_turns = 2.45 + (ratio - 1) * (1.1 + 2.45)  # fake score fwd + bwd; fresh generator samples after the first
    extra = 0.2 if method == "disback" else 0.0  # the target adapter's LoRA on the two CFG passes
    return student_turn + critic_turns + extra


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_throughput_table(family):
    rows = bench.bench_train(families=[family], iters=3, warmup=1, show=False)
    print("\n" + bench.format_table(rows))
    for r in rows:
        ratio = bench.method_preset(r["method"], family).get("critic_updates_per_student_update", 1)
        expected = expected_forwards(r["method"], ratio)
        assert 0.85 * expected < r["forwards_per_sample"] < 1.2 * expected, (r["method"], r["forwards_per_sample"])
        # Prompts and latents are cached: every counted FLOP is in the UNet.
        assert set(r["flops_by_module"]) == {"UNet2DConditionModel"}
        assert r["flops_by_op"].get("attention", 0) > 0  # SDPA's CUDA kernels are counted, not skipped
        assert 0 < r["utilisation"] < 1
        assert r["peak_mem_gb"] < GPU_MEMORY_GB


def test_sdxl_dmd_fits_a_useful_batch_on_one_gpu():
    """The memory goal of the shared-base design: SDXL 1024 px one-step dmd at batch >= 4 per 80 GB GPU."""
    (row,) = bench.bench_train(["dmd"], ["sdxl"], batch=4, iters=1, warmup=1, max_batch=64, show=False)
    print("\n" + bench.format_table([row]))
    print(f"sdxl dmd: largest batch {row['max_batch']} (peak {row['max_batch_peak_gb']:.1f} GB)")
    assert row["peak_mem_gb"] < GPU_MEMORY_GB
    assert row["max_batch"] >= 4


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lever_table(family):
    """One row per efficiency lever (minutes: torch.compile builds five graphs per run)."""
    levers = ["baseline", "channels_last", "compile", "grad_ckpt", "attention_triton", "fp32_base"]
    rows = bench.bench_train(["dmd"], [family], levers=levers, iters=3, warmup=2, show=False)
    print("\n" + bench.format_table(rows))
    counts = {r["lever"]: r["flops_per_iteration"] for r in rows}
    # Levers that change how, not what, is computed leave the counted FLOPs alone; checkpointing adds recomputation.
    for lever in ("channels_last", "compile", "attention_triton", "fp32_base"):
        assert counts[lever] == counts["baseline"], lever
    assert counts["grad_ckpt"] > counts["baseline"]


def test_compile_lever_keeps_the_maths_on_cuda():
    """Inductor on the tiny models: one dmd iteration's loss and gradient norms match eager (bf16 tolerance)."""
    logs = {}
    for compile_ in (False, True):
        sets = ["lora.rank=4", "method.critic_updates_per_student_update=2", f"model.compile={str(compile_).lower()}"]
        cfg = bench.bench_config("dmd", "sd15", 2, sets)
        torch.manual_seed(0)
        model = bench.bench_model("sd15", tiny=True, device="cuda", dtype=torch.bfloat16)
        with tempfile.TemporaryDirectory() as out:
            trainer = bench.make_trainer(cfg, model, bench.bench_data(cfg, model), out, "cuda")
            logs[compile_] = bench.run_iteration(trainer)
    for key in ("loss", "student_grad_norm", "critic_grad_norm"):
        assert logs[True][key] == pytest.approx(logs[False][key], rel=5e-2), key
