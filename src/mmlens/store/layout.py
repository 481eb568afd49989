"""Where each row of a recorded value sits: hook values of any layout as (rows, tokens, width), and the patch or
latent grid a token axis lies on (raster grids, latent grids, and Qwen2-VL's merge-window patch order). Everything
here is vectorised: no Python work per token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Int
from torch import Tensor

from ..hooks.tokens import square_grid
from .schema import COLUMNS, MODALITIES, empty_meta


def latent_grid(seq: int, latent_hw: tuple[int, int]) -> tuple[int, int] | None:
    """(rows, cols) of a token sequence laid over a latent of `latent_hw` at some power-of-two stride (UNet
    blocks downsample by 2 with ceil; DiTs patchify by their patch size), or None if none tiles it."""
    h, w = latent_hw
    for k in range(8):
        f = 2 ** k
        rows, cols = -(-h // f), -(-w // f)
        if rows * cols == seq:
            return rows, cols
    return None


def merge_window_grid(t: int, h: int, w: int, merge: int) -> Int[Tensor, "n 2"]:
    """(row, col) on the h x w patch grid of each of the t*h*w patches in the order Qwen2-VL's vision tower takes
    them (the image processor's `pixel_values` rows, `image_grid_thw` = (t, h, w)): frame by frame, the merge x merge
    windows in raster order over the (h/merge, w/merge) merged grid, and within a window its patches in raster order.
    The patch merger turns each window (merge**2 consecutive rows) into one token, so merged token j of a frame
    sits at (j // (w/merge), j % (w/merge)) on the merged grid: raster order there. Frames of a video repeat the
    grid. Inverse (raster -> tower order): `rc[:, 0] * w + rc[:, 1]` gives each tower row's raster index."""
    if min(t, h, w, merge) < 1 or h % merge or w % merge:
        raise ValueError(f"a ({t}, {h}, {w}) patch grid does not tile into {merge}x{merge} merge windows")
    br, bc, ir, ic = torch.meshgrid(torch.arange(h // merge), torch.arange(w // merge), torch.arange(merge),
                                    torch.arange(merge), indexing="ij")  # window row, window col, row/col within
    rc = torch.stack([(br * merge + ir).reshape(-1), (bc * merge + ic).reshape(-1)], dim=1)
    return rc.repeat(t, 1)


@dataclass
class Tokens:
    """A hook value as `x` (rows, tokens, width). `kind`: 'seq' (a token axis), 'map' (a (C, h, w) feature map
    flattened in raster order; `grid` = (h, w)) or 'pooled' (one vector per row, no token axis)."""

    x: Tensor
    kind: str
    grid: tuple[int, int] | None = None


def as_tokens(value: Tensor, heads: bool, name: str) -> Tokens:
    """(B, S, d) -> seq; (B, S, heads, d_head) -> seq of width heads * d_head; other 4-D values are feature maps
    (B, C, h, w) -> (B, h*w, C); (B, d) -> pooled (B, 1, d)."""
    v = value.detach()
    if heads and v.dim() == 4:
        return Tokens(v.flatten(2), "seq")
    if v.dim() == 4:
        b, c, h, w = v.shape
        return Tokens(v.flatten(2).transpose(1, 2), "map", (h, w))
    if v.dim() == 3:
        return Tokens(v, "seq")
    if v.dim() == 2:
        return Tokens(v[:, None], "pooled")
    raise ValueError(f"{name}: a value of shape {tuple(v.shape)} has no token layout the store knows; it stores "
                     "(batch, tokens, d), (batch, tokens, heads, d_head), (batch, C, h, w) or (batch, d) values")


def flat_meta(keep: Tensor, **cols) -> dict[str, Tensor]:
    """Metadata of the kept cells of a (rows, tokens) layout, rows outer. Each column given is a scalar, a (rows,)
    or (tokens,) tensor (said by its `_r` / `_s` suffix) or a (rows, tokens) tensor; missing columns are 'none'."""
    R, S = keep.shape
    out = empty_meta(int(keep.sum()))
    for key, v in cols.items():
        col, _, axis = key.partition("__")
        t = torch.as_tensor(v)
        if t.dim() == 0:
            pass
        elif axis == "r":
            t = t.reshape(R, 1)
        elif axis == "s":
            t = t.reshape(1, S)
        t = t.to(keep.device).expand(R, S)
        out[col] = t[keep].to("cpu", COLUMNS[col])
    return out


def pooled_meta(examples: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """One pooled vector per row (a text tower's or encoder's pooled output): (keep, meta), a 'special' token."""
    keep = torch.ones(len(examples), 1, dtype=torch.bool)
    return keep, flat_meta(keep, example__r=examples, modality=MODALITIES.index("special"), position=-1)


def text_meta(keep: Tensor, examples: Tensor, ids: Tensor, specials: Tensor) -> dict[str, Tensor]:
    """Metadata of text tokens (rows, seq) under `keep`: 'special' for the tokenizer's special ids, else 'text';
    position along the sequence and token id."""
    mod = torch.where(torch.isin(ids, specials.to(ids.dtype)), MODALITIES.index("special"), MODALITIES.index("text"))
    return flat_meta(keep, example__r=examples, modality=mod, position__s=torch.arange(ids.shape[1]), token=ids)


def image_tower_meta(keep: Tensor, seq: int, kind: str, example: Tensor, image: Tensor | int = 0) -> dict:
    """Tokens of an image tower (or projector) on a square patch grid: a leading CLS is 'special', patches are
    'image' with their (row, col); pooled vectors are one 'special' token at position -1."""
    if kind == "pooled":
        return flat_meta(keep, example__r=example, image__r=image, modality=MODALITIES.index("special"), position=-1)
    g = square_grid(seq)
    pos = torch.arange(seq)
    if g is None:
        return flat_meta(keep, example__r=example, image__r=image, modality=MODALITIES.index("image"),
                         position__s=pos)
    rows, cols, cls = g
    cell = pos - int(cls)
    mod = torch.where(cell >= 0, MODALITIES.index("image"), MODALITIES.index("special"))
    return flat_meta(keep, example__r=example, image__r=image, modality__s=mod, position__s=pos,
                     row__s=torch.where(cell >= 0, cell // cols, -1), col__s=torch.where(cell >= 0, cell % cols, -1))
