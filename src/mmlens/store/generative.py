"""Generative VLMs: `lens.run_with_cache`. LM positions take modality / image / (row, col) from `lens.token_map` and
token ids from `input_ids`, padding dropped; vision-tower and projector sites (one row per image) are laid out like a
contrastive image tower and given to the example holding the image (Qwen2-VL's flattened merge-window tower:
qwen2_vl.py); Q-Former sites are 'query' tokens."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .inputs import Batch, as_image
from .layout import as_tokens, flat_meta, image_tower_meta
from .qwen2_vl import qwen2_vl_tower
from .schema import MODALITIES, empty_meta
from .sites import Acts, Meta, attention_keep, pack, same_layout


def generative(lens, names: list[str], batch: Batch) -> tuple[Acts, Meta]:
    inputs = _generative_inputs(lens, batch)
    ids = inputs["input_ids"].cpu()
    B, L = ids.shape
    if len(batch.examples) != B:
        raise ValueError(f"the processor output holds {B} rows for {len(batch.examples)} examples")
    _, cache = lens.run_with_cache(inputs, names=names)
    if names[0].split(".", 1)[0] in ("vision", "projector") and names[0] not in cache \
            and not isinstance(inputs.get("pixel_values"), Tensor):
        return {}, empty_meta(0)  # text-only examples have no image-tower tokens
    if lens.architecture == "qwen2_vl" and names[0].split(".", 1)[0] in ("vision", "projector"):
        tm = lens.token_map(inputs)
        n_images = len(inputs["image_grid_thw"])
        return qwen2_vl_tower(lens, names, {n: cache[n] for n in names}, inputs["image_grid_thw"],
                              _image_owner(tm.image, n_images, B), _first_image_per_row(tm.image), batch.examples)
    toks = {}
    for n in names:
        v = cache[n]
        if v.dim() == 2 and v.shape[0] == B * L and n.startswith("lm."):  # OPT flattens (batch*seq, d)
            v = v.reshape(B, L, -1)
        toks[n] = as_tokens(v, lens.sites[n].row.heads, n)
    same_layout(toks, names)
    t, head = toks[names[0]], names[0].split(".", 1)[0]
    tm = lens.token_map(inputs)
    R, S = t.x.shape[:2]
    first = _first_image_per_row(tm.image)
    if head in ("vision", "projector"):  # one row per image
        owner = _image_owner(tm.image, R, B)
        keep = torch.ones(R, S, dtype=torch.bool)
        within = torch.arange(R) - first[owner]
        return pack(names, toks, keep), image_tower_meta(keep, S, t.kind, batch.examples[owner], within)
    if t.kind == "seq" and (R, S) == (B, L):
        keep = attention_keep(inputs, ids)
        img = torch.where(tm.image >= 0, tm.image - first[:, None], -1)
        meta = flat_meta(keep, example__r=batch.examples, image=img, modality=tm.modality, row=tm.row, col=tm.col,
                         position__s=torch.arange(S), token=ids)
        return pack(names, toks, keep), meta
    if t.kind == "seq" and R == B:  # learned queries (BLIP-2 Q-Former): one per position, for the row's image
        keep = torch.ones(R, S, dtype=torch.bool)
        meta = flat_meta(keep, example__r=batch.examples, image=0, modality=MODALITIES.index("query"),
                         position__s=torch.arange(S))
        return pack(names, toks, keep), meta
    if t.kind == "pooled" and R == B:
        keep = torch.ones(R, 1, dtype=torch.bool)
        return pack(names, toks, keep), flat_meta(keep, example__r=batch.examples,
                                                   modality=MODALITIES.index("special"), position=-1)
    raise ValueError(f"{names[0]} gives {t.kind} values of shape {tuple(t.x.shape)}, which match neither the "
                     f"{B}x{L} input_ids nor one row per image; the store cannot place its tokens")


def _first_image_per_row(image: Tensor) -> Tensor:
    """(rows,) the global index of each row's first image (images are numbered row-major over the batch)."""
    big = torch.iinfo(image.dtype).max
    first = torch.where(image >= 0, image, big).min(1).values
    return torch.where(first == big, 0, first)


def _image_owner(image: Tensor, n_images: int, rows: int) -> Tensor:
    """(n_images,) the batch row holding each image."""
    owner = torch.full((n_images,), -1, dtype=torch.long)
    r, p = (image >= 0).nonzero(as_tuple=True)
    j = image[r, p]
    ok = j < n_images
    owner[j[ok]] = r[ok]
    if (owner < 0).any():
        if n_images == rows:  # no image tokens to read it from (e.g. BLIP-2 queries): one image per row
            return torch.arange(rows)
        raise ValueError(f"{n_images} images but the token map places only {int((owner >= 0).sum())} of them")
    return owner


def _generative_inputs(lens, batch: Batch) -> dict:
    if batch.kind == "processed":
        inputs = batch.items[0]
    elif batch.kind == "image":
        raise TypeError("a generative VLM needs text with each image: pass conversations {'image': img, 'text': "
                        f"prompt}} (examples {batch.examples[:4].tolist()}...) or processor outputs")
    else:
        texts = [x if isinstance(x, str) else x["text"] for x in batch.items]
        images = []
        for x, e in zip(batch.items, batch.examples):
            if isinstance(x, Mapping):
                got = x.get("images", [x["image"]] if "image" in x else [])
                images += [as_image(im, int(e)) for im in got]
        kw = {"images": images} if images else {}
        inputs = dict(lens.processor(text=texts, padding=True, return_tensors="pt", **kw))
    if not isinstance(inputs.get("input_ids"), Tensor):
        raise ValueError(f"write_activations: generative inputs need input_ids; the processor output holds "
                         f"{sorted(inputs)}")
    return inputs
