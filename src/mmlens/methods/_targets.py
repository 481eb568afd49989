"""Where a causal technique intervenes: position columns (shared positions, named regions, per-example masks) and
the sequence / head dimensions of a hook point's value, read from its layout in the adapter's name table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from jaxtyping import Bool
from torch import Tensor


def _mask_from(spec, batch: int, seq: int, label: str) -> Bool[Tensor, "batch seq"]:
    """One column's positions as a (batch, seq) bool mask: an int, a list of ints (every example), a list of lists
    (one per example), or a bool tensor (seq,) / (batch, seq). Negative ints count from the end."""
    where = f"positions[{label!r}]"
    if isinstance(spec, Tensor) and spec.dtype == torch.bool:
        m = spec.cpu()
        if m.shape == (seq,):
            m = m.expand(batch, seq)
        if m.shape != (batch, seq):
            raise ValueError(f"{where}: a bool mask must be (seq,) = ({seq},) or (batch, seq) = ({batch}, {seq}); "
                             f"got {tuple(m.shape)}")
        return m.clone()
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, range):
        spec = list(spec)
    if not isinstance(spec, Sequence) or isinstance(spec, str):
        raise TypeError(f"{where}: expected an int, a list of ints, a list of per-example lists or a bool mask; got "
                        f"{type(spec).__name__}")
    per_example = len(spec) > 0 and all(isinstance(s, (list, tuple, range, Tensor)) for s in spec)
    if per_example and len(spec) != batch:
        raise ValueError(f"{where}: {len(spec)} per-example position lists for a batch of {batch}")
    rows = [list(s.tolist() if isinstance(s, Tensor) else s) for s in spec] if per_example else [list(spec)] * batch
    m = torch.zeros(batch, seq, dtype=torch.bool)
    for b, pos in enumerate(rows):
        for p in pos:
            if not isinstance(p, int) or isinstance(p, bool):
                raise TypeError(f"{where}: positions must be ints; got {p!r:.40}")
            if not -seq <= p < seq:
                raise ValueError(f"{where}: position {p} is out of range for a sequence of {seq}")
            m[b, p] = True
    if not m.any():
        raise ValueError(f"{where} selects no position")
    return m


def columns(positions, batch: int, seq: int) -> tuple[list[str], list[Tensor | None]]:
    """`positions` -> (labels, masks): None is one column "all" (the whole activation, mask None); an int or a list
    of ints is one column per position; a dict is one column per named region; a bool tensor is one column."""
    if positions is None:
        return ["all"], [None]
    if isinstance(positions, Mapping):
        if not positions:
            raise ValueError("positions: an empty dict names no region")
        return [str(k) for k in positions], [_mask_from(v, batch, seq, str(k)) for k, v in positions.items()]
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        return ["mask"], [_mask_from(positions, batch, seq, "mask")]
    if isinstance(positions, (int, Tensor)):
        positions = torch.as_tensor(positions).reshape(-1).tolist()
    if isinstance(positions, (Sequence, range)) and not isinstance(positions, str):
        if not len(positions):
            raise ValueError("positions: an empty list selects nothing")
        if any(isinstance(p, (list, tuple, range, Tensor)) for p in positions):
            raise TypeError("positions: a list of lists is ambiguous (per example or per column?); give a dict of "
                            "named regions, each an int list or a list of per-example lists")
        return [str(p) for p in positions], [_mask_from(int(p), batch, seq, str(p)) for p in positions]
    raise TypeError(f"positions must be None, an int, a list of ints, a dict {{name: positions}} or a bool mask; got "
                    f"{type(positions).__name__}")


def is_flat(site) -> bool:
    """Values laid out (batch * seq, ...) (OPT's MLP): viewed as (batch, seq, ...) to index positions."""
    return (site.row.layout or "").startswith("(batch * seq")


def layout_dims(site) -> tuple[int | None, int | None]:
    """(sequence dim, head dim) of a site's value, from its documented layout: "(batch, seq, d_model)" -> (1, None),
    "(batch, heads, query, key)" -> (2, 1), "(batch, seq, heads, d_head)" -> (1, 2); None where absent. A flat
    "(batch * seq, d)" layout counts as (batch, seq, d): see `is_flat`."""
    if is_flat(site):
        return 1, None
    layout = (site.row.layout or "").split(":")[0].strip("() ")
    dims = [d.strip() for d in layout.split(",")]
    seq = next((i for i, d in enumerate(dims) if d == "seq" or any(w in d for w in ("quer", "token", "patch"))), None)
    head = next((i for i, d in enumerate(dims) if d == "heads"), None)
    return seq, head
