"""Record sources: random access to prompts or (image, caption) records of standard formats, without loading them.

A source is indexed once (offsets, an Arrow memory map or tar member offsets: a few bytes per record) and then
read one record at a time, so a process reads only the records of its share and host memory stays flat in the
size of the set. `get(i)` returns the record, (text, image or None, size row or None), or raises BadRecord(reason);
callers skip and count those. An image's size row is its original (H, W) and crop (top, left), data.images.SIZE_FIELDS.

Prompts: .txt (one per line), .jsonl / .json / .parquet (a `text` or `prompt` field, or data.text_field), or a
folder written by datasets' save_to_disk. Images: a folder (same-stem .txt captions or metadata.jsonl), a
save_to_disk folder with an image column, or WebDataset shards (brace pattern or a folder of .tar files; image
and .txt / .json caption per key). The Arrow formats go through `datasets`, the shards through `webdataset`'s key
rules and `braceexpand`: the optional extra stepdistill[data].
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from ..errors import DataError

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
TEXT_FIELDS = ("text", "prompt", "caption")
PIP_HINT = "pip install 'stepdistill[data]'"


class BadRecord(Exception):
    """A record that cannot be used; str(e) is the reason counted in data_report.json."""


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this data format needs the `{module}` package: {PIP_HINT}") from None


def _clean_text(value, max_words: int = 0) -> str:
    if value is None:
        raise BadRecord("missing field")
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    if not text:
        raise BadRecord("empty caption")
    if max_words and len(text.split()) > max_words:
        text = " ".join(text.split()[:max_words])
    return text


def _pick_field(columns, text_field: str, where) -> str:
    if text_field:
        if text_field not in columns:
            raise DataError(f"{where} has no field {text_field!r} (fields: {', '.join(columns)}): set data.text_field")
        return text_field
    for name in TEXT_FIELDS:
        if name in columns:
            return name
    raise DataError(f"{where} has none of the fields {', '.join(TEXT_FIELDS)} (fields: {', '.join(columns)}): "
                    "set data.text_field=NAME")


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


# ---- prompts ---------------------------------------------------------------------------------------------------

class TextLines:
    """A .txt file, one prompt per line, indexed by line offsets (12 bytes a line); empty lines are left out."""

    kind = "prompts"

    def __init__(self, path, max_words: int = 0, chunk: int = 1 << 24):
        self.path, self.max_words = Path(path), max_words
        starts, ends, offset, size = [], [], 0, self.path.stat().st_size
        with open(self.path, "rb") as f:
            while offset < size:
                buf = np.frombuffer(f.read(chunk), dtype=np.uint8)
                nl = np.flatnonzero(buf == 10) + offset
                if offset + len(buf) >= size and (len(nl) == 0 or nl[-1] != size - 1):
                    nl = np.append(nl, size)  # last line without a newline
                ends.append(nl)
                offset += len(buf)
        ends = np.concatenate(ends) if ends else np.zeros(0, np.int64)
        starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else ends
        lengths = (ends - starts).astype(np.int64)
        # "\r" of CRLF files and blank lines: lines of up to 2 bytes are checked here, longer blank ones when read.
        short = np.flatnonzero(lengths <= 2)
        blank = [i for i in short if not _pread(self.path, int(starts[i]), int(lengths[i])).strip()]
        keep = np.ones(len(starts), bool)
        keep[blank] = False
        self.starts, self.lengths = starts[keep], lengths[keep].astype(np.int32)
        self.index_report = {"empty lines": len(blank)}

    def __len__(self):
        return len(self.starts)

    def get(self, i: int):
        raw = _pread(self.path, int(self.starts[i]), int(self.lengths[i]))
        return _clean_text(raw, self.max_words), None, None


class ArrowTexts:
    """A text column of a `datasets` Dataset (Arrow, memory-mapped from disk)."""

    kind = "prompts"

    def __init__(self, ds, text_field: str, where, max_words: int = 0):
        self.field = _pick_field(ds.column_names, text_field, where)
        self.ds = ds.select_columns([self.field])
        self.max_words = max_words
        self.index_report = {}

    def __len__(self):
        return len(self.ds)

    def get(self, i: int):
        return _clean_text(self.ds[int(i)][self.field], self.max_words), None, None


def _load_datasets_folder(path: Path):
    ds = _need("datasets").load_from_disk(str(path))
    if hasattr(ds, "keys") and not hasattr(ds, "column_names"):  # a DatasetDict
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds


def open_prompts(spec: str, text_field: str = "", max_words: int = 0):
    """The prompt source of data.prompts, by file suffix (or a datasets folder)."""
    path = Path(spec)
    if path.is_dir():
        if not (path / "dataset_info.json").is_file() and not (path / "dataset_dict.json").is_file():
            raise DataError(f"{path} is a folder but not a datasets save_to_disk folder: pass a .txt, .jsonl, .json "
                            "or .parquet file, or such a folder, as data.prompts")
        return ArrowTexts(_load_datasets_folder(path), text_field, path, max_words)
    if not path.is_file():
        raise DataError(f"no prompts file at {path}: pass --set data.prompts=FILE (.txt one prompt per line, .jsonl, "
                        ".json, .parquet, or a datasets folder)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        datasets = _need("datasets")
        try:
            ds = datasets.Dataset.from_json(str(path))
        except Exception as e:  # noqa: BLE001 - pyarrow's and datasets' errors vary; keep them to one line
            raise DataError(f"{path} is not readable JSON lines ({str(e).splitlines()[0][:200]})") from None
        return ArrowTexts(ds, text_field, path, max_words)
    if suffix == ".parquet":
        return ArrowTexts(_need("datasets").Dataset.from_parquet(str(path)), text_field, path, max_words)
    return TextLines(path, max_words)


# ---- images ----------------------------------------------------------------------------------------------------

def decode_image(data, resolution: int):
    """Bytes or a path -> (float [-1, 1] [3, H, W], size row): data.images.centre_crop's resize and crop, with the
    image's original size and crop offset for SDXL's micro-conditioning; BadRecord when unreadable."""
    from PIL import Image

    from .images import centre_crop, to_tensor

    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            im, size = centre_crop(im.convert("RGB"), resolution)
            return to_tensor(im), size
    except FileNotFoundError:
        raise BadRecord("missing image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        # PIL reports corrupt and truncated files as OSError (UnidentifiedImageError is one).
        raise BadRecord("unreadable image") from None


class ImageFolder:
    """Image files with same-stem .txt captions, or a metadata.jsonl of {"file_name", "text"} rows (as before)."""

    kind = "images"

    def __init__(self, root: Path, resolution: int, text_field: str = ""):
        from .images import ImageReport, _folder_items

        report = ImageReport()
        self.items = _folder_items(root, report)
        self.resolution = resolution
        self.index_report = {"malformed metadata line": len(report.skipped)}

    def __len__(self):
        return len(self.items)

    def get(self, i: int):
        path, caption = self.items[i]
        return (_clean_text(caption), *decode_image(path, self.resolution))


class ArrowImages:
    """A datasets save_to_disk folder with an image column (datasets.Image, or bytes / path named image)."""

    kind = "images"

    def __init__(self, ds, resolution: int, text_field: str, where):
        datasets = _need("datasets")
        images = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
        images = images or [k for k in ("image", "jpg", "png") if k in ds.column_names]
        if not images:
            raise DataError(f"{where} has no image column (columns: {', '.join(ds.column_names)})")
        self.image = images[0]
        if isinstance(ds.features[self.image], datasets.Image):
            ds = ds.cast_column(self.image, datasets.Image(decode=False))  # decoded here, so a bad one is counted
        self.captions = ArrowTexts(ds, text_field, where)
        self.ds, self.resolution, self.index_report = ds.select_columns([self.image]), resolution, {}

    def __len__(self):
        return len(self.ds)

    def get(self, i: int):
        caption = self.captions.get(i)[0]
        value = self.ds[int(i)][self.image]
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if value is None:
            raise BadRecord("missing image")
        return (caption, *decode_image(value, self.resolution))


class WebDatasetShards:
    """WebDataset tar shards indexed by member offsets (headers only), so any record is one seek away.

    Keys and extensions are split by webdataset's own rule; a sample needs an image and a .txt or .json caption.
    A truncated shard keeps the samples before the damage and counts one `truncated shard`.
    """

    kind = "images"

    def __init__(self, shards: list[Path], resolution: int, text_field: str = ""):
        from webdataset.tariterators import base_plus_ext

        self.shards, self.resolution, self.text_field = shards, resolution, text_field
        self.index_report = {"truncated shard": 0, "no image": 0, "missing caption": 0}
        rows = []  # (shard, image offset, image size, caption offset, caption size, caption is json)
        for s, path in enumerate(shards):
            samples: dict[str, dict] = {}
            size = path.stat().st_size
            end = 0
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        end = m.offset_data + -(-m.size // 512) * 512
                        if m.isfile() and m.offset_data + m.size <= size:
                            key, ext = base_plus_ext(m.name)
                            if key is not None:
                                samples.setdefault(key, {})[ext.lower()] = (m.offset_data, m.size)
                        elif m.isfile():
                            raise tarfile.ReadError("member past the end of the file")
                # tarfile stops quietly at a cut between members: a whole tar ends in two zero blocks after the last.
                if size < end + 1024:
                    raise tarfile.ReadError("no end-of-archive blocks")
            except (tarfile.TarError, EOFError, OSError):
                self.index_report["truncated shard"] += 1
            for parts in samples.values():  # tar order, as written
                img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                cap = parts.get("txt") or parts.get("json")
                if img is None:
                    self.index_report["no image"] += 1
                elif cap is None:
                    self.index_report["missing caption"] += 1
                else:
                    rows.append((s, *img, *cap, "txt" not in parts))
        self.index = np.array(rows, dtype=np.int64).reshape(-1, 6)

    def __len__(self):
        return len(self.index)

    def get(self, i: int):
        s, io_, isz, co, csz, is_json = (int(v) for v in self.index[i])
        path = self.shards[s]
        raw = _pread(path, co, csz)
        if is_json:
            try:
                row = json.loads(raw)
            except ValueError:
                raise BadRecord("unreadable caption") from None
            if not isinstance(row, dict):
                raise BadRecord("unreadable caption")
            field = self.text_field or next((f for f in TEXT_FIELDS if f in row), TEXT_FIELDS[0])
            raw = row.get(field)
        caption = _clean_text(raw)
        return (caption, *decode_image(_pread(path, io_, isz), self.resolution))


def shard_paths(spec: str) -> list[Path] | None:
    """The .tar shards of a brace pattern (shards/{000000..000127}.tar) or a folder of .tar files; None if not shards."""
    path = Path(spec)
    if "{" in spec and spec.endswith(".tar"):
        braceexpand = _need("braceexpand")
        paths = [Path(p) for p in braceexpand.braceexpand(spec)]
        missing = [p for p in paths if not p.is_file()]
        if len(missing) == len(paths):
            raise DataError(f"no shard of {spec} exists (e.g. {missing[0]})")
        return [p for p in paths if p.is_file()]
    if path.suffix == ".tar" and path.is_file():
        return [path]
    if path.is_dir():
        tars = sorted(path.glob("*.tar"))
        return tars or None
    return None


def open_images(spec: str, resolution: int, text_field: str = ""):
    """The image source of data.images: WebDataset shards, a datasets folder, or an image folder."""
    shards = shard_paths(spec)
    if shards:
        _need("webdataset")
        return WebDatasetShards(shards, resolution, text_field)
    root = Path(spec)
    if not root.is_dir():
        raise DataError(f"no image folder at {root}: pass --set data.images=DIR (images with .txt captions or a "
                        "metadata.jsonl, a datasets folder, WebDataset shards DIR/{000000..000009}.tar), or "
                        "data.images=toy:N for the toy world")
    if (root / "dataset_info.json").is_file() or (root / "dataset_dict.json").is_file():
        return ArrowImages(_load_datasets_folder(root), resolution, text_field, root)
    return ImageFolder(root, resolution, text_field)
