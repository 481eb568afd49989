"""A plain mapping from canonical name to tensor: no model reference, no analysis, no global state."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from .names import natural_sorted, resolve


class ActivationCache(Mapping[str, torch.Tensor]):
    """Values recorded by `Lens.run_with_cache`, detached, on `device` and in `dtype` when given.

    `cache[name]` is the tensor a site produced; globs select several (`cache.select("lm.blocks.*.resid_post")`).
    A site that fired more than once in one run (a module reused) keeps every call: `cache.calls(name)`.
    """

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device, self.dtype = device, dtype
        self._store: dict[str, list[torch.Tensor]] = {}

    def record(self, name: str, value: torch.Tensor) -> None:
        value = value.detach()
        if self.device is not None or self.dtype is not None:
            value = value.to(device=self.device or value.device, dtype=self.dtype or value.dtype)
        if self.device is None and self.dtype is None:
            value = value.clone()  # the model may reuse the buffer in place
        self._store.setdefault(name, []).append(value)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._store:
            resolve(name, self._store, where="this cache (only the names asked for are recorded)")
        vals = self._store[name]
        if len(vals) > 1:
            raise KeyError(f"{name!r} fired {len(vals)} times in this run; use cache.calls({name!r})")
        return vals[0]

    def calls(self, name: str) -> list[torch.Tensor]:
        return list(self._store[name])

    def select(self, pattern: str) -> dict[str, torch.Tensor]:
        return {n: self[n] for n in resolve(pattern, self._store)}

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the values of a glob along a new dim 0, in natural order (layers 0, 1, ..., 10)."""
        return torch.stack([self[n] for n in resolve(pattern, self._store)])

    def __iter__(self) -> Iterator[str]:
        return iter(natural_sorted(self._store))

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for vals in self._store.values() for t in vals)

    def summary(self) -> list[dict]:
        return [
            {"name": n, "shape": list(self._store[n][-1].shape), "dtype": str(self._store[n][-1].dtype).replace("torch.", ""),
             "calls": len(self._store[n])}
            for n in self
        ]

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file; repeated calls are stored as `name@k`. Written atomically."""
        from safetensors.torch import save_file

        from ..io import atomic_path

        tensors = {}
        for n, vals in self._store.items():
            if len(vals) == 1:
                tensors[n] = vals[0].contiguous().cpu()
            else:
                tensors.update({f"{n}@{k}": v.contiguous().cpu() for k, v in enumerate(vals)})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "mmlens.ActivationCache"})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationCache:
        from safetensors.torch import load_file

        cache = cls()
        for key, t in sorted(load_file(str(path)).items(), key=lambda kv: (kv[0].split("@")[0], int(kv[0].split("@")[1]) if "@" in kv[0] else 0)):
            cache._store.setdefault(key.split("@")[0], []).append(t)
        return cache

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} names, {self.nbytes() / 2**20:.2f} MiB)"

    def _repr_html_(self) -> str:
        rows = "".join(
            f"<tr><td><code>{html.escape(r['name'])}</code></td><td>{tuple(r['shape'])}</td><td>{r['dtype']}</td>"
            f"<td>{r['calls']}</td></tr>"
            for r in self.summary()
        )
        return (f"<b>{html.escape(repr(self))}</b><table><tr><th>name</th><th>shape</th><th>dtype</th><th>calls</th></tr>"
                f"{rows}</table>")

    def to_json(self) -> str:
        return json.dumps(self.summary())
