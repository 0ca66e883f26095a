"""Issue 19 on the tiny SD1.5 teacher: tracking, the model card beside every export, push, scripted generation.

One short LCM run (TensorBoard, and W&B offline when installed) serves every test here.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import types

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stepdistill.card import CARD_FILE, GRID_FILE, read_front_matter
from stepdistill.cli import main
from stepdistill.config import load_config
from stepdistill.core.recipe import RECIPE_FILE
from stepdistill.export import DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME
from stepdistill.train.loop import Trainer

from .helpers import ROOT

HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
PROMPT = "a photo of a cat"

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def base_copy(tiny_sd15_dir, tmp_path_factory):
    """The tiny teacher with a model card of its own, whose license the student's card must carry over."""
    base = tmp_path_factory.mktemp("base") / "sd15"
    shutil.copytree(tiny_sd15_dir, base)
    (base / CARD_FILE).write_text("---\nlicense: creativeml-openrail-m\ntags: [tiny]\n---\n# tiny teacher\n")
    return base


@pytest.fixture(scope="module")
def run(base_copy, prompts_file, tmp_path_factory):
    if not HAS_TENSORBOARD:
        pytest.skip("tensorboard is not installed: pip install 'stepdistill[tensorboard]'")
    trackers = ["tensorboard", "wandb"] if HAS_WANDB else ["tensorboard"]
    out = tmp_path_factory.mktemp("eco") / "run"
    env = pytest.MonkeyPatch()
    env.setenv("WANDB_MODE", "offline")  # no network: W&B writes its run folder only
    env.setenv("WANDB_SILENT", "true")
    try:
        cfg = load_config(ROOT / "configs/tiny/lcm_sd15.yaml", [
            f"model.path={base_copy}", f"data.prompts={prompts_file}", "loop.max_steps=2", "loop.progress=false",
            "loop.sample_every=2", "loop.checkpoint_every=2", f"loop.report_to=[{','.join(trackers)}]",
        ])
        trainer = Trainer(cfg, out)
        trainer.run()
        trainer.close()
    finally:
        env.undo()
    return out


def _log_records(run):
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


# ---- tracking ----

def test_tensorboard_scalars_match_log_jsonl(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    records = _log_records(run)
    keys = {k for r in records for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert {"loss", "it_per_s", "student_lr", "student_grad_norm", "nonfinite_steps"} <= keys
    assert keys <= set(acc.Tags()["scalars"])
    for key in keys:
        logged = [(r["step"], r[key]) for r in records if key in r]
        tracked = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in tracked] == [s for s, _ in logged], key
        assert [v for _, v in tracked] == pytest.approx([v for _, v in logged], rel=1e-6, abs=1e-12), key
    assert "samples" in acc.Tags()["images"] and [e.step for e in acc.Images("samples")] == [2]


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed: pip install 'stepdistill[wandb]'")
def test_wandb_offline_writes_its_run_folder(run):
    runs = list((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), sorted(p.name for p in (run / "wandb").iterdir())


# ---- model card ----

def test_export_has_a_hub_model_card(run, base_copy):
    final = run / "final"
    meta = read_front_matter(final / CARD_FILE)
    # A local base is no Hub model id: the Hub would reject it as base_model, so the card names it in its text only.
    assert "base_model" not in meta and meta["library_name"] == "diffusers"
    assert str(base_copy) in (final / CARD_FILE).read_text()
    assert meta["pipeline_tag"] == "text-to-image" and meta["license"] == "creativeml-openrail-m"
    assert {"lora", "text-to-image", "stepdistill", "lcm"} <= set(meta["tags"])
    text = (final / CARD_FILE).read_text()
    assert "LCMScheduler.from_config" in text and "num_inference_steps=4" in text and "guidance_scale=0.0" in text
    assert "`optim.lr` | 0.001" in text and "training steps (student updates)` | 2" in text
    assert (final / GRID_FILE).read_bytes() == (run / "samples" / "step-000002.png").read_bytes()
    assert f"![samples]({GRID_FILE})" in text


def _snippet(card) -> str:
    text = card.read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def test_card_snippet_reproduces_stepdistill_generate(run, tmp_path, monkeypatch):
    final = run / "final"
    out = tmp_path / "generate.png"
    assert main(["generate", "--lora", str(final), "--prompt", PROMPT, "--seed", "0", "--out", str(out)]) == 0
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_snippet(final / CARD_FILE), "README.md", "exec"), namespace)  # noqa: S102 (the test's point)
    assert np.array_equal(_pixels(namespace["image"]), _pixels(Image.open(out)))
    assert (tmp_path / "stepdistill.png").is_file()


@pytest.mark.parametrize("fmt", ["kohya", "merged"])
def test_export_command_writes_a_card_that_loads_its_weights(fmt, run, tmp_path, monkeypatch):
    out = tmp_path / fmt
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(out)]) == 0
    assert read_front_matter(out / CARD_FILE)["library_name"] == "diffusers" and (out / GRID_FILE).is_file()
    snippet = _snippet(out / CARD_FILE)
    assert (f"weight_name={KOHYA_WEIGHT_NAME!r}" if fmt == "kohya" else "DiffusionPipeline.from_pretrained(model)") in snippet
    assert ("merged" if fmt == "merged" else "lora") in read_front_matter(out / CARD_FILE)["tags"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    reference = tmp_path / "ref.png"
    main(["generate", "--lora", str(run / "final"), "--prompt", PROMPT, "--out", str(reference)])
    assert np.abs(_pixels(namespace["image"]) - _pixels(Image.open(reference))).max() <= 2


# ---- push ----

def test_push_offline_fails_in_one_line(run, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["push", "--run", str(run), "--repo-id", "someone/tiny"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "HF_HUB_OFFLINE" in err and "Traceback" not in err


def test_push_without_token_fails_in_one_line(run, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code = main(["push", "--run", str(run), "--repo-id", "someone/tiny"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "\n" not in err and "token" in err


def test_push_uploads_exactly_the_listed_files(run, monkeypatch, capsys):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create_repo"] = (repo_id, kwargs)
            return f"https://huggingface.co/{repo_id}"

        def create_commit(self, repo_id, operations, **kwargs):
            calls["commit"] = (repo_id, list(operations), kwargs)
            return types.SimpleNamespace(commit_url="x")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake")
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert main(["push", "--run", str(run), "--repo-id", "someone/tiny", "--private"]) == 0
    assert calls["token"] == "hf_fake"
    assert calls["create_repo"] == ("someone/tiny", {"repo_type": "model", "private": True, "exist_ok": True})
    repo_id, ops, _ = calls["commit"]
    assert repo_id == "someone/tiny"
    assert sorted(op.path_in_repo for op in ops) == sorted(
        [DIFFUSERS_WEIGHT_NAME, KOHYA_WEIGHT_NAME, RECIPE_FILE, CARD_FILE, GRID_FILE])
    card = next(op for op in ops if op.path_in_repo == CARD_FILE).path_or_fileobj
    card = card.read() if hasattr(card, "read") else card
    # The base is a local folder: no Hub model id, so the front matter omits base_model (the Hub would refuse it).
    assert b"lora = 'someone/tiny'" in card and "base_model" not in yaml.safe_load(card.split(b"---")[1])
    assert "pushed" in capsys.readouterr().out


# ---- scripted generation ----

def test_generate_prompts_file_writes_numbered_pngs_and_jsonl(run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\na red cat on the sea\n")
    out = tmp_path / "images"
    assert main(["generate", "--lora", str(run / "final"), "--prompts", str(prompts), "--n", "4",
                 "--batch-size", "3", "--seed", "10", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(8)]
    lines = [json.loads(x) for x in (out / "images.jsonl").read_text().splitlines()]
    assert [x["file"] for x in lines] == [f"{i:06d}.png" for i in range(8)]
    assert [x["prompt"] for x in lines] == [PROMPT] * 4 + ["a red cat on the sea"] * 4
    assert [x["seed"] for x in lines] == list(range(10, 18))
    assert all(x["recipe"]["scheduler_class"] == "LCMScheduler" for x in lines)
    # The recorded seed redoes an image alone (batching may move a pixel by a rounding step at most).
    single = tmp_path / "single.png"
    assert main(["generate", "--lora", str(run / "final"), "--prompt", lines[5]["prompt"], "--seed",
                 str(lines[5]["seed"]), "--out", str(single)]) == 0
    assert np.abs(_pixels(Image.open(single)) - _pixels(Image.open(out / lines[5]["file"]))).max() <= 2


def test_two_loras_at_half_weight_equal_one_at_full(run, tmp_path):
    """--lora given twice mixes LoRAs by their weights: the same LoRA twice at 0.5 is that LoRA at 1."""
    final = str(run / "final")
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["generate", "--lora", final, "--prompt", PROMPT, "--lora-weight", "1.0", "--out", str(one)]) == 0
    assert main(["generate", "--lora", final, "--lora", final, "--lora-weight", "0.5", "--lora-weight", "0.5",
                 "--prompt", PROMPT, "--out", str(two)]) == 0
    assert np.abs(_pixels(Image.open(one)) - _pixels(Image.open(two))).max() <= 2


def test_lora_weight_count_must_match(run, tmp_path, capsys):
    code = main(["generate", "--lora", str(run / "final"), "--lora-weight", "1", "--lora-weight", "1",
                 "--prompt", PROMPT, "--out", str(tmp_path / "x.png")])
    assert code == 2 and "one weight per --lora" in capsys.readouterr().err

