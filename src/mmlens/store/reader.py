"""`ActivationStore`: a store folder opened for reading: metadata, selections, whole tensors and shuffled batches."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .schema import COLUMNS, DTYPES, FORMAT, STORE_FILE, act_key, code, meta_key, part_file
from .shardio import Entry, read_header, read_rows


class _Meta(Mapping):
    """Metadata columns over all tokens, each read from the shards on first access."""

    def __init__(self, store: ActivationStore):
        self._store, self._cols = store, {}

    def __getitem__(self, column: str) -> Tensor:
        if column not in COLUMNS:
            raise KeyError(f"no metadata column {column!r}; columns: {list(COLUMNS)}")
        if column not in self._cols:
            s = self._store
            parts = [s._read(j, meta_key(column), 0, s._tokens[j]) for j in range(len(s._files))]
            self._cols[column] = torch.cat(parts) if parts else torch.empty(0, dtype=COLUMNS[column])
        return self._cols[column]

    def __contains__(self, column) -> bool:  # without loading it
        return column in COLUMNS

    def __iter__(self):
        return iter(COLUMNS)

    def __len__(self) -> int:
        return len(COLUMNS)

    def __repr__(self) -> str:
        return f"<metadata columns {list(COLUMNS)} over {len(self._store)} tokens>"


class ActivationStore:
    """A folder written by `write_activations` (every rank's shards, in rank order).

        store = ActivationStore("acts/")
        store.names, store.d, len(store)             # hook names, width per name, tokens
        store.meta["modality"]                       # one value per token (see schema.COLUMNS)
        store.select(modality="image", step=[0, 1])  # a bool mask over tokens
        for x in store.batches("vision.blocks.2.resid_post", 4096, seed=0): ...   # shuffled at disk speed
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        path = self.folder / STORE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{self.folder} holds no {STORE_FILE}: not a store written by write_activations")
        doc = json.loads(path.read_text())
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path}: format {doc.get('format')!r}, expected {FORMAT!r}")
        self.names: list[str] = list(doc["names"])
        self.dtype: torch.dtype = DTYPES[doc["dtype"]]
        self.world_size: int = int(doc["world_size"])
        self.fingerprint: dict = doc.get("fingerprint", {})
        self.d: dict[str, int] = {}
        self._files: list[Path] = []
        self._tokens: list[int] = []
        self._strings: dict[int, str] = {}
        missing, unfinished = [], []
        for r in range(self.world_size):
            p = self.folder / part_file(r, self.world_size)
            if not p.exists():
                missing.append(r)
                continue
            part = json.loads(p.read_text())
            if not part.get("complete"):
                unfinished.append(r)
            for name, w in part["d"].items():
                if self.d.setdefault(name, w) != w:
                    raise ValueError(f"{p}: {name} has width {w} there and {self.d[name]} in another part")
            for s in part["shards"]:
                self._files.append(self.folder / s["file"])
                self._tokens.append(int(s["tokens"]))
            self._strings.update({int(k): v for k, v in part.get("token_strings", {}).items()})
        self.complete = not missing and not unfinished
        if not self.complete:
            warnings.warn(f"{self.folder}: incomplete store (ranks not started: {missing}, not finished: "
                          f"{unfinished}); reading the {sum(self._tokens)} tokens written so far. Rerun "
                          "write_activations with resume=True to finish it", stacklevel=2)
        offs = torch.tensor([0] + self._tokens, dtype=torch.int64).cumsum(0)
        self._offsets = offs
        self._headers: dict[int, dict[str, Entry]] = {}
        self._meta = _Meta(self)

    # ------------------------------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shards(self) -> list[tuple[Path, int]]:
        """(file, tokens) of every shard, in reading order."""
        return list(zip(self._files, self._tokens))

    @property
    def meta(self) -> Mapping[str, Tensor]:
        """column -> (tokens,) tensor, each loaded on first access."""
        return self._meta

    @property
    def token_strings(self) -> dict[int, str]:
        return dict(self._strings)

    def __repr__(self) -> str:
        dims = ", ".join(f"{n} ({self.d.get(n, '?')})" for n in self.names)
        return (f"ActivationStore({self.folder}: {len(self)} tokens x [{dims}], "
                f"{str(self.dtype).removeprefix('torch.')}, {len(self._files)} shards"
                f"{'' if self.complete else ', incomplete'})")

    def _entry(self, j: int, key: str) -> Entry:
        if j not in self._headers:
            self._headers[j] = read_header(self._files[j])[0]
        try:
            return self._headers[j][key]
        except KeyError:
            raise ValueError(f"{self._files[j]} holds no tensor {key!r}: corrupt shard") from None

    def _read(self, j: int, key: str, lo: int, hi: int) -> Tensor:
        fd = os.open(self._files[j], os.O_RDONLY)
        try:
            return read_rows(fd, self._entry(j, key), lo, hi)
        finally:
            os.close(fd)

    def _check_name(self, name: str) -> str:
        if name not in self.names:
            import difflib

            close = difflib.get_close_matches(str(name), self.names, n=3, cutoff=0.3)
            raise KeyError(f"{name!r} is not in this store; it holds {self.names}"
                           f"{f' (did you mean {close[0]!r}?)' if close else ''}")
        return name

    # --------------------------------------------------------------------------------------- selection
    def select(self, **where) -> Bool[Tensor, "tokens"]:
        """Tokens whose metadata match every condition: `column=value` or `column=[values]`; modality and branch
        take names too (`modality="image"`, `branch="cond"`)."""
        mask = torch.ones(len(self), dtype=torch.bool)
        for column, want in where.items():
            if column not in COLUMNS:
                raise ValueError(f"select: no metadata column {column!r}; columns: {list(COLUMNS)}")
            values = list(want) if isinstance(want, (list, tuple, set, range, Tensor)) else [want]
            values = [v.item() if isinstance(v, Tensor) else v for v in values]
            col = self.meta[column]
            mask &= torch.isin(col, torch.tensor([code(column, v) for v in values], dtype=col.dtype))
        return mask

    def _mask(self, where) -> Tensor | None:
        if where is None:
            return None
        if isinstance(where, Tensor):
            if where.dtype != torch.bool or where.shape != (len(self),):
                raise ValueError(f"where as a tensor must be a bool mask of shape ({len(self)},); got "
                                 f"{where.dtype} {tuple(where.shape)}")
            return where
        if isinstance(where, Mapping):
            return self.select(**where)
        raise TypeError(f"where must be a dict of conditions (as select takes) or a bool mask; got "
                        f"{type(where).__name__}")

    def tensor(self, name: str, where=None, dtype: torch.dtype = torch.float32) -> Float[Tensor, "n d"]:
        """Every (selected) token's activation of `name`, in store order, materialised: small stores only."""
        self._check_name(name)
        parts = [self._read(j, act_key(name), 0, n) for j, n in enumerate(self._tokens)]
        x = torch.cat(parts) if parts else torch.empty(0, self.d.get(name, 0), dtype=self.dtype)
        mask = self._mask(where)
        return (x if mask is None else x[mask]).to(dtype)

    # ------------------------------------------------------------------------------------------- batches
    def batches(self, name: str, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                buffer_tokens: int = 262_144, where=None, stratify: Mapping | None = None, epochs: int = 1,
                dtype: torch.dtype = torch.float32, with_meta: bool = False, rank: int | None = None,
                world_size: int | None = None, pin_memory: bool = False) -> Iterator:
        """(batch, d) tensors of `name` (or `(tensor, meta)` with `with_meta`), `epochs` passes over the selected
        tokens, each selected token exactly once per epoch (the last batch of an epoch may be smaller).

        Shards are read whole and in sequence (their order shuffled from `seed` and the epoch) into a buffer of
        `buffer_tokens`, from which random batches are drawn; deterministic from `seed`. `where`: conditions as
        `select` takes them, or a bool mask. `stratify={"modality": {"image": .5, "text": .5}}`: per epoch, each
        listed value contributes its share of the tokens (shares are normalised; the scarcest value is used whole,
        the others subsampled, differently each epoch). `rank` / `world_size` (default: torch.distributed's or
        torchrun's) cut each epoch's tokens into disjoint slices, sizes within one token, whose union is all.
        Batches are prepared in a background thread a few batches ahead; `pin_memory=True` puts them in page-locked
        memory (CUDA only) for `x.to("cuda", non_blocking=True)`."""
        from .shuffle import iterate

        self._check_name(name)
        return iterate(self, name, batch_size, shuffle=shuffle, seed=seed, buffer_tokens=buffer_tokens,
                       where=where, stratify=stratify, epochs=epochs, dtype=dtype, with_meta=with_meta, rank=rank,
                       world_size=world_size, pin_memory=pin_memory)
