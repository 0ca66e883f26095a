"""Optional preference metrics (ImageReward, HPSv2.1, LAION aesthetic) behind a thin interface.

Each metric is a loader returning a scorer `score(images: list[PIL.Image], prompts: list[str]) -> list[float]`
(raw scale, as PCM/Hyper-SD tables report them). A metric whose package or weights are missing is skipped
with a one-line notice; it never stops an evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch

from stepdistill.metrics.aesthetic import AESTHETIC_WEIGHTS, AestheticMLP

log = logging.getLogger(__name__)



class MetricUnavailable(RuntimeError):
    """A preference metric that cannot run here; the message says what to install or download."""


def _load_imagereward(weights, device):
    try:
        import ImageReward as reward
    except ImportError as e:
        raise MetricUnavailable("pip install image-reward") from e
    model = reward.load(str(weights) if weights else "ImageReward-v1.0", device=device)

    def score(images, prompts):
        return [float(model.score(p, [img])) for img, p in zip(images, prompts)]

    return score


def _load_hpsv21(weights, device):
    try:
        import hpsv2
    except ImportError as e:
        raise MetricUnavailable("pip install hpsv2") from e

    def score(images, prompts):
        # hpsv2.score reloads its checkpoint per call, so score one prompt with all its images at a time.
        return [float(hpsv2.score([img], p, hps_version="v2.1")[0]) for img, p in zip(images, prompts)]

    return score


def _load_aesthetic(weights, device):
    from stepdistill.metrics.clip import load_clip_encoder

    path = Path(weights) if weights else None
    if path is None or not path.is_file():
        raise MetricUnavailable(
            f"place {AESTHETIC_WEIGHTS} (christophschuhmann/improved-aesthetic-predictor) and pass its path"
        )
    head = AestheticMLP()
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    head = head.eval().to(device)
    encoder = load_clip_encoder("torchmetrics", device=device)  # OpenAI CLIP ViT-L/14

    @torch.no_grad()
    def score(images, prompts):
        return head(encoder.encode_images(images).to(device)).cpu().tolist()

    return score


PREFERENCE_METRICS: dict[str, Callable] = {
    "imagereward": _load_imagereward,
    "hpsv21": _load_hpsv21,
    "aesthetic": _load_aesthetic,
}


def load_preference(name: str, weights=None, device="cpu"):
    """The scorer for `name`, or None (after a one-line notice) when its package or weights are missing."""
    if name not in PREFERENCE_METRICS:
        raise ValueError(f"unknown preference metric {name!r}: choose from {', '.join(PREFERENCE_METRICS)}")
    try:
        return PREFERENCE_METRICS[name](weights, device)
    except Exception as e:  # noqa: BLE001 -- a missing extra or an offline download must never stop the evaluation
        log.warning("skipping %s: %s", name, e)
        return None


def compute_preference(gen_dir, names, weights: dict | None = None, batch_size: int = 16, device=None,
                       write_metrics: bool = True) -> dict:
    """Mean preference scores of a generation folder for the metrics that can run; others are skipped."""
    from PIL import Image

    from .generate import read_manifest
    from .images import load_rgb

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    entries = read_manifest(gen_dir)
    results = {}
    for name in names:
        scorer = load_preference(name, (weights or {}).get(name), device)
        if scorer is None:
            continue
        values = []
        for start in range(0, len(entries), batch_size):
            batch = entries[start : start + batch_size]
            images = [Image.fromarray(load_rgb(Path(gen_dir) / e["file"])) for e in batch]
            values += scorer(images, [e["prompt"] for e in batch])
        results[name] = {"score": sum(values) / len(values), "n": len(values), "scale": "raw"}
        if write_metrics:
            from .report import update_metrics

            update_metrics(gen_dir, "preference", results[name], key=name)
    return results
