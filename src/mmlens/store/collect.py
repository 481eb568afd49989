"""One batch through the model -> every stored token's activation per name and its metadata (contrastive.py,
generative.py, diffusion.py, text_encoder.py say how each family's tokens are placed)."""

from __future__ import annotations

import torch

from .contrastive import contrastive
from .diffusion import diffusion
from .generative import generative
from .inputs import Batch
from .sites import Acts, Meta, check_run_kwargs, text_encoder_of
from .text_encoder import text_encoder


def run_batch(lens, names: list[str], batch: Batch, *, seed: int = 0, dtype: torch.dtype | None = None,
              **run_kwargs) -> tuple[Acts, Meta]:
    """(activations per name (n, d), metadata columns (n,)) of one batch, on CPU."""
    if text_encoder_of(lens, names) is not None:  # a diffusion pipeline's text encoder: its prompt tokens
        return text_encoder(lens, names, batch, dtype=dtype, **run_kwargs)
    if lens.family == "diffusion":
        return diffusion(lens, names, batch, seed=seed, dtype=dtype, **run_kwargs)
    check_run_kwargs(lens, run_kwargs)
    fn = contrastive if lens.family == "contrastive" else generative
    acts, meta = fn(lens, names, batch)
    if not acts:
        return {}, meta
    return {n: a.to("cpu", dtype) if dtype is not None else a.cpu() for n, a in acts.items()}, meta
