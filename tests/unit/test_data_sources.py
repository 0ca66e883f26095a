"""Every data format a run can point at, read record by record; bad records raise BadRecord, never stop the reader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from stepdistill.data.sources import (
    ArrowImages,
    ArrowTexts,
    BadRecord,
    ImageFolder,
    TextLines,
    WebDatasetShards,
    open_images,
    open_prompts,
)
from stepdistill.errors import DataError

datasets = pytest.importorskip("datasets")
pytest.importorskip("webdataset")

PROMPTS = ["a red cat", "a blue dog", "a green house"]


def texts(source):
    out = []
    for i in range(len(source)):
        try:
            out.append(source.get(i)[0])
        except BadRecord as e:
            out.append(f"<{e}>")
    return out


def png_bytes(color=(255, 0, 0), size=20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# ---- prompts ---------------------------------------------------------------------------------------------------

def test_txt_lines_skip_blank_lines_and_keep_crlf_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"a red cat\r\n\r\n  \na blue dog\n\n\xff a green house")  # no final newline
    source = open_prompts(str(path))
    assert isinstance(source, TextLines)
    assert texts(source) == ["a red cat", "a blue dog", "\ufffd a green house"]
    assert source.index_report == {"empty lines": 3}


def test_txt_long_blank_line_is_a_bad_record_when_read(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n        \n")
    assert texts(open_prompts(str(path))) == ["a red cat", "<empty caption>"]


def test_txt_many_lines_across_read_chunks(tmp_path):
    path = tmp_path / "p.txt"
    lines = [f"prompt number {i}" for i in range(1000)]
    path.write_text("\n".join(lines) + "\n")
    source = TextLines(path, chunk=100)  # chunk boundaries fall inside lines
    assert texts(source) == lines


@pytest.mark.parametrize("field", ["text", "prompt"])
def test_jsonl_with_text_or_prompt_field(tmp_path, field):
    path = tmp_path / "p.jsonl"
    rows = [{field: p, "id": i} for i, p in enumerate(PROMPTS)] + [{"id": 9}, {field: "  "}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    source = open_prompts(str(path))
    assert isinstance(source, ArrowTexts)
    assert texts(source) == [*PROMPTS, "<missing field>", "<empty caption>"]


def test_json_array_and_configured_field(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps([{"caption_en": p} for p in PROMPTS]))
    assert texts(open_prompts(str(path), text_field="caption_en")) == PROMPTS
    with pytest.raises(DataError, match="no field 'nope'.*data.text_field"):
        open_prompts(str(path), text_field="nope")


def test_json_without_a_known_field_says_which_to_set(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"words": "a cat"}\n')
    with pytest.raises(DataError, match="set data.text_field"):
        open_prompts(str(path))


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": [*PROMPTS, None]}), path)
    assert texts(open_prompts(str(path))) == [*PROMPTS, "<missing field>"]


def test_datasets_folder_of_prompts(tmp_path):
    datasets.Dataset.from_dict({"text": PROMPTS, "score": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    assert texts(open_prompts(str(tmp_path / "ds"))) == PROMPTS


def test_missing_prompts_file_says_what_to_pass(tmp_path):
    with pytest.raises(DataError, match="data.prompts=FILE"):
        open_prompts(str(tmp_path / "none.txt"))


def test_max_words_cuts_long_prompts(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one two three four five\n")
    assert texts(open_prompts(str(path), max_words=2)) == ["one two"]


# ---- images ----------------------------------------------------------------------------------------------------

def check_image(x, resolution=8):
    assert x.shape == (3, resolution, resolution) and x.dtype == torch.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_image_folder_with_txt_captions_and_a_bad_image(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes())
    (tmp_path / "a.txt").write_text("a red square")
    (tmp_path / "b.png").write_bytes(b"not a png")
    (tmp_path / "b.txt").write_text("broken")
    (tmp_path / "c.png").write_bytes(png_bytes())  # no caption
    source = open_images(str(tmp_path), 8)
    assert isinstance(source, ImageFolder) and len(source) == 3
    caption, image, size = source.get(0)
    assert caption == "a red square"
    assert size == (20, 20, 0, 0)  # SDXL's original size and crop offset, data.images.SIZE_FIELDS
    check_image(image)
    assert texts(source)[1:] == ["<unreadable image>", "<empty caption>"]


def test_metadata_jsonl_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes((0, 255, 0)))
    rows = [{"file_name": "x.png", "text": "green"}, {"file_name": "gone.png", "text": "missing"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(map(json.dumps, rows)) + "\nnot json\n")
    source = open_images(str(tmp_path), 8)
    assert texts(source) == ["green", "<missing image>"]
    assert source.index_report == {"malformed metadata line": 1}
    assert float(source.get(0)[1][1].mean()) == pytest.approx(1.0, abs=1e-3)  # green channel at +1


def test_datasets_folder_with_an_image_column(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [Image.open(io.BytesIO(png_bytes())), Image.new("RGB", (9, 9))],
                                     "caption": ["red", ""]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "ds"))
    source = open_images(str(tmp_path / "ds"), 8)
    assert isinstance(source, ArrowImages)
    assert texts(source) == ["red", "<empty caption>"]
    check_image(source.get(0)[1])


def write_shard(path, samples):
    """samples: (key, {ext: bytes})"""
    with tarfile.open(path, "w") as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def shard_samples(start, n):
    return [(f"{i:06d}", {"jpg" if i % 2 else "png": png_bytes((i * 20 % 255, 0, 0)),
                          "txt" if i % 3 else "json": (f"sample {i}".encode() if i % 3 else
                                                        json.dumps({"caption": f"sample {i}"}).encode())})
            for i in range(start, start + n)]


def test_webdataset_brace_pattern_and_folder(tmp_path):
    for s in range(3):
        write_shard(tmp_path / f"{s:06d}.tar", shard_samples(4 * s, 4))
    by_pattern = open_images(str(tmp_path / "{000000..000002}.tar"), 8)
    by_folder = open_images(str(tmp_path), 8)
    assert isinstance(by_pattern, WebDatasetShards)
    assert texts(by_pattern) == texts(by_folder) == [f"sample {i}" for i in range(12)]
    check_image(by_pattern.get(5)[1])
    assert by_pattern.index_report == {"truncated shard": 0, "no image": 0, "missing caption": 0}


def test_truncated_shard_keeps_what_came_before_and_bad_members_are_counted(tmp_path):
    write_shard(tmp_path / "000000.tar", shard_samples(0, 4))
    samples = shard_samples(4, 4)
    samples[0][1]["png"] = b"\x89PNG garbage"  # unreadable image
    samples.append(("nocap", {"png": png_bytes()}))
    samples.append(("noimg", {"txt": b"caption only"}))
    write_shard(tmp_path / "000001.tar", samples)
    data = (tmp_path / "000001.tar").read_bytes()
    (tmp_path / "000001.tar").write_bytes(data[: len(data) // 2])  # cut in the middle of the shard
    source = WebDatasetShards(sorted(tmp_path.glob("*.tar")), 8)
    assert source.index_report["truncated shard"] == 1
    got = texts(source)
    assert got[:4] == [f"sample {i}" for i in range(4)] and 4 < len(got) < 8 + 2
    assert got[4] == "<unreadable image>"


def test_shards_of_a_pattern_that_matches_nothing(tmp_path):
    with pytest.raises(DataError, match="no shard"):
        open_images(str(tmp_path / "{000000..000003}.tar"), 8)


def test_missing_extra_names_the_pip_command(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "p.jsonl"
    path.write_text('{"text": "a cat"}\n')
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'stepdistill\[data\]'"):
        open_prompts(str(path))


def test_stream_choice_threshold():
    from stepdistill.data.stream import MEMORY_MAX_RECORDS, use_memory

    assert use_memory("auto", 1000, 10_000) and not use_memory("auto", MEMORY_MAX_RECORDS + 1, 10)
    assert not use_memory("auto", 10_000, 315 * 1024)  # SDXL embeddings: 3 GB of host memory
    assert use_memory("memory", 10**7, 10**6) and not use_memory("stream", 1, 1)
    assert np.isscalar(MEMORY_MAX_RECORDS)


def test_cat_conds_equals_pairwise_cat_with_added_conditioning():
    from stepdistill.core.denoiser import Cond
    from stepdistill.data.prompts import cat_conds

    parts = [Cond(torch.randn(n, 3, 4), {"text_embeds": torch.randn(n, 5), "time_ids": torch.randn(n, 6)})
             for n in (2, 1, 3)]
    joined, pairwise = cat_conds(parts), parts[0].cat(parts[1]).cat(parts[2])
    assert torch.equal(joined.encoder_hidden_states, pairwise.encoder_hidden_states)
    assert all(torch.equal(joined.added_cond_kwargs[k], pairwise.added_cond_kwargs[k]) for k in pairwise.added_cond_kwargs)
    assert cat_conds([Cond(torch.ones(1, 2))]).added_cond_kwargs is None
