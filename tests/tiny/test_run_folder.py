"""Issue 37: a run folder belongs to one run, and every failure is one line.

Locks (two processes on one folder), a reused folder checked against its recorded config before anything is written,
Ctrl-C and the resumed log, the one top-level CLI handler (paths, a full disk, a wrong base, STEPDISTILL_DEBUG), and
the conveniences around exports (the user's README kept, --lora given the .safetensors file, merged pipelines).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from stepdistill.cli import main
from stepdistill.methods.consistency import ConsistencyDistiller
from stepdistill.models.tiny import save_tiny_pipeline
from stepdistill.train.rundir import LOCK_FILE, RunFolderError, RunLock

from .helpers import ROOT, assert_same_lora, cli_env, run_cli, train_args

LCM = "configs/tiny/lcm_sd15.yaml"


def _argv(out, model, prompts, *sets):
    return [str(a) for a in train_args(LCM, out, model, prompts, *sets)]


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("stepdistill: error: "), err
    return err.splitlines()[-1]


@pytest.fixture(scope="module")
def lone_run(tiny_sd15_dir, prompts_file, tmp_path_factory):
    """A 2-step lcm run, trained alone: what any run on these settings must give."""
    out = tmp_path_factory.mktemp("lone") / "run"
    assert main(_argv(out, tiny_sd15_dir, prompts_file, "loop.max_steps=2", "loop.checkpoint_every=1")) == 0
    return out


# ---- the lock ---------------------------------------------------------------------------------------------------

def test_second_run_on_a_busy_folder_refuses_and_the_first_trains_as_alone(tiny_sd15_dir, prompts_file, tmp_path):
    sets = ("loop.max_steps=3", "loop.checkpoint_every=1")
    lone = tmp_path / "lone"
    run_cli(train_args(LCM, lone, tiny_sd15_dir, prompts_file, *sets))
    shared = tmp_path / "shared"
    code = "import sys, torch; torch.set_num_threads(1); from stepdistill.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, *map(str, train_args(LCM, shared, tiny_sd15_dir, prompts_file, *sets))]
    first = subprocess.Popen(cmd, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while not (shared / LOCK_FILE).is_file():
            assert first.poll() is None and time.time() < deadline, "the first run never claimed its folder"
            time.sleep(0.05)
        # Paused while it holds the folder, so the second run meets it whatever the machine's speed.
        os.kill(first.pid, signal.SIGSTOP)
        second = run_cli(train_args(LCM, shared, tiny_sd15_dir, prompts_file, *sets, "seed=7"), check=False)
        os.kill(first.pid, signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr and line.startswith("stepdistill: error: ")
    assert f"pid {first.pid}" in line and "in use by another run" in line and "--output-dir" in line
    assert "seed: 0" in (shared / "resolved_config.yaml").read_text()  # the second run wrote nothing
    steps = [json.loads(x)["step"] for x in (shared / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert not (shared / LOCK_FILE).exists()  # released at the end
    assert_same_lora(lone / "final", shared / "final")


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(lone_run, tiny_sd15_dir, prompts_file, tmp_path,
                                                                   caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    out.mkdir()
    import socket

    (out / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "earlier"}))
    assert main(_argv(out, tiny_sd15_dir, prompts_file, "loop.max_steps=2", "loop.checkpoint_every=1")) == 0
    assert f"locked by pid {dead.pid}, which is no longer running" in caplog.text
    assert not (out / LOCK_FILE).exists()
    assert_same_lora(lone_run / "final", out / "final")


def test_lock_held_by_a_live_process_or_another_host_refuses(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": os.getppid(), "host": __import__("socket").gethostname()}))
    with pytest.raises(RunFolderError, match="in use by another run"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(RunFolderError, match="host elsewhere.*delete"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_FILE).unlink()
    lock = RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


# ---- a reused folder ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_base(tmp_path_factory):
    """A tiny SD1.5 of the same architecture with other weights."""
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd15_seed1", family="sd15", seed=1)


@pytest.mark.parametrize("change, key", [
    (("method.name=tscd", "method.segments=[2, 1]", "method.stage_steps=[2, 1]"), "method.name"),
    (("lora.rank=8",), "lora.rank"),
    (("lora.targets=attn",), "lora.targets"),
    ((), "model.path"),
], ids=["method", "rank", "targets", "base"])
def test_reused_folder_with_another_config_is_refused_before_any_write(change, key, lone_run, other_base,
                                                                      tiny_sd15_dir, prompts_file, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(lone_run, out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    model = other_base if key == "model.path" else tiny_sd15_dir
    code = main(_argv(out, model, prompts_file, "loop.max_steps=3", *change))
    line = _one_line_error(capsys)
    assert code == 2 and key in line and "--output-dir" in line and "to resume that one" in line
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # resolved_config.yaml, log, checkpoints, final: untouched


def test_reused_folder_with_the_same_settings_resumes(lone_run, tiny_sd15_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(lone_run, out)
    assert main(_argv(out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.checkpoint_every=1")) == 0
    assert "max_steps: 3" in (out / "resolved_config.yaml").read_text()
    assert [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]


# ---- Ctrl-C, the resumed log, and the one-line handler -------------------------------------------------------------

def test_ctrl_c_says_rerun_resumes_and_the_resumed_log_holds_each_step_once(lone_run, tiny_sd15_dir, prompts_file,
                                                                              tmp_path, monkeypatch, capsys):
    real = ConsistencyDistiller.student_loss
    calls = {"n": 0}

    def interrupted(self, nets, batch, step):
        calls["n"] += 1
        if calls["n"] == 2:  # in update 2: update 1 is logged and checkpointed
            raise KeyboardInterrupt
        return real(self, nets, batch, step)

    out = tmp_path / "run"
    argv = _argv(out, tiny_sd15_dir, prompts_file, "loop.max_steps=2", "loop.checkpoint_every=1")
    with monkeypatch.context() as m:
        m.setattr(ConsistencyDistiller, "student_loss", interrupted)
        assert main(argv) == 130
    line = _one_line_error(capsys)
    assert "interrupted at step 1" in line and "step-000001" in line and "Rerun the same command to resume" in line
    assert "KeyboardInterrupt" in (out / "error.log").read_text()  # the traceback is kept in the run folder
    # A record past the checkpoint (as a kill after logging, before checkpointing, leaves) is dropped on resume.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 2, "loss": 1.0}) + "\n")
    assert main(argv) == 0
    records = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and all(r["time"].endswith("Z") for r in records)
    assert_same_lora(lone_run / "final", out / "final")


def test_output_paths_that_are_files_are_one_line(lone_run, tiny_sd15_dir, prompts_file, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(_argv(a_file, tiny_sd15_dir, prompts_file)) == 2
    assert "--output-dir" in _one_line_error(capsys) and a_file.read_text() == "mine"
    assert main(["export", "--run", str(lone_run), "--format", "kohya", "--out", str(a_file)]) == 2
    assert "--out" in _one_line_error(capsys)
    assert main(["generate", "--lora", str(lone_run / "final"), "--prompts", str(prompts_file), "--out",
                 str(a_file)]) == 2
    assert "--out" in _one_line_error(capsys) and a_file.read_text() == "mine"
    # A path under a file: the OS error itself, caught by the one handler.
    assert main(_argv(a_file / "run", tiny_sd15_dir, prompts_file)) == 2
    line = _one_line_error(capsys)
    assert "a_file" in line and "STEPDISTILL_DEBUG=1" in line


def test_debug_env_shows_the_traceback(tiny_sd15_dir, prompts_file, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    monkeypatch.setenv("STEPDISTILL_DEBUG", "1")
    assert main(_argv(a_file / "run", tiny_sd15_dir, prompts_file)) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("stepdistill: error: ")


def test_disk_full_as_torch_reports_it_is_one_line_with_the_traceback_kept(tiny_sd15_dir, prompts_file, tmp_path,
                                                                           monkeypatch, capsys):
    real_save = torch.save

    def save(obj, path, *a, **k):
        if "step-000002" in str(path):
            # What torch.save raises on a full disk (not an OSError).
            raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                               "data/0: file write failed")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    assert main(_argv(out, tiny_sd15_dir, prompts_file, "loop.max_steps=3", "loop.checkpoint_every=1")) == 1
    line = _one_line_error(capsys)
    assert "could not write the checkpoint of step 2" in line and "step-000001" in line
    assert f"traceback in {out / 'error.log'}" in line
    assert "PytorchStreamWriter" in (out / "error.log").read_text()


def test_shape_mismatch_from_a_wrong_base_is_one_line(lone_run, tmp_path, capsys):
    from stepdistill.cli import describe_failure

    err = RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 32x32)")
    code, line = describe_failure(err, "eval")
    assert code == 2 and "another base model" in line and "--base" in line
    assert describe_failure(RuntimeError("something else"), "eval") is None  # a bug keeps its traceback


# ---- exports -------------------------------------------------------------------------------------------------------

def test_export_never_overwrites_the_users_readme(lone_run, tmp_path, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    assert main(["export", "--run", str(lone_run), "--format", "kohya", "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "README.md" in line and "stepdistill did not write it" in line and "another --out" in line
    assert (out / "README.md").read_text() == "# my notes\n" and sorted(p.name for p in out.iterdir()) == ["README.md"]
    # Its own card from an earlier export is replaced, as before.
    again = tmp_path / "again"
    assert main(["export", "--run", str(lone_run), "--format", "kohya", "--out", str(again)]) == 0
    assert main(["export", "--run", str(lone_run), "--format", "kohya", "--out", str(again)]) == 0


def test_merged_export_is_a_whole_pipeline_that_loads_alone(lone_run, tiny_sd15_dir, tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill import pipelines
    from stepdistill.card import read_front_matter
    from stepdistill.core.recipe import Recipe

    out = tmp_path / "merged"
    assert main(["export", "--run", str(lone_run), "--format", "merged", "--out", str(out)]) == 0
    assert "merged" in read_front_matter(out / "README.md")["tags"]
    merged = DiffusionPipeline.from_pretrained(out)  # nothing else: base parts, merged UNet, the recipe's scheduler
    recipe = Recipe.load(out)
    assert type(merged.scheduler).__name__ == recipe.scheduler_class
    merged.set_progress_bar_config(disable=True)
    lora = pipelines.load(tiny_sd15_dir, lone_run / "final")
    a = pipelines.generate(merged, recipe, ["a red circle"], seed=0, output_type="latent")
    b = pipelines.generate(lora, recipe, ["a red circle"], seed=0, output_type="latent")
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_lora_may_be_the_safetensors_file_itself(lone_run, tmp_path):
    out = tmp_path / "img.png"
    weights = lone_run / "final" / "pytorch_lora_weights.safetensors"
    assert main(["generate", "--lora", str(weights), "--prompt", "a red circle", "--out", str(out)]) == 0
    assert out.is_file()


def test_recipe_names_a_local_base_absolutely_and_generate_works_from_elsewhere(lone_run, tiny_sd15_dir, tmp_path,
                                                                                monkeypatch):
    from stepdistill.core.recipe import Recipe

    recipe = Recipe.load(lone_run / "final")
    assert recipe.base_model == str(tiny_sd15_dir.resolve())
    elsewhere = tmp_path / "empty"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["generate", "--lora", str(lone_run / "final"), "--prompt", "a red circle", "--out", "x.png"]) == 0
    assert (elsewhere / "x.png").is_file()


# ---- the tiny builders at the command line, and the progress bars ---------------------------------------------------

def test_toy_tiny_pipeline_makes_what_the_tiny_presets_train_on(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    base = tmp_path / "tiny_sd15"
    assert main(["toy", "tiny-pipeline", "--family", "sd15", "--out", str(base)]) == 0
    assert type(DiffusionPipeline.from_pretrained(base)).__name__ == "StableDiffusionPipeline"
    capsys.readouterr()
    out = tmp_path / "run"
    argv = _argv(out, base, base / "prompts.txt", "loop.max_steps=2", "loop.progress=true")  # the last --set wins
    assert main(argv) == 0
    err = capsys.readouterr().err
    # The first update (dmd's teacher ODE pairs, compilation) has its own bar: the training bar's ETA starts after it.
    assert "first update (one-off set-up" in err and "train lcm" in err
    first, train = err.index("first update"), err.rindex("train lcm")
    assert first < train


def test_eval_toy_of_a_lora_of_another_world_is_one_line(lone_run, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["eval", "toy", "--lora", str(lone_run / "final"), "--n", "2", "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "toy judge reads (3, 32, 32)" in line and "--base" in line and not out.exists()
    # --base is taken (here the very base of the recipe, named explicitly): same failure, same line.
    base = json.loads((lone_run / "final" / "stepdistill.json").read_text())["base_model"]
    assert main(["eval", "toy", "--lora", str(lone_run / "final"), "--base", base, "--n", "2", "--out", str(out)]) == 2
    assert "toy judge reads" in _one_line_error(capsys)


def test_eval_toy_refuses_a_recipe_of_another_size_before_loading_anything(lone_run, tmp_path, capsys, monkeypatch):
    """A recipe that fixes its size (FLUX's) to something other than the judge's 32 px is refused from the recipe
    alone: before, the first batch was generated at that size (minutes on a CPU) and then refused."""
    from stepdistill import pipelines

    final = tmp_path / "final"
    shutil.copytree(lone_run / "final", final)
    recipe = json.loads((final / "stepdistill.json").read_text())
    (final / "stepdistill.json").write_text(json.dumps({**recipe, "height": 256, "width": 256}))
    monkeypatch.setattr(pipelines, "load", lambda *a, **k: pytest.fail("the pipeline was loaded"))
    out = tmp_path / "m.json"
    assert main(["eval", "toy", "--lora", str(final), "--n", "2", "--out", str(out)]) == 2
    line = _one_line_error(capsys)
    assert "makes (3, 256, 256) images" in line and "--base" in line and not out.exists()
