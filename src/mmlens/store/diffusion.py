"""Diffusion pipelines: `lens.generate` records every step (or `record_steps`) and guidance branch; every cell of a
feature map (B, C, h, w) or token of a sequence over the latent grid is one 'latent' token with its (row, col), step,
timestep and branch; the `num_images_per_prompt` images of one prompt are images 0..k-1 of its example. Each
image's noise comes from a generator seeded by (seed, example, image), so batching and resuming draw the same.
A pipeline's text-encoder sites are stored from the prompts alone, without denoising: text_encoder.py."""

from __future__ import annotations

import torch
from torch import Tensor

from ..hooks.steps import branch_rows
from .inputs import Batch
from .layout import Tokens, as_tokens, flat_meta, latent_grid
from .schema import BRANCHES, MODALITIES
from .sites import Acts, Meta, same_layout


def seeded_generators(lens, examples: Tensor, per_prompt: int, seed: int) -> list[torch.Generator]:
    """One generator per image, seeded by (seed, example, image): an example's noise does not depend on its batch,
    so a resumed or re-batched run draws the same latents."""
    dev = lens.device
    return [torch.Generator(dev).manual_seed((seed * 1_000_003 + int(e) * 1009 + j) % 2**63)
            for e in examples for j in range(per_prompt)]


def diffusion(lens, names: list[str], batch: Batch, *, seed: int = 0, dtype: torch.dtype | None = None,
              **generate_kwargs) -> tuple[Acts, Meta]:
    if batch.kind != "text":
        raise TypeError(f"a diffusion store runs prompts: items must be strings; got {batch.kind} items "
                        f"(examples {batch.examples[:4].tolist()}...)")
    prompts = list(batch.items)
    n = len(prompts)
    k = int(generate_kwargs.get("num_images_per_prompt") or 1)
    kw = {"progress": False, "output_type": "latent", **generate_kwargs}
    if kw.get("generator") is None:
        kw["generator"] = seeded_generators(lens, batch.examples, k, seed)
    latent: list[tuple[int, int]] = []
    den = getattr(lens.model, lens.adapter.denoiser)

    def grab(module, args, kwargs):
        if not latent:
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            if isinstance(x, Tensor) and x.dim() == 4:
                latent.append(tuple(x.shape[-2:]))

    handle = den.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _, cache = lens.generate(prompts, names=names, cache_device="cpu", cache_dtype=dtype, **kw)
    finally:
        handle.remove()
    steps, times = cache.steps, cache.timesteps
    if not steps:
        raise ValueError("no denoising step was recorded (record_steps selected none that ran)")
    acts: dict[str, list[Tensor]] = {nm: [] for nm in names}
    metas: list[Meta] = []
    for s in steps:
        toks = {nm: as_tokens(cache.get(nm, step=s), lens.sites[nm].row.heads, nm) for nm in names}
        same_layout(toks, names)
        t = toks[names[0]]
        rows = t.x.shape[0]
        n_br = rows // (n * k)
        if n_br not in (1, 2) or n_br * n * k != rows:
            raise ValueError(f"{names[0]} has {rows} rows at step {s}; expected {n * k} images x 1 or 2 guidance "
                             "branches")
        branches = BRANCHES if n_br == 2 else ("cond",)
        for br in branches:
            part = {nm: Tokens(branch_rows(toks[nm].x, branches, br), toks[nm].kind, toks[nm].grid) for nm in names}
            meta, keep = _latent_meta(names[0], part[names[0]], latent, lens, n, k, batch.examples)
            for col, val in (("step", s), ("timestep", float(times[s])), ("branch", BRANCHES.index(br))):
                meta[col] = torch.full_like(meta[col], val)
            metas.append(meta)
            for nm in names:
                acts[nm].append(part[nm].x[keep])
    meta = {c: torch.cat([m[c] for m in metas]) for c in metas[0]}
    order = torch.sort(meta["example"], stable=True).indices  # example-major, then step, branch, position
    return {nm: torch.cat(v)[order] for nm, v in acts.items()}, {c: v[order] for c, v in meta.items()}


def _latent_meta(name, t: Tokens, latent, lens, n: int, k: int, examples: Tensor) -> tuple[Meta, Tensor]:
    R, S = t.x.shape[:2]
    keep = torch.ones(R, S, dtype=torch.bool)
    ex, img = examples.repeat_interleave(k), torch.arange(k).repeat(n)
    if t.kind == "pooled":
        return flat_meta(keep, example__r=ex, image__r=img, modality=MODALITIES.index("special"), position=-1), keep
    if t.kind == "map":
        rows, cols = t.grid
    else:
        parts = name.split(".")  # cross-attention keys/values and text streams run over the prompt's tokens
        text_stream = "text" in lens.sites[name].row.layout or parts[-2] == "cross" and parts[-1] in ("k", "v")
        g = None if text_stream or not latent else latent_grid(S, latent[0])
        if g is None:
            raise ValueError(f"{name}: its {S} tokens are not cells of the {latent[0] if latent else '?'} latent "
                             "(text-conditioning tokens?); the store records latent tokens of the denoiser")
        rows, cols = g
    pos = torch.arange(S)
    meta = flat_meta(keep, example__r=ex, image__r=img, modality=MODALITIES.index("latent"), position__s=pos,
                     row__s=pos // cols, col__s=pos % cols)
    return meta, keep
