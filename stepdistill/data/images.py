"""Image-caption sets: real latents for consistency distillation and GAN terms.

Sources: a folder (image files with same-stem .txt captions, or a metadata.jsonl of {"file_name", "text"}),
or `toy:N`, N images of the built-in toy world. Images are resized (shorter side) to the model's resolution and
centre-cropped, encoded once by the VAE and cached with their caption embeddings; each keeps its original size and
crop offset (`image_sizes`), SDXL's micro-conditioning of that image (models/families/sdxl.py, docs/data.md).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .prompts import DataError, publish_report

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_LISTED = 10000  # skipped files named in data_report.json; the count is always exact


@dataclass
class ImageReport:
    kept: int = 0
    skipped: list[str] = field(default_factory=list)  # "file: reason"


def _folder_items(root: Path, report: ImageReport) -> list[tuple[Path, str]]:
    meta = root / "metadata.jsonl"
    if meta.is_file():
        items = []
        for i, line in enumerate(meta.read_text(encoding="utf-8", errors="replace").splitlines()):
            if line.strip():
                try:
                    row = json.loads(line)
                    items.append((root / str(row["file_name"]), str(row["text"] or "")))
                except (json.JSONDecodeError, KeyError, TypeError):
                    report.skipped.append(f"{meta.name} line {i + 1}: not {{\"file_name\": ..., \"text\": ...}}")
        return items
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8", errors="replace").strip()
             if p.with_suffix(".txt").is_file() else "")
            for p in sorted(root.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]


# One row per image: (original height, original width, crop top, crop left), SDXL's c_size and c_crop.
SIZE_FIELDS = ("original_height", "original_width", "crop_top", "crop_left")


def centre_crop(im, resolution: int):
    """A PIL image resized (bicubic) so that its shorter side is `resolution`, then centre-cropped to a square:
    (the square, (original H, W, crop top, left)).

    The size row follows diffusers' SDXL training example (train_text_to_image_sdxl.py), the convention SDXL's
    micro-conditioning was trained with (Podell et al. 2023, sec. 2.2): the original size is the image's own, before
    any resize or crop; the crop offsets are in the pixels of the resized image, where the crop is taken.
    """
    from PIL import Image

    h, w = im.height, im.width
    scale = resolution / min(h, w)
    # The long side is rounded (torchvision's Resize in that example truncates: at most 1 px apart).
    rh, rw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    top, left = round((rh - resolution) / 2), round((rw - resolution) / 2)  # round half to even, as diffusers
    im = im.resize((rw, rh), Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
    return im, (h, w, top, left)


def to_tensor(im) -> torch.Tensor:
    """An RGB PIL image as float [-1, 1] [3, H, W]."""
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


def uncropped_sizes(n: int, resolution: int) -> torch.Tensor:
    """Size rows of n images made at `resolution` (the toy world): original = resolution, no crop."""
    return torch.tensor([[resolution, resolution, 0, 0]], dtype=torch.long).repeat(n, 1)


def _load_image(path: Path, resolution: int) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """centre_crop of the file: (float [-1, 1] [3, H, W], its size row)."""
    from PIL import Image

    with Image.open(path) as im:
        im, size = centre_crop(im.convert("RGB"), resolution)
    return to_tensor(im), size


def read_image_folder(root, resolution: int) -> tuple[torch.Tensor, list[str], torch.Tensor, ImageReport]:
    """All usable (image, caption) pairs and their size rows (SIZE_FIELDS, long [N, 4]); corrupt, missing or
    uncaptioned images are skipped and counted."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"no image folder at {root}: pass --set data.images=DIR (images with .txt captions or a "
                        "metadata.jsonl), or data.images=toy:N for the toy world")
    from PIL import Image

    report, images, captions, sizes = ImageReport(), [], [], []
    for path, caption in _folder_items(root, report):
        if not caption.strip():
            report.skipped.append(f"{path.name}: no caption")
            continue
        try:
            image, size = _load_image(path, resolution)
            images.append(image)
            captions.append(caption)
            sizes.append(size)
        except FileNotFoundError:
            report.skipped.append(f"{path.name}: missing")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # PIL reports corrupt and truncated files as OSError (UnidentifiedImageError is one).
            report.skipped.append(f"{path.name}: unreadable ({type(e).__name__})")
    report.kept = len(images)
    if report.skipped:
        log.warning("%s: kept %d images, skipped %d (e.g. %s); the list is in the run's data_report.json", root,
                    report.kept, len(report.skipped), "; ".join(report.skipped[:3]))
    if not images:
        raise DataError(f"{root} has no usable image-caption pairs ({len(report.skipped)} skipped, e.g. "
                        f"{'; '.join(report.skipped[:3]) or 'no image files'}): each image needs a readable file "
                        "and a non-empty caption (same-stem .txt, or metadata.jsonl rows {\"file_name\", \"text\"})")
    publish_report("images", root, {"kept": report.kept, "skipped_count": len(report.skipped),
                                    "skipped": report.skipped[:MAX_LISTED]})
    return torch.stack(images), captions, torch.tensor(sizes, dtype=torch.long), report


def read_toy_images(spec: str, resolution: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """`toy:N`: N toy-world images with their captions, deterministic in the run's seed."""
    from .toy_world import ToyWorld

    try:
        n = int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise DataError(f"data.images={spec!r}: write toy:N, e.g. toy:20000") from None
    images, captions, _ = ToyWorld().sample(n, seed=seed, as_float=True)
    if images.shape[-1] != resolution:
        images = torch.nn.functional.interpolate(images, size=(resolution, resolution), mode="bilinear",
                                                 antialias=True, align_corners=False)
    return images, captions


@torch.no_grad()
def encode_latents(family, images: torch.Tensor, chunk: int = 64, progress: bool = False) -> torch.Tensor:
    """VAE latents (scaled) of all images, on the CPU: one sample of the VAE posterior each (FamilyModel.encode_images,
    as diffusers' training scripts draw), drawn once when the cache is built and reused from then on."""
    from tqdm.auto import tqdm

    out = []
    for i in tqdm(range(0, len(images), chunk), desc="encoding images", disable=not progress):
        x = images[i : i + chunk].to(family.device, family.vae.dtype)
        out.append(family.encode_images(x).float().cpu())
    return torch.cat(out)
