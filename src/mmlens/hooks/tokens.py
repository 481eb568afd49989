"""Token geometry of generative VLMs: for every sequence position, its modality, image and patch cell."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch

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


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


@dataclass
class TokenMap:
    """Per position: `modality` code (index into MODALITIES), `image` (global image index or -1),
    `row`/`col` on that image's patch grid (-1 where none: text, CLS, BLIP-2 queries), `query` (learned
    query index or -1), and the token strings. All tensors are (batch, seq)."""

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

        `grids[j]` holds (row, col) for the tokens of image j (one grid reused when all images share it).
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
        return cls(mod, img, row, col, qry, tokens, list(grid_shapes or []))
