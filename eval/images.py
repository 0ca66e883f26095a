"""Image helpers shared by FID, CLIP and reports: the protocol's crop/resize and listing image files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


def center_crop_long_edge(img: np.ndarray) -> np.ndarray:
    """Crop an HWC image to a centred min(H, W) square (BigGAN's CenterCropLongEdge, as in GigaGAN/DMD2)."""
    h, w = img.shape[:2]
    side = min(h, w)
    # torchvision's center_crop rounds the offset with round(); keep it so crops match the reference code.
    top, left = round((h - side) / 2.0), round((w - side) / 2.0)
    return img[top : top + side, left : left + side]


class CropResize:
    """HWC uint8 -> centre square crop -> PIL Lanczos resize to eval_res (the GigaGAN/DMD2 pre-resize).

    A class rather than a closure so DataLoader workers can pickle it.
    """

    def __init__(self, eval_res: int):
        self.eval_res = eval_res

    def __call__(self, img: np.ndarray) -> np.ndarray:
        square = Image.fromarray(center_crop_long_edge(img))
        return np.asarray(square.resize((self.eval_res, self.eval_res), Image.LANCZOS))

    def describe(self) -> str:
        return f"center-crop-long-edge + PIL LANCZOS to {self.eval_res}"


class CenterPatch:
    """HWC uint8 -> the centred size x size patch at full resolution (patch-FID, SDXL-Lightning/DMD2)."""

    def __init__(self, size: int = 299):
        self.size = size

    def __call__(self, img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"patch-FID needs images of at least {self.size}px, got {w}x{h}")
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return np.ascontiguousarray(img[top : top + self.size, left : left + self.size])

    def describe(self) -> str:
        return f"center {self.size}x{self.size} patch, no resize"


class Identity:
    def __call__(self, img: np.ndarray) -> np.ndarray:
        return img

    def describe(self) -> str:
        return "none"


def list_images(folder) -> list[Path]:
    """All image files under folder (recursive), sorted, so every run sees the same order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder at {folder}: check the path (a folder of PNG/JPEG images)")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise FileNotFoundError(f"{folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def load_rgb(path) -> np.ndarray:
    with Image.open(path) as img:
        return np.array(img.convert("RGB"))
