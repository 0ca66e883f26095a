"""Training data at any size: choose the in-memory cache or the stream, and serve batches with the loop's interface.

`open_data` reads data.* and returns either PromptData (every prompt, and image latent, encoded up front and held
in host memory: today's behaviour, the fastest for small sets) or StreamData (records read, decoded and encoded
per batch by a background thread, a few batches ahead: start-up and host memory do not grow with the set).
Both serve `next(device) -> (prompts, cond, uncond, latents, image_sizes)` (the last two None without images), `state_dict()` / `load_state_dict()`, and, for work
done once per run, `first_encoded(n)`, `encode_indices(idx)`, `conds`, `fingerprint()` (docs/data.md).

Order: the same Order as PromptData (epoch permutations of (seed, epoch); rows rank::world of each global batch),
so N processes with batch B see what one process with batch N*B sees, and the stream position is the checkpointed
state. A bad record (empty caption, missing field, unreadable image) is replaced by a record chosen from its own
index alone, so the replacement, too, is the same whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
from pathlib import Path

import torch

from ..core.denoiser import Cond
from ..errors import DataError
from .prompts import Order, PromptData, cat_conds, publish_report, read_prompts
from .sources import BadRecord, TextLines, open_images, open_prompts

log = logging.getLogger(__name__)

# data.cache=auto keeps sets of up to this many records in memory and streams larger ones: docs/data.md,
# "Choosing the cache", has the measurements behind it.
MEMORY_MAX_RECORDS = 5_000
# ... and never more than this many bytes of cached embeddings and latents (SDXL: 315 KB a prompt, 3,400 prompts).
MEMORY_MAX_BYTES = 1 << 30
MAX_REPLACEMENTS = 64  # tries to replace one bad record before giving up on the data set
MIN_ROWS_FOR_FRACTION = 32  # data.max_bad_fraction is judged once this many records were read
# Blank lines of a text file are layout, not bad records: reported, never counted against data.max_bad_fraction.
NOT_BAD = ("empty lines",)
REASONS = ("missing field", "empty caption", "unreadable caption", "missing image", "unreadable image")


def _key(reason: str) -> str:
    return reason.replace(" ", "_")


class _Encoded:
    """All prompts of a stream as something with len() and .index(idx) (what dmd's ODE pairs index)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def index(self, idx) -> Cond:
        return self.data.encode_indices(idx)


class StreamData:
    """Records read, decoded and encoded per batch, `prefetch` batches ahead, in Order's per-process order."""

    def __init__(self, family, source, batch_size: int, seed: int, rank: int = 0, world: int = 1, *,
                 spec: str = "", prefetch: int = 2, max_bad_fraction: float = 0.05):
        if len(source) == 0:
            raise DataError(f"{spec} has no usable records ({_describe(source.index_report)})")
        self.family, self.source, self.spec = family, source, spec
        self.seed, self.rank, self.world = seed, rank, world
        self.prefetch, self.max_bad_fraction = prefetch, max_bad_fraction
        self.order = Order(len(source), batch_size, seed, rank, world)
        with torch.no_grad():
            self.uncond = family.empty_cond(1).to("cpu")
        self.counts = {r: 0 for r in REASONS}  # bad records this process read, in the batches it consumed
        self.rows = 0  # records this process read, bad ones included
        self._worker = None
        bad_at_index = _bad(source.index_report)
        _check_fraction(spec, bad_at_index, len(source) + bad_at_index, max_bad_fraction,
                        _describe(source.index_report))
        # The published entry itself: sync_report() fills in what reading found.
        self.report = publish_report(source.kind, spec, {
            "mode": "stream", "kept": len(source), **{_key(k): v for k, v in source.index_report.items()},
            "skipped_count": bad_at_index})
        if sum(source.index_report.values()):
            log.warning("%s: %d records left out (%s); the counts are in the run's data_report.json", spec,
                        sum(source.index_report.values()), _describe(source.index_report))

    def __len__(self):
        return len(self.source)

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    @batch_size.setter
    def batch_size(self, value: int):
        self._stop()  # prefetched batches have the old size
        self.order.batch_size = int(value)

    # -- reading one record, and its deterministic replacement when it is bad --
    def _read(self, i: int, counts: dict):
        n = len(self.source)
        for attempt in range(MAX_REPLACEMENTS):
            try:
                return i, self.source.get(i)
            except BadRecord as e:
                counts[str(e)] = counts.get(str(e), 0) + 1
                i = (i * 2654435761 + (attempt + 1) * 40503 + self.seed) % n
        raise DataError(f"{self.spec}: {MAX_REPLACEMENTS} records in a row are unusable ({_describe(counts)}): "
                        "check the data set")

    @torch.no_grad()
    def _make(self, idx: list[int], epoch: int):
        """This process's batch on the CPU (prompts, cond, uncond, latents or None, image_sizes or None) and the bad
        records met."""
        counts: dict[str, int] = {}
        rows = [self._read(i, counts) for i in idx]
        prompts = [text for _, (text, _, _) in rows]
        cond = self.family.encode_prompts(prompts).to("cpu")
        uncond = self.uncond.index(torch.zeros(len(idx), dtype=torch.long))
        latents = sizes = None
        if rows[0][1][1] is not None:
            images = torch.stack([image for _, (_, image, _) in rows])
            sizes = torch.tensor([size for _, (_, _, size) in rows], dtype=torch.long)
            # The VAE posterior's noise per record, from (seed, epoch, record): the same in any batch split.
            gens = [torch.Generator(self.family.device).manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + j)
                    for j, _ in rows]
            x = images.to(self.family.device, self.family.vae.dtype)
            latents = self.family.encode_images(x, generator=gens).float().cpu()
        return (prompts, cond, uncond, latents, sizes), counts, len(idx) + sum(counts.values())

    def _produce(self, order: Order):
        idx, epoch = order.next_global()
        return self._make(idx[self.rank :: self.world], epoch), order.state_dict()

    # -- the background thread: the next `prefetch` batches, prepared in order while the step runs --
    def _start(self):
        order = Order(len(self.source), self.batch_size, self.seed, self.rank, self.world)
        order.load_state_dict(self.order.state_dict())  # a copy: self.order moves only as batches are consumed
        q, stop = queue.Queue(maxsize=self.prefetch), threading.Event()

        def work():
            while not stop.is_set():
                try:
                    item = self._produce(order)
                except BaseException as e:  # noqa: BLE001 - handed to the consumer, raised in the training thread
                    item = e
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return

        thread = threading.Thread(target=work, name="stepdistill-data", daemon=True)
        thread.start()
        self._worker = (thread, q, stop)

    def _stop(self):
        if self._worker is not None:
            thread, _, stop = self._worker
            stop.set()
            thread.join()
            self._worker = None

    def next(self, device=None):
        """(prompts, cond, uncond, latents or None, image_sizes or None) of this process's next micro-batch."""
        if self.prefetch == 0:
            item = self._produce(self.order)
        else:
            if self._worker is None:
                self._start()
            item = self._worker[1].get()
            if isinstance(item, BaseException):
                self._worker = None
                raise item
        ((prompts, cond, uncond, latents, sizes), counts, rows), state = item
        self.order.load_state_dict(state)
        self.rows += rows
        for k, v in counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        bad = sum(self.counts.values())
        if self.rows >= MIN_ROWS_FOR_FRACTION:
            _check_fraction(self.spec, bad, self.rows, self.max_bad_fraction, _describe(self.counts))
        return prompts, cond.to(device), uncond.to(device), latents.to(device) if latents is not None else None, sizes

    # -- what work done once per run needs (write_samples, dmd's ODE pairs) --
    @torch.no_grad()
    def encode_indices(self, idx) -> Cond:
        """Embeddings of the records at `idx` (source order), encoded now, on the CPU; bad ones replaced."""
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1).tolist()]
        texts = [self._read(i, {})[1][0] for i in idx]
        parts = [self.family.encode_prompts(texts[i : i + 64]).to("cpu") for i in range(0, len(texts), 64)]
        return cat_conds(parts)

    def first_encoded(self, n: int) -> tuple[list[str], Cond]:
        """The first n prompts (source order) and their embeddings, on the CPU."""
        idx = list(range(min(n, len(self))))
        return [self._read(i, {})[1][0] for i in idx], self.encode_indices(idx)

    @property
    def conds(self):
        return _Encoded(self)

    def fingerprint(self) -> str:
        """Identifies the data set without reading it all: its files' names, sizes and record count."""
        paths = getattr(self.source, "shards", None) or [Path(self.spec)]
        facts = [f"{p}:{p.stat().st_size if p.is_file() else ''}" for p in paths] + [str(len(self))]
        return hashlib.sha256("\n".join(facts).encode()).hexdigest()

    # -- checkpoint state: the position of the batches consumed (not of those prefetched) and the counts --
    def state_dict(self):
        return {**self.order.state_dict(), "rows": self.rows, "bad": dict(self.counts)}

    def load_state_dict(self, state):
        self._stop()
        self.order.load_state_dict(state)
        self.rows = int(state.get("rows", 0))
        self.counts = {r: 0 for r in REASONS} | dict(state.get("bad", {}))

    def sync_report(self):
        """Sum the bad records every process read into the published report (a collective under torch.distributed)."""
        counts = torch.tensor([self.counts.get(r, 0) for r in REASONS] + [self.rows], dtype=torch.float64)
        if self.world > 1 and torch.distributed.is_initialized():
            dev = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
                else torch.device("cpu")
            counts = counts.to(dev)
            torch.distributed.all_reduce(counts)
        values = [int(v) for v in counts.cpu().tolist()]
        read = dict(zip(REASONS, values[:-1]))
        self.report["records_read"] = values[-1]
        for r, v in read.items():
            self.report[_key(r)] = v + self.source.index_report.get(r, 0)
        self.report["skipped_count"] = _bad(self.source.index_report) + sum(read.values())

    def close(self):
        self._stop()


def _bad(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k not in NOT_BAD)


def _describe(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items() if v) or "none readable"


# ---- choosing: memory or stream ----------------------------------------------------------------------------------

def _embedding_bytes(family) -> int:
    with torch.no_grad():
        c = family.empty_cond(1)
    tensors = [c.encoder_hidden_states, *(c.added_cond_kwargs or {}).values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def use_memory(cache: str, n: int, bytes_per_record: int) -> bool:
    """data.cache=auto: memory for sets up to MEMORY_MAX_RECORDS records and MEMORY_MAX_BYTES cached bytes."""
    if cache != "auto":
        return cache == "memory"
    return n <= MEMORY_MAX_RECORDS and n * bytes_per_record <= MEMORY_MAX_BYTES


def _read_all(source, spec, max_bad_fraction):
    """Every usable record of a source (the in-memory path), bad ones counted in the report."""
    counts, records = dict(source.index_report), []  # blank text lines never reach here (read_prompts reads .txt)
    for i in range(len(source)):
        try:
            records.append(source.get(i))
        except BadRecord as e:
            counts[str(e)] = counts.get(str(e), 0) + 1
    bad = _bad(counts)
    if not records:
        raise DataError(f"{spec} has no usable records ({_describe(counts)}): docs/data.md says what each format needs")
    _check_fraction(spec, bad, len(records) + bad, max_bad_fraction, _describe(counts))
    if bad:
        log.warning("%s: kept %d records, skipped %d (%s); the counts are in the run's data_report.json", spec,
                    len(records), bad, _describe(counts))
    publish_report(source.kind, spec, {"mode": "memory", "kept": len(records), **{_key(k): v for k, v in counts.items()},
                                       "skipped_count": bad})
    return records


def _check_fraction(spec, bad: int, total: int, max_bad_fraction: float, what: str = "") -> None:
    if bad > max_bad_fraction * total:
        raise DataError(f"{spec}: {bad} of {total} records are unusable{f' ({what})' if what else ''}, more than "
                        f"data.max_bad_fraction={max_bad_fraction}: fix the data, or raise data.max_bad_fraction")


def open_data(family, data, resolution: int, seed: int, rank: int = 0, world: int = 1, progress: bool = False):
    """PromptData or StreamData for the config section `data` (data.prompts, data.images, data.cache, ...)."""
    out = _open_data(family, data, resolution, seed, rank, world, progress)
    if data.images and data.prompts:
        # One meaning, said out loud: the captions of the images condition every loss term.
        log.warning("data.images=%s and data.prompts=%s are both set: the images' captions are the prompts of every "
                    "loss term and data.prompts is not read (unset one to silence this)", data.images, data.prompts)
        publish_report("prompts", data.prompts, {"not_read": 1, "because": f"data.images={data.images} is set"})
    return out


def _open_data(family, data, resolution, seed, rank, world, progress):
    from .images import encode_latents, read_image_folder, read_toy_images, uncropped_sizes
    from .sources import ImageFolder

    kw = {"batch_size": data.batch_size, "seed": seed, "rank": rank, "world": world}
    if data.images.startswith("toy:"):
        images, captions = read_toy_images(data.images, resolution, seed)
        latents = encode_latents(family, images, progress=progress)
        return PromptData.from_family(family, captions, progress=progress, latents=latents,
                                      image_sizes=uncropped_sizes(len(images), resolution), **kw)
    per_record = _embedding_bytes(family)
    if data.images:
        source = open_images(data.images, resolution, data.text_field)
        c, h = family.latent_shape(1, resolution)[1], family.latent_shape(1, resolution)[2:]
        per_record += 4 * c * int(torch.tensor(h).prod())
    else:
        if not data.prompts:
            raise DataError("no training data: pass --set data.prompts=FILE (or data.images=DIR)")
        source = open_prompts(data.prompts, data.text_field, data.max_prompt_words)
    spec = data.images or data.prompts
    memory = use_memory(data.cache, len(source), per_record)
    log.info("%s: %d records, %s (data.cache=%s)", spec, len(source),
             "encoded up front and kept in memory" if memory else "streamed: read and encoded per batch", data.cache)
    if not memory:
        return StreamData(family, source, spec=spec, prefetch=data.prefetch, max_bad_fraction=data.max_bad_fraction,
                          **kw)
    if isinstance(source, TextLines):  # today's reader and report for text files
        prompts, _ = read_prompts(data.prompts, data.max_prompt_words, data.max_bad_fraction)
        return PromptData.from_family(family, prompts, progress=progress, **kw)
    if isinstance(source, ImageFolder):  # today's reader and report (skipped files by name) for image folders
        images, captions, sizes, report = read_image_folder(data.images, resolution)
        _check_fraction(data.images, len(report.skipped), len(captions) + len(report.skipped), data.max_bad_fraction)
        latents = encode_latents(family, images, progress=progress)
        return PromptData.from_family(family, captions, progress=progress, latents=latents, image_sizes=sizes, **kw)
    records = _read_all(source, spec, data.max_bad_fraction)
    latents = sizes = None
    if data.images:
        latents = encode_latents(family, torch.stack([image for _, image, _ in records]), progress=progress)
        sizes = torch.tensor([size for _, _, size in records], dtype=torch.long)
    return PromptData.from_family(family, [text for text, _, _ in records], progress=progress, latents=latents,
                                  image_sizes=sizes, **kw)
