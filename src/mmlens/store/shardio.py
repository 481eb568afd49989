"""Shard files: safetensors written atomically, read back with one positioned read per contiguous row range.

Reading parses the safetensors header once per file and then `preadv`s straight into the output tensor: one large
sequential read per name and shard, no memory map page faults and no intermediate copy."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import atomic_path

_ST_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file

    @property
    def row_bytes(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_header(path: str | os.PathLike) -> tuple[dict[str, Entry], dict[str, str]]:
    """(entries by key, the file's string metadata)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        try:
            doc = json.loads(f.read(n))
        except ValueError:
            raise ValueError(f"{path}: corrupt safetensors header") from None
    meta = doc.pop("__metadata__", {}) or {}
    out = {}
    for key, e in doc.items():
        if e["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key!r} has dtype {e['dtype']}, which a store never writes")
        out[key] = Entry(_ST_DTYPES[e["dtype"]], tuple(e["shape"]), 8 + n + e["data_offsets"][0])
    return out, meta


def read_rows(fd: int, entry: Entry, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows [lo, hi) of one tensor, read from an open file descriptor into `out` (allocated when None)."""
    shape = (hi - lo, *entry.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=entry.dtype)
    nbytes = (hi - lo) * entry.row_bytes
    if nbytes == 0:
        return out
    view = memoryview(out.view(torch.uint8).numpy()).cast("B") if out.dtype != torch.uint8 else \
        memoryview(out.numpy()).cast("B")
    off, done = entry.start + lo * entry.row_bytes, 0
    while done < nbytes:
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], off + done)
        else:  # Windows: no positioned read
            os.lseek(fd, off + done, os.SEEK_SET)
            got = os.readv(fd, [view[done:]]) if hasattr(os, "readv") else _read_into(fd, view[done:])
        if got <= 0:
            raise OSError(f"short read: {done} of {nbytes} bytes at offset {off}")
        done += got
    return out


def _read_into(fd: int, view: memoryview) -> int:
    data = os.read(fd, len(view))
    view[:len(data)] = data
    return len(data)
