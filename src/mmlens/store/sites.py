"""What the store can record for a model, and the checks and helpers every family's collector shares."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .layout import Tokens

Acts = dict[str, Tensor]
Meta = dict[str, Tensor]


def check_names(lens, names) -> list[str]:
    """Canonical names the store can hold for this model (unknown names list the close ones: lens.resolve)."""
    if names is None:
        raise ValueError("names is required: the hook point(s) to store, e.g. 'vision.blocks.2.resid_post' (globs "
                         "allowed); see lens.hook_points()")
    resolved = lens.resolve(names)
    if not resolved:
        raise ValueError(f"names={names!r} matches no hook point")
    maps = [n for n in resolved if lens.sites[n].row.read == "pattern"]
    if maps:
        raise ValueError(f"{maps}: attention maps are (heads, queries, keys) per example, not one vector per token; "
                         "store the q/k/v/z or out sites instead")
    if lens.family == "contrastive":
        towers = {tower_of(n) for n in resolved}
        if len(towers) > 1:
            raise ValueError(f"names span the {sorted(towers)} towers; one store holds one token sequence per "
                             "example, so write one store per tower")
    if lens.family == "diffusion":
        den = lens.adapter.denoiser
        off = [n for n in resolved if not (lens.sites[n].path == den or lens.sites[n].path.startswith(den + "."))]
        if off:
            raise ValueError(f"{off} are not denoiser sites: the store records latent tokens of the {den} at every "
                             f"denoising step; text-encoder sites are not supported")
    return resolved


def tower_of(name: str) -> str:
    head = name.split(".", 1)[0]
    if head in ("vision", "text"):
        return head
    raise ValueError(f"{name!r}: a contrastive store reads vision.* or text.* tower sites (one tower runs per "
                     "batch); for the embeddings use vision.proj / text.proj")


def tokenizer(lens):
    return getattr(lens.processor, "tokenizer", lens.processor)


def special_ids(lens) -> Tensor:
    return torch.tensor(sorted(getattr(tokenizer(lens), "all_special_ids", None) or []), dtype=torch.int64)


def same_layout(acts: dict[str, Tokens], names: list[str]) -> None:
    first = acts[names[0]]
    for n in names[1:]:
        t = acts[n]
        spatial = {t.kind, first.kind} == {"map", "seq"}  # a feature map and a token sequence in raster order
        if t.x.shape[:2] != first.x.shape[:2] or t.kind != first.kind and not spatial:
            raise ValueError(f"{names[0]} gives {first.kind} tokens of shape {tuple(first.x.shape[:2])} (rows, tokens) "
                             f"but {n} gives {t.kind} {tuple(t.x.shape[:2])}; one store holds names with the same "
                             "token rows: write one store per layout")


def pack(names, toks: dict[str, Tokens], keep: Tensor) -> Acts:
    k = keep.to(toks[names[0]].x.device)
    return {n: toks[n].x[k] for n in names}


def attention_keep(inputs: Mapping, ids: Tensor) -> Tensor:
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == ids.shape:
        return mask.bool().cpu()
    return torch.ones(ids.shape, dtype=torch.bool)


def once(got: dict[str, list[Tensor]], name: str) -> Tensor:
    vals = got.get(name)
    if not vals:
        raise ValueError(f"{name} did not fire: this run does not reach it (for a contrastive model one tower runs "
                         "at a time, so joint outputs such as image_embeds or logits never do; use vision.proj / "
                         "text.proj)")
    if len(vals) > 1:
        raise ValueError(f"{name} fired {len(vals)} times in one forward; the store takes sites that fire once")
    return vals[0]



def check_run_kwargs(lens, run_kwargs: dict) -> None:
    if run_kwargs and lens.family != "diffusion":
        raise TypeError(f"unexpected keywords {sorted(run_kwargs)}: run keywords go to lens.generate for diffusion "
                        f"prompts; {lens.architecture} is a {lens.family} model")
