"""Streamed data in the real loop: resume mid-epoch is bit-identical, bad records are counted and never fatal, two
processes reading WebDataset shards train the LoRA of one process with the combined batch, and a killed process stops
the whole job, whose rerun ends with the same LoRA."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import time

import pytest
from PIL import Image

from stepdistill.models.tiny import TINY_PROMPTS

from .helpers import ROOT, assert_same_lora, cli_env, lora_tensors, run_cli, train_args

pytest.importorskip("webdataset")
CONFIG = "configs/tiny/lcm_sd15.yaml"
STREAM = ("data.cache=stream", "loop.checkpoint_every=2", "optim.eps=1e-3")


def png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (i * 37 % 256, i * 91 % 256, i * 53 % 256)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three shards of 8 samples (16px-ready images, .txt or .json captions); one image in shard 1 is garbage."""
    root = tmp_path_factory.mktemp("shards")
    for s in range(3):
        with tarfile.open(root / f"{s:06d}.tar", "w") as tf:
            for j in range(8):
                i = 8 * s + j
                cap = TINY_PROMPTS[i % len(TINY_PROMPTS)]
                parts = {"png": b"\x89PNG broken" if i == 9 else png(i),
                         "json" if i % 2 else "txt": json.dumps({"text": cap}).encode() if i % 2 else cap.encode()}
                for ext, data in parts.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return root


def image_args(out, model, shards, *sets):
    return train_args(CONFIG, out, model, "", f"data.images={shards}/{{000000..000002}}.tar",
                      "data.max_bad_fraction=0.2", *STREAM, *sets)


def test_stream_resume_mid_epoch_is_bit_identical(tiny_sd15_dir, prompts_file, tmp_path):
    # 10 prompts, batch 2: 4 steps end mid-epoch; the kill comes after step 3, past the checkpoint of step 2.
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    args = lambda out: train_args(CONFIG, out, tiny_sd15_dir, prompts_file, *STREAM, "loop.max_steps=4")  # noqa: E731
    run_cli(args(straight))
    assert run_cli(args(killed), check=False, STEPDISTILL_KILL_AT="step:3").returncode != 0
    run_cli(args(killed))
    assert_same_lora(straight / "final", killed / "final")
    report = json.loads((straight / "data_report.json").read_text())
    assert any(r.get("mode") == "stream" for r in report)


def test_shards_with_a_bad_image_and_a_truncated_shard_train_and_are_counted(tiny_sd15_dir, shards, tmp_path):
    cut = tmp_path / "shards"
    cut.mkdir()
    for p in sorted(shards.glob("*.tar")):
        (cut / p.name).write_bytes(p.read_bytes())
    data = (cut / "000002.tar").read_bytes()
    (cut / "000002.tar").write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    # 16 samples a pass: 6 steps of batch 2 read 12 records; a bigger batch makes sure the bad image is met.
    run_cli(image_args(out, tiny_sd15_dir, cut, "loop.max_steps=3", "data.batch_size=8"))
    (report,) = [r for r in json.loads((out / "data_report.json").read_text()) if r["kind"] == "images"]
    assert report["mode"] == "stream" and report["truncated_shard"] == 1
    assert report["unreadable_image"] >= 1 and report["skipped_count"] >= 2
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_too_many_bad_records_stop_the_run(tiny_sd15_dir, shards, tmp_path):
    proc = run_cli(image_args(tmp_path / "run", tiny_sd15_dir, shards, "loop.max_steps=6", "data.batch_size=8",
                              "data.max_bad_fraction=0.01"), check=False)
    assert proc.returncode != 0 and "data.max_bad_fraction" in proc.stderr


def torchrun(args, nproc: int, timeout: int = 600, **env):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
           "-m", "stepdistill.cli", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=cli_env(**env), capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_on_shards_equal_one_with_the_combined_batch(tiny_sd15_dir, shards, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_cli(image_args(one, tiny_sd15_dir, shards, "loop.max_steps=3", "data.batch_size=4"))
    proc = torchrun(image_args(two, tiny_sd15_dir, shards, "loop.max_steps=3", "data.batch_size=2"), nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = lora_tensors(one / "final"), lora_tensors(two / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() <= 1e-5 + 1e-3 * a[k].abs().max(), k
    counts = [{k: r[k] for k in ("unreadable_image", "records_read")}
              for r in (json.loads((d / "data_report.json").read_text())[-1] for d in (one, two))]
    assert counts[0] == counts[1]  # the two processes' bad records summed = the one process's


@pytest.mark.slow
def test_killing_one_rank_stops_the_job_and_the_rerun_gives_the_same_lora(tiny_sd15_dir, shards, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    sets = ("loop.max_steps=4", "data.batch_size=2")
    assert torchrun(image_args(straight, tiny_sd15_dir, shards, *sets), nproc=2).returncode == 0
    t0 = time.monotonic()
    proc = torchrun(image_args(killed, tiny_sd15_dir, shards, *sets), nproc=2, timeout=300,
                    STEPDISTILL_KILL_AT="step:3", STEPDISTILL_KILL_RANK="1")
    assert proc.returncode != 0 and time.monotonic() - t0 < 300
    assert not (killed / "final").exists()
    proc = torchrun(image_args(killed, tiny_sd15_dir, shards, *sets), nproc=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_lora(straight / "final", killed / "final")


def test_stream_and_cache_serve_the_same_batches_and_encodings(tiny_sd15_dir, prompts_file):
    """What the loop, write_samples and dmd's ODE pairs read is the same whichever data.cache is chosen."""
    from types import SimpleNamespace

    import torch

    from stepdistill.data.stream import StreamData, open_data
    from stepdistill.models import load_family

    family = load_family(str(tiny_sd15_dir), "sd15", device=torch.device("cpu"), dtype=torch.float32)
    cfg = dict(prompts=str(prompts_file), images="", batch_size=3, text_field="", max_bad_fraction=0.05, prefetch=2,
               max_prompt_words=0)
    memory = open_data(family, SimpleNamespace(**cfg, cache="memory"), 16, seed=5)
    stream = open_data(family, SimpleNamespace(**cfg, cache="stream"), 16, seed=5)
    assert isinstance(stream, StreamData) and not isinstance(memory, StreamData)
    for _ in range(5):  # past the end of an epoch (10 prompts)
        pm, cm, um, _, _ = memory.next()
        ps, cs, us, _, _ = stream.next()
        assert pm == ps
        assert torch.allclose(cm.encoder_hidden_states, cs.encoder_hidden_states, atol=1e-6)
        assert torch.equal(um.encoder_hidden_states, us.encoder_hidden_states)
    assert memory.state_dict()["position"] == stream.state_dict()["position"]
    assert memory.first_encoded(3)[0] == stream.first_encoded(3)[0]
    idx = torch.tensor([4, 0, 4])
    assert torch.allclose(memory.conds.index(idx).encoder_hidden_states, stream.conds.index(idx).encoder_hidden_states,
                          atol=1e-6)
    assert len(memory.conds) == len(stream.conds) == len(memory)
    # A restored stream continues where the saved one stood, not where its prefetch thread had got to.
    other = open_data(family, SimpleNamespace(**cfg, cache="stream"), 16, seed=5)
    other.load_state_dict(stream.state_dict())
    assert other.next()[0] == stream.next()[0]
    stream.close()
    other.close()
