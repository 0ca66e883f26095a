"""The toy world: 32x32 images of one or two coloured shapes with captions that say what is there.

Everything is generated in code from a seed, so tests, CI and first-time users need no data files. An
image is described by a label row of `LABEL_FIELDS` (integers, -1 where a field does not apply); the
caption is a deterministic function of the label, and `parse_caption` inverts it. In a pair, slot 1 is
the object mentioned first: the upper one ("above") or the left one ("to the left of").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES = ("small", "large")
# A single object's place, then the two pair layouts (slot 1 above slot 2, slot 1 left of slot 2).
LAYOUTS = ("left", "right", "top", "bottom", "middle", "above", "left_of")
SINGLE_LAYOUTS = LAYOUTS[:5]
PAIR_LAYOUTS = LAYOUTS[5:]
LABEL_FIELDS = ("layout", "shape1", "colour1", "size1", "shape2", "colour2", "size2")
# Number of classes of each label field, in LABEL_FIELDS order (the judge's heads).
FIELD_CLASSES = (len(LAYOUTS), len(SHAPES), len(COLOURS), len(SIZES), len(SHAPES), len(COLOURS), len(SIZES))

_PLACE_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "middle": "in the middle",
}
_RELATION_PHRASES = {"above": "above", "left_of": "to the left of"}

TOY_WORDS = tuple(
    dict.fromkeys(
        ["a"]
        + list(SIZES)
        + list(COLOURS)
        + list(SHAPES)
        + " ".join(list(_PLACE_PHRASES.values()) + list(_RELATION_PHRASES.values())).split()
    )
)

# Saturated object colours (RGB 0..255), far apart from each other and from the muted backgrounds.
_COLOUR_RGB = np.array(
    [[220, 40, 40], [40, 190, 60], [40, 80, 230], [235, 220, 40], [150, 50, 200], [245, 140, 20]], dtype=np.float32
)
# Low-saturation background bases: dark, mid and light greys with slight tints.
_BACKGROUND_RGB = np.array(
    [[30, 30, 34], [60, 58, 54], [110, 110, 116], [150, 146, 138], [196, 196, 200], [230, 226, 214]], dtype=np.float32
)

IMAGE_SIZE = 32


@dataclass(frozen=True)
class ToyWorld:
    """The distribution of toy images; `sample(n, seed)` is deterministic in (n, seed) and the fields below."""

    p_single: float = 0.4
    image_size: int = IMAGE_SIZE
    colour_jitter: float = 18.0  # per-channel uniform jitter of object colours, in 0..255 units
    background_jitter: float = 14.0

    def sample_labels(self, n: int, seed: int) -> np.ndarray:
        """Random label rows [n, 7] (see LABEL_FIELDS); pair fields are -1 for a single object."""
        rng = np.random.default_rng(seed)
        labels = np.full((n, len(LABEL_FIELDS)), -1, dtype=np.int64)
        single = rng.random(n) < self.p_single
        labels[:, 0] = np.where(
            single, rng.integers(0, len(SINGLE_LAYOUTS), n), len(SINGLE_LAYOUTS) + rng.integers(0, 2, n)
        )
        for base in (1, 4):
            labels[:, base] = rng.integers(0, len(SHAPES), n)
            labels[:, base + 1] = rng.integers(0, len(COLOURS), n)
            labels[:, base + 2] = rng.integers(0, len(SIZES), n)
        labels[single, 4:] = -1
        return labels

    def sample(self, n: int, seed: int = 0, as_float: bool = False):
        """Draw n images with captions and labels.

        Returns (images, captions, labels): images uint8 [n, 32, 32, 3], or float32 in [-1, 1] [n, 3, 32, 32]
        with as_float; captions a list of n strings; labels int64 [n, 7].
        """
        labels = self.sample_labels(n, seed)
        images = self.render(labels, seed)
        captions = [caption_from_label(row) for row in labels]
        if as_float:
            return to_float(images), captions, labels
        return images, captions, labels

    def render(self, labels: np.ndarray, seed: int) -> np.ndarray:
        """Render label rows as uint8 images [n, H, W, 3]; geometry and colours are drawn from `seed`."""
        rng = np.random.default_rng([seed, 1])
        n, size = len(labels), self.image_size
        image = self._background(rng, n)
        for slot in (0, 1):
            geometry = self._geometry(rng, labels, slot)
            colour = _COLOUR_RGB[np.maximum(labels[:, 1 + 3 * slot + 1], 0)]
            colour = colour + rng.uniform(-self.colour_jitter, self.colour_jitter, (n, 3)).astype(np.float32)
            coverage = _coverage(labels[:, 1 + 3 * slot], *geometry, size)  # [n, H, W]
            if slot == 1:
                coverage[labels[:, 4] < 0] = 0.0
            a = coverage[..., None]
            image = image * (1.0 - a) + colour[:, None, None, :] * a
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def _background(self, rng, n: int) -> np.ndarray:
        """A muted base colour with a linear gradient in a random direction: [n, H, W, 3] float."""
        size = self.image_size
        base = _BACKGROUND_RGB[rng.integers(0, len(_BACKGROUND_RGB), n)]
        base = base + rng.uniform(-self.background_jitter, self.background_jitter, (n, 3)).astype(np.float32)
        angle = rng.uniform(0, 2 * math.pi, n)
        amplitude = rng.uniform(0, 30, n)
        coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
        ramp = np.cos(angle)[:, None, None] * coords[None, None, :] + np.sin(angle)[:, None, None] * coords[None, :, None]
        image = base[:, None, None, :] + (amplitude[:, None, None] * ramp)[..., None]
        return image.astype(np.float32)

    def _geometry(self, rng, labels: np.ndarray, slot: int):
        """Centre (cx, cy) and half-extent r, in pixels, of each image's object in `slot` (0 or 1)."""
        n, size = len(labels), self.image_size
        layout = labels[:, 0]
        pair = layout >= len(SINGLE_LAYOUTS)
        large = labels[:, 1 + 3 * slot + 2] == 1
        # Pairs share the canvas, so their "large" is smaller than a single object's.
        r = np.where(
            pair,
            np.where(large, rng.uniform(5.0, 6.5, n), rng.uniform(3.0, 4.0, n)),
            np.where(large, rng.uniform(6.0, 7.5, n), rng.uniform(3.0, 4.5, n)),
        )
        half, quarter = size / 2, size / 4
        # Nominal centres per layout: (cx, cy) of slot 1 / the single object, then slot 2.
        cx = np.full(n, half)
        cy = np.full(n, half)
        jitter_along = rng.uniform(-1.5, 1.5, n)
        jitter_across = rng.uniform(-5.0, 5.0, n)
        small_jitter = rng.uniform(-2.0, 2.0, (n, 2))
        first = slot == 0
        for name, (x, y) in {
            "left": (quarter, half), "right": (size - quarter, half),
            "top": (half, quarter), "bottom": (half, size - quarter), "middle": (half, half),
        }.items():
            m = layout == LAYOUTS.index(name)
            cx[m] = x + small_jitter[m, 0]
            cy[m] = y + small_jitter[m, 1]
        m = layout == LAYOUTS.index("above")
        cx[m] = half + jitter_across[m]
        cy[m] = (quarter if first else size - quarter) + jitter_along[m]
        m = layout == LAYOUTS.index("left_of")
        cx[m] = (quarter if first else size - quarter) + jitter_along[m]
        cy[m] = half + jitter_across[m]
        # Keep every object inside the canvas.
        cx = np.clip(cx, r + 0.5, size - 0.5 - r)
        cy = np.clip(cy, r + 0.5, size - 0.5 - r)
        return cx.astype(np.float32), cy.astype(np.float32), r.astype(np.float32)


def _coverage(shape: np.ndarray, cx, cy, r, size: int) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (pixels, negative inside): clip(0.5 - d, 0, 1)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    dx = coords[None, None, :] - cx[:, None, None]
    dy = coords[None, :, None] - cy[:, None, None]
    r = r[:, None, None]
    circle = np.sqrt(dx**2 + dy**2) - r
    square = np.maximum(np.abs(dx), np.abs(dy)) - r
    # Upward isosceles triangle filling the square's box: base edge and the two slanted edges.
    k = 1.0 / math.sqrt(5.0)
    triangle = np.maximum(dy - r, k * (2 * np.abs(dx) - dy - r))
    d = np.select([shape[:, None, None] == 0, shape[:, None, None] == 1], [circle, square], triangle)
    return np.clip(0.5 - d, 0.0, 1.0)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 tensor [N, 3, H, W] in [-1, 1] (the diffusers image convention)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _object_phrase(shape: int, colour: int, size: int) -> str:
    return f"a {SIZES[size]} {COLOURS[colour]} {SHAPES[shape]}"


def caption_from_label(label) -> str:
    """The English caption of one label row, e.g. 'a small red circle above a large blue square'."""
    layout, s1, c1, z1, s2, c2, z2 = (int(v) for v in label)
    name = LAYOUTS[layout]
    if name in _PLACE_PHRASES:
        return f"{_object_phrase(s1, c1, z1)} {_PLACE_PHRASES[name]}"
    return f"{_object_phrase(s1, c1, z1)} {_RELATION_PHRASES[name]} {_object_phrase(s2, c2, z2)}"


def _parse_object(words: list[str], caption: str) -> tuple[int, int, int]:
    if len(words) != 4 or words[0] != "a":
        raise ValueError(f"cannot parse {caption!r}: expected 'a <size> <colour> <shape>' in it")
    try:
        return SHAPES.index(words[3]), COLOURS.index(words[2]), SIZES.index(words[1])
    except ValueError:
        raise ValueError(
            f"cannot parse {caption!r}: sizes are {SIZES}, colours {COLOURS}, shapes {SHAPES}"
        ) from None


def parse_caption(caption: str) -> np.ndarray:
    """Invert caption_from_label: a caption of the toy world -> its label row [7] (int64, -1 = not stated)."""
    words = caption.strip().lower().split()
    label = np.full(len(LABEL_FIELDS), -1, dtype=np.int64)
    label[1:4] = _parse_object(words[:4], caption)
    rest = " ".join(words[4:])
    for name, phrase in _PLACE_PHRASES.items():
        if rest == phrase:
            label[0] = LAYOUTS.index(name)
            return label
    for name, phrase in _RELATION_PHRASES.items():
        if rest.startswith(phrase + " "):
            label[0] = LAYOUTS.index(name)
            label[4:7] = _parse_object(rest[len(phrase) + 1:].split(), caption)
            return label
    raise ValueError(
        f"cannot parse {caption!r}: after the first object expected one of "
        f"{list(_PLACE_PHRASES.values()) + list(_RELATION_PHRASES.values())}"
    )


def toy_prompts(n: int, seed: int = 0, world: ToyWorld | None = None) -> list[str]:
    """n captions drawn from the toy world's distribution (the prompt set for toy distillation and eval)."""
    labels = (world or ToyWorld()).sample_labels(n, seed)
    return [caption_from_label(row) for row in labels]


def toy_asset_path(name: str = "") -> Path:
    """Path of the shipped assets/toy/<name> (package data; STEPDISTILL_ASSETS points at another assets/ folder)."""
    from ..resources import assets_dir

    root = assets_dir()
    if not (root / "toy").is_dir():
        raise FileNotFoundError(
            f"no toy assets in {root}: reinstall stepdistill (they ship as package data), or set "
            "STEPDISTILL_ASSETS to a folder holding toy/"
        )
    return root / "toy" / name
