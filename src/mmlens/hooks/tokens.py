"""Token geometry of generative VLMs: for every sequence position, its modality, image and patch cell."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import numpy as np
import torch
from jaxtyping import Float64, Int, Shaped
from torch import Tensor

MODALITIES = ("text", "image", "special", "query")


def grid_positions(n: int, rows: int, cols: int, *, cls_first: bool = False) -> torch.Tensor:
    """(n, 2) (row, col) of each image token in raster order; a leading CLS token gets (-1, -1)."""
    k = torch.arange(rows * cols)
    rc = torch.stack([k // cols, k % cols], dim=1)
    if cls_first:
        rc = torch.cat([torch.tensor([[-1, -1]]), rc])
    if rc.shape[0] != n:
        raise ValueError(f"grid {rows}x{cols}{' + CLS' if cls_first else ''} has {rc.shape[0]} cells, expected {n}")
    return rc


def square_grid(seq: int) -> tuple[int, int, bool] | None:
    """An image tower's (rows, cols, cls_first) from its sequence length: a square grid, with or without a
    leading CLS token (CLS tried first: 17 = CLS + 4x4); None when neither fits."""
    import math

    for cls in (True, False):
        side = math.isqrt(max(seq - cls, 0))
        if side > 0 and side * side == seq - cls:
            return side, side, cls
    return None


def area_pool(mask: Shaped[Tensor, "h w"], rows: int, cols: int) -> Float64[Tensor, "rows cols"]:
    """Fraction of each of `rows x cols` equal cells that `mask` covers, pixels split exactly where cell
    edges cut them, so it holds when H, W are not multiples of the grid (block averaging would need that)."""
    m = torch.as_tensor(mask).detach().to("cpu", torch.float64)
    return _cell_weights(m.shape[0], rows) @ m @ _cell_weights(m.shape[1], cols).T


def _cell_weights(n_pix: int, n_cells: int) -> torch.Tensor:
    """(n_cells, n_pix): the share of cell i's extent that pixel p fills (rows sum to 1)."""
    edges = torch.arange(n_cells + 1, dtype=torch.float64) * n_pix / n_cells
    p = torch.arange(n_pix, dtype=torch.float64)[None]
    overlap = (torch.minimum(edges[1:, None], p + 1) - torch.maximum(edges[:-1, None], p)).clamp(min=0)
    return overlap * n_cells / n_pix


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


@dataclass
class TokenMap:
    """Per position: `modality` code (index into MODALITIES), `image` (global image index or -1),
    `row`/`col` on that image's patch grid (-1 where none: text, CLS, BLIP-2 queries), `query` (learned
    query index or -1), and the token strings. All tensors are (batch, seq).

    `grids[j]` is image j's patch grid (rows, cols), images in global order (row-major over the batch). It is
    empty for BLIP-2: its learned queries cross-attend to the whole image and have no cell of their own, so
    `to_grid` and `positions_in_mask` do not apply there."""

    modality: torch.Tensor
    image: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    query: torch.Tensor
    tokens: list[list[str]] = field(default_factory=list)
    grids: list[tuple[int, int]] = field(default_factory=list)

    def positions(self, modality: str = "image", batch: int = 0, image: int | None = None) -> torch.Tensor:
        """Sequence positions of one modality in one batch row (optionally of one image)."""
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; allowed: {MODALITIES}")
        keep = self.modality[batch] == MODALITIES.index(modality)
        if image is not None:
            keep &= self.image[batch] == image
        return keep.nonzero().flatten()

    # ------------------------------------------------------------------------------------ image geometry
    def _resolve_image(self, batch: int, image: int | None) -> int:
        present = self.image[batch][self.image[batch] >= 0].unique().tolist()
        if image is None:
            if len(present) != 1:
                raise ValueError(f"batch row {batch} holds {len(present)} images {present}; pass image=")
            return present[0]
        if image not in present:
            raise ValueError(f"image {image} is not in batch row {batch} (it holds images {present})")
        return image

    def _grid(self, image: int) -> tuple[int, int]:
        if image >= len(self.grids):
            raise ValueError(f"image {image} has no patch grid (TokenMap.grids has {len(self.grids)} entries): "
                             "learned query tokens (BLIP-2) have no spatial cell")
        return self.grids[image]

    def _cells(self, batch: int, image: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Positions of the image's tokens (CLS included) and which of them are grid cells."""
        rows, cols = self._grid(image)
        pos = (self.image[batch] == image).nonzero().flatten()
        cell = self.row[batch, pos] >= 0
        if int(cell.sum()) != rows * cols:
            raise ValueError(f"image {image} has {int(cell.sum())} patch tokens for a {rows}x{cols} grid "
                             "(several frames of a video?)")
        return pos, cell, (rows, cols)

    def to_grid(self, values: Shaped[Tensor, "*lead n"], batch: int = 0,
                image: int | None = None) -> Shaped[Tensor, "*lead rows cols"]:
        """Per-token values of one image laid out on its patch grid, e.g. (heads, seq) -> (heads, rows, cols).

        The last dim of `values` indexes either the whole sequence or that image's tokens (CLS included where
        the model keeps it). A CLS token (row -1, LLaVA's "full" strategy) is no cell and is left out: its value
        is `values[..., tm.positions("image", batch, j)[0]]`. `image=None`: the only image of that batch row.
        """
        j = self._resolve_image(batch, image)
        pos, cell, (rows, cols) = self._cells(batch, j)
        v = torch.as_tensor(values)
        n_seq = self.modality.shape[1]
        if v.dim() == 0 or v.shape[-1] not in (n_seq, len(pos)):
            got = "a scalar" if v.dim() == 0 else f"last dim {v.shape[-1]}"
            raise ValueError(f"values have {got}; expected the sequence length {n_seq} "
                             f"or image {j}'s {len(pos)} tokens")
        if v.shape[-1] == n_seq:
            v = v[..., pos.to(v.device)]
        keep = cell.to(v.device)
        flat = (self.row[batch, pos] * cols + self.col[batch, pos])[cell].to(v.device)
        out = v.new_zeros(*v.shape[:-1], rows * cols)
        out[..., flat] = v[..., keep]
        return out.reshape(*v.shape[:-1], rows, cols)

    def positions_in_mask(self, mask: Shaped[Tensor, "h w"] | np.ndarray, min_cover: float = 0.5, batch: int = 0,
                          image: int | None = None) -> Int[Tensor, "k"]:
        """Sequence positions of the image tokens whose patch cell `mask` covers at least `min_cover` of.

        `mask` (H, W), bool or float in [0, 1], is in the pixels of the image as the processor fed it to the
        model (e.g. `scene.masks[i]` or `scene.coverage[i]`); it is area-pooled onto the patch grid (`area_pool`),
        so H, W need not be multiples of the grid. This is how the world's ground truth meets token positions.
        """
        m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
        if m.dim() != 2:
            raise ValueError(f"mask must be 2-D (H, W) in the image's pixels; got shape {tuple(m.shape)}")
        if m.dtype != torch.bool and m.numel() and (m.min() < 0 or m.max() > 1):
            raise ValueError(f"mask must be bool or lie in [0, 1]; got values in [{float(m.min())}, {float(m.max())}]")
        if not 0 < min_cover <= 1:
            raise ValueError(f"min_cover must be in (0, 1]; got {min_cover}")
        j = self._resolve_image(batch, image)
        pos, cell, (rows, cols) = self._cells(batch, j)
        cover = area_pool(m, rows, cols)
        pos = pos[cell]
        got = cover[self.row[batch, pos], self.col[batch, pos]]
        return pos[got >= min_cover - 1e-9]  # cell edges cut pixels at fractions: forgive rounding

    def answer_positions(self) -> Int[Tensor, "batch"]:
        """Per batch row, the last text position: where a causal LM's next-token logits predict the answer.

        Special tokens (padding, `<s>`, `</s>`, `<unk>`, vision markers), image and query tokens are skipped. Reading
        `logits[:, -1]` is wrong whenever a row ends otherwise: right padding, or a tokenizer template that
        appends `</s>`, as the vlm organism's does to every prompt (`... answer : </s>`), so -1 reads the
        prediction after `</s>`. Read `logits[torch.arange(b), tm.answer_positions()]` instead.
        """
        text = self.modality == MODALITIES.index("text")
        empty = (~text.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"batch rows {empty} hold no text token to read an answer after")
        idx = torch.arange(text.shape[1]).expand_as(text)
        return torch.where(text, idx, -1).max(1).values

    def names(self, batch: int = 0) -> list[str]:
        return [MODALITIES[int(m)] for m in self.modality[batch]]

    def to_records(self, batch: int = 0) -> list[dict]:
        return [
            {"pos": p, "modality": MODALITIES[int(self.modality[batch, p])], "image": int(self.image[batch, p]),
             "row": int(self.row[batch, p]), "col": int(self.col[batch, p]), "query": int(self.query[batch, p]),
             "token": self.tokens[batch][p] if self.tokens else ""}
            for p in range(self.modality.shape[1])
        ]

    def _repr_html_(self) -> str:
        colours = {"text": "#eef", "image": "#efe", "special": "#eee", "query": "#fed"}
        cells = "".join(
            f"<span title='pos {r['pos']} {r['modality']} img {r['image']} ({r['row']},{r['col']})' "
            f"style='background:{colours[r['modality']]};margin:1px;padding:1px'>{html.escape(r['token'] or r['modality'])}</span>"
            for r in self.to_records(0)
        )
        return f"<div style='font-family:monospace;line-height:1.8'>{cells}</div>"

    @classmethod
    def from_runs(cls, input_ids: torch.Tensor, image_token_id: int, grids: list[torch.Tensor] | None, processor,
                  *, per_image: int | list[int], modality: str = "image", grid_shapes=None) -> TokenMap:
        """Walk each row; consecutive image tokens are assigned to images in order, `per_image` tokens each.

        `grids[j]` holds (row, col) for the tokens of image j, `grid_shapes[j]` its (rows, cols); a single
        entry is reused for every image when all share it.
        """
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        b, n = ids.shape
        mod = torch.zeros(b, n, dtype=torch.long)
        img, row, col, qry = (torch.full((b, n), -1, dtype=torch.long) for _ in range(4))
        tok = _tokenizer(processor)
        special = set(getattr(tok, "all_special_ids", []) or []) - {image_token_id}
        counts = [per_image] if isinstance(per_image, int) else list(per_image)
        image_idx, within = 0, 0
        for bi in range(b):
            for p in range(n):
                t = int(ids[bi, p])
                if t == image_token_id:
                    size = counts[min(image_idx, len(counts) - 1)] if not isinstance(per_image, int) else per_image
                    mod[bi, p] = MODALITIES.index(modality)
                    img[bi, p] = image_idx
                    if modality == "query":
                        qry[bi, p] = within
                    elif grids is not None:
                        g = grids[min(image_idx, len(grids) - 1)]
                        row[bi, p], col[bi, p] = g[within]
                    within += 1
                    if within == size:
                        image_idx, within = image_idx + 1, 0
                elif t in special:
                    mod[bi, p] = MODALITIES.index("special")
        tokens = [tok.convert_ids_to_tokens(r.tolist()) for r in ids] if hasattr(tok, "convert_ids_to_tokens") else \
            [[str(int(t)) for t in r] for r in ids]
        shapes = [tuple(g) for g in grid_shapes or []]
        if len(shapes) == 1:
            shapes *= image_idx
        return cls(mod, img, row, col, qry, tokens, shapes)
