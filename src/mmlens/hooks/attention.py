"""Attention probabilities at the kernel, without eager attention.

Transformers 5 runs SDPA by default and then returns no attention weights; diffusers never returns them.
Both libraries hand q, k, v, the mask and the scale to one kernel function, so mmlens taps that call:

* transformers: for the duration of a `with` block, `ALL_ATTENTION_FUNCTIONS` maps the implementation
  key (`sdpa`, `eager`, `flash_attention_2`, ...) to a wrapper. Modules that are not hooked pass straight
  through to the original kernel.
* diffusers: the hooked `Attention` modules get a processor that calls their original processor with
  `F.scaled_dot_product_attention` (or, for the classic `AttnProcessor`, `get_attention_scores`)
  observed for the duration of that one call.

The probabilities are recomputed from the kernel's own q (after rotary / M-RoPE), k, mask and scale,
with grouped-query heads repeated, and only for the query rows and heads asked for. Under eager attention
the kernel's own weights are used as they are. A hook that returns new probabilities replaces the
kernel's output by `probs @ v` (attention knockout, steering of attention).
"""

from __future__ import annotations

import inspect
import sys
import types
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from .context import HookContext
from .sites import Site

Selection = Sequence[int] | torch.Tensor | slice | None


def repeat_kv(x: Float[Tensor, "b kv n d"], groups: int) -> Float[Tensor, "b h n d"]:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), as grouped-query attention shares k and v."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _index(sel: Selection, size: int, device) -> torch.Tensor | None:
    if sel is None:
        return None
    if isinstance(sel, slice):
        return torch.arange(size, device=device)[sel]
    return torch.as_tensor(sel, device=device, dtype=torch.long)


def attention_probs(
    q: Float[Tensor, "b h nq d"],
    k: Float[Tensor, "b kv nk d"],
    *,
    scale: float | None = None,
    mask: Tensor | None = None,
    is_causal: bool = False,
    rows: Selection = None,
    heads: Selection = None,
) -> Float[Tensor, "b h2 nq2 nk"]:
    """softmax(q k^T * scale + mask) for `q` (b, h, nq, d) and `k` (b, h_kv, nk, d) -> (b, h', nq', nk).

    `mask` is additive (float) or boolean (True = attend) and broadcasts to (b, h, nq, nk); `is_causal`
    applies the upper-left causal mask SDPA uses. `rows`/`heads` pick query positions and heads first, so
    memory is (b, len(heads), len(rows), nk) instead of the full map. Softmax runs in float32 and is cast
    back to q's dtype, as in the eager implementations.
    """
    groups = q.shape[1] // k.shape[1]
    k = repeat_kv(k, groups)
    nq, nk = q.shape[2], k.shape[2]
    hi, ri = _index(heads, q.shape[1], q.device), _index(rows, nq, q.device)
    if hi is not None:
        q, k = q[:, hi], k[:, hi]
    if ri is not None:
        q = q[:, :, ri]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        m = mask
        if m.dim() == 4:
            if hi is not None and m.shape[1] > 1:
                m = m[:, hi]
            if ri is not None and m.shape[2] > 1:
                m = m[:, :, ri]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, torch.finfo(scores.dtype).min)
        else:
            scores = scores + m
    elif is_causal and nq > 1:
        qpos = torch.arange(nq, device=q.device) if ri is None else ri
        allowed = torch.arange(nk, device=q.device)[None, :] <= qpos[:, None]
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)


class PatternHandler:
    """The hooks of one `attn.pattern`/`probs` site: user functions, then capture of the final value."""

    def __init__(self, site: Site, fns: list[Callable], context: Callable[[Site], HookContext],
                 rows: Selection = None, heads: Selection = None, enabled: Callable[[], bool] = lambda: True):
        self.site, self.fns, self.context = site, fns, context
        self.rows, self.heads, self.enabled = rows, heads, enabled
        self.pending: list[torch.Tensor] = []

    @property
    def selective(self) -> bool:
        return self.rows is not None or self.heads is not None

    def fire(self, probs: torch.Tensor) -> torch.Tensor | None:
        """Run the hooks on `probs`; return the edited probabilities, or None when nothing edited them."""
        edited = None
        ctx = self.context(self.site)
        for fn in self.fns:
            out = fn(probs if edited is None else edited, ctx)
            if out is not None:
                if self.selective:
                    raise ValueError(
                        f"hook on {self.site.name!r} edited attention probabilities computed for a subset of rows or "
                        "heads; edits need the full map (drop attn_rows/attn_heads)"
                    )
                if out.shape != probs.shape:
                    raise ValueError(f"hook on {self.site.name!r} returned shape {tuple(out.shape)}; expected {tuple(probs.shape)}")
                edited = out
        return edited

    def select(self, weights: torch.Tensor) -> torch.Tensor:
        if self.heads is not None:
            weights = weights[:, _index(self.heads, weights.shape[1], weights.device)]
        if self.rows is not None:
            weights = weights[:, :, _index(self.rows, weights.shape[2], weights.device)]
        return weights


def _apply(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output (b, h, nq, d) for given probabilities and values."""
    return torch.matmul(probs.to(v.dtype), repeat_kv(v, probs.shape[1] // v.shape[1]))


# ----------------------------------------------------------------------------------------------- transformers
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


def _eager_of(module) -> Callable:
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise NotImplementedError(
            f"{type(module).__name__} defines no module-level eager_attention_forward; cannot tap its eager attention"
        )
    return fn


class HFAttentionTap:
    """Route the transformers attention interface of hooked modules through `PatternHandler`s."""

    def __init__(self, handlers: dict[int, PatternHandler], modules: list[torch.nn.Module]):
        self.handlers = handlers
        keys = set()
        for m in modules:
            cfg = getattr(m, "config", None)
            keys.add(getattr(cfg, "_attn_implementation", None) or "eager")
        self.keys = sorted(keys)
        self._saved: dict[str, object] = {}

    def __enter__(self):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as table

        missing = object()
        for key in self.keys:
            prev = table._local_mapping.get(key, missing)
            self._saved[key] = prev
            base = None if prev is missing else prev
            if base is None and key != "eager":
                base = table._global_mapping.get(key)
                if base is None:
                    raise NotImplementedError(f"attention implementation {key!r} is not registered in transformers")
            table._local_mapping[key] = self._wrapper(key, base)
        self._missing = missing
        return self

    def __exit__(self, *exc):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as table

        for key, prev in self._saved.items():
            if prev is self._missing:
                table._local_mapping.pop(key, None)
            else:
                table._local_mapping[key] = prev
        self._saved.clear()
        return False

    def _wrapper(self, key: str, base: Callable | None):
        handlers = self.handlers

        def tapped(module, query, key_states, value, attention_mask, *args, **kwargs):
            kernel = base if base is not None else _eager_of(module)
            h = handlers.get(id(module))
            if h is None or not h.enabled():
                return kernel(module, query, key_states, value, attention_mask, *args, **kwargs)
            if key == "eager":
                out, weights = kernel(module, query, key_states, value, attention_mask, *args, **kwargs)
                edited = h.fire(h.select(weights))
                if edited is None:
                    h.pending.append(h.select(weights))
                    return out, weights
            else:
                bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
                if bad:
                    raise NotImplementedError(
                        f"{h.site.name}: recomputing attention with {bad} is not supported under {key!r}; "
                        "load the model with attn_implementation='eager'"
                    )
                is_causal = kwargs.get("is_causal")
                is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
                probs = attention_probs(
                    query, key_states, scale=kwargs.get("scaling"), mask=attention_mask,
                    is_causal=bool(is_causal) and attention_mask is None, rows=h.rows, heads=h.heads,
                )
                edited = h.fire(probs)
                if edited is None:
                    h.pending.append(probs)
                    return kernel(module, query, key_states, value, attention_mask, *args, **kwargs)
            h.pending.append(edited)
            return _apply(edited, value).transpose(1, 2).contiguous(), edited

        return tapped


# -------------------------------------------------------------------------------------------------- diffusers
class _FunctionalProxy(types.ModuleType):
    """`torch.nn.functional` with `scaled_dot_product_attention` observed, for one processor call."""

    def __init__(self, sdpa: Callable):
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name):
        return getattr(F, name)


class _TapProcessor:
    def __init__(self, orig, handler: PatternHandler):
        self.orig, self.handler = orig, handler

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        h = self.handler
        probs = attention_probs(query, key, scale=scale, mask=attn_mask, is_causal=is_causal, rows=h.rows, heads=h.heads)
        edited = h.fire(probs)
        h.pending.append(probs if edited is None else edited)
        if edited is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, **kw)
        return _apply(edited, value)

    def __call__(self, attn, *args, **kwargs):
        if not self.handler.enabled():
            return self.orig(attn, *args, **kwargs)
        g = getattr(type(self.orig).__call__, "__globals__", {})
        patch_f = g.get("F") is F
        if not patch_f and not hasattr(attn, "get_attention_scores"):
            raise NotImplementedError(
                f"{self.handler.site.name}: cannot tap attention probabilities of processor {type(self.orig).__name__}; "
                "supported: processors that call F.scaled_dot_product_attention (AttnProcessor2_0, "
                "JointAttnProcessor2_0, ...) or attn.get_attention_scores (the classic AttnProcessor)"
            )
        # Observe both kernels a processor may use; only the one it calls records anything.
        orig_scores = attn.get_attention_scores
        attn.get_attention_scores = self._scores(attn, orig_scores)
        if patch_f:
            g["F"] = _FunctionalProxy(self._sdpa)
        try:
            return self.orig(attn, *args, **kwargs)
        finally:
            if patch_f:
                g["F"] = F
            del attn.get_attention_scores

    def _scores(self, attn, orig_scores):
        """The classic processor computes probabilities with `attn.get_attention_scores` (batch*heads, q, k)."""
        h = self.handler

        def scores(query, key, attention_mask=None):
            probs = orig_scores(query, key, attention_mask)
            probs4 = probs.unflatten(0, (probs.shape[0] // attn.heads, attn.heads))
            edited = h.fire(h.select(probs4))
            h.pending.append(h.select(probs4) if edited is None else edited)
            return probs if edited is None else edited.flatten(0, 1).to(probs.dtype)

        return scores


def tap_processor(orig, handler: PatternHandler):
    """A processor object that behaves as `orig` (same call signature) and feeds `handler`."""
    cls = type(f"Tapped{type(orig).__name__}", (_TapProcessor,), {})
    call = lambda self, attn, *a, **k: _TapProcessor.__call__(self, attn, *a, **k)  # noqa: E731
    call.__signature__ = inspect.signature(type(orig).__call__)
    cls.__call__ = call
    return cls(orig, handler)


def flush(handler: PatternHandler) -> torch.Tensor | None:
    """Join what one module forward produced (several kernel calls, e.g. per image in Qwen2-VL's ViT)."""
    parts, handler.pending = handler.pending, []
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    nq = max(p.shape[-2] for p in parts)
    nk = max(p.shape[-1] for p in parts)
    parts = [F.pad(p, (0, nk - p.shape[-1], 0, nq - p.shape[-2])) for p in parts]
    return torch.cat(parts, dim=0)
