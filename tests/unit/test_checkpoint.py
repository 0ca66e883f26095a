"""Atomic checkpoints: a partial, truncated or altered newest checkpoint is skipped (with a warning) for the previous
one; rotation never deletes the only good checkpoint; a failed write leaves no debris and the old ones intact."""

from __future__ import annotations

import errno
import json
import logging
import shutil

import pytest
import torch

from stepdistill.train import checkpoint as ckpt


def _save(root, step, keep_last=10):
    shared = {"step": step, "lora": {"w": torch.full((64,), float(step))}}
    return ckpt.save_checkpoint(root, step, shared, {"rank": step}, 0, 1, lambda: None, keep_last)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        _save(root, step)
    return root


def _latest_step(root):
    found = ckpt.load_latest(root, 0, 1)
    return None if found is None else found[0]["step"]


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the recorded sha256 can tell
    path.write_bytes(bytes(data))


def test_complete_checkpoint_round_trips(root):
    shared, per_rank, path = ckpt.load_latest(root, 0, 1)
    assert path.name == "step-000003" and shared["step"] == 3 and per_rank == {"rank": 3}
    assert torch.equal(shared["lora"]["w"], torch.full((64,), 3.0))
    meta = json.loads((path / ckpt.COMPLETE).read_text())
    assert set(meta["files"]) == {"state.pt", "rank-000.pt"}


@pytest.mark.parametrize("damage", [
    lambda d: _truncate(d / "state.pt"),
    lambda d: _flip_a_byte(d / "state.pt"),
    lambda d: (d / ckpt.COMPLETE).unlink(),
    lambda d: (d / "rank-000.pt").unlink(),
    lambda d: (d / ckpt.COMPLETE).write_text("{not json"),
    lambda d: (d / "state.pt").write_bytes(b""),
], ids=["truncated-state", "flipped-byte", "no-complete-json", "missing-rank-file", "garbled-complete-json",
        "empty-state"])
def test_damaged_newest_checkpoint_falls_back_with_a_warning(root, damage, caplog):
    damage(root / "step-000003")
    with caplog.at_level(logging.WARNING, logger="stepdistill.train.checkpoint"):
        assert _latest_step(root) == 2
    assert any("step-000003" in r.getMessage() and "trying the previous one" in r.getMessage() for r in caplog.records)


def test_every_newer_checkpoint_damaged_walks_back_to_the_oldest(root):
    _truncate(root / "step-000003" / "state.pt")
    (root / "step-000002" / ckpt.COMPLETE).unlink()
    assert _latest_step(root) == 1
    (root / "step-000001" / "rank-000.pt").write_bytes(b"junk")
    assert ckpt.load_latest(root, 0, 1) is None


def test_stale_temp_folder_is_ignored_then_cleaned(root):
    stale = root / f"{ckpt.TMP_PREFIX}000004"
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"half a checkpoint")
    (stale / ckpt.COMPLETE).write_text(json.dumps({"step": 4, "world_size": 1}))
    assert _latest_step(root) == 3
    _save(root, 4)
    assert not stale.exists() and _latest_step(root) == 4


def test_legacy_checkpoint_without_file_list_still_loads(root):
    d = root / "step-000003"
    (d / ckpt.COMPLETE).write_text(json.dumps({"step": 3, "world_size": 1}))
    assert _latest_step(root) == 3
    _truncate(d / "state.pt")  # no sha256 to check: unpickling fails, and that is caught too
    assert _latest_step(root) == 2


def test_other_number_of_processes_is_refused_not_skipped(root):
    with pytest.raises(ckpt.CheckpointMismatch, match="same number of processes"):
        ckpt.load_latest(root, 0, 2)


def test_rotation_keeps_the_newest(tmp_path):
    root = tmp_path / "c"
    for step in range(1, 6):
        _save(root, step, keep_last=2)
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step-000004", "step-000005"]


def test_rotation_never_deletes_the_only_good_checkpoint(tmp_path):
    """Newest on disk is corrupt: the run resumed from step 2 and writes step 3 with keep_last=1. The corrupt step 4
    must not count as one of the kept, or the good step 3 (and 2) would be deleted, leaving nothing to resume."""
    root = tmp_path / "c"
    for step in (1, 2, 4):
        _save(root, step)
    _truncate(root / "step-000004" / "state.pt")
    assert _latest_step(root) == 2
    _save(root, 3, keep_last=1)
    assert _latest_step(root) == 3
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step-000003", "step-000004"]
    _save(root, 4, keep_last=1)  # reaching step 4 again overwrites the corrupt one
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step-000004"] and _latest_step(root) == 4


def test_partial_folders_do_not_count_for_rotation(tmp_path):
    root = tmp_path / "c"
    _save(root, 1)
    (root / "step-000000").mkdir()  # no complete.json: not a checkpoint, and older, so never the kept one
    _save(root, 2, keep_last=1)
    assert _latest_step(root) == 2


def test_steps_sort_numerically(tmp_path):
    root = tmp_path / "c"
    _save(root, 999_999)
    _save(root, 1_000_000)
    assert _latest_step(root) == 1_000_000


def test_failed_write_keeps_the_old_checkpoints_and_leaves_no_debris(root, monkeypatch):
    real_save = torch.save

    def disk_full(obj, path, *a, **k):
        if str(path).endswith("state.pt"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        _save(root, 4, keep_last=1)
    monkeypatch.undo()
    assert not list(root.glob(f"{ckpt.TMP_PREFIX}*"))
    assert [d.name for d in ckpt.list_checkpoints(root)] == ["step-000001", "step-000002", "step-000003"]
    assert _latest_step(root) == 3


def test_checkpoint_dir_replaced_over_an_existing_one(root):
    """Saving a step that exists (a rerun from an earlier checkpoint) replaces it whole."""
    shutil.copy(root / "step-000001" / "state.pt", root / "step-000003" / "extra.pt")
    _save(root, 3)
    assert not (root / "step-000003" / "extra.pt").exists() and _latest_step(root) == 3


def test_the_loop_saves_and_resumes_the_same_named_contents(tmp_path):
    """The checkpoint's contents are named once (Trainer._checkpoint_contents): what save_checkpoint writes is exactly
    what resume reads, and a fresh Trainer on the folder gets every piece back (step, LoRA, optimizer moments)."""
    from .bench_rig import tiny_trainer

    trainer = tiny_trainer("dmd", [], tmp_path / "run")
    trainer.iteration()
    trainer.step = 1
    trainer.save_checkpoint()
    contents, own = trainer._checkpoint_contents()
    saved = torch.load(trainer.last_checkpoint / "state.pt", weights_only=False)
    assert list(saved) == [key for key, _, _ in contents]
    assert list(torch.load(trainer.last_checkpoint / "rank-000.pt", weights_only=False)) == [k for k, _, _ in own]

    again = tiny_trainer("dmd", [], tmp_path / "run")
    assert again.step == 1 and again.last_checkpoint == trainer.last_checkpoint
    for key, value in again._lora_state().items():
        assert torch.equal(value, saved["lora"][key]), key
    moments = again.optimizers["student"].state_dict()["state"]
    assert moments and all(torch.equal(m["exp_avg"], saved["optimizers"]["student"]["state"][i]["exp_avg"])
                           for i, m in moments.items())
