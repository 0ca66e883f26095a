"""CLIP score of a generation folder (its manifest pairs each image with its prompt)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image

from stepdistill.metrics.clip import CLIPScorer, get_convention, load_clip_encoder

from .images import CropResize, load_rgb


class _PairDataset(torch.utils.data.Dataset):
    """(PIL image, prompt) pairs from manifest entries, optionally centre-cropped and Lanczos-resized."""

    def __init__(self, root: Path, entries: list[dict], eval_res: int | None):
        self.root, self.entries = root, entries
        self.transform = CropResize(eval_res) if eval_res else None

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, i):
        img = load_rgb(self.root / self.entries[i]["file"])
        if self.transform is not None:
            img = self.transform(img)
        return Image.fromarray(img), self.entries[i]["prompt"]


def _collate(pairs):
    images, prompts = zip(*pairs)
    return list(images), list(prompts)


def score_entries(scorer: CLIPScorer, root, entries, eval_res=None, batch_size=32, num_workers=0, progress=True):
    """Per-image CLIP scores [N] of manifest entries, in manifest order."""
    from tqdm.auto import tqdm

    loader = torch.utils.data.DataLoader(
        _PairDataset(Path(root), entries, eval_res), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate
    )
    batches = tqdm(loader, desc="CLIP", disable=not progress)
    return torch.cat([scorer.scores(images, prompts).cpu() for images, prompts in batches])


def compute_clip(
    gen_dir,
    convention: str = "gigagan",
    weights=None,
    eval_res: int | None = None,
    encoder=None,
    batch_size: int = 32,
    num_workers: int = 0,
    device=None,
    dtype=torch.float32,
    write_metrics: bool = True,
    progress: bool = True,
) -> dict:
    """CLIP score of the images in gen_dir against their prompts; merged into metrics.json under clip/<convention>.

    eval_res: centre crop + Lanczos to this size first, as GigaGAN/DMD2 do (256 for SD1.5, 512 for SDXL).
    """
    from .generate import read_manifest

    conv = get_convention(convention)
    entries = read_manifest(gen_dir)  # check the inputs before loading any network
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    encoder = encoder or load_clip_encoder(conv, weights, device, dtype)
    scorer = CLIPScorer(encoder, conv)
    per_image = score_entries(scorer, gen_dir, entries, eval_res, batch_size, num_workers, progress)
    result = {
        "score": scorer.aggregate(per_image),
        "std": per_image.double().std().item() if len(per_image) > 1 else 0.0,
        "n": len(per_image),
        "convention": conv.name,
        "label": conv.label,
        "description": conv.description,
        "model": str(weights or conv.model),
        "pretrained": conv.pretrained,
        "prefix": conv.prefix,
        "scale": conv.scale,
        "eval_res": eval_res,
        "dtype": str(dtype).replace("torch.", ""),
    }
    if write_metrics:
        from .report import update_metrics

        update_metrics(gen_dir, "clip", result, key=conv.name)
    return result
