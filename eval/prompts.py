"""Evaluation prompt sets: every prompt gets a stable id and its own seed, so sharded, resumed and batched
runs all produce the same image for the same id.

Accepted files:
  *.txt           one prompt per line; id = zero-padded line number among non-empty lines
  *.csv / *.tsv   a header with a prompt column (`prompt`, `caption` or `text`), optional `id` and `seed`
  *.json          a list of {"id", "prompt"[, "seed"]} objects, a list of strings, or an {id: prompt} object
  *.jsonl         one {"id", "prompt"[, "seed"]} object per line
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_COLUMNS = ("prompt", "caption", "text")
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class PromptRecord:
    id: str
    prompt: str
    seed: int


def _prompt_of(row: dict, where: str) -> str:
    for key in PROMPT_COLUMNS:
        if key in row and row[key] is not None:
            return str(row[key]).strip()
    raise ValueError(f"{where} has no prompt: give each entry one of the fields {', '.join(PROMPT_COLUMNS)}")


def _rows_from_file(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    if suffix == ".jsonl":
        lines = path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return [{"id": k, "prompt": v} for k, v in data.items()]
        return [row if isinstance(row, dict) else {"prompt": row} for row in data]
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    return [{"prompt": line} for line in lines if line]


def _check_id(record_id: str, path: Path) -> str:
    # Ids become file names (images/<id>.png), so they must be safe on every file system.
    if not _SAFE_ID.fullmatch(record_id):
        raise ValueError(
            f"{path}: id {record_id!r} cannot be a file name; use letters, digits, '.', '_' or '-' (or drop the "
            "id column to number the prompts)"
        )
    return record_id


def load_prompts(path, limit: int | None = None, base_seed: int = 0) -> list[PromptRecord]:
    """Read a prompt file into records; seed = base_seed + position unless the file gives a seed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}: pass a .txt (one prompt per line), .csv, .json or .jsonl")
    rows = _rows_from_file(path)
    if limit is not None:
        rows = rows[:limit]
    width = max(6, len(str(len(rows))))
    records, seen = [], set()
    for i, row in enumerate(rows):
        where = f"{path} entry {i}"
        record_id = _check_id(str(row["id"]).strip(), path) if row.get("id") not in (None, "") else f"{i:0{width}d}"
        if record_id in seen:
            raise ValueError(f"{path}: id {record_id!r} appears twice; ids must be unique")
        seen.add(record_id)
        seed = int(row["seed"]) if row.get("seed") not in (None, "") else base_seed + i
        records.append(PromptRecord(record_id, _prompt_of(row, where), seed))
    if not records:
        raise ValueError(f"{path} has no prompts")
    return records


def shard(records: list, rank: int, world: int) -> list:
    """Contiguous block `rank` of `world`: shards concatenated in rank order give back the original order."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside 0..{world - 1}")
    n = len(records)
    return records[rank * n // world : (rank + 1) * n // world]
