"""Contrastive models: images run the vision tower alone, strings the text tower (`get_image_features` /
`get_text_features` under `lens.hooks`). A CLS token is 'special', patches 'image' with their (row, col); text tokens
are 'text' (the tokenizer's special tokens 'special'), padding dropped by the attention mask; pooled vectors are one
'special' token at position -1."""

from __future__ import annotations

import torch
from torch import Tensor

from .inputs import Batch, as_image
from .layout import as_tokens, image_tower_meta, pooled_meta, text_meta
from .sites import Acts, Meta, attention_keep, once, pack, same_layout, special_ids, tokenizer, tower_of


def contrastive(lens, names: list[str], batch: Batch) -> tuple[Acts, Meta]:
    tower = tower_of(names[0])
    inputs = _contrastive_inputs(lens, batch, tower)
    got: dict[str, list[Tensor]] = {}
    caps = {n: [lambda v, ctx: got.setdefault(ctx.name, []).append(v.detach())] for n in names}
    model = lens.model
    fn = getattr(model, "get_image_features" if tower == "vision" else "get_text_features", None)
    with torch.no_grad(), lens.hooks(captures=caps):
        if fn is not None and hasattr(model, "vision_model") and hasattr(model, "text_model"):
            dev, dt = lens.device, lens.dtype
            fn(**{k: v.to(dev, dt if v.is_floating_point() else v.dtype) for k, v in inputs.items()})
        else:  # a tower loaded alone
            lens(inputs)
    toks = {n: as_tokens(once(got, n), lens.sites[n].row.heads, n) for n in names}
    same_layout(toks, names)
    t = toks[names[0]]
    R, S = t.x.shape[:2]
    ex = batch.examples
    if len(ex) != R:
        raise ValueError(f"{names[0]} gave {R} rows for a batch of {len(ex)} examples")
    if tower == "vision":
        keep = torch.ones(R, S, dtype=torch.bool)
        return pack(names, toks, keep), image_tower_meta(keep, S, t.kind, ex)
    if t.kind == "pooled":
        keep, meta = pooled_meta(ex)
        return pack(names, toks, keep), meta
    ids = inputs["input_ids"].cpu()
    if ids.shape != (R, S):
        raise ValueError(f"{names[0]} has {S} tokens per row but input_ids are {tuple(ids.shape)}")
    keep = attention_keep(inputs, ids)
    return pack(names, toks, keep), text_meta(keep, ex, ids, special_ids(lens))


def _contrastive_inputs(lens, batch: Batch, tower: str) -> dict:
    where = "write_activations"
    if batch.kind == "processed":
        inputs = batch.items[0]
        need = "pixel_values" if tower == "vision" else "input_ids"
        if not isinstance(inputs.get(need), Tensor):
            raise ValueError(f"{where}: {tower}-tower names need {need} in the processor output; it holds "
                             f"{sorted(inputs)}")
        keys = ("pixel_values",) if tower == "vision" else ("input_ids", "attention_mask", "position_ids")
        return {k: inputs[k] for k in keys if k in inputs}
    if tower == "vision":
        if batch.kind != "image":
            raise TypeError(f"{where}: names are vision-tower sites, so items must be images; got {batch.kind} items "
                            f"(examples {batch.examples[:4].tolist()}...)")
        imgs = [as_image(x, int(e)) for x, e in zip(batch.items, batch.examples)]
        return {"pixel_values": lens.processor(images=imgs, return_tensors="pt")["pixel_values"]}
    if batch.kind != "text":
        raise TypeError(f"{where}: names are text-tower sites, so items must be strings; got {batch.kind} items "
                        f"(examples {batch.examples[:4].tolist()}...)")
    pad = "max_length" if lens.architecture == "siglip" else True  # SigLIP was trained on max-length padding
    enc = tokenizer(lens)(list(batch.items), padding=pad, truncation=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
