"""The ground-truth judge: colour and shape of every object, read from pixels.

Trivial because the world is ours (saturated colours on grey), and it judges generated images too: a
blurry blob is assigned the palette colour nearest to its median pixel and the shape template that
overlaps it best. It never uses another model.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from .scene import COLOURS, SHAPES, shape_mask

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)
_NAMES = list(COLOURS)
_SCALE = {"square": 1 / 0.92}  # template half-width per half-width of the bounding box


@dataclass
class Detection:
    colour: str
    shape: str
    mask: np.ndarray
    box: tuple[int, int, int, int]
    iou: float  # overlap with the best shape template: low means "not a clean shape"

    @property
    def pixels(self) -> int:
        return int(self.mask.sum())


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as boolean masks."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        comp = np.zeros_like(mask, dtype=bool)
        q = deque([(y0, x0)])
        seen[y0, x0] = True
        while q:
            y, x = q.popleft()
            comp[y, x] = True
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    q.append((ny, nx))
        out.append(comp)
    return out


def _shape_of(comp: np.ndarray) -> tuple[str, float]:
    ys, xs = np.nonzero(comp)
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = max(x1 - x0, y1 - y0) / 2
    best, best_iou = SHAPES[0], -1.0
    for s in SHAPES:
        t = shape_mask(s, cx, cy, half * _SCALE.get(s, 1.0), comp.shape[0])
        iou = float((t & comp).sum() / max((t | comp).sum(), 1))
        if iou > best_iou:
            best, best_iou = s, iou
    return best, best_iou


def detect(image: np.ndarray, *, saturation: float = 60.0, min_frac: float = 0.004) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image, largest first."""
    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {img.shape}")
    if img.max() <= 1.0:
        img = img * 255.0
    sat = img.max(axis=2) - img.min(axis=2)
    fg = sat > saturation
    min_px = max(4, int(min_frac * fg.size))
    found = []
    for comp in _components(fg):
        if comp.sum() < min_px:
            continue
        core = comp & (sat >= np.quantile(sat[comp], 0.5))  # the most saturated half: no blended edges
        rgb = np.median(img[core], axis=0)
        name = _NAMES[int(((_PALETTE - rgb) ** 2).sum(-1).argmin())]
        shape, iou = _shape_of(comp)
        ys, xs = np.nonzero(comp)
        found.append(Detection(name, shape, comp, (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1), iou))
    return sorted(found, key=lambda d: -d.pixels)


def classify(image: np.ndarray) -> tuple[str | None, str | None]:
    """(colour, shape) of the largest object, (None, None) when there is none."""
    found = detect(image)
    return (found[0].colour, found[0].shape) if found else (None, None)


def object_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: the object pixels of an (H, W, 3) image (uint8, or floats in [0, 1]), found as `detect` finds
    objects (saturated pixels, 4-connected components above its size floor) and united. Generated images come with
    no mask; this is the label a pixel probe of a generated image is scored against."""
    img = np.asarray(image)
    mask = np.zeros(img.shape[:2], dtype=bool)
    for d in detect(img):
        mask |= d.mask
    return mask
