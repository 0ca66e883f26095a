"""Issue 10, reliability, end to end on the tiny models: kill a run anywhere and rerun it (same result, bit for bit),
damaged checkpoints, NaN and out-of-memory steps, a full disk, bad data, and bad input at the command line.

Kills: the run is forked from this process and SIGKILLs itself at a fault point (stepdistill/train/faults.py), so a
kill costs the steps it runs, not a fresh interpreter's imports; test_train_lcm.py's
test_resume_after_kill_is_bit_identical kills a real `stepdistill train` subprocess. The uninterrupted and the
resumed runs go through stepdistill.cli.main in this process, with one thread, so both reduce in the same order.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import signal
import sys
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from stepdistill.cli import main
from stepdistill.core.recipe import Recipe
from stepdistill.methods.base import LossOut
from stepdistill.methods.consistency import ConsistencyDistiller
from stepdistill.train import checkpoint as ckpt

from .helpers import ROOT, lora_tensors

LCM = "configs/tiny/lcm_sd15.yaml"

# method -> (preset, --set overrides). tscd: two stages (k = 2, then 1) with the boundary at step 2.
RUNS = {
    "lcm": (LCM, ("loop.max_steps=4", "loop.checkpoint_every=2")),
    "tscd": (LCM, ("method.name=tscd", "method.segments=[2, 1]", "method.stage_steps=[2, 1]", "loop.max_steps=3",
                   "loop.checkpoint_every=1")),
    "dmd": ("configs/tiny/dmd_sd15.yaml", ("loop.max_steps=3", "loop.checkpoint_every=1")),
    # loop.ema_decay: the exported average must come back from the checkpoint too
    "dmd_ema": ("configs/tiny/dmd_sd15.yaml", ("loop.max_steps=3", "loop.checkpoint_every=1", "loop.ema_decay=0.9")),
    # disback: stage 1 (recording node 1) is step 1, stage 2 (backtracking) steps 2-3.
    "disback": ("configs/tiny/disback_sd15.yaml", ("loop.max_steps=3", "loop.checkpoint_every=1")),
}

# (method, kill point, the checkpoint the rerun must resume from: 0 = none, start over).
KILLS = [
    ("lcm", "mid-step:3", 2),  # between the student update and after_step
    ("lcm", "checkpoint-write:4", 2),  # checkpoint half written
    ("lcm", "checkpoint:4", 2),  # checkpoint written and marked complete, not yet renamed into place
    ("lcm", "export:4", 4),  # final LoRA written, not yet published
    ("tscd", "export:2", 1),  # the stage-1 (k=2) LoRA export at the stage boundary
    ("tscd", "checkpoint:2", 1),  # just after the stage boundary: stage export published, its checkpoint not
    ("dmd", "mid-step:2", 1),  # between the student and the critic updates
    ("dmd", "checkpoint:2", 1),
    ("dmd_ema", "mid-step:3", 2),
    ("disback", "checkpoint:1", 0),  # stage 1 -> 2: node 1 recorded and backtracking begun, checkpoint not published
    ("disback", "mid-step:2", 1),  # the first backtracking step, resumed from the stage-boundary checkpoint
]


def _argv(method, out, model, prompts, *extra) -> list[str]:
    preset, sets = RUNS[method]
    if not (ROOT / preset).is_file():
        pytest.skip(f"{preset} does not exist yet")
    argv = ["train", "--config", str(ROOT / preset), "--output-dir", str(out)]
    for s in (f"model.path={model}", f"data.prompts={prompts}", "loop.progress=false", *sets, *extra):
        argv += ["--set", s]
    return argv


def run_killed(argv, point: str) -> int:
    """Run `stepdistill <argv>` in a forked child that SIGKILLs itself at `point`; the child's wait status."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 3
        try:
            os.environ["STEPDISTILL_KILL_AT"] = point
            main(argv)
            code = 4  # finished: the kill point was never reached
        except BaseException:  # noqa: BLE001 (whatever it is, report it and leave through os._exit)
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return status


@pytest.fixture(scope="module")
def straight(tiny_sd15_dir, prompts_file, tmp_path_factory):
    """method -> the folder of its uninterrupted run (trained on first use)."""
    runs = {}

    def get(method):
        if method not in runs:
            out = tmp_path_factory.mktemp(f"straight-{method}") / "run"
            assert main(_argv(method, out, tiny_sd15_dir, prompts_file)) == 0
            runs[method] = out
        return runs[method]

    return get


def _assert_same_file(a: Path, b: Path):
    """Same tensors, bit for bit, and the same metadata (safetensors writes metadata keys in no fixed order)."""
    if a.name == "README.md":  # the model card names its own folder in the usage snippet
        assert a.read_text().replace(str(a.parent), "DIR") == b.read_text().replace(str(b.parent), "DIR")
        return
    if a.suffix != ".safetensors":
        assert a.read_bytes() == b.read_bytes(), a.name
        return
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():  # noqa: SIM118 (not a dict)
            assert torch.equal(fa.get_tensor(k), fb.get_tensor(k)), f"{a.name}: {k} differs"


def _assert_same_export(a: Path, b: Path):
    """Every file of two export folders (diffusers and kohya LoRA, recipe) the same."""
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "pytorch_lora_weights.safetensors" in names
    for name in names:
        _assert_same_file(a / name, b / name)


@pytest.mark.parametrize("method, point, resume_from", KILLS, ids=[f"{m}-{p}" for m, p, _ in KILLS])
def test_kill_anywhere_and_rerun_gives_the_same_lora(method, point, resume_from, straight, tiny_sd15_dir,
                                                     prompts_file, tmp_path):
    """SIGKILL at `point`, rerun the same command: it resumes from the latest complete checkpoint and ends with the
    LoRA (and every stage LoRA) of the uninterrupted run, bit for bit: RNG states, data order, EMA target, optimizer,
    step counter and stage index all came back."""
    reference = straight(method)
    out = tmp_path / "run"
    argv = _argv(method, out, tiny_sd15_dir, prompts_file)
    status = run_killed(argv, point)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"not killed at {point} ({status})"

    # What the kill left: the last complete checkpoint, and no half-published folder under a real name.
    found = ckpt.load_latest(out / "checkpoints", 0, 1)
    assert (found[0]["step"] if found else 0) == resume_from
    assert not (out / "final").exists()
    if point.startswith("export"):
        assert [p for p in out.rglob(".*.tmp") if p.is_dir()], "the export was being written to a temp folder"
        assert not (out / "stages" / "stage1-k2").exists()

    assert main(argv) == 0
    _assert_same_export(reference / "final", out / "final")
    stages = sorted(str(p.relative_to(reference)) for p in reference.glob("stages/*"))
    assert stages == (["stages/stage1-k2", "stages/stage2-k1"] if method == "tscd" else [])
    for stage in stages:
        _assert_same_export(reference / stage, out / stage)
    if method == "tscd":
        assert Recipe.load(out / stages[0]).training_steps == 2  # the export belongs to the update that ended stage 1
    nodes = sorted(p.name for p in reference.glob("nodes/*"))
    assert nodes == sorted(p.name for p in out.glob("nodes/*")) and bool(nodes) == (method == "disback")
    for name in nodes:  # DisBack's recorded path
        _assert_same_file(reference / "nodes" / name, out / "nodes" / name)


def test_corrupt_newest_checkpoint_is_skipped_and_the_run_still_matches(straight, tiny_sd15_dir, prompts_file,
                                                                        tmp_path, caplog):
    """Truncated state.pt in the newest checkpoint, and a stale temp folder: the rerun warns, resumes from the one
    before and ends bit-identical to the uninterrupted run."""
    reference = straight("lcm")
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns("final"))
    state = out / "checkpoints" / "step-000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    stale = out / "checkpoints" / f"{ckpt.TMP_PREFIX}000006"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half")
    with caplog.at_level(logging.INFO):
        assert main(_argv("lcm", out, tiny_sd15_dir, prompts_file)) == 0
    assert "step-000004 is partial or corrupt" in caplog.text and "resumed from" in caplog.text
    assert "step-000002 (step 2)" in caplog.text
    _assert_same_export(reference / "final", out / "final")
    assert not stale.exists()


# ---- numerical faults, out of memory, full disk -----------------------------------------------------------------

def _patch_student_loss(monkeypatch, fault):
    """Wrap the consistency loss: `fault(out, nets, step)` may change it or raise."""
    real = ConsistencyDistiller.student_loss

    def patched(self, nets, batch, step):
        return fault(real(self, nets, batch, step), nets, step)

    monkeypatch.setattr(ConsistencyDistiller, "student_loss", patched)


def _nan_loss_at(steps):
    def fault(out, nets, step):
        return LossOut(out.loss * float("nan"), out.logs) if step + 1 in steps else out
    return fault


def _nan_grad_at(steps):
    """Finite loss, NaN gradients: d sqrt(x)/dx at 0 is inf, times 0."""
    def fault(out, nets, step):
        if step + 1 not in steps:
            return out
        p = next(p for n, p in nets.denoiser.named_parameters() if ".student." in n and p.requires_grad)
        return LossOut(out.loss + torch.sqrt(p.abs() * 0).sum(), out.logs)
    return fault


def _student_lora(checkpoint: Path) -> dict:
    lora = torch.load(checkpoint / "state.pt", weights_only=False)["lora"]
    return {k: v for k, v in lora.items() if ".student." in k}


def _log(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fault", [_nan_loss_at, _nan_grad_at], ids=["nan-loss", "nan-grad"])
def test_non_finite_step_is_skipped_and_counted(fault, tiny_sd15_dir, prompts_file, tmp_path, monkeypatch):
    _patch_student_loss(monkeypatch, fault({2}))
    out = tmp_path / "run"
    argv = _argv("lcm", out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.checkpoint_every=1",
                 "loop.keep_last=3")
    assert main(argv) == 0
    log = {x["step"]: x for x in _log(out)}
    assert "student_skipped" not in log[1] and log[1]["nonfinite_steps"] == 0
    assert log[2]["student_skipped"] == 1 and log[2]["nonfinite_steps"] == 1
    assert "student_skipped" not in log[3] and log[3]["nonfinite_steps"] == 1
    # The skipped update changed nothing; the next one trained again.
    ckpts = out / "checkpoints"
    before, skipped, after = (_student_lora(ckpts / f"step-00000{i}") for i in (1, 2, 3))
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    final = lora_tensors(out / "final")
    assert all(torch.isfinite(v).all() for v in final.values())


def test_too_many_non_finite_steps_stop_the_run_naming_the_last_good_checkpoint(tiny_sd15_dir, prompts_file,
                                                                                 tmp_path, monkeypatch, capsys):
    _patch_student_loss(monkeypatch, _nan_loss_at({2, 3, 4, 5}))
    out = tmp_path / "run"
    argv = _argv("lcm", out, tiny_sd15_dir, prompts_file, "loop.max_steps=5", "loop.checkpoint_every=1",
                 "loop.max_nonfinite_in_a_row=2")
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "2 non-finite steps in a row" in err and "up to step 3" in err
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-000002'}" in err and "rerun the same command" in err
    assert not (out / "final").exists()
    # Rerun once the cause is gone: it resumes there and finishes.
    monkeypatch.undo()
    assert main(argv) == 0 and Recipe.load(out / "final").training_steps == 5


def test_gpu_out_of_memory_names_the_settings_that_reduce_memory(tiny_sd15_dir, prompts_file, tmp_path, monkeypatch,
                                                                 capsys):
    def oom(out, nets, step):
        if step + 1 == 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return out

    _patch_student_loss(monkeypatch, oom)
    out = tmp_path / "run"
    assert main(_argv("lcm", out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.checkpoint_every=1")) == 1
    err = _one_line_error(capsys)
    assert err.startswith("stepdistill: error: out of GPU memory at step 2")
    for setting in ("data.batch_size=1", "loop.grad_accum=2", "model.gradient_checkpointing=true", "lora.rank=2",
                    "model.resolution"):
        assert setting in err
    assert f"Last good checkpoint: {out / 'checkpoints' / 'step-000001'}" in err


def test_run_refuses_to_start_without_disk_space_for_a_checkpoint(straight, tiny_sd15_dir, prompts_file, tmp_path,
                                                                  monkeypatch, capsys):
    from stepdistill.config import load_config
    from stepdistill.train.loop import Trainer

    # The estimate covers a real checkpoint of this run (LoRA tensors + AdamW moments + RNG and data state).
    preset, sets = RUNS["lcm"]
    cfg = load_config(ROOT / preset, [*sets, f"model.path={tiny_sd15_dir}", f"data.prompts={prompts_file}",
                                      "loop.progress=false"])
    trainer = Trainer(cfg, tmp_path / "probe")
    trainer.setup()
    lora_bytes = sum(p.numel() * p.element_size() for n, p in trainer.built.nets.denoiser.named_parameters()
                     if "lora_" in n)
    written = sum(f.stat().st_size for f in (straight("lcm") / "checkpoints" / "step-000004").iterdir())
    need = trainer.checkpoint_bytes()
    assert need >= max(written, 3 * lora_bytes)

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need - 1))
    out = tmp_path / "run"
    assert main(_argv("lcm", out, tiny_sd15_dir, prompts_file)) == 1
    err = _one_line_error(capsys)
    assert "not enough free disk space" in err and "--output-dir" in err
    assert not (out / "checkpoints").exists()


def test_disk_full_while_checkpointing_stops_and_keeps_the_previous_checkpoint(tiny_sd15_dir, prompts_file, tmp_path,
                                                                              monkeypatch, capsys):
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-000002" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert main(_argv("lcm", out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.checkpoint_every=1")) == 1
    err = _one_line_error(capsys)
    assert "could not write the checkpoint of step 2" in err and "No space left" in err
    assert f"last good checkpoint: {out / 'checkpoints' / 'step-000001'}" in err
    assert [d.name for d in (out / "checkpoints").iterdir()] == ["step-000001"]  # no half-written temp folder
    assert ckpt.load_latest(out / "checkpoints", 0, 1)[0]["step"] == 1


# ---- bad data, end to end ---------------------------------------------------------------------------------------

def test_bad_images_and_long_captions_are_skipped_counted_and_reported(tiny_sd15_dir, prompts_file, tmp_path,
                                                                       caplog):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        Image.new("RGB", (24, 24), color).save(folder / f"ok{i}.png")
        (folder / f"ok{i}.txt").write_text("a red circle" if i else " ".join(["a big red circle"] * 30))
    (folder / "corrupt.png").write_bytes(b"not an image")
    (folder / "corrupt.txt").write_text("a cat")
    Image.new("RGB", (24, 24)).save(folder / "uncaptioned.png")
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        assert main(_argv("lcm", out, tiny_sd15_dir, prompts_file, f"data.images={folder}", "loop.max_steps=1",
                         "data.max_bad_fraction=0.5")) == 0  # 2 of 5 files bad, on purpose
    report = {r["kind"]: r for r in json.loads((out / "data_report.json").read_text())}
    assert report["images"]["kept"] == 3 and report["images"]["skipped_count"] == 2
    assert sorted(s.split(":")[0] for s in report["images"]["skipped"]) == ["corrupt.png", "uncaptioned.png"]
    assert report["tokenizer"]["truncated_by_tokenizer"] == 1 and report["tokenizer"]["max_tokens"] == 77
    # ... and said again at the end of the run, where it is seen.
    end = [r.getMessage() for r in caplog.records if r.getMessage().startswith("data: images")]
    assert len(end) == 1 and "skipped_count=2" in end[0] and "truncated_by_tokenizer=1" in end[0]


def test_prompt_file_problems_are_reported(tiny_sd15_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a red circle\n\n\xff a blue square\n" + b" ".join([b"red"] * 90) + b"\n")
    out = tmp_path / "run"
    assert main(_argv("lcm", out, tiny_sd15_dir, prompts, "loop.max_steps=1", "data.max_prompt_words=80",
                      "data.max_bad_fraction=0.5")) == 0  # 1 undecodable line of 3, on purpose
    report = {r["kind"]: r for r in json.loads((out / "data_report.json").read_text())}
    assert report["prompts"] == {"kind": "prompts", "source": str(prompts), "kept": 2, "empty_lines": 1,
                                 "undecodable_lines": 1, "truncated": 1}
    assert report["tokenizer"]["truncated_by_tokenizer"] == 1  # 80 words + 2 special tokens > 77


# ---- bad input at the command line: exit code 2 and one line, no traceback -----------------------------------

def _one_line_error(capsys) -> str:
    """The error line, checked to be one line and the last thing written (progress bars may come before it)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("stepdistill: error: "), err
    return err.splitlines()[-1]


def _unsupported_folder(tmp_path):
    folder = tmp_path / "hunyuan"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanDiTPipeline"}))
    return folder


def _prompt_file(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, match", [
    ("missing-model", "no model at .*nothing: pass model.path="),
    ("not-a-pipeline", "not a diffusers pipeline folder .no model_index.json"),
    ("unsupported-pipeline", "HunyuanDiTPipeline pipeline, which stepdistill does not support"),
    ("wrong-family", "model.family='sdxl' but .* holds a sd15 model"),
    ("missing-prompts", "no prompts file at .*absent.txt: pass --set data.prompts=FILE"),
    ("empty-prompts", "has no usable prompts .* one prompt per line"),
    ("unknown-key", "unknown config key 'loop.max_stpes'; did you mean 'loop.max_steps'"),
    ("bad-value", "loop.max_steps must be an integer"),
])
def test_train_bad_input_exits_2_with_one_line(case, match, tiny_sd15_dir, prompts_file, tmp_path, capsys):
    model, prompts, extra = tiny_sd15_dir, prompts_file, []
    if case == "missing-model":
        model = tmp_path / "nothing"
    elif case == "not-a-pipeline":
        model = tmp_path
    elif case == "unsupported-pipeline":
        model = _unsupported_folder(tmp_path)
    elif case == "wrong-family":
        extra = ["model.family=sdxl"]
    elif case == "missing-prompts":
        prompts = tmp_path / "absent.txt"
    elif case == "empty-prompts":
        prompts = _prompt_file(tmp_path, "\n  \n\n")
    elif case == "unknown-key":
        extra = ["loop.max_stpes=3"]
    elif case == "bad-value":
        extra = ["loop.max_steps=many"]
    assert main(_argv("lcm", tmp_path / "run", model, prompts, *extra)) == 2
    assert re.search(match, _one_line_error(capsys))


def test_bad_yaml_config_file_exits_2_with_one_line(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("method: {name: lcm\nloop: [\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "is not valid YAML" in _one_line_error(capsys)


# ---- generate and eval with the wrong artifacts --------------------------------------------------------------

@pytest.fixture
def lora_copy(straight, tmp_path):
    """A copy of the lcm run's final LoRA folder, with recipe fields changed by `edit(**fields)`."""
    folder = tmp_path / "lora"
    shutil.copytree(straight("lcm") / "final", folder)

    def edit(**fields):
        path = folder / "stepdistill.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
        return folder

    return edit


def test_generate_writes_the_image(lora_copy, tiny_sd15_dir, tmp_path):
    from PIL import Image

    out = tmp_path / "img" / "cat.png"
    argv = ["generate", "--lora", str(lora_copy()), "--base", str(tiny_sd15_dir), "--prompt", "a red circle",
            "--steps", "1", "--out", str(out)]
    assert main(argv) == 0
    with Image.open(out) as im:
        assert im.size == (16, 16)
    assert [p.name for p in out.parent.iterdir()] == ["cat.png"]  # no temp file left


@pytest.mark.parametrize("case, match", [
    ("other-family-base", "this LoRA was trained for sd15 .* but .* is a StableDiffusionXLPipeline"),
    ("other-architecture", "this LoRA was trained for sdxl .* does not fit"),
    ("newer-recipe", "recipe format 99, newer than this stepdistill reads .1.: upgrade stepdistill"),
    ("missing-scheduler", "unknown scheduler class 'FancyScheduler'"),
    ("no-recipe", "no stepdistill.json at .*: pass the folder a stepdistill run exported"),
    ("timesteps-and-steps", "fixes its timesteps \\[999, 499\\]: drop --steps"),
    ("bad-out", "--out .*cat.gif must end in one of"),
])
def test_generate_with_the_wrong_artifacts_exits_2_with_one_line(case, match, lora_copy, tiny_sd15_dir,
                                                                 tiny_sdxl_dir, tmp_path, capsys):
    base, lora, out = tiny_sd15_dir, None, tmp_path / "cat.png"
    if case == "other-family-base":
        base = tiny_sdxl_dir
    elif case == "other-architecture":  # the same LoRA labelled sdxl: its modules do not fit the SDXL UNet
        base, lora = tiny_sdxl_dir, lora_copy(family="sdxl", base_model=str(tiny_sdxl_dir))
    elif case == "newer-recipe":
        lora = lora_copy(format_version=99)
    elif case == "missing-scheduler":
        lora = lora_copy(scheduler_class="FancyScheduler")
    elif case == "no-recipe":
        lora = lora_copy()
        (lora / "stepdistill.json").unlink()
    elif case == "timesteps-and-steps":
        lora = lora_copy(timesteps=[999, 499])
    elif case == "bad-out":
        out = tmp_path / "cat.gif"
    argv = ["generate", "--lora", str(lora or lora_copy()), "--base", str(base), "--prompt", "a red circle",
            "--steps", "1", "--out", str(out)]
    assert main(argv) == 2
    assert re.search(match, _one_line_error(capsys))
    assert not out.exists()


@pytest.mark.parametrize("case, match", [
    ("newer-recipe", "upgrade stepdistill"),
    ("missing-scheduler", "unknown scheduler class"),
    ("other-family-base", "this LoRA was trained for sd15 .* StableDiffusionXLPipeline"),
])
def test_eval_with_the_wrong_artifacts_exits_2_with_one_line(case, match, lora_copy, tiny_sdxl_dir, tmp_path, capsys):
    fields = {"newer-recipe": {"format_version": 99}, "missing-scheduler": {"scheduler_class": "FancyScheduler"},
              "other-family-base": {"base_model": str(tiny_sdxl_dir)}}[case]
    out = tmp_path / "toy.json"
    assert main(["eval", "toy", "--lora", str(lora_copy(**fields)), "--n", "2", "--out", str(out)]) == 2
    assert re.search(match, _one_line_error(capsys))
    assert not out.exists()


def test_export_of_an_unfinished_run_exits_2(tmp_path, capsys):
    assert main(["export", "--run", str(tmp_path), "--format", "kohya", "--out", str(tmp_path / "x")]) == 2
    assert "no stepdistill.json" in _one_line_error(capsys)


def test_export_of_a_lora_without_its_alpha_exits_2(lora_copy, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    run.mkdir()
    shutil.move(lora_copy(), run / "final")
    weights = run / "final" / "pytorch_lora_weights.safetensors"
    save_file(load_file(str(weights)), str(weights))  # the same tensors, without the alpha metadata
    assert main(["export", "--run", str(run), "--format", "kohya", "--out", str(tmp_path / "x")]) == 2
    assert "its alpha is unknown: re-export it with stepdistill" in _one_line_error(capsys)
