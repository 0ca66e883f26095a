"""Atomic writes: a reader, or a run restarted after a kill, never sees half a file or half a folder.

The one place for the temp-name-then-os.replace idiom (recipes, LoRA files, ODE pairs, DisBack's manifest,
generated PNGs and manifests, metrics, exported folders).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def atomic_write(path, write: Callable[[str], object], suffix: str = ".tmp") -> Path:
    """write(tmp) to a temp file beside `path`, then os.replace it over `path`; a failed write leaves nothing.

    `suffix` is the temp file's: PIL and others pick the format from it (e.g. ".png")."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old `dst` is moved aside first and deleted only afterwards."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(dst) -> Iterator[Path]:
    """Yield a temp folder beside `dst`; on success it replaces `dst` whole, on any error it is removed.

    The temp folder has a fixed name (`.<name>.tmp`), so one left by a killed writer is cleared by the next: one
    writer per `dst` at a time (rank 0 writes exports)."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
