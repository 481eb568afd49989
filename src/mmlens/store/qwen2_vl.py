"""Qwen2-VL's vision tower and patch merger: their values hold every image's tokens in one (tokens, ...) axis with no
batch dim, image after image, each image's patches in merge-window order (`layout.merge_window_grid`). Every token
is an 'image' token of the example holding the image, with its image index in that example, its position among the
image's tokens and its (row, col): on the (h, w) patch grid for vision.* sites, on the merged (h/m, w/m) grid for
projector.out (the grid the LM's image tokens and `lens.token_map` use)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..hooks.tokens import grid_positions
from .layout import flat_meta, merge_window_grid
from .schema import MODALITIES
from .sites import Acts, Meta


def qwen2_vl_tower(lens, names: list[str], values: dict[str, Tensor], grid_thw, owner: Tensor, first: Tensor,
                   examples: Tensor) -> tuple[Acts, Meta]:
    """`values[name]` (tokens, ...) as recorded; `owner[j]` the batch row holding image j, `first[r]` row r's first
    image index, `examples[r]` its example id."""
    thw = torch.as_tensor(grid_thw).tolist()
    m = int(lens.model.config.vision_config.spatial_merge_size)
    merged = names[0].split(".", 1)[0] == "projector"
    grids = []
    for t, h, w in thw:
        if merged:
            grids.append(grid_positions((h // m) * (w // m), h // m, w // m).repeat(t, 1))
        else:
            grids.append(merge_window_grid(t, h, w, m))
    counts = [len(g) for g in grids]
    n = sum(counts)
    acts = {}
    for name in names:
        v = values[name].detach()
        if v.shape[0] != n:
            what = "merged tokens (t*h*w / merge**2)" if merged else "patches (t*h*w)"
            raise ValueError(f"{name} has {v.shape[0]} rows but image_grid_thw {thw} gives {n} {what}; one store "
                             "holds names with the same token rows (vision.* or projector.out): write one store each")
        acts[name] = v.reshape(n, -1)
    img = torch.arange(len(thw)).repeat_interleave(torch.tensor(counts))
    row_of = owner[img]
    keep = torch.ones(n, 1, dtype=torch.bool)
    rc = torch.cat(grids) if grids else torch.empty(0, 2, dtype=torch.long)
    meta = flat_meta(keep, example__r=examples[row_of], image__r=img - first[row_of],
                     modality=MODALITIES.index("image"), position__r=torch.cat([torch.arange(c) for c in counts]),
                     row__r=rc[:, 0], col__r=rc[:, 1])
    return acts, meta
