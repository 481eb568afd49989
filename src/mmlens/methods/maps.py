"""Spatial maps over an image, one result type for every technique that says *where*: cross-attention word maps,
relevancy and gradient maps, patch-level decompositions, unit masks.

    res = word_maps(sd, "a red square")            # or relevancy(...), gradient_map(...), ...
    res.maps                                       # (images, labels, h, w) at the model's own resolution
    res.upsampled()                                # (images, labels, H, W) at the image's resolution (bilinear)
    res.segment(0.4)                               # bool masks: above 0.4 x each map's max (DAAM's rule)
    res.iou(masks, label="red")                    # against ground-truth masks (images, H, W)
    res.pointing_game(masks, label="red")          # does each map's maximum fall inside the mask?
    res.plot()                                     # overlays on the images, a row per image

Why one type: the evaluation (IoU, pointing game, overlays) is the same whichever technique made the map, so a
relevancy map and a word map compare directly and each technique only computes its maps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from .result import Result


def upsample(maps: Float[Tensor, "... h w"], size: int | tuple[int, int]) -> Float[Tensor, "... H W"]:
    """Bilinear upsampling of the last two dims (align_corners=False: cell centres land on pixel centres)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(maps.shape[-2:]) == size:
        return maps.float()
    lead = maps.shape[:-2]
    x = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).reshape(*lead, *size)


def normalise(maps: Float[Tensor, "... h w"]) -> Float[Tensor, "... h w"]:
    """Each map scaled to [0, 1] by its own min and max (a constant map becomes all zeros)."""
    flat = maps.reshape(*maps.shape[:-2], -1).float()
    lo, hi = flat.min(-1, keepdim=True).values, flat.max(-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)


def grid_of(values: Float[Tensor, "... tokens"], rows: int | None = None, cols: int | None = None
            ) -> Float[Tensor, "... rows cols"]:
    """Patch-token values (row-major, no CLS) as a grid; square unless rows/cols are given."""
    n = values.shape[-1]
    if rows is None and cols is None:
        rows = cols = int(round(n ** 0.5))
    elif rows is None:
        rows = n // cols
    elif cols is None:
        cols = n // rows
    if rows * cols != n:
        raise ValueError(f"{n} patch tokens do not form a {rows}x{cols} grid; give rows= and cols=")
    return values.reshape(*values.shape[:-1], rows, cols)


def binarise(maps: Float[Tensor, "... H W"], threshold: float | str) -> Bool[Tensor, "... H W"]:
    """Each map above `threshold` x its range after min-max normalisation, or above its own mean ("mean")."""
    if not (threshold == "mean" if isinstance(threshold, str) else 0.0 <= threshold <= 1.0):
        raise ValueError(f"threshold={threshold!r}; allowed: a fraction in [0, 1] of each map's range, or 'mean'")
    if threshold == "mean":
        return maps > maps.mean((-2, -1), keepdim=True)
    return normalise(maps) > threshold


def iou(pred: Bool[Tensor, "... H W"], mask: Bool[Tensor, "... H W"]) -> Float[Tensor, "..."]:
    """Intersection over union per map; two empty masks count as 1."""
    pred, mask = pred.bool(), mask.bool()
    inter = (pred & mask).flatten(-2).sum(-1).float()
    union = (pred | mask).flatten(-2).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def pointing_game(maps: Float[Tensor, "... H W"], mask: Bool[Tensor, "... H W"]) -> Bool[Tensor, "..."]:
    """Hit when the map's maximum (first one in row-major order on ties) lies inside the mask (Zhang et al. 2018)."""
    flat = maps.flatten(-2)
    idx = flat.argmax(-1, keepdim=True)
    return mask.bool().flatten(-2).gather(-1, idx).squeeze(-1)


def as_masks(masks, n: int, size: tuple[int, int], what: str = "masks") -> Bool[Tensor, "n H W"]:
    """Ground-truth masks as a (n, H, W) bool tensor, checked against the result's images and size."""
    m = torch.as_tensor(np.asarray(masks)).bool()
    if m.dim() == 2:
        m = m.unsqueeze(0)
    if m.dim() != 3 or m.shape[0] != n or tuple(m.shape[-2:]) != tuple(size):
        raise ValueError(f"{what}: expected ({n}, {size[0]}, {size[1]}) (one mask per image at the image's size); "
                         f"got {tuple(m.shape)}")
    return m


@dataclasses.dataclass(repr=False)
class MapResult(Result):
    """Maps (images, labels, h, w) over `images` (images, H, W, 3) uint8; `labels` name the maps (words, classes,
    units); `method` says what made them. Higher = more of the label there."""

    maps: Float[Tensor, "images labels h w"]
    images: Tensor  # (images, H, W, 3) uint8, what the maps are drawn over
    labels: list[str]
    method: str

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def _index(self, label: str | int | None) -> list[int]:
        if label is None:
            return list(range(len(self.labels)))
        if isinstance(label, int):
            if not -len(self.labels) <= label < len(self.labels):
                raise IndexError(f"label index {label} out of range for {len(self.labels)} maps")
            return [label % len(self.labels)]
        if label not in self.labels:
            raise KeyError(f"no map labelled {label!r}; labels: {self.labels}")
        return [self.labels.index(label)]

    def map(self, label: str | int) -> Float[Tensor, "images h w"]:
        return self.maps[:, self._index(label)[0]]

    def upsampled(self, label: str | int | None = None) -> Float[Tensor, "images labels H W"]:
        """At the images' resolution (bilinear), every label or one (then still a labels dim of 1)."""
        return upsample(self.maps[:, self._index(label)], self.size)

    def segment(self, threshold: float | str = 0.4, label: str | int | None = None
                ) -> Bool[Tensor, "images labels H W"]:
        """Pixels above `threshold` x the map's maximum after min-max normalisation (DAAM thresholds at 0.4), or with
        threshold="mean" above the map's own mean (Chefer et al. 2021's segmentation test: it suits heavy-tailed
        pixel maps such as raw gradients, of which a fraction of the peak keeps a few pixels)."""
        return binarise(self.upsampled(label), threshold)

    def own(self, label) -> Float[Tensor, "images H W"]:
        """One upsampled map per image: `label` names one map for every image, or one per image (e.g. each image's
        own object word, when a batch of prompts or targets differs)."""
        n = self.maps.shape[0]
        if isinstance(label, (str, int)):
            idx = torch.full((n,), self._index(label)[0])
        else:
            labels = list(label)
            if len(labels) != n:
                raise ValueError(f"label: one per image ({n}) or a single one; got {len(labels)}")
            idx = torch.tensor([self._index(lb)[0] for lb in labels])
        return upsample(self.maps[torch.arange(n), idx], self.size)

    def iou(self, masks, label, threshold: float | str = 0.4) -> Float[Tensor, "images"]:
        """IoU of the label's segmentation (see `segment` for `threshold`) with one ground-truth mask per image;
        `label`: one for every image or one per image (see `own`)."""
        m = as_masks(masks, self.maps.shape[0], self.size)
        return iou(binarise(self.own(label), threshold), m)

    def pointing_game(self, masks, label) -> Bool[Tensor, "images"]:
        """Whether the label's map peaks inside each image's mask; `label` as in `iou`."""
        m = as_masks(masks, self.maps.shape[0], self.size)
        return pointing_game(self.own(label), m)

    def summary(self) -> str:
        n, k, h, w = self.maps.shape
        return (f"MapResult({self.method} on {self.meta.get('architecture', '?')}: {n} images x {k} maps "
                f"[{', '.join(self.labels[:6])}{', ...' if k > 6 else ''}] at {h}x{w} over {self.size[0]}x{self.size[1]})")

    def plot(self, images: Sequence[int] | None = None, labels: Sequence[str | int] | None = None, alpha: float = 0.55):
        """Overlays: a row per image, the image first, then one panel per label (each map min-max normalised)."""
        import matplotlib.pyplot as plt

        rows = list(images) if images is not None else list(range(min(4, self.maps.shape[0])))
        cols = [self._index(lb)[0] for lb in labels] if labels is not None else list(range(min(8, len(self.labels))))
        fig, axes = plt.subplots(len(rows), len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.7 * len(rows)),
                                 squeeze=False)
        up = normalise(upsample(self.maps[rows][:, cols], self.size)).numpy()
        for r, i in enumerate(rows):
            img = self.images[i].numpy()
            axes[r, 0].imshow(img)
            axes[r, 0].set_title("image" if r == 0 else "", fontsize=8)
            for c, j in enumerate(cols):
                ax = axes[r, c + 1]
                ax.imshow(img)
                ax.imshow(up[r, c], cmap="jet", alpha=alpha, vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(self.labels[j], fontsize=8)
        for ax in axes.flat:
            ax.axis("off")
        fig.suptitle(self.method, fontsize=9)
        fig.tight_layout()
        return fig


def images_uint8(x) -> Tensor:
    """Images as (n, H, W, 3) uint8 from PIL images, numpy arrays (H, W, 3) or (n, H, W, 3), or float tensors in
    [0, 1] / [-1, 1] laid out (n, 3, H, W)."""
    if isinstance(x, Tensor) and x.dim() == 4 and x.shape[1] == 3:
        x = x.detach().float().cpu()
        x = (x + 1) / 2 if x.min() < 0 else x
        return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    if not isinstance(x, (list, tuple)):
        x = [x] if (getattr(x, "ndim", 4) == 3 or not hasattr(x, "ndim")) else list(x)
    out = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in x]
    for a in out:
        if a.ndim != 3 or a.shape[-1] != 3:
            raise ValueError(f"images: expected (H, W, 3) RGB arrays or PIL images; got shape {a.shape}")
    if len({a.shape for a in out}) > 1:
        raise ValueError(f"images: all must have one size; got {sorted({a.shape for a in out})}")
    arr = np.stack(out)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8) if arr.max() <= 1.0 else arr.clip(0, 255).astype(np.uint8)
    return torch.from_numpy(arr)
