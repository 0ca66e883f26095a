"""The toy world's judge: a small CNN that reads layout, shapes, colours and sizes off a 32x32 image.

It plays two parts in toy evaluation: its penultimate features are the embedding for toy FID (the role
Inception pool3 plays for real FID), and its predictions score prompt alignment. It is trained on the toy
world's own data (`train_judge`) and shipped in assets/toy/judge.safetensors with its config in judge.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..data.toy_world import (
    FIELD_CLASSES,
    LABEL_FIELDS,
    SINGLE_LAYOUTS,
    ToyWorld,
    parse_caption,
    to_float,
    toy_asset_path,
)

JUDGE_WEIGHTS = "judge.safetensors"
JUDGE_CONFIG = "judge.json"


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1), nn.GroupNorm(8, c_out), nn.SiLU())


class ToyJudge(nn.Module):
    """CNN 32x32 -> feature_dim penultimate features -> one logit group per label field (LABEL_FIELDS)."""

    def __init__(self, width: int = 16, feature_dim: int = 128):
        super().__init__()
        self.config = {"width": width, "feature_dim": feature_dim}
        w = width
        self.trunk = nn.Sequential(
            _block(3, w, 1), _block(w, w, 1),  # 32x32
            _block(w, 2 * w, 2), _block(2 * w, 2 * w, 1),  # 16x16
            _block(2 * w, 4 * w, 2),  # 8x8
            _block(4 * w, 4 * w, 2),  # 4x4
        )
        # Flatten rather than pool: where things are is part of what the judge must tell.
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * 16, feature_dim), nn.SiLU())
        self.head = nn.Linear(feature_dim, sum(FIELD_CLASSES))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits per label field, each [N, classes]."""
        return list(self.head(self.embed(self.trunk(x))).split(FIELD_CLASSES, dim=1))

    @torch.no_grad()
    def features(self, images, batch_size: int = 256) -> torch.Tensor:
        """Penultimate features [N, feature_dim] (float32) of images in [-1, 1] [N,3,32,32] or uint8 [N,32,32,3]."""
        x = _as_input(images)
        device = next(self.parameters()).device
        return torch.cat([self.embed(self.trunk(b.to(device))).float().cpu() for b in x.split(batch_size)])

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> np.ndarray:
        """Predicted label rows [N, 7] (int64; pair fields -1 when the judged layout is a single object)."""
        x = _as_input(images)
        device = next(self.parameters()).device
        rows = []
        for b in x.split(batch_size):
            rows.append(torch.stack([logits.argmax(1) for logits in self(b.to(device))], dim=1).cpu())
        labels = torch.cat(rows).numpy().astype(np.int64)
        labels[labels[:, 0] < len(SINGLE_LAYOUTS), 4:] = -1
        return labels

    def alignment(self, images, labels_or_captions) -> float:
        """Fraction of images whose judged content matches their prompt in every stated field."""
        return float(matches(self.predict(images), labels_or_captions).mean())


def matches(predicted: np.ndarray, labels_or_captions) -> np.ndarray:
    """Per-image bool: predicted label row equals the target row on every field the target states (!= -1)."""
    target = _as_labels(labels_or_captions)
    stated = target >= 0
    return np.all((predicted == target) | ~stated, axis=1)


def _as_labels(labels_or_captions) -> np.ndarray:
    if len(labels_or_captions) and isinstance(labels_or_captions[0], str):
        return np.stack([parse_caption(c) for c in labels_or_captions])
    return np.asarray(labels_or_captions, dtype=np.int64)


def _as_input(images) -> torch.Tensor:
    """Accept uint8 [N,H,W,3] (numpy or torch) or float [N,3,H,W] in [-1, 1]; return float32 [N,3,H,W]."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images) if images.dtype != np.uint8 else to_float(images)
    if images.dtype == torch.uint8:
        images = to_float(images.cpu().numpy())
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the judge takes images [N, 3, 32, 32] in [-1, 1] or uint8 [N, 32, 32, 3], got {tuple(images.shape)}")
    return images.float()


def judge_loss(judge: ToyJudge, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over label fields of the cross-entropy, skipping fields a label does not state (-1)."""
    return sum(F.cross_entropy(logits, labels[:, i], ignore_index=-1) for i, logits in enumerate(judge(x)))


def train_judge(
    out_dir=None,
    steps: int = 600,
    batch_size: int = 128,
    seed: int = 0,
    lr: float = 2e-3,
    noise_std: float = 0.05,
    progress: bool = True,
) -> ToyJudge:
    """Train the judge on fresh toy batches (CPU) and save it to out_dir (default: the shipped assets/toy/).

    Images get a little Gaussian noise so that the small artefacts of generated images do not confuse it.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    world = ToyWorld()
    judge = ToyJudge()
    opt = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start = time.process_time()
    bar = tqdm(range(steps), desc="judge", disable=not progress)
    for step in bar:
        # Each step draws a new batch: the world is infinite, so the judge never sees an image twice.
        x, _, labels = world.sample(batch_size, seed=seed * 1_000_003 + step, as_float=True)
        x = x + noise_std * torch.rand(batch_size, 1, 1, 1) * torch.randn_like(x)
        loss = judge_loss(judge, x, torch.from_numpy(labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    judge.eval()
    meta = {"steps": steps, "batch_size": batch_size, "seed": seed, "lr": lr, "noise_std": noise_std,
            "cpu_seconds": round(time.process_time() - start, 1)}
    save_judge(judge, out_dir if out_dir is not None else toy_asset_path(), meta)
    return judge


def save_judge(judge: ToyJudge, out_dir, meta: dict | None = None) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(out_dir / JUDGE_WEIGHTS))
    config = {"config": judge.config, "label_fields": list(LABEL_FIELDS), "training": meta or {}}
    (out_dir / JUDGE_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def load_judge(path=None, device="cpu") -> ToyJudge:
    """Load the judge from a folder holding judge.safetensors and judge.json (default: the shipped assets/toy/)."""
    folder = Path(path) if path is not None else toy_asset_path()
    weights, config = folder / JUDGE_WEIGHTS, folder / JUDGE_CONFIG
    if not weights.is_file() or not config.is_file():
        raise FileNotFoundError(
            f"no toy judge at {folder} (expected {JUDGE_WEIGHTS} and {JUDGE_CONFIG}): "
            "train one with `stepdistill toy train-judge`"
        )
    judge = ToyJudge(**json.loads(config.read_text())["config"])
    judge.load_state_dict(load_file(str(weights)))
    return judge.eval().to(device)
