"""Diffusion text encoders: the prompts through the pipeline's own `encode_prompt` (its tokenizer, padding,
truncation and text preprocessing; no denoising, no guidance branch), recording one text encoder's sites. Each
text position is one token: 'text', or 'special' for the tokenizer's special tokens (BOS / EOS, as the contrastive
text tower marks them), with its token id and position; step, branch and timestep are none. Pooled outputs
(`text_embeds`) are one 'special' token at position -1.

Padding is dropped under the attention mask the encoder is given (PixArt's T5). Where the pipeline passes none
(Stable Diffusion's and SD3's CLIP encoders pad to `model_max_length`, SD3's T5 to `max_sequence_length`), the kept
tokens are the real ones: up to and including the first end-of-text token, which is the tokenizer's own attention
mask for these tokenizers. The padding still ran through the encoder as in the pipeline; a causal CLIP encoder's
real tokens do not see it, a T5 run without a mask does, and the stored values are the ones the pipeline used."""

from __future__ import annotations

import inspect

import torch
from torch import Tensor

from .inputs import Batch
from .layout import as_tokens, pooled_meta, text_meta
from .sites import (Acts, Meta, attention_keep, component, once, pack, same_layout, store_tokenizer,
                    tokenizer_special_ids)

_SET_HERE = {"prompt", "device", "num_images_per_prompt", "do_classifier_free_guidance", "kwargs"}


def encode_options(lens) -> list[str]:
    """Keywords of the pipeline's `encode_prompt` a text-encoder store passes on (e.g. `max_sequence_length`,
    `clean_caption`): not the prompts, negative prompts, precomputed embeddings, device or guidance."""
    params = inspect.signature(lens.model.encode_prompt).parameters
    return [p for p in params if p not in _SET_HERE and not p.startswith("prompt_") and "negative" not in p
            and "embeds" not in p and "attention_mask" not in p]


def text_encoder(lens, names: list[str], batch: Batch, *, dtype: torch.dtype | None = None,
                 **encode_kwargs) -> tuple[Acts, Meta]:
    """(activations per name (n, d) on CPU, metadata) of one batch of prompts at one text encoder's sites."""
    if batch.kind != "text":
        raise TypeError(f"a text-encoder store runs prompts: items must be strings; got {batch.kind} items "
                        f"(examples {batch.examples[:4].tolist()}...)")
    comp = component(lens, names[0])
    enc, tok = getattr(lens.model, comp), store_tokenizer(lens, names)
    fed: list[tuple[Tensor, Tensor | None]] = []

    def grab(module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        fed.append((ids.detach().cpu(), mask.detach().cpu() if isinstance(mask, Tensor) else None))

    got: dict[str, list[Tensor]] = {}
    caps = {n: [lambda v, ctx: got.setdefault(ctx.name, []).append(v.detach())] for n in names}
    handle = enc.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), lens.hooks(captures=caps):
            lens.model.encode_prompt(**_encode_args(lens, list(batch.items), encode_kwargs))
    finally:
        handle.remove()
    if len(fed) != 1:
        raise ValueError(f"{comp} ran {len(fed)} times to encode one batch of prompts; the store takes one run")
    ids, mask = fed[0]
    toks = {n: as_tokens(once(got, n), lens.sites[n].row.heads, n) for n in names}
    same_layout(toks, names)
    t = toks[names[0]]
    R, S = t.x.shape[:2]
    ex = batch.examples
    if R != len(ex):
        raise ValueError(f"{names[0]} gave {R} rows for {len(ex)} prompts")
    if t.kind == "pooled":
        keep, meta = pooled_meta(ex)
    elif t.kind == "seq" and tuple(ids.shape) == (R, S):
        keep = real_tokens(ids, mask, getattr(tok, "eos_token_id", None))
        meta = text_meta(keep, ex, ids, tokenizer_special_ids(tok))
    else:
        raise ValueError(f"{names[0]} gives {t.kind} values of shape {tuple(t.x.shape)}, which match neither the "
                         f"{tuple(ids.shape)} input_ids the encoder ran on nor one vector per prompt")
    acts = pack(names, toks, keep)
    return {n: a.to("cpu", dtype) if dtype is not None else a.cpu() for n, a in acts.items()}, meta


def real_tokens(ids: Tensor, mask: Tensor | None, eos: int | None) -> Tensor:
    """(rows, seq) bool: the encoder's attention mask where it got one, else every position up to and including
    each row's first `eos` (the whole row where there is none)."""
    if isinstance(mask, Tensor) and mask.shape == ids.shape:
        return attention_keep({"attention_mask": mask}, ids)
    L = ids.shape[1]
    if eos is None:
        return torch.ones(ids.shape, dtype=torch.bool)
    is_eos = ids == eos
    last = torch.where(is_eos.any(1), is_eos.int().argmax(1), L - 1)
    return torch.arange(L)[None] <= last[:, None]


def _encode_args(lens, prompts: list[str], options: dict) -> dict:
    """Keywords for `encode_prompt`: one prompt per image, no guidance; a pipeline's further prompts (SD3's prompt_2,
    prompt_3) default to the prompt."""
    params = inspect.signature(lens.model.encode_prompt).parameters
    args = {"prompt": prompts, "device": lens.device, "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    args = {k: v for k, v in args.items() if k in params}
    for p, spec in params.items():
        if p.startswith("prompt_") and not p.endswith(("embeds", "mask")) and spec.default is inspect.Parameter.empty:
            args[p] = None
    return {**args, **options}
