"""A plain mapping from canonical name to tensor: no model reference, no analysis, no global state."""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..errors import UnknownNameError
from .names import as_patterns, close_matches, natural_sorted, resolve

WHERE = "this cache (only the names asked for are recorded)"
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_FORMATS: dict[str, type[ActivationCache]] = {}  # safetensors "format" tag -> class; filled by __init_subclass__


def _is_glob(name) -> bool:
    return isinstance(name, str) and any(c in name for c in "*?[")


def check_dtype(dtype, arg: str = "cache_dtype") -> torch.dtype | None:
    """None or a floating dtype (or its name): an integer dtype would silently truncate activations to zero."""
    allowed = f"None, {', '.join('torch.' + d for d in FLOAT_DTYPES)} or their names as strings"
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dt = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(dt, torch.dtype):
            raise ValueError(f"{arg}={dtype!r} is not a torch dtype; allowed: {allowed}")
        dtype = dt
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{arg} must be a torch.dtype; got {type(dtype).__name__} {dtype!r:.80}; allowed: {allowed}")
    if not dtype.is_floating_point:
        raise ValueError(f"{arg}={dtype} is not a floating dtype (activations would be truncated); allowed: {allowed}")
    return dtype


def check_device(device, arg: str = "cache_device") -> torch.device | None:
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise (TypeError if isinstance(e, TypeError) else ValueError)(
            f"{arg} must be None or a device torch.device() accepts ('cpu', 'cuda:0', ...); got {device!r:.80}"
        ) from None
    if dev.type == "meta":
        raise ValueError(f"{arg}='meta' would record shapes without values; use 'cpu' or an accelerator")
    try:
        torch.empty(0, device=dev)
    except (AssertionError, RuntimeError) as e:
        raise ValueError(f"{arg}={device!r:.40} is not usable here ({str(e).splitlines()[0][:120]}); "
                         "use 'cpu' or an available accelerator") from None
    return dev


class ActivationCache(Mapping[str, torch.Tensor]):
    """Values recorded by `Lens.run_with_cache`: detached copies, on `device` and in `dtype` when given.

    `cache[name]` is the tensor a site produced; a glob gives a dict name -> tensor in natural order
    (`cache["lm.blocks.*.resid_post"]`, same as `cache.select`). A site that fired more than once in one run
    (a module reused) keeps every call: `cache.calls(name)`. `keep_graph=True` keeps the recorded tensors
    themselves (no detach, no copy) so gradient methods can backpropagate through them.
    """

    format = "mmlens.ActivationCache"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "format" in cls.__dict__:
            _FORMATS[cls.format] = cls

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                 keep_graph: bool = False):
        self.device, self.dtype, self.keep_graph = check_device(device), check_dtype(dtype), bool(keep_graph)
        if self.keep_graph and (self.device is not None or self.dtype is not None):
            raise ValueError("keep_graph=True records the tensors themselves; cache_device/cache_dtype would copy "
                             "them and the copy would leave the autograd graph. Use one or the other.")
        self._store: dict[str, list[torch.Tensor]] = {}

    def record(self, name: str, value: torch.Tensor) -> None:
        if not self.keep_graph:  # always a copy: the model may reuse the buffer in place
            value = value.detach().to(device=self.device or value.device, dtype=self.dtype or value.dtype, copy=True)
        self._store.setdefault(name, []).append(value)

    # ------------------------------------------------------------------------------------------- lookup
    def _missing(self, name: str) -> UnknownNameError:
        close = close_matches(name, natural_sorted(self._store))
        hint = f" Closest recorded names: {', '.join(close)}." if close else ""
        kind = "no recorded name matches the glob" if _is_glob(name) else "no recorded value for"
        return UnknownNameError(f"{kind} {name!r} in {WHERE}.{hint} Pass it in names= to record it.")

    def _names(self, pattern: str) -> list[str]:
        """An exact name or a glob -> the recorded names it selects, natural order; UnknownNameError if none."""
        if not isinstance(pattern, str):
            raise TypeError(f"cache keys are hook-point names or globs (str); got {type(pattern).__name__} "
                            f"{pattern!r:.80}")
        if pattern in self._store:
            return [pattern]
        (pattern,) = as_patterns(pattern, "cache key")  # length limit; old aliases (`.probs`) with a warning
        try:
            return resolve(pattern, self._store, where=WHERE, arg="cache key")
        except UnknownNameError:
            raise self._missing(pattern) from None

    def __getitem__(self, name: str):
        if _is_glob(name):
            return self.select(name)
        (name,) = self._names(name)
        vals = self._store[name]
        if len(vals) > 1:  # not a KeyError: Mapping.get would turn it into None
            raise ValueError(f"{name!r} fired {len(vals)} times in this run; use cache.calls({name!r})")
        return vals[0]

    def calls(self, name: str) -> list[torch.Tensor]:
        """Every value `name` produced in this run, in call order."""
        if _is_glob(name):
            raise ValueError(f"calls() takes one exact name, not the glob {name!r}; "
                             f"matching: {', '.join(self._names(name))}")
        (name,) = self._names(name)
        return list(self._store[name])

    def select(self, pattern: str) -> dict[str, torch.Tensor]:
        return {n: self[n] for n in self._names(pattern)}

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the values of a glob along a new dim 0, in natural order (layers 0, 1, ..., 10)."""
        return torch.stack([self[n] for n in self._names(pattern)])

    def __iter__(self) -> Iterator[str]:
        return iter(natural_sorted(self._store))

    def __len__(self) -> int:
        return len(self._store)

    def __contains__(self, name: object) -> bool:
        return name in self._store

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for vals in self._store.values() for t in vals)

    def summary(self) -> list[dict]:
        last = {n: self._store[n][-1] for n in self}
        return [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                 "calls": len(self._store[n])} for n, t in last.items()]

    # ------------------------------------------------------------------------------------- persistence
    def _metadata(self) -> dict[str, str]:
        return {"format": self.format}

    def _load_metadata(self, meta: dict[str, str], path: Path) -> None:
        pass

    def save(self, path: str | os.PathLike) -> Path:
        """One safetensors file; repeated calls are stored as `name@k`, subclass metadata as JSON. Atomic."""
        from safetensors.torch import save_file

        from ..io import atomic_path

        def cpu(t):  # keep_graph values may be one tensor under two names: safetensors refuses shared storage
            t = t.detach()
            return (t.clone(memory_format=torch.contiguous_format) if self.keep_graph else t).contiguous().cpu()

        tensors = {}
        for n, vals in self._store.items():
            if len(vals) == 1:
                tensors[n] = cpu(vals[0])
            else:
                tensors.update({f"{n}@{k}": cpu(v) for k, v in enumerate(vals)})
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=self._metadata())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ActivationCache:
        """The class named by the file's format tag (`ActivationCache.load` also gives back a StepCache)."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        try:
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise ValueError(f"{path}: not a safetensors file saved by cache.save() ({e})") from None
        fmt = meta.get("format")
        target = _FORMATS.get(fmt)
        if target is None:
            raise ValueError(f"{path}: format tag {fmt!r} is not an mmlens cache; expected one of {list(_FORMATS)}")
        if not issubclass(target, cls):
            raise ValueError(f"{path} holds a {fmt}, not a {cls.format}; load it with {target.__name__}.load "
                             "or ActivationCache.load")

        def key(k):
            n, _, i = k.rpartition("@")
            return (n, int(i)) if n and i.isdigit() else (k, 0)

        cache = target()
        for k in sorted(tensors, key=key):
            cache._store.setdefault(key(k)[0], []).append(tensors[k])
        cache._load_metadata(meta, path)
        return cache

    # -------------------------------------------------------------------------------------------- display
    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} names, {self.nbytes() / 2**20:.2f} MiB)"

    def _repr_html_(self) -> str:
        rows = self.summary()
        cols = list(rows[0]) if rows else ["name", "shape", "dtype", "calls"]

        def cell(c, v):
            text = html.escape(str(tuple(v) if c == "shape" else v))
            return f"<code>{text}</code>" if c == "name" else text

        body = "".join("<tr>" + "".join(f"<td>{cell(c, r[c])}</td>" for c in cols) + "</tr>" for r in rows)
        head = "".join(f"<th>{c}</th>" for c in cols)
        return f"<b>{html.escape(repr(self))}</b><table><tr>{head}</tr>{body}</table>"

    def to_json(self) -> str:
        return json.dumps(self.summary())


_FORMATS[ActivationCache.format] = ActivationCache
