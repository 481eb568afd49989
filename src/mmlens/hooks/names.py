"""Name resolution: exact names and globs to sites, with errors that list the closest valid names."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable


def _sort_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Sort so that `blocks.2` comes before `blocks.10`."""
    return sorted(names, key=_sort_key)


def close_matches(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    valid = list(valid)
    found = difflib.get_close_matches(name, valid, n=n, cutoff=0.5)
    if not found:  # fall back to names sharing the last component (e.g. "resid_post")
        tail = name.rsplit(".", 1)[-1]
        found = [v for v in valid if v.endswith("." + tail)][:n]
    return found


def resolve(patterns: str | Iterable[str], valid: Iterable[str], where: str = "",
            valid_set: set[str] | frozenset[str] | None = None) -> list[str]:
    """Expand names and globs (`lm.blocks.*.resid_post`) against `valid`; unknown names raise ValueError.

    Glob hits come in natural order (`blocks.2` before `blocks.10`).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    valid_set = set(valid) if valid_set is None else valid_set
    if all(p in valid_set for p in patterns):  # the hot path: exact names
        return list(dict.fromkeys(patterns))
    valid = natural_sorted(valid)
    out: list[str] = []
    for pat in patterns:
        if pat in valid_set:
            hits = [pat]
        elif any(c in pat for c in "*?["):
            hits = [v for v in valid if fnmatch.fnmatchcase(v, pat)]
        else:
            hits = []
        if not hits:
            close = close_matches(pat, valid)
            hint = f" Closest valid names: {', '.join(close)}." if close else ""
            src = f" Names are defined by {where}." if where else ""
            raise ValueError(f"unknown hook point {pat!r}.{hint}{src} See lens.hook_points() for all of them.")
        out.extend(h for h in hits if h not in out)
    return out
