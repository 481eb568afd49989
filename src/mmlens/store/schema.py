"""What a store holds: the metadata columns of every token, their dtypes and codes, the file names, dtype choices."""

from __future__ import annotations

import torch

from ..hooks.steps import BRANCHES_CFG
from ..hooks.tokens import MODALITIES as _TOKEN_MODALITIES

MODALITIES = (*_TOKEN_MODALITIES, "latent")  # token modalities of VLMs, plus diffusion's latent cells
BRANCHES = BRANCHES_CFG  # branch code 0: uncond, 1: cond, -1: none

# column -> dtype; every token has every column (-1 / nan where it does not apply)
COLUMNS: dict[str, torch.dtype] = {
    "example": torch.int64,    # index of the item in `data`
    "image": torch.int32,      # image index within the example (-1 none)
    "modality": torch.int8,    # index into MODALITIES
    "row": torch.int16,        # patch or latent cell (-1 none)
    "col": torch.int16,
    "position": torch.int32,   # index along the hooked tensor's token axis (-1: a pooled vector)
    "token": torch.int64,      # token id (-1 none)
    "step": torch.int32,       # diffusion step (-1 none)
    "timestep": torch.float32,  # the scheduler's timestep (nan none)
    "branch": torch.int8,      # 0 uncond, 1 cond (-1 none)
}
CODED = {"modality": MODALITIES, "branch": BRANCHES}  # columns whose values may be given by name

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

STORE_FILE = "store.json"
FORMAT = "mmlens.ActivationStore/1"


def part_file(rank: int, world: int) -> str:
    return f"parts/rank-{rank:05d}-of-{world:05d}.json"


def shard_file(rank: int, index: int) -> str:
    return f"shards/rank-{rank:05d}-{index:06d}.safetensors"


def act_key(name: str) -> str:
    return f"act/{name}"


def meta_key(column: str) -> str:
    return f"meta/{column}"


def check_dtype(dtype) -> str:
    """'float16' | 'bfloat16' | 'float32' (or the torch dtype) -> its name; anything else raises."""
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: a store holds float16, bfloat16 or float32 (allowed: {tuple(DTYPES)})")
    return dtype


def empty_meta(n: int) -> dict[str, torch.Tensor]:
    """Columns for n tokens, every one 'none' (-1, nan)."""
    out = {c: torch.full((n,), -1, dtype=dt) for c, dt in COLUMNS.items() if dt != torch.float32}
    out["timestep"] = torch.full((n,), float("nan"))
    return {c: out[c] for c in COLUMNS}


def code(column: str, value) -> int | float:
    """A column value given by name (modality 'image', branch 'cond') -> its stored code; numbers pass."""
    names = CODED.get(column)
    if isinstance(value, str):
        if names is None:
            raise ValueError(f"{column}={value!r}: only {sorted(CODED)} take names; {column} takes numbers")
        if value not in names:
            raise ValueError(f"{column}={value!r} is unknown; allowed: {names} (or their indices)")
        return names.index(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{column}: values must be numbers{' or names ' + str(names) if names else ''}; "
                        f"got {value!r:.40}")
    return value
