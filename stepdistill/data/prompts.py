"""Prompt sets and the text-embedding cache: prompts are encoded once, so training never runs text encoders per step."""

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


def publish_report(kind: str, source, report) -> None:
    """Hand a reader's report (a dataclass or dict) to the active collect_reports() block, if any."""
    reports = _REPORTS.get()
    if reports is not None:
        fields = asdict(report) if not isinstance(report, dict) else dict(report)
        reports.append({"kind": kind, "source": str(source), **fields})


def summarize_reports(reports: list[dict]) -> str:
    """One line for the log: each data set's kept and problem counts."""
    parts = []
    for r in reports:
        counts = ", ".join(f"{k}={v}" for k, v in r.items() if isinstance(v, int) and k not in ("kind",))
        parts.append(f"{r['kind']} {r['source']}: {counts}")
    return "; ".join(parts)


def read_prompts(path, max_words: int = 0) -> tuple[list[str], PromptReport]:
    """Read one prompt per line; skip empty lines, replace undecodable bytes, optionally cut long prompts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no prompts file at {path}: pass --set data.prompts=FILE (a text file, one prompt per line)")
    report = PromptReport()
    prompts = []
    for raw in path.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            report.undecodable_lines += 1
        line = line.strip()
        if not line:
            report.empty_lines += 1
            continue
        if max_words and len(line.split()) > max_words:
            line = " ".join(line.split()[:max_words])
            report.truncated += 1
        prompts.append(line)
    report.kept = len(prompts)
    if not prompts:
        raise DataError(f"{path} has no usable prompts ({report.empty_lines} empty lines): put one prompt per line")
    publish_report("prompts", path, report)
    if report.empty_lines or report.undecodable_lines or report.truncated:
        log.warning(
            "%s: kept %d prompts; skipped %d empty lines, %d lines with non-UTF-8 bytes (replaced), %d truncated",
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


class PromptData:
    """Cached prompt embeddings served in a deterministic, resumable, per-process order.

    Order: a permutation of all prompts per epoch drawn from (seed, epoch); process r of W takes every W-th
    index from r, so W processes together see the same prompts as one process with a W-times larger batch.
    """

    def __init__(self, prompts, cond: Cond, uncond: Cond, batch_size: int, seed: int, rank: int = 0, world: int = 1,
                 latents: torch.Tensor | None = None):
        self.prompts, self.cond, self.uncond, self.latents = prompts, cond, uncond, latents
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.epoch, self.position = 0, 0  # position counts global samples consumed in this epoch

    @classmethod
    def from_family(cls, family, prompts, batch_size, seed, rank=0, world=1, chunk=64, progress=False, latents=None):
        from tqdm.auto import tqdm

        parts, too_long = [], 0
        for i in tqdm(range(0, len(prompts), chunk), desc="encoding prompts", disable=not progress):
            parts.append(family.encode_prompts(prompts[i : i + chunk]).to("cpu"))
            too_long += count_too_long(family, prompts[i : i + chunk])
        if too_long:
            log.warning("%d of %d prompts are longer than the text encoder reads (%d tokens): only their start is "
                        "used", too_long, len(prompts), _max_tokens(family))
        publish_report("tokenizer", getattr(family, "path", ""), {
            "kept": len(prompts), "truncated_by_tokenizer": too_long, "max_tokens": _max_tokens(family)})
        cond = parts[0]
        for p in parts[1:]:
            cond = cond.cat(p)
        return cls(prompts, cond, family.empty_cond(1).to("cpu"), batch_size, seed, rank, world, latents)

    def _permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.prompts), generator=g)

    def next_indices(self) -> list[int]:
        """Global batch of batch_size * world prompts; this process's share."""
        global_bs = self.batch_size * self.world
        out = []
        while len(out) < global_bs:
            perm = self._permutation(self.epoch)
            take = min(global_bs - len(out), len(perm) - self.position)
            out += perm[self.position : self.position + take].tolist()
            self.position += take
            if self.position >= len(perm):
                self.epoch, self.position = self.epoch + 1, 0
        return out[self.rank :: self.world]

    def next(self, device=None):
        """(prompts, cond, uncond, latents or None) of this process's next micro-batch."""
        idx = self.next_indices()
        cond = _cond_rows(self.cond, idx).to(device)
        uncond = _cond_rows(self.uncond, [0] * len(idx)).to(device)
        latents = self.latents[torch.as_tensor(idx)].to(device) if self.latents is not None else None
        return [self.prompts[i] for i in idx], cond, uncond, latents

    def state_dict(self):
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state):
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
