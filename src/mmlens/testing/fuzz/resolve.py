"""What drawn specs mean, as the oracle reads them without mmlens.

Hook-point names from names and globs (`resolve`, `resolve_names`: fnmatch over `lens.hook_points()`), and attention
selections: the value passed to mmlens (`sel_value`) and Python's meaning of it as indices (`sel_index`, `select`).
`_Bad` marks a spec that reaches nothing, or a selection that is invalid for a given size.
"""

from __future__ import annotations

import fnmatch

import numpy as np
import torch

from .cases import Arg


class _Bad(Exception):
    """A selection that is invalid for a given size (or a name spec that reaches nothing)."""


def resolve(pattern, info) -> list[str]:
    """The hook points of `info` that a name, a '.probs' alias or a glob reaches; _Bad when none."""
    if not isinstance(pattern, str):
        raise _Bad
    if pattern.endswith(".probs"):
        pattern = pattern[: -len(".probs")] + ".pattern"
    if pattern in info.names:
        return [pattern]
    hits = [n for n in info.names if fnmatch.fnmatchcase(n, pattern)] if any(c in pattern for c in "*?[") else []
    if not hits:
        raise _Bad
    return hits


def resolve_names(arg: Arg, info) -> list[str]:
    """The hook points a valid `names` argument records (None: every value hook point)."""
    kind, value = arg.spec
    if value is None:
        return list(info.values)
    items = [value] if isinstance(value, str) else list(value)
    out: list[str] = []
    for p in items:
        out += [n for n in resolve(p, info) if n not in out]
    return out


def sel_value(spec):
    """A selection spec -> the value passed to mmlens."""
    if spec is None:
        return None
    kind, *rest = spec
    if kind == "list":
        return list(rest[0])
    if kind == "range":
        return range(*rest[0])
    if kind == "slice":
        return slice(*rest[0])
    if kind == "tensor":
        return torch.tensor(rest[0], dtype=torch.long)
    if kind == "ndarray":
        return np.array(rest[0], dtype=np.int64)
    if kind == "mask":
        m = torch.zeros(rest[0], dtype=torch.bool)
        m[list(rest[1])] = True
        return m
    if kind == "mask_list":
        return [k in set(rest[1]) for k in range(rest[0])]
    if kind == "raw":
        return rest[0]() if callable(rest[0]) else rest[0]
    if kind == "dict":
        return {glob: sel_value(sub) for glob, sub in rest[0]}
    raise ValueError(kind)


def sel_index(spec, size: int) -> torch.Tensor | None:
    """Python's meaning of a (type-valid) selection over `size` entries, as indices; _Bad when it selects
    nothing or reaches outside."""
    if spec is None:
        return None
    kind, *rest = spec
    if kind in ("list", "tensor", "ndarray", "range"):
        items = list(range(*rest[0])) if kind == "range" else list(rest[0])
        if not items or any(not -size <= i < size for i in items):
            raise _Bad
        return torch.tensor([i % size for i in items], dtype=torch.long)
    if kind == "slice":
        idx = torch.arange(size)[slice(*rest[0])]
        if idx.numel() == 0:
            raise _Bad
        return idx
    if kind in ("mask", "mask_list"):
        if rest[0] != size or not rest[1]:
            raise _Bad
        return torch.tensor(sorted(set(rest[1])), dtype=torch.long)
    raise ValueError(kind)


def select(p: torch.Tensor, heads, rows) -> torch.Tensor:
    if heads is not None:
        p = p.index_select(1, heads.to(p.device))
    if rows is not None:
        p = p.index_select(2, rows.to(p.device))
    return p
