"""Reading a site's tensor out of a module's inputs/outputs and writing an edited one back.

The view a user sees (heads split, a slice of a fused qkv) is undone before the tensor goes back into
the model, so an edit through a canonical name is exactly an edit of the module's real tensor.
"""

from __future__ import annotations

from typing import Any

import torch

from .sites import Site


def check_returned(site: Site, out: Any, like: torch.Tensor) -> torch.Tensor:
    """A hook's return value, checked against the value it was given and cast to that value's dtype and device,
    so later hooks, captures and the model all see what the model will use."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"hook on {site.name!r} returned {type(out).__name__}; a hook returns None (no edit) or a "
                        f"torch.Tensor of the shape it received, {tuple(like.shape)}")
    if out.shape != like.shape:
        raise ValueError(f"hook on {site.name!r} returned shape {tuple(out.shape)}; it must keep the shape it "
                         f"received, {tuple(like.shape)}")
    if out.dtype != like.dtype or out.device != like.device:
        out = out.to(device=like.device, dtype=like.dtype)
    return out


def is_view(site: Site) -> bool:
    """The canonical value is a reshaped or sliced view of the module's tensor (heads split, fused qkv part)."""
    return site.row.heads or site.row.part is not None


def to_view(site: Site, t: torch.Tensor) -> torch.Tensor:
    row = site.row
    if row.part is not None:
        k, n = row.part
        t = t.chunk(n, dim=-1)[k]
    if row.heads:
        t = t.unflatten(-1, (-1, site.head_dim))
    return t


def from_view(site: Site, new: torch.Tensor, old_full: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_view`: `new` in view layout back into the layout of `old_full`."""
    row = site.row
    if row.heads:
        new = new.flatten(-2)
    if row.part is not None:
        k, n = row.part
        chunks = list(old_full.chunk(n, dim=-1))
        chunks[k] = new.to(old_full.dtype)
        new = torch.cat(chunks, dim=-1)
    if new.shape != old_full.shape:
        raise ValueError(
            f"hook on {site.name!r} returned shape {tuple(new.shape)}; it must keep the shape it received"
        )
    return new.to(device=old_full.device, dtype=old_full.dtype)


def _key(output: Any, pick: int | str | None) -> int | str:
    """ModelOutputs are dicts that also index by position; write back through their field names."""
    if hasattr(output, "to_tuple") and not isinstance(pick, str):
        return list(output.keys())[pick or 0]
    return pick


def get_output(site: Site, output: Any) -> torch.Tensor:
    pick = _key(output, site.row.pick)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(pick, str):
        return output[pick]
    if isinstance(output, (tuple, list)):
        return output[pick or 0]
    raise TypeError(f"{site.name!r}: cannot read a tensor from a {type(output).__name__} output of {site.path!r}")


def set_output(site: Site, output: Any, new: torch.Tensor) -> Any:
    pick = _key(output, site.row.pick)
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(pick, str):
        output[pick] = new  # ModelOutput / dict: in place keeps its class
        return output
    items = list(output)
    items[pick or 0] = new
    return type(output)(items) if isinstance(output, tuple) and type(output) is tuple else items


def get_input(site: Site, args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"{site.name!r}: {site.path!r} was called without a tensor input")


def set_input(site: Site, args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if isinstance(v, torch.Tensor))
    return args, {**kwargs, key: new}
