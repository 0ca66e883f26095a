"""Prompt files, data reports, the deterministic per-process order, and the in-memory text-embedding cache.

Small sets are encoded once up front (PromptData); large ones stream (data.stream.StreamData, docs/data.md)."""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..core.denoiser import Cond
from ..errors import DataError

log = logging.getLogger(__name__)


@dataclass
class PromptReport:
    kept: int = 0
    empty_lines: int = 0
    undecodable_lines: int = 0
    truncated: int = 0  # cut to data.max_prompt_words


# ---- data reports: what was skipped, replaced or cut, gathered for DIR/data_report.json -----------------------

_REPORTS: contextvars.ContextVar[list | None] = contextvars.ContextVar("stepdistill_data_reports", default=None)


@contextlib.contextmanager
def collect_reports():
    """Gather the report of every data set read inside the block, as a list of dicts (the loop saves them)."""
    reports: list[dict] = []
    token = _REPORTS.set(reports)
    try:
        yield reports
    finally:
        _REPORTS.reset(token)


def publish_report(kind: str, source, report) -> dict:
    """Hand a reader's report (a dataclass or dict) to the active collect_reports() block, if any. Returns the entry:
    a reader that keeps counting while training runs (a stream) updates it in place."""
    fields = asdict(report) if not isinstance(report, dict) else dict(report)
    entry = {"kind": kind, "source": str(source), **fields}
    reports = _REPORTS.get()
    if reports is not None:
        reports.append(entry)
    return entry


def summarize_reports(reports: list[dict]) -> str:
    """One line for the log: each data set's kept and problem counts."""
    parts = []
    for r in reports:
        counts = ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, int) and k not in ("kind",))
        parts.append(f"{r['kind']} {r['source']}: {counts}")
    return "; ".join(parts)


def read_prompts(path, max_words: int = 0, max_bad_fraction: float = 0.05) -> tuple[list[str], PromptReport]:
    """Read one prompt per line; skip empty lines, optionally cut long prompts.

    A line that is not UTF-8 is a bad record (its text is unknown, and replacement characters would train on noise):
    it is skipped and counted against `max_bad_fraction`, like a corrupt image. A file with NUL bytes is binary, not
    text: refused at once.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompts file at {path}: pass --set data.prompts=FILE (a text file, one prompt per line)")
    data = path.read_bytes()
    if b"\0" in data:
        raise DataError(f"{path} is a binary file, not text (it holds NUL bytes): pass a text file with one prompt per "
                        "line as data.prompts")
    report = PromptReport()
    prompts = []
    for raw in data.splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.undecodable_lines += 1
            continue
        line = line.strip()
        if not line:
            report.empty_lines += 1
            continue
        if max_words and len(line.split()) > max_words:
            line = " ".join(line.split()[:max_words])
            report.truncated += 1
        prompts.append(line)
    report.kept = len(prompts)
    bad, total = report.undecodable_lines, report.kept + report.undecodable_lines
    if bad and bad > max_bad_fraction * total:
        raise DataError(f"{path}: {bad} of {total} lines are not UTF-8 text, more than data.max_bad_fraction="
                        f"{max_bad_fraction}: save the file as UTF-8, or raise data.max_bad_fraction")
    if not prompts:
        raise DataError(f"{path} has no usable prompts ({report.empty_lines} empty lines): put one prompt per line")
    publish_report("prompts", path, report)
    if report.empty_lines or report.undecodable_lines or report.truncated:
        log.warning(
            "%s: kept %d prompts; skipped %d empty lines and %d lines that are not UTF-8 text; %d truncated",
            path, report.kept, report.empty_lines, report.undecodable_lines, report.truncated,
        )
    return prompts, report


def _max_tokens(family) -> int:
    tokenizers = getattr(family, "tokenizers", None) or []
    return min((t.model_max_length for t in tokenizers), default=0)


def count_too_long(family, prompts: list[str]) -> int:
    """How many prompts the family's tokenizers cut (CLIP reads 77 tokens, start and end tokens included)."""
    tokenizers = getattr(family, "tokenizers", None) or []
    if not tokenizers:
        return 0
    tok = min(tokenizers, key=lambda t: t.model_max_length)
    # verbose=False: we count the long prompts ourselves instead of one transformers warning per call.
    ids = tok(list(prompts), truncation=False, verbose=False).input_ids
    return sum(len(x) > tok.model_max_length for x in ids)


def _cond_rows(cond: Cond, idx) -> Cond:
    return cond.index(torch.as_tensor(idx, dtype=torch.long))


def cat_conds(parts: list[Cond]) -> Cond:
    """One torch.cat per tensor over all parts (Cond.cat in a loop copies the growing result: quadratic)."""
    first = parts[0]
    added = None
    if first.added_cond_kwargs is not None:
        added = {k: torch.cat([p.added_cond_kwargs[k] for p in parts]) for k in first.added_cond_kwargs}
    return Cond(torch.cat([p.encoder_hidden_states for p in parts]), added)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of epoch `epoch`: a permutation of range(n) drawn from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


class Order:
    """Deterministic, resumable, per-process walk over n records: epoch permutations from (seed, epoch); each global
    batch holds batch_size * world records and process r of W takes rows r::W of it, so W processes together see
    what one process with a W-times larger batch sees."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.epoch, self.position = 0, 0  # position counts global samples consumed in this epoch
        self._perm = (None, None)

    def _permutation(self, epoch: int) -> list[int]:
        # One randperm per epoch, not per batch (1M records: ~20 ms each), read into a list once: a tensor read back
        # per batch would be a value read in every iteration (issue 33's count).
        if self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.n, self.seed, epoch).tolist())
        return self._perm[1]

    def next_global(self) -> tuple[list[int], int]:
        """The next global batch's record indices (all processes') and the epoch of its first record."""
        global_bs, out, epoch = self.batch_size * self.world, [], self.epoch
        while len(out) < global_bs:
            perm = self._permutation(self.epoch)
            take = min(global_bs - len(out), len(perm) - self.position)
            out += perm[self.position : self.position + take]
            self.position += take
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return out, epoch

    def next_indices(self) -> list[int]:
        """Global batch of batch_size * world records; this process's share."""
        return self.next_global()[0][self.rank :: self.world]

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class PromptData:
    """Cached prompt embeddings (all encoded up front, held in host memory) served in Order's deterministic,
    resumable, per-process order. The streaming twin with the same interface is data.stream.StreamData."""

    def __init__(self, prompts, cond: Cond, uncond: Cond, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 latents: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None):
        if (latents is None) != (image_sizes is None):
            # Real latents without their size rows would condition SDXL on the run's size instead of the image's.
            raise ValueError("PromptData: pass image_sizes (data.images.SIZE_FIELDS rows) with latents, and only then")
        self.prompts, self.cond, self.uncond, self.latents = prompts, cond, uncond, latents
        self.image_sizes = image_sizes  # long [N, 4]: each image's original (H, W) and crop (top, left)
        self.seed, self.rank, self.world = seed, rank, world
        self.order = Order(len(prompts), batch_size, seed, rank, world)

    @classmethod
    def from_family(cls, family, prompts, batch_size, seed, rank=0, world=1, chunk=64, progress=False, latents=None,
                    image_sizes=None):
        from tqdm.auto import tqdm

        parts, too_long = [], 0
        with torch.no_grad():
            for i in tqdm(range(0, len(prompts), chunk), desc="encoding prompts", disable=not progress):
                parts.append(family.encode_prompts(prompts[i : i + chunk]).to("cpu"))
                too_long += count_too_long(family, prompts[i : i + chunk])
        if too_long:
            log.warning("%d of %d prompts are longer than the text encoder reads (%d tokens): only their start is "
                        "used", too_long, len(prompts), _max_tokens(family))
        publish_report("tokenizer", getattr(family, "path", ""), {
            "kept": len(prompts), "truncated_by_tokenizer": too_long, "max_tokens": _max_tokens(family)})
        return cls(prompts, cat_conds(parts), family.empty_cond(1).to("cpu"), batch_size, seed, rank, world, latents,
                   image_sizes)

    # Kept as attributes for callers and tests that read them.
    epoch = property(lambda self: self.order.epoch)
    position = property(lambda self: self.order.position)

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    @batch_size.setter
    def batch_size(self, value: int):  # the training benchmark sweeps it on one built run
        self.order.batch_size = int(value)

    def __len__(self):
        return len(self.prompts)

    def next_indices(self) -> list[int]:
        return self.order.next_indices()

    def next(self, device=None):
        """(prompts, cond, uncond, latents or None, image_sizes or None) of this process's next micro-batch."""
        idx = self.next_indices()
        cond = _cond_rows(self.cond, idx).to(device)
        uncond = _cond_rows(self.uncond, [0] * len(idx)).to(device)
        if self.latents is None:
            return [self.prompts[i] for i in idx], cond, uncond, None, None
        rows = torch.as_tensor(idx)
        return [self.prompts[i] for i in idx], cond, uncond, self.latents[rows].to(device), self.image_sizes[rows]

    # -- what work done once per run needs (write_samples, dmd's ODE pairs): the same on PromptData and StreamData --
    def first_encoded(self, n: int) -> tuple[list[str], Cond]:
        """The run's first n prompts (file order) and their embeddings, on the CPU."""
        idx = list(range(min(n, len(self))))
        return [self.prompts[i] for i in idx], _cond_rows(self.cond, idx)

    def encode_indices(self, idx) -> Cond:
        """Embeddings of the prompts at `idx` (file order), on the CPU."""
        return _cond_rows(self.cond, idx)

    @property
    def conds(self):
        """All prompts' embeddings as something with len() and .index(idx) (here the cache itself)."""
        return self.cond

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256("\n".join(self.prompts).encode()).hexdigest()

    def state_dict(self):
        return self.order.state_dict()

    def load_state_dict(self, state):
        self.order.load_state_dict(state)

    def sync_report(self) -> None:
        """Nothing to gather: the cache read every record up front (StreamData counts as it reads)."""

    def close(self) -> None:
        """Nothing to stop (StreamData stops its prefetch thread)."""
