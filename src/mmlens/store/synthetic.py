"""A store of made-up activations with realistic metadata, written through the same shard writer: for tests of the
reader and for the I/O benchmark (no model needed)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .schema import DTYPES, MODALITIES, check_dtype, empty_meta
from .writer import ShardSink, _open_store


def synthetic_batch(start: int, n: int, d: int, *, tokens_per_example: int = 64, image_tokens: int = 16,
                    dtype: torch.dtype = torch.float32, generator: torch.Generator | None = None):
    """Tokens [start, start + n): `act[:, 0]` is the global token index (exact in float32 below 2**24), the rest
    Gaussian; each example holds `image_tokens` image tokens on a square grid, then text tokens."""
    idx = torch.arange(start, start + n)
    x = torch.randn(n, d, generator=generator).to(dtype)
    x[:, 0] = idx.to(dtype)
    meta = empty_meta(n)
    pos = idx % tokens_per_example
    side = max(1, int(image_tokens ** 0.5))
    img = pos < image_tokens
    meta["example"] = idx // tokens_per_example
    meta["position"] = pos.int()
    meta["modality"] = torch.where(img, MODALITIES.index("image"), MODALITIES.index("text")).to(torch.int8)
    meta["image"] = torch.where(img, 0, -1).int()
    meta["row"] = torch.where(img, pos // side, -1).short()
    meta["col"] = torch.where(img, pos % side, -1).short()
    meta["token"] = torch.where(img, -1, 100 + pos % 7)
    return x, meta


def write_synthetic(folder: str | os.PathLike, tokens: int, d: int, *, dtype="float16", shard_tokens: int = 65_536,
                    batch_tokens: int = 8192, name: str = "synthetic.resid", tokens_per_example: int = 64,
                    seed: int = 0, rank: int = 0, world_size: int = 1):
    """Write `tokens` synthetic tokens of width `d` as rank `rank` of `world_size`; returns the ActivationStore."""
    import warnings

    from .reader import ActivationStore

    dtype = check_dtype(dtype)
    folder = Path(folder)
    fp = {"names": [name], "dtype": dtype, "items": -(-tokens // tokens_per_example), "model": "synthetic",
          "world_size": world_size, "run": {"d": d, "tokens": tokens}, "seed": seed}
    _open_store(folder, fp, resume=False)
    state = {"rank": rank, "world_size": world_size, "shards": [], "items_done": 0, "complete": False, "d": {},
             "token_strings": {}}
    sink = ShardSink(folder, state, DTYPES[dtype], shard_tokens)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, tokens, batch_tokens):
        n = min(batch_tokens, tokens - start)
        x, meta = synthetic_batch(start, n, d, tokens_per_example=tokens_per_example, dtype=DTYPES[dtype],
                                  generator=g)
        sink.add({name: x}, meta, start + n)
    sink.finish()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ActivationStore(folder)
