"""Run a block stack from layer l on many edited rows, reusing a reference run (the patch engine's fast path).

A patch at layer l leaves everything below l as it was in the reference (corrupt) run, and in a causal LM a patch
at position p leaves every position before p unchanged at every layer. So instead of one full forward per patch,
the engine records one reference run (each block's input, the keyword arguments the model passed to its blocks,
and the keys/values its attention cached), then calls blocks l, l+1, ... itself on the patched rows only, on the
positions from p on, with the reference's keys/values for the positions before p. The blocks are the model's own
modules called as the model calls them, so every hook on them fires and nothing is re-implemented; what changes is
only how much is recomputed. Replays whose blocks take arguments this module does not know how to slice refuse
(`NotReplayable`) and the caller falls back to full batched forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


class NotReplayable(Exception):
    """This stack cannot be replayed from a reference run (the caller runs full forwards instead)."""


@dataclass
class Stack:
    """A lens's block stack (`lm` of a generative VLM, `vision` of a contrastive model) and its read-out."""

    prefix: str
    paths: list[str]
    modules: list[torch.nn.Module]
    causal: bool

    @classmethod
    def of(cls, lens) -> Stack | None:
        prefix = {"generative": "lm", "contrastive": "vision"}.get(lens.family)
        if prefix is None:
            return None
        n = len(lens.hook_points(f"{prefix}.blocks.*.resid_pre")) if f"{prefix}.blocks.0.resid_pre" in lens.sites else 0
        if n == 0:
            return None
        paths = [lens.sites[f"{prefix}.blocks.{i}.resid_pre"].path for i in range(n)]
        mods = [lens.model.get_submodule(p) for p in paths]
        return cls(prefix, paths, mods, causal=lens.family == "generative")

    def layer_of(self, lens, name: str) -> int | None:
        """The block a hook point lives in (None: outside the stack, e.g. the vision tower of a VLM)."""
        path = lens.sites[name].path
        for i, p in enumerate(self.paths):
            if path == p or path.startswith(p + "."):
                return i
        return None


@dataclass
class Reference:
    """One recorded run: each block's input (batch, seq, d), its keyword arguments, the attention keys/values
    ((batch, kv_heads, seq, d_head) per block, None where not cached in full) and the model output."""

    hidden: list[Tensor]
    kwargs: list[dict]
    kv: list[tuple[Tensor, Tensor]] | None
    output: Any
    causal: bool

    @property
    def batch(self) -> int:
        return self.hidden[0].shape[0]

    @property
    def seq(self) -> int:
        return self.hidden[0].shape[1]


def record(lens, stack: Stack, inputs: dict, hooks: dict | None = None) -> Reference:
    """The reference forward under `hooks`, recording every block's input as the block received it (after the
    hooks' edits) and its keyword arguments; in causal stacks the attention cache is requested to reuse keys/values."""
    hidden: list[Tensor | None] = [None] * len(stack.modules)
    kwargs: list[dict | None] = [None] * len(stack.modules)
    handles = []

    def rec(i):
        def pre(module, args, kw):
            if len(args) != 1:
                hidden[i] = None  # an unknown calling convention: refuse the replay below
                return None
            hidden[i], kwargs[i] = args[0].detach(), dict(kw)
            return None
        return pre

    extra = {"use_cache": True} if stack.causal and _accepts(lens.model, "use_cache") else {}
    with torch.no_grad(), lens.hooks(hooks or {}):
        handles = [m.register_forward_pre_hook(rec(i), with_kwargs=True) for i, m in enumerate(stack.modules)]
        try:
            output = lens.model(**lens.prepare(inputs, where="patch"), **extra)
        finally:
            for h in handles:
                h.remove()
    if any(h is None for h in hidden):
        raise NotReplayable("a block was not called with exactly one positional argument")
    seq = hidden[0].shape[1]
    causal = stack.causal and all(_is_causal(kw.get("attention_mask"), seq) for kw in kwargs)
    return Reference(hidden, kwargs, _keys_values(kwargs, seq) if causal else None, output, causal)


def _is_causal(mask, seq: int) -> bool:
    """Whether no query attends to a later key: PaliGemma's prefix (image + prompt) attends both ways, so a patch
    there changes earlier positions too and their keys/values cannot be reused."""
    if mask is None:
        return True
    if not isinstance(mask, Tensor) or mask.dim() != 4 or mask.shape[-2:] != (seq, seq):
        return False
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    return not bool(allowed.triu(1).any())


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _keys_values(kwargs: list[dict], seq: int) -> list[tuple[Tensor, Tensor]] | None:
    """Each block's cached keys/values from the cache object the model passed to its blocks (transformers' Cache:
    one layer per block). None when a layer keeps less than every position (sliding windows) or no cache was used."""
    cache = kwargs[0].get("cache", kwargs[0].get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if layers is None or len(layers) < len(kwargs):
        return None
    out = []
    for layer in layers[: len(kwargs)]:
        k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(k, Tensor) or k.dim() != 4 or k.shape[-2] != seq or type(layer).__name__ != "DynamicLayer":
            return None
        out.append((k, v))
    return out


class PrefixKV:
    """Duck-typed transformers Cache for a replay: each attention layer's `cache.update(k, v, layer_idx)` gets the
    reference run's keys/values of positions [0, p0) (rows picked per replayed row) prepended to its own."""

    def __init__(self, kv: list[tuple[Tensor, Tensor]], rows: Tensor, p0: int):
        self.kv, self.rows, self.p0 = kv, rows, p0

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return tuple(torch.cat([self._prefix(ref).to(new.dtype), new], dim=-2)
                     for ref, new in zip(self.kv[layer_idx], (key, value)))

    def _prefix(self, t: Tensor) -> Tensor:
        t = t[..., : self.p0, :]
        return t.index_select(0, self.rows.to(t.device)) if t.shape[0] > 1 else t.expand(len(self.rows), -1, -1, -1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.p0


def _rows(t: Tensor, dim: int, rows: Tensor, batch: int) -> Tensor:
    """Pick the replayed rows along a batch dim of size `batch` (a size-1 dim broadcasts and stays)."""
    size = t.shape[dim]
    if size == 1:
        return t
    if size != batch:
        raise NotReplayable(f"a block argument has {size} rows along its batch dim; the reference batch is {batch}")
    return t.index_select(dim, rows.to(t.device))


def _attn_impl(module: torch.nn.Module) -> str:
    for m in module.modules():
        impl = getattr(getattr(m, "config", None), "_attn_implementation", None)
        if impl:
            return str(impl)
    return "sdpa"


def block_kwargs(ref: Reference, layer: int, module: torch.nn.Module, rows: Tensor, p0: int) -> dict:
    """Layer `layer`'s recorded keyword arguments for the replayed rows and positions [p0, seq)."""
    batch, seq = ref.batch, ref.seq
    out = {}
    for key, val in ref.kwargs[layer].items():
        if key in ("cache", "past_key_values"):
            out[key] = PrefixKV(ref.kv, rows, p0) if p0 else None
        elif key == "use_cache":
            out[key] = False
        elif key == "attention_mask":
            if val is None:
                if p0 and not _attn_impl(module).startswith("flash"):
                    q = torch.arange(p0, seq, device=ref.hidden[0].device)[:, None]
                    val = (torch.arange(seq, device=q.device)[None] <= q)[None, None]  # causal, offset by p0
                out[key] = val
            elif isinstance(val, Tensor) and val.dim() == 4:
                out[key] = _rows(val, 0, rows, batch)[:, :, p0:]
            elif isinstance(val, Tensor) and val.dim() == 2 and val.shape[-1] == seq:
                out[key] = _rows(val, 0, rows, batch)  # a padding mask over keys: every position stays a key
            else:
                raise NotReplayable(f"attention_mask of type {type(val).__name__}")
        elif key == "position_embeddings" and isinstance(val, (tuple, list)):
            out[key] = tuple(_rows(t, t.dim() - 3, rows, batch)[..., p0:, :] for t in val)
        elif key == "position_ids" and isinstance(val, Tensor):
            out[key] = _rows(val, val.dim() - 2, rows, batch)[..., p0:] if val.dim() >= 2 else val[p0:]
        elif key == "cache_position" and isinstance(val, Tensor):
            out[key] = val[p0:]
        elif isinstance(val, Tensor):
            raise NotReplayable(f"block argument {key!r} (a tensor) has no known slicing rule")
        else:
            out[key] = val
    return out


def run_from(lens, stack: Stack, ref: Reference, start: int, rows: Tensor, p0: int, hooks: dict) -> Tensor:
    """Blocks start.. of the stack on the reference's rows `rows` (positions p0..) with `hooks` live: the last
    block's output (len(rows), seq - p0, d)."""
    if p0 and ref.kv is None:
        raise NotReplayable("the reference run cached no keys/values to reuse")
    x = ref.hidden[start].index_select(0, rows.to(ref.hidden[start].device))[:, p0:]
    with lens.hooks(hooks), torch.no_grad():
        for layer in range(start, len(stack.modules)):
            module = stack.modules[layer]
            out = module(x, **block_kwargs(ref, layer, module, rows, p0))
            x = out[0] if isinstance(out, (tuple, list)) else out
    return x
