"""Optional preference metrics (ImageReward, HPSv2.1, LAION aesthetic) behind a thin interface.

Each metric is scored by the reward model loader the ReFL stage uses (stepdistill.metrics.reward_models: one loader
per model), wrapped as a scorer `score(images: list[PIL.Image], prompts: list[str]) -> list[float]` (raw scale, as
PCM/Hyper-SD tables report them). `--weights NAME=PATH` passes the model's local weights (hpsv21: HPS_v2.1_compressed.pt,
with open_clip; aesthetic: the head's .pth). A metric whose package or weights are missing is skipped
with a one-line notice; it never stops an evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from stepdistill.metrics.reward_models import RewardUnavailable, load_reward_model

log = logging.getLogger(__name__)



MetricUnavailable = RewardUnavailable  # a preference metric that cannot run here; the message says what to do

# Metric name -> the reward model (stepdistill.metrics.reward_models) that scores it: one loader for each model,
# shared with the ReFL stage.
PREFERENCE_METRICS: dict[str, str] = {"imagereward": "imagereward", "hpsv21": "hpsv2", "aesthetic": "aesthetic"}


def _as_batch(images) -> torch.Tensor:
    """PIL images (one size) -> float [B, 3, H, W] in [-1, 1], what the reward models take."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


def _scorer(reward_fn: Callable, device) -> Callable:
    @torch.no_grad()
    def score(images, prompts):
        return reward_fn(_as_batch(images).to(device), list(prompts)).float().reshape(-1).cpu().tolist()

    return score


def load_preference(name: str, weights=None, device="cpu"):
    """The scorer for `name`, or None (after a one-line notice) when its package or weights are missing."""
    if name not in PREFERENCE_METRICS:
        raise ValueError(f"unknown preference metric {name!r}: choose from {', '.join(PREFERENCE_METRICS)}")
    try:
        return _scorer(load_reward_model(PREFERENCE_METRICS[name], str(weights or ""), device), device)
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
