"""Bad data is skipped, counted and reported; a data set with nothing usable stops with an error saying what to do."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from stepdistill.data.images import read_image_folder
from stepdistill.data.prompts import (
    DataError,
    collect_reports,
    count_too_long,
    publish_report,
    read_prompts,
    summarize_reports,
)
from stepdistill.models.tokenizer import TINY_WORDS, build_word_tokenizer

# ---- prompt files --------------------------------------------------------------------------------------------

def test_prompt_file_with_empty_lines_bad_bytes_and_long_prompts(tmp_path, caplog):
    path = tmp_path / "p.txt"
    long = " ".join(["red"] * 30)
    path.write_bytes(b"a red cat\n\n   \n\xff\xfe a dog\r\n" + long.encode() + b"\n\n")
    with collect_reports() as reports:
        prompts, report = read_prompts(path, max_words=10, max_bad_fraction=0.5)
    # The undecodable line is a bad record: skipped, not trained on as replacement characters.
    assert prompts == ["a red cat", " ".join(["red"] * 10)]
    assert (report.kept, report.empty_lines, report.undecodable_lines, report.truncated) == (2, 3, 1, 1)
    assert reports == [{"kind": "prompts", "source": str(path), "kept": 2, "empty_lines": 3, "undecodable_lines": 1,
                        "truncated": 1}]
    assert "kept 2 prompts" in caplog.text and "1 lines that are not UTF-8" in caplog.text and "1 truncated" in caplog.text


def test_undecodable_lines_count_against_max_bad_fraction(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red cat\n" * 18 + b"\xb9\xff noise\n" * 2)  # 2 bad of 20 records: 10 %
    with pytest.raises(DataError, match=r"2 of 20 lines are not UTF-8.*data.max_bad_fraction=0.05"):
        read_prompts(path)
    prompts, report = read_prompts(path, max_bad_fraction=0.1)
    assert len(prompts) == 18 and report.undecodable_lines == 2


def test_binary_prompt_file_is_refused(tmp_path):
    path = tmp_path / "p.bin"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(DataError, match="binary file, not text"):
        read_prompts(path)


def test_clean_prompt_file_warns_nothing(tmp_path, caplog):
    path = tmp_path / "p.txt"
    path.write_text("a red cat\na blue dog\n")
    prompts, report = read_prompts(path)
    assert prompts == ["a red cat", "a blue dog"] and report.empty_lines == 0 and not caplog.records


@pytest.mark.parametrize("content", [b"", b"\n\n  \n\t\n", b"\r\n"])
def test_prompt_file_with_nothing_usable_stops(tmp_path, content):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match="no usable prompts.*one prompt per line"):
        read_prompts(path)


@pytest.mark.parametrize("where", ["missing", "folder"])
def test_missing_prompt_file_says_which_key(tmp_path, where):
    path = tmp_path / "p.txt"
    if where == "folder":
        path.mkdir()
    with pytest.raises(DataError, match="no prompts file.*data.prompts=FILE"):
        read_prompts(path)


def test_tokenizer_truncation_is_counted():
    """CLIP reads 77 tokens; longer prompts lose their end, so they are counted (data.max_prompt_words aside)."""

    family = SimpleNamespace(tokenizers=[build_word_tokenizer(TINY_WORDS, 77)])
    prompts = ["a red cat", " ".join(["red"] * 75), " ".join(["red"] * 76), " ".join(["blue cat"] * 100)]
    # 75 words + start + end = 77 tokens fit; 76 words do not.
    assert count_too_long(family, prompts) == 2
    assert count_too_long(object(), prompts) == 0  # a family without tokenizers (the toy world) counts none


def test_reports_only_collected_inside_the_block():
    publish_report("prompts", "outside", {"kept": 1})
    with collect_reports() as reports:
        publish_report("images", "x", {"kept": 2, "skipped_count": 1, "skipped": ["a.png: missing"]})
    publish_report("prompts", "outside", {"kept": 1})
    assert reports == [{"kind": "images", "source": "x", "kept": 2, "skipped_count": 1, "skipped": ["a.png: missing"]}]
    assert summarize_reports(reports) == "images x: kept=2, skipped_count=1"


# ---- image-caption folders -----------------------------------------------------------------------------------

def _png(path, size=(20, 12), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 90, 200)).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder_skips_corrupt_truncated_and_uncaptioned(tmp_path, caplog):
    _png(tmp_path / "good.png")
    (tmp_path / "good.txt").write_text("a red square")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "corrupt.txt").write_text("a cat")
    (tmp_path / "truncated.png").write_bytes(_png_bytes()[:60])
    (tmp_path / "truncated.txt").write_text("a dog")
    _png(tmp_path / "nocaption.png")
    _png(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("  \n")
    (tmp_path / "notes.md").write_text("not an image")  # other files are not part of the set
    with collect_reports() as reports:
        images, captions, _, report = read_image_folder(tmp_path, 16)
    assert images.shape == (1, 3, 16, 16) and captions == ["a red square"]
    assert images.min() >= -1 and images.max() <= 1
    assert report.kept == 1 and sorted(s.split(" (")[0] for s in report.skipped) == [
        "blank.png: no caption", "corrupt.png: unreadable", "nocaption.png: no caption", "truncated.png: unreadable"]
    assert reports[0]["kind"] == "images" and reports[0]["kept"] == 1 and reports[0]["skipped_count"] == 4
    assert "skipped 4" in caplog.text


def test_metadata_jsonl_with_missing_files_and_bad_rows(tmp_path):
    _png(tmp_path / "a.png")
    rows = [{"file_name": "a.png", "text": "a red square"}, {"file_name": "gone.png", "text": "a cat"},
            "{not json", {"file_name": "a.png"}, [1, 2], {"file_name": "a.png", "text": None}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    images, captions, _, report = read_image_folder(tmp_path, 8)
    assert captions == ["a red square"] and images.shape == (1, 3, 8, 8)
    bad_row = 'not {"file_name": ..., "text": ...}'
    assert sorted(report.skipped) == sorted(["gone.png: missing", "a.png: no caption"] + [
        f"metadata.jsonl line {i}: {bad_row}" for i in (3, 4, 5)])


def test_image_folder_with_nothing_usable_stops(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    (tmp_path / "x.txt").write_text("a cat")
    with pytest.raises(DataError, match=r"no usable image-caption pairs \(1 skipped, e.g. x.png: unreadable"):
        read_image_folder(tmp_path, 16)


def test_empty_or_missing_image_folder_stops(tmp_path):
    with pytest.raises(DataError, match="no usable image-caption pairs.*no image files"):
        read_image_folder(tmp_path, 16)
    with pytest.raises(DataError, match="no image folder.*data.images=DIR"):
        read_image_folder(tmp_path / "absent", 16)


def test_images_are_exact_after_skipping(tmp_path):
    """Skipping a bad file does not shift captions onto the wrong images."""
    for name, color in (("a", (255, 0, 0)), ("c", (0, 0, 255))):
        _png(tmp_path / f"{name}.png", (16, 16), color)
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    (tmp_path / "b.png").write_bytes(b"bad")
    (tmp_path / "b.txt").write_text("caption b")
    images, captions, _, _ = read_image_folder(tmp_path, 16)
    assert captions == ["caption a", "caption c"]
    assert torch.allclose(images[0, 0], torch.ones(16, 16)) and torch.allclose(images[1, 2], torch.ones(16, 16))
