"""FID / KID of generated images against a reference set, through clean-fid's `clean` preprocessing.

Pipeline per image, identical for generated and reference images (the GigaGAN protocol used by DMD/DMD2):
    PNG/JPEG -> RGB uint8 -> [protocol: centre crop + Lanczos to eval_res] -> clean-fid PIL-bicubic on float
    to 299 -> Inception pool3 (torchscript, fp32, TF32 off) -> float64 streaming statistics.
The statistics and distances are stepdistill.metrics.fid; reference statistics are cached once per
(reference files, preprocessing, feature extractor) in our own cache folder, never in site-packages.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from stepdistill.metrics.fid import FeatureStats, kernel_distance

from .images import CenterPatch, CropResize, Identity, list_images

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
STATS_VERSION = 1  # bump when the preprocessing changes, so stale cached reference statistics are not reused


@dataclass(frozen=True)
class FIDProtocol:
    name: str
    eval_res: int | None  # centre crop + Lanczos to this size before clean-fid's resize; None: no pre-resize
    n_gen: int | None  # the number of generated images the published numbers use
    reference: str
    comparable_to: str
    patch: bool = False  # also report patch-FID (centre 299 crop at full resolution)


PROTOCOLS = {
    "coco2014-30k-256": FIDProtocol(
        "coco2014-30k-256", 256, 30_000,
        "all 40,504 COCO-2014 val images (val2014/), same crop + Lanczos 256",
        "zero-shot COCO FID-30k (SD1.5): DMD2 8.35 / 9.28, SD1.5 teacher 8.59 (50 steps, cfg 3), DMD 11.49, "
        "GigaGAN 9.09, LCM-LoRA 4-step 23.62",
    ),
    "coco2014-10k-512": FIDProtocol(
        "coco2014-10k-512", 512, 10_000,
        "the 10k COCO images that match the prompts (DMD2 coco10k/subset), same crop + Lanczos 512",
        "COCO FID-10k @512 (SDXL): DMD2 19.01 (1-step), 19.32 (4-step), 19.68 (4-step LoRA); patch-FID is "
        "SDXL-Lightning's FID-Patch in spirit (its whole-image resize is not published)",
        patch=True,
    ),
    "folder": FIDProtocol(
        "folder", None, None, "any folder of images, same preprocessing", "only runs of this harness"
    ),
    "custom": FIDProtocol(
        "custom", None, None, "a named reference folder whose statistics are cached once", "only runs of this harness"
    ),
}


def default_cache_dir() -> Path:
    """$STEPDISTILL_CACHE, else $XDG_CACHE_HOME/stepdistill, else ~/.cache/stepdistill."""
    if os.environ.get("STEPDISTILL_CACHE"):
        return Path(os.environ["STEPDISTILL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stepdistill"


def resolve_protocol(name: str, eval_res: int | None = None) -> FIDProtocol:
    """A preset by name; `folder`/`custom` take eval_res (None keeps images at their size before the 299 resize)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown FID protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    if eval_res is not None and eval_res != protocol.eval_res:
        if protocol.n_gen is not None:
            raise ValueError(f"protocol {name} fixes eval_res={protocol.eval_res}; use --protocol folder to change it")
        protocol = FIDProtocol(**{**asdict(protocol), "eval_res": eval_res})
    return protocol


# ---------------------------------------------------------------------------------------------------------
# Inception weights


class InceptionFeatures(torch.nn.Module):
    """The NVIDIA torchscript Inception-v3 (TF weights): [B,3,299,299] in [0,255] -> [B,2048] pool3 features."""

    def __init__(self, path: Path):
        super().__init__()
        with warnings.catch_warnings():
            # torch deprecates TorchScript loading, but this file only exists as TorchScript.
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*jit.load")
            self.base = torch.jit.load(str(path), map_location="cpu").eval()
        self.cache_id = f"inception-2015-12-05:{_sha256(path)[:16]}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2:] != (299, 299):
            raise ValueError(f"Inception expects 299x299 inputs, got {tuple(x.shape[2:])}")
        # clean-fid's normalisation for this network: (x - 128) / 128.
        return self.base.layers((x - 128) / 128).view(x.shape[0], 2048)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def inception_candidates(path=None) -> list[Path]:
    """Where the Inception weights are looked for, in order."""
    candidates = []
    for given in (path, os.environ.get("STEPDISTILL_INCEPTION")):
        if given:
            given = Path(given)
            candidates.append(given / INCEPTION_FILE if given.is_dir() else given)
    candidates.append(default_cache_dir() / INCEPTION_FILE)
    # clean-fid's own download location (it writes to the temp folder on Linux and macOS).
    candidates.append(Path(tempfile.gettempdir()) / INCEPTION_FILE)
    return candidates


def load_inception(path=None, device="cpu", allow_download: bool = False) -> InceptionFeatures:
    """The Inception extractor from a local file, or downloaded by clean-fid when allowed; else a clear error."""
    candidates = inception_candidates(path)
    found = next((c for c in candidates if c.is_file()), None)
    if found is None and path:
        raise FileNotFoundError(f"no Inception weights at {path}: expected the file {INCEPTION_FILE} ({INCEPTION_URL})")
    if found is None and allow_download:
        found = _download_inception(default_cache_dir())
    if found is None:
        raise FileNotFoundError(
            f"Inception weights not found. On a connected machine download {INCEPTION_URL} and place it at "
            f"{candidates[-2]} (or pass --inception PATH, or set STEPDISTILL_INCEPTION); looked in: "
            + ", ".join(str(c) for c in candidates)
        )
    try:
        return InceptionFeatures(found).to(device)
    except RuntimeError as e:
        raise RuntimeError(
            f"{found} ({found.stat().st_size} bytes) is not a valid torchscript Inception, probably a truncated "
            f"download: delete it and download {INCEPTION_URL} again"
        ) from e


def _download_inception(folder: Path) -> Path:
    from cleanfid.downloads_helper import check_download_inception

    folder.mkdir(parents=True, exist_ok=True)
    try:
        check_download_inception(fpath=str(folder))
    except Exception as e:  # requests/urllib raise many types; all mean the same thing here
        partial = folder / INCEPTION_FILE
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(
            f"could not download the Inception weights ({e}); offline, download {INCEPTION_URL} on a connected "
            f"machine and place it at {partial}"
        ) from e
    return folder / INCEPTION_FILE


# ---------------------------------------------------------------------------------------------------------
# Features


@contextlib.contextmanager
def _strict_fp32():
    """TF32 off while extracting features: paper-grade FID is computed in full fp32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def default_num_workers() -> int:
    return min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def extract_features(
    files, extractor, transform=None, batch_size: int = 64, num_workers: int | None = None, device="cpu",
    keep_features: bool = True, progress: bool = True, desc: str = "features",
) -> FeatureStats:
    """Streaming statistics of extractor features over image files; the CPU resizing runs in DataLoader workers."""
    from cleanfid.utils import ResizeDataset
    from tqdm.auto import tqdm

    dataset = ResizeDataset([str(f) for f in files], mode="clean")
    dataset.custom_image_tranform = transform or Identity()
    workers = default_num_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers)
    stats = FeatureStats(keep_features=keep_features)
    with torch.no_grad(), _strict_fp32():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            stats.update(extractor(batch.to(device, torch.float32)))
    return stats


def generated_files(gen_dir) -> list[Path]:
    """The images of a generation folder: those in its manifest when it has one, else every image file."""
    from .generate import MANIFEST, read_manifest

    gen_dir = Path(gen_dir)
    if (gen_dir / MANIFEST).is_file():
        return [gen_dir / e["file"] for e in read_manifest(gen_dir)]
    return list_images(gen_dir)


def _fingerprint(files: list[Path], transform, extractor) -> str:
    """Cache key of reference statistics: file names, sizes and mtimes + preprocessing + extractor identity."""
    h = hashlib.sha256()
    extractor_id = getattr(extractor, "cache_id", type(extractor).__name__)
    h.update(json.dumps([STATS_VERSION, transform.describe(), extractor_id]).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def reference_stats(
    ref, transform, extractor, cache_dir=None, name: str | None = None, keep_features: bool = True, **extract_kwargs
) -> FeatureStats:
    """Statistics of a reference: an .npz of statistics, or a folder whose statistics are computed once and cached.

    With `name` (the `custom` protocol) the cache file is <cache>/fid_stats/custom/<name>.npz and later runs
    need only the name; otherwise the cache file is keyed by the folder's content and the preprocessing.
    """
    stats_dir = Path(cache_dir or default_cache_dir()) / "fid_stats"
    named = stats_dir / "custom" / f"{name}.npz" if name else None
    if ref is None:
        if named is not None and named.is_file():
            return FeatureStats.load(named)
        raise ValueError("no reference: pass --ref FOLDER (or a statistics .npz), or --ref-name of cached statistics")
    ref = Path(ref)
    if ref.suffix == ".npz":
        return FeatureStats.load(ref)
    files = list_images(ref)
    key = _fingerprint(files, transform, extractor)
    cached = named or stats_dir / f"{ref.name}-{key[:16]}.npz"
    if cached.is_file():
        stats = FeatureStats.load(cached)
        if stats.meta.get("key") == key and (stats.keep_features or not keep_features):
            return stats
    stats = extract_features(
        files, extractor, transform, keep_features=keep_features, desc="reference", **extract_kwargs
    )
    stats.meta = {"key": key, "reference": str(ref), "n": len(files), "preprocessing": transform.describe()}
    stats.save(cached)
    return stats


def _distances(gen: FeatureStats, ref: FeatureStats, kid: bool) -> dict:
    out = {"fid": gen.fid(ref)}
    if kid and gen.keep_features and ref.keep_features:
        out["kid"] = kernel_distance(gen.features, ref.features)
    return out


def compute_fid(
    gen_dir,
    protocol: str = "folder",
    ref=None,
    eval_res: int | None = None,
    ref_name: str | None = None,
    extractor=None,
    inception_path=None,
    allow_download: bool = False,
    cache_dir=None,
    batch_size: int = 64,
    num_workers: int | None = None,
    device=None,
    kid: bool = True,
    write_metrics: bool = True,
    progress: bool = True,
) -> dict:
    """FID (and KID, patch-FID where the protocol has it) of a generation folder; also merged into its metrics.json."""
    proto = resolve_protocol(protocol, eval_res)
    files = generated_files(gen_dir)  # check the inputs before loading any network
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = extractor or load_inception(inception_path, device, allow_download)
    kwargs = {"batch_size": batch_size, "num_workers": num_workers, "device": device, "progress": progress}
    transform = CropResize(proto.eval_res) if proto.eval_res else Identity()

    gen = extract_features(files, extractor, transform, keep_features=kid, desc="generated", **kwargs)
    ref_stats = reference_stats(ref, transform, extractor, cache_dir, ref_name, keep_features=kid, **kwargs)
    result = {
        **_distances(gen, ref_stats, kid),
        "protocol": proto.name,
        "n_gen": gen.n,
        "n_ref": ref_stats.n,
        "complete": proto.n_gen is None or gen.n == proto.n_gen,
        "reference": ref_stats.meta.get("reference", str(ref) if ref else ref_name),
        "preprocessing": f"{transform.describe()} -> clean-fid clean (PIL bicubic on float) to 299",
        "feature_extractor": getattr(extractor, "cache_id", type(extractor).__name__),
        "comparable_to": proto.comparable_to,
        "implementation": _implementation(),
    }
    if proto.patch:
        patch = CenterPatch(299)
        gen_patch = extract_features(files, extractor, patch, keep_features=False, desc="generated patches", **kwargs)
        ref_patch = reference_stats(ref, patch, extractor, cache_dir, ref_name and f"{ref_name}-patch", False, **kwargs)
        result["patch_fid"] = gen_patch.fid(ref_patch)
    if write_metrics:
        from .report import update_metrics

        update_metrics(gen_dir, "fid", result)
    return result


def _implementation() -> dict:
    from importlib.metadata import version

    return {"library": f"clean-fid {version('clean-fid')} (clean mode)", "stats": "stepdistill float64, eigen sqrt",
            "kid": "cubic kernel, 100 subsets of <= 1000, seed 0", "dtype": "fp32, TF32 off", "numpy": np.__version__}
