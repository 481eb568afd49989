"""Name resolution: exact names and globs to sites, with errors that list the closest valid names."""

from __future__ import annotations

import difflib
import fnmatch
import re
import warnings
from collections.abc import Iterable

from ..errors import UnknownNameError

MAX_PATTERN = 400  # characters; real names are < 80, and fnmatch on pathological globs is slow
# Old names kept as aliases: (suffix, replacement). Attention probabilities are `.pattern` in every family.
ALIASES = ((".probs", ".pattern"),)


def _sort_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def natural_sorted(names: Iterable[str]) -> list[str]:
    """Sort so that `blocks.2` comes before `blocks.10`."""
    return sorted(names, key=_sort_key)


def close_matches(name: str, valid: Iterable[str], n: int = 5) -> list[str]:
    valid = list(valid)
    found = difflib.get_close_matches(name[:120], valid, n=n, cutoff=0.5)
    if not found:  # fall back to names sharing the last component (e.g. "resid_post")
        tail = name.rsplit(".", 1)[-1]
        found = [v for v in valid if v.endswith("." + tail)][:n]
    return found


def as_patterns(patterns, arg: str = "names") -> list[str]:
    """A string, or any iterable of strings (a generator is read once), as a list; anything else is a TypeError."""
    if isinstance(patterns, str):
        patterns = [patterns]
    elif isinstance(patterns, Iterable) and not isinstance(patterns, (bytes, dict)):
        patterns = list(patterns)
    else:
        raise TypeError(f"{arg} must be a hook-point name or glob, or a list of them; got {type(patterns).__name__} "
                        f"{patterns!r:.80}")
    for p in patterns:
        if not isinstance(p, str):
            raise TypeError(f"{arg} must hold strings (hook-point names or globs); got {type(p).__name__} {p!r:.80}")
        if len(p) > MAX_PATTERN:
            raise ValueError(f"{arg}: a name or glob of {len(p)} characters; at most {MAX_PATTERN} are allowed")
    return [_unalias(p) for p in patterns]


def _unalias(pattern: str) -> str:
    for old, new in ALIASES:
        if pattern.endswith(old):
            warnings.warn(f"{pattern!r}: the suffix {old!r} is an alias of {new!r} (attention probabilities are "
                          f"'{new[1:]}' in every family); use {pattern[: -len(old)] + new!r}", FutureWarning,
                          stacklevel=4)
            return pattern[: -len(old)] + new
    return pattern


def resolve(patterns: str | Iterable[str], valid: Iterable[str], where: str = "",
            valid_set: set[str] | frozenset[str] | None = None, arg: str = "names", ordered: bool = False) -> list[str]:
    """Expand names and globs (`lm.blocks.*.resid_post`) against `valid`; unknown names raise UnknownNameError.

    Glob hits come in natural order (`blocks.2` before `blocks.10`); `ordered`: `valid` is already in that order.
    """
    patterns = as_patterns(patterns, arg)
    valid_set = set(valid) if valid_set is None else valid_set
    if all(p in valid_set for p in patterns):  # the hot path: exact names
        return list(dict.fromkeys(patterns))
    valid = list(valid) if ordered else natural_sorted(valid)
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
            kind = "glob matching no hook point" if any(c in pat for c in "*?[") else "unknown hook point"
            raise UnknownNameError(f"{arg}: {kind} {pat!r}.{hint}{src} See lens.hook_points() for all of them.")
        out.extend(h for h in hits if h not in out)
    return out
