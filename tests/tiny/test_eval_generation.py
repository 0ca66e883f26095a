"""Evaluation generation on a tiny SD1.5 teacher: resumable after a kill, sharded, reported."""

import json

import numpy as np
import pytest
import stepdistill.eval.generate as generation
import torch
from PIL import Image
from stepdistill.eval.generate import MANIFEST, generate_images, read_manifest, student_generate_fn, teacher_generate_fn
from stepdistill.eval.prompts import PromptRecord, load_prompts, shard

from stepdistill.models.tiny import TINY_PROMPTS, build_tiny_pipeline

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher_fn():
    pipe = build_tiny_pipeline("sd15", seed=0)
    pipe.set_progress_bar_config(disable=True)
    return teacher_generate_fn(pipe, steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def records():
    return [PromptRecord(f"{i:06d}", p, 100 + i) for i, p in enumerate(TINY_PROMPTS[:6])]


@pytest.fixture(scope="module")
def reference_run(teacher_fn, records, tmp_path_factory):
    """An uninterrupted single-process run: what every other run must reproduce."""
    out = tmp_path_factory.mktemp("eval") / "reference"
    generate_images(teacher_fn, records, out, batch_size=4, rank=0, world=1, progress=False)
    return out


def _pixels(out_dir) -> dict[str, np.ndarray]:
    def read(path):
        with Image.open(path) as img:
            return np.asarray(img)

    return {e["id"]: read(out_dir / e["file"]) for e in read_manifest(out_dir)}


def _assert_same_run(out_dir, reference_run, records):
    entries = read_manifest(out_dir)
    assert [e["id"] for e in entries] == [r.id for r in records]  # every id exactly once, in prompt order
    assert [(e["prompt"], e["seed"]) for e in entries] == [(r.prompt, r.seed) for r in records]
    ours, ref = _pixels(out_dir), _pixels(reference_run)
    for i in ref:
        np.testing.assert_array_equal(ours[i], ref[i])


def test_reference_run_writes_pngs_manifest_and_generation_info(reference_run, records):
    assert len(list((reference_run / "images").glob("*.png"))) == len(records)
    info = json.loads((reference_run / "generation.json").read_text())
    assert info["n_images"] == len(records) and info["images_per_s"] > 0 and info["image_format"] == "png"
    with Image.open(reference_run / "images" / f"{records[0].id}.png") as first:
        assert first.format == "PNG" and first.size == (16, 16)
    # Different seeds give different images.
    px = _pixels(reference_run)
    assert not np.array_equal(px[records[0].id], px[records[1].id])


def test_killed_run_resumes_to_the_same_images(teacher_fn, records, reference_run, tmp_path, monkeypatch):
    out = tmp_path / "resumed"
    real_save = generation.save_png
    saved = []

    def save_then_die(image, path):
        if len(saved) == 3:  # dies in the middle of the first batch of 4
            raise KeyboardInterrupt
        real_save(image, path)
        saved.append(path)

    monkeypatch.setattr(generation, "save_png", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate_images(teacher_fn, records, out, batch_size=4, rank=0, world=1, progress=False)
    monkeypatch.setattr(generation, "save_png", real_save)
    assert not (out / MANIFEST).exists()
    # What a hard kill can also leave behind: a half-written PNG and a cut manifest line.
    (out / "images" / f".{records[3].id}.png.tmp").write_bytes(b"\x89PNG\r\n")
    with open(out / "manifest.part-00000-of-00001.jsonl", "a") as f:
        f.write('{"id": "000003", "prompt": "a bl')

    calls = []

    def counting_fn(prompts, seeds):
        calls.append(list(seeds))
        return teacher_fn(prompts, seeds)

    generate_images(counting_fn, records, out, batch_size=4, rank=0, world=1, progress=False)
    assert calls == [[r.seed for r in records[:4]], [r.seed for r in records[4:]]]  # the partial batch, then the rest
    _assert_same_run(out, reference_run, records)
    # Rerunning a finished folder generates nothing and keeps the manifest.
    calls.clear()
    rate = json.loads((out / "generation.json").read_text())["images_per_s"]
    generate_images(counting_fn, records, out, batch_size=4, rank=0, world=1, progress=False)
    assert calls == []
    _assert_same_run(out, reference_run, records)
    assert json.loads((out / "generation.json").read_text())["images_per_s"] == rate > 0


def test_generator_that_raises_after_k_images_then_resume(teacher_fn, records, reference_run, tmp_path):
    out = tmp_path / "raised"
    n_batches = []

    def flaky(prompts, seeds):
        if n_batches:
            raise RuntimeError("device lost")
        n_batches.append(1)
        return teacher_fn(prompts, seeds)

    with pytest.raises(RuntimeError, match="device lost"):
        generate_images(flaky, records, out, batch_size=4, rank=0, world=1, progress=False)
    assert len(generation.finished_entries(out)) == 4
    generate_images(teacher_fn, records, out, batch_size=4, rank=0, world=1, progress=False)
    _assert_same_run(out, reference_run, records)


def test_two_shards_equal_one_process(teacher_fn, records, reference_run, tmp_path):
    out = tmp_path / "sharded"
    # Process 1 finishes first; process 0 then merges (accelerate's wait_for_everyone orders them for real).
    assert generate_images(teacher_fn, records, out, batch_size=2, rank=1, world=2, progress=False) == {}
    assert not (out / MANIFEST).exists()
    generate_images(teacher_fn, records, out, batch_size=2, rank=0, world=2, progress=False)
    _assert_same_run(out, reference_run, records)
    assert [r.id for r in shard(records, 0, 2) + shard(records, 1, 2)] == [r.id for r in records]


def test_merge_refuses_when_a_shard_is_missing(teacher_fn, records, tmp_path):
    with pytest.raises(RuntimeError, match="rerun the same command"):
        generate_images(teacher_fn, records, tmp_path / "half", batch_size=4, rank=0, world=2, progress=False)


def test_same_folder_with_other_prompts_is_refused(teacher_fn, records, reference_run):
    changed = [PromptRecord(records[0].id, "a green tree in the day", records[0].seed)] + records[1:]
    with pytest.raises(ValueError, match="new output folder"):
        generate_images(teacher_fn, changed, reference_run, rank=0, world=1, progress=False)


def test_student_generate_fn_gives_each_prompt_its_own_generator():
    seen = {}

    def fake_generate(pipe, recipe, prompts, seed, generator=None):
        seen.update(pipe=pipe, recipe=recipe, prompts=prompts, seed=seed, generator=generator)
        return [Image.new("RGB", (8, 8)) for _ in prompts]

    images = student_generate_fn("PIPE", "RECIPE", generate=fake_generate)(["a", "b"], [5, 6])
    assert len(images) == 2 and seen["prompts"] == ["a", "b"]
    draws = [g.initial_seed() for g in seen["generator"]]
    assert draws == [5, 6]


def test_prompt_files_in_every_format(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    recs = load_prompts(tmp_path / "p.txt", base_seed=10)
    assert [(r.id, r.prompt, r.seed) for r in recs] == [("000000", "a cat", 10), ("000001", "a dog", 11)]
    (tmp_path / "p.csv").write_text("id,caption,seed\n42,a cat,7\n43,\"a dog, running\",\n")
    recs = load_prompts(tmp_path / "p.csv")
    assert [(r.id, r.prompt, r.seed) for r in recs] == [("42", "a cat", 7), ("43", "a dog, running", 1)]
    (tmp_path / "p.json").write_text(json.dumps({"x1": "a cat", "x2": "a dog"}))
    assert [r.id for r in load_prompts(tmp_path / "p.json", limit=1)] == ["x1"]
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(ValueError, match="appears twice"):
        load_prompts(tmp_path / "p.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"id": "../x", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="file name"):
        load_prompts(tmp_path / "bad.jsonl")


def _fake_eval_dir(root, name, steps, fid, training_step=None, color=0):
    from stepdistill.eval.generate import save_png
    from stepdistill.eval.report import update_metrics

    root.mkdir()
    (root / "images").mkdir()
    lines = []
    for i in range(3):
        save_png(Image.new("RGB", (16, 16), (color, 40 * i, 0)), root / "images" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "prompt": f"p{i}", "seed": i, "file": f"images/{i}.png"}))
    (root / MANIFEST).write_text("\n".join(lines) + "\n")
    info = {"name": name, "model": name, "method": name.split("-")[0], "steps": steps, "images_per_s": 2.0,
            "training_step": training_step}
    (root / "generation.json").write_text(json.dumps(info))
    update_metrics(root, "fid", {"fid": fid, "kid": 0.004, "protocol": "folder", "n_gen": 3, "n_ref": 3})
    update_metrics(root, "clip", {"score": 0.31, "label": "CLIP ViT-g-14 (raw cos)", "description": "d"}, key="gigagan")


def test_report_compares_runs_with_table_plots_and_grid(tmp_path):
    from stepdistill.eval.report import report

    _fake_eval_dir(tmp_path / "teacher", "teacher-50", 50, 8.6)
    _fake_eval_dir(tmp_path / "dmd1", "dmd-1", 1, 12.5, training_step=1000, color=200)
    _fake_eval_dir(tmp_path / "dmd2", "dmd-1b", 1, 9.5, training_step=2000, color=100)
    text = report([tmp_path / "teacher", tmp_path / "dmd1", tmp_path / "dmd2"], tmp_path / "report")
    assert "| teacher-50 |" in text and "12.50" in text and "CLIP ViT-g-14 (raw cos)" in text
    assert "4.00" in text  # KID x 1e3
    for name in ("report.md", "fid_vs_steps.png", "fid_vs_training_step.png", "grid.png"):
        assert (tmp_path / "report" / name).is_file()
    with Image.open(tmp_path / "report" / "grid.png") as grid:
        assert grid.size[1] == 3 * 128  # one row per run


def test_cli_registers_eval_commands():
    from stepdistill.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "fid", "gen", "--protocol", "coco2014-30k-256", "--ref", "val2014"])
    assert args.protocol == "coco2014-30k-256" and callable(args.func)
    args = parser.parse_args(["eval", "clip", "gen", "--convention", "torchmetrics"])
    assert args.convention == "torchmetrics"
    args = parser.parse_args(["eval", "generate", "--prompts", "p.txt", "--out", "o", "--base", "b", "--steps", "2",
                              "--guidance-scale", "3"])
    assert args.guidance_scale == 3.0
    assert parser.parse_args(["eval", "report", "a", "b", "--out", "r"]).runs == ["a", "b"]


def test_cli_generate_then_fid_then_report_end_to_end(tmp_path, prompts_file, tiny_sd15_dir, monkeypatch):
    """The commands a user types, on the tiny teacher saved to disk, with a tiny feature extractor."""
    from stepdistill.eval import fid as eval_fid
    from stepdistill.eval.cli import build_parser
    torch.manual_seed(0)
    extractor = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 15, stride=15), torch.nn.AdaptiveAvgPool2d(1),
                                    torch.nn.Flatten())
    monkeypatch.setattr(eval_fid, "load_inception", lambda *a, **k: extractor)
    parser = build_parser()
    for name, steps in (("teacher", 2), ("teacher-1", 1)):
        args = parser.parse_args(["generate", "--prompts", str(prompts_file), "--out", str(tmp_path / name),
                                  "--base", str(tiny_sd15_dir), "--steps", str(steps), "--guidance-scale", "2",
                                  "--dtype", "fp32", "--batch-size", "5", "--limit", "6"])
        args.func(args)
        args = parser.parse_args(["fid", str(tmp_path / name), "--ref", str(tmp_path / "teacher" / "images"),
                                  "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--device", "cpu"])
        args.func(args)
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert abs(metrics["fid"]["fid"]) < 1e-6
    args = parser.parse_args(["report", str(tmp_path / "teacher"), str(tmp_path / "teacher-1"), "--out",
                              str(tmp_path / "report")])
    args.func(args)
    assert "teacher-1" in (tmp_path / "report" / "report.md").read_text()


@pytest.fixture(scope="module")
def student_dir(tiny_sd15_dir, tmp_path_factory):
    """An exported student on the tiny SD1.5 teacher: a random non-zero LoRA and a 2-step TCD recipe."""
    from diffusers import DiffusionPipeline

    from stepdistill.core.lora import adapter_state_dict, add_adapter
    from stepdistill.core.recipe import Recipe
    from stepdistill.export import save_diffusers_lora

    out = tmp_path_factory.mktemp("student")
    pipe = DiffusionPipeline.from_pretrained(tiny_sd15_dir)
    params = add_adapter(pipe.unet, "student", 4, 4.0, "full")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_diffusers_lora(adapter_state_dict(pipe.unet, "student"), out, 4, 4.0, targets="full")
    Recipe(base_model=str(tiny_sd15_dir), family="sd15", method="dmd", scheduler_class="TCDScheduler",
           scheduler_config={"timestep_spacing": "trailing"}, num_inference_steps=2, guidance_scale=1.0,
           lora_rank=4, lora_alpha=4.0, training_steps=500).save(out)
    return out


def test_student_generation_through_pipelines_is_batch_independent(student_dir, prompts_file, tmp_path):
    from stepdistill.eval.generate import run_generation

    kwargs = {"lora": student_dir, "limit": 5, "dtype": "fp32", "progress": False}
    info = run_generation(prompts_file, tmp_path / "b2", batch_size=2, **kwargs)
    run_generation(prompts_file, tmp_path / "b5", batch_size=5, **kwargs)
    assert info["role"] == "student" and info["method"] == "dmd" and info["steps"] == 2
    assert info["training_step"] == 500 and info["recipe"]["scheduler_class"] == "TCDScheduler"
    a, b = _pixels(tmp_path / "b2"), _pixels(tmp_path / "b5")
    assert a.keys() == b.keys() and len(a) == 5
    for i in a:
        np.testing.assert_array_equal(a[i], b[i])
    with pytest.raises(ValueError, match="--height"):
        run_generation(prompts_file, tmp_path / "hw", height=32, **kwargs)


@pytest.mark.slow
def test_bench_reports_generation_and_feature_throughput():
    from stepdistill.bench.eval import run_bench

    result = run_bench(n=8, size=128, eval_res=64, workers=(0, 2), batch_size=4)
    assert result["generation_images_per_s"] > 0
    assert set(result["features_images_per_s"]) == {0, 2}
    assert all(rate > 0 for rate in result["features_images_per_s"].values())


@pytest.mark.slow
def test_two_processes_under_torchrun_equal_one_process(tmp_path, prompts_file, tiny_sd15_dir):
    import os
    import subprocess
    import sys

    def run(out, *launcher):
        args = ["-m", "stepdistill.cli", "eval", "generate", "--prompts", str(prompts_file), "--out", str(out),
                "--base", str(tiny_sd15_dir), "--steps", "2", "--guidance-scale", "3", "--dtype", "fp32",
                "--batch-size", "3"]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        subprocess.run([sys.executable, *launcher, *args], check=True, env=env, capture_output=True, timeout=600)

    run(tmp_path / "one")
    run(tmp_path / "two", "-m", "torch.distributed.run", "--nproc_per_node", "2")
    assert json.loads((tmp_path / "two" / "generation.json").read_text())["world_size"] == 2
    assert read_manifest(tmp_path / "one") == read_manifest(tmp_path / "two")
    a, b = _pixels(tmp_path / "one"), _pixels(tmp_path / "two")
    assert all(np.array_equal(a[i], b[i]) for i in a)
