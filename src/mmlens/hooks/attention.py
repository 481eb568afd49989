"""Attention probabilities at the kernel, without eager attention.

Transformers 5 runs SDPA by default and then returns no attention weights; diffusers never returns them.
Both libraries hand q, k, v, the mask and the scale to one kernel function, so mmlens taps that call:

* transformers: while any session needs it, `ALL_ATTENTION_FUNCTIONS` hands out one process-wide dispatcher
  per implementation (`sdpa`, flash, ...: their table entry; eager: through `get_interface`, around the eager
  function the model itself passes). It looks the calling module up in a registry of handlers, so modules
  nobody hooked (another model, another thread's model) run their own kernel unchanged. The table is a global:
  its entry is installed by the first session and restored by identity by the last, under a lock.
* diffusers: a hooked `Attention` module gets one tap processor that calls its original processor; while that
  call runs, a thread-local `TorchFunctionMode` observes `F.scaled_dot_product_attention` (no module global is
  swapped, so other threads and other pipelines never see it), and the classic `AttnProcessor`'s
  `attn.get_attention_scores` is wrapped on that one module. Nested sessions share the tap.

The probabilities are recomputed from the kernel's own q (after rotary / M-RoPE), k, mask and scale,
with grouped-query heads repeated, and only for the query rows and heads asked for. Under eager attention
the kernel's own weights are used as they are. A hook that returns new probabilities replaces the
kernel's output by `probs @ v` (attention knockout, steering of attention). With gradients on, the output keeps
the kernel's values and takes the gradient of `probs @ v`, so gradients reach the recorded probabilities.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .context import HookContext
from .sites import Site
from .values import check_returned

Selection = Sequence[int] | torch.Tensor | slice | None
SELECTION_HELP = "a list or 1-D tensor of ints (negative counts from the end), a 1-D bool mask, a slice, or None"


def check_selection(sel, arg: str):
    """Validate `attn_rows`/`attn_heads` at the boundary; returns None, a slice, or a 1-D long/bool tensor."""
    if sel is None or isinstance(sel, slice):
        return sel
    if isinstance(sel, (bool, int, float)) or (isinstance(sel, torch.Tensor) and sel.dim() == 0):
        raise TypeError(f"{arg} must be {SELECTION_HELP}; got the scalar {sel!r} (write [{sel!r}] for one index)")
    if hasattr(sel, "__array__") and not isinstance(sel, torch.Tensor):  # numpy arrays
        sel = torch.as_tensor(sel)
    if not isinstance(sel, torch.Tensor):
        if isinstance(sel, (str, bytes)) or not isinstance(sel, (Sequence, range)):
            raise TypeError(f"{arg} must be {SELECTION_HELP}; got {type(sel).__name__}")
        items = list(sel)
        if items and all(isinstance(x, bool) for x in items):
            sel = torch.tensor(items, dtype=torch.bool)
        else:
            bad = [x for x in items if isinstance(x, bool) or not hasattr(x, "__index__")]
            if bad:
                raise TypeError(f"{arg} must be {SELECTION_HELP}; it holds {type(bad[0]).__name__} {bad[0]!r}")
            sel = torch.tensor([int(x) for x in items], dtype=torch.long)
    if sel.dim() != 1:
        raise ValueError(f"{arg} must be one-dimensional (the same positions in every batch row); got shape "
                         f"{tuple(sel.shape)}")
    if sel.dtype == torch.bool:
        return sel
    if sel.is_floating_point() or sel.is_complex():
        raise TypeError(f"{arg} must be {SELECTION_HELP}; got a {sel.dtype} tensor")
    if sel.numel() == 0:
        raise ValueError(f"{arg} selects nothing (an empty list); pass None for all of them")
    return sel.long()


def resolve_index(sel, size: int, device, arg: str = "index", where: str = "") -> torch.Tensor | None:
    """A validated selection as concrete indices into a dimension of `size` (negatives wrap, as in Python)."""
    if sel is None:
        return None
    at = f" at {where}" if where else ""
    if isinstance(sel, slice):
        idx = torch.arange(size, device=device)[sel]
        if idx.numel() == 0:
            raise ValueError(f"{arg} {sel} selects nothing of the {size}{at}; allowed: {SELECTION_HELP} that "
                             "selects at least one")
        return idx
    sel = check_selection(sel, arg) if not isinstance(sel, torch.Tensor) else sel
    if sel.dtype == torch.bool:
        if sel.numel() != size:
            raise ValueError(f"{arg} is a bool mask of length {sel.numel()}; it must have length {size}{at}")
        idx = sel.nonzero().flatten()
        if idx.numel() == 0:
            raise ValueError(f"{arg} mask selects nothing{at}; allowed: a mask with at least one True, or "
                             f"{SELECTION_HELP}")
        return idx.to(device)
    lo, hi = int(sel.min()), int(sel.max())
    if lo < -size or hi >= size:
        bad = lo if lo < -size else hi
        raise ValueError(f"{arg} index {bad} is out of range for {size} entries{at} (allowed: {-size} to {size - 1})")
    return (sel % size).to(device)


def repeat_kv(x: Float[Tensor, "b kv n d"], groups: int) -> Float[Tensor, "b h n d"]:
    """(b, kv_heads, n, d) -> (b, kv_heads * groups, n, d), as grouped-query attention shares k and v."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _probs(q, k, scale, mask, is_causal, hi, ri):
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    nq, nk = q.shape[2], k.shape[2]
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
    applies the upper-left causal mask SDPA uses. `rows`/`heads` pick query positions and heads first (negative
    indices count from the end), so memory is (b, len(heads), len(rows), nk) instead of the full map. Softmax
    runs in float32 and is cast back to q's dtype, as in the eager implementations.
    """
    hi = resolve_index(check_selection(heads, "heads"), q.shape[1], q.device, "heads")
    ri = resolve_index(check_selection(rows, "rows"), q.shape[2], q.device, "rows")
    return _probs(q, k, scale, mask, is_causal, hi, ri)


class PatternHandler:
    """The hooks of one `*.pattern` site in one session: user functions, then the values its captures will see."""

    def __init__(self, site: Site, fns: list[Callable], context: Callable[[Site], HookContext],
                 rows: Selection = None, heads: Selection = None, enabled: Callable[[], bool] = lambda: True):
        self.site, self.fns, self.context = site, fns, context
        self.rows, self.heads = check_selection(rows, "attn_rows"), check_selection(heads, "attn_heads")
        self.enabled = enabled
        self.pending: list[torch.Tensor] = []

    @property
    def selective(self) -> bool:
        return self.rows is not None or self.heads is not None

    def indices(self, n_heads: int, n_rows: int, device=None) -> tuple[Tensor | None, Tensor | None]:
        return (resolve_index(self.heads, n_heads, device, "attn_heads", self.site.name),
                resolve_index(self.rows, n_rows, device, "attn_rows", self.site.name))

    def select(self, weights: torch.Tensor) -> torch.Tensor:
        return _pick(weights, *self.indices(weights.shape[1], weights.shape[2], weights.device))

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
                edited = check_returned(self.site, out, probs)
        return edited


def fire_handlers(handlers: list[PatternHandler], probs_for: ProbsFor) -> tuple[Tensor | None, Tensor | None]:
    """Feed every active handler of one kernel call; returns (edited probabilities or None, full map or None).

    One handler gets exactly its selection (memory); several (nested sessions) share one full map, each reading
    its own selection, and their edits chain in session order.
    """
    if len(handlers) == 1 and handlers[0].selective:
        h = handlers[0]
        probs = probs_for(*h.indices(*probs_for.sizes))
        edited = h.fire(probs)
        h.pending.append(probs if edited is None else edited)
        return edited, None
    full = probs_for(None, None)
    edited = None
    for h in handlers:
        view = h.select(full if edited is None else edited)
        out = h.fire(view)
        if out is not None:
            edited = out
        h.pending.append(view if out is None else out)
    return edited, full


class ProbsFor:
    """`fn(head_idx, row_idx)` -> probabilities for those heads/rows (None: all), with the sizes and device the
    handlers' selections are resolved against."""

    def __init__(self, fn: Callable, n_heads: int, n_rows: int, device):
        self.fn, self.sizes = fn, (n_heads, n_rows, device)

    def __call__(self, hi, ri):
        return self.fn(hi, ri)


def _wants_graph(q: Tensor) -> bool:
    """With gradients on, the output is routed through the full recorded map so gradients reach it."""
    return torch.is_grad_enabled() and q.requires_grad


def _through(kernel_out: Tensor, pv: Tensor) -> Tensor:
    """The kernel's output values, exactly, with the gradient of `pv = probs @ v` only: forward stays the kernel's
    (also on fully masked padding rows, where `probs @ v` differs), backward reaches q, k, v once, through the
    recorded probabilities."""
    pv = pv.to(kernel_out.dtype)
    return kernel_out.detach() + (pv - pv.detach())


def _apply(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention output (b, h, nq, d) for given probabilities and values."""
    return torch.matmul(probs.to(v.dtype), repeat_kv(v, probs.shape[1] // v.shape[1]))


# ----------------------------------------------------------------------------------------------- transformers
_UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias", "sliding_window")


def attn_impl(module) -> str:
    """The attention implementation a transformers module dispatches on (`sdpa`, `eager`, ...)."""
    cfg = getattr(module, "config", None)
    return getattr(cfg, "_attn_implementation", None) or "eager"


def _table():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


class _KernelTable:
    """Process-wide registry: which transformers attention modules are tapped, by which handlers.

    Non-eager implementations (`sdpa`, flash, ...) have an `ALL_ATTENTION_FUNCTIONS` entry, which holds a
    dispatcher while any session taps a module using it. Eager has no entry: each model passes its own eager
    function as `get_interface`'s default, so while eager modules are tapped the table's `get_interface` hands back
    a dispatcher around that default. Both are installed by the first user and restored by identity by the last.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.handlers: dict[torch.nn.Module, list[PatternHandler]] = {}
        self.users: dict[str, int] = {}
        self.installed: dict[str, tuple[Callable, object]] = {}  # impl -> (what mmlens installed, what it replaced)
        self._eager: dict[Callable, Callable] = {}  # a model's eager function -> its dispatcher

    def add(self, module: torch.nn.Module, handler: PatternHandler) -> None:
        impl = attn_impl(module)
        with self.lock:
            if self.users.get(impl, 0) == 0:
                self.installed[impl] = self._install_eager() if impl == "eager" else self._install(impl)
            self.users[impl] = self.users.get(impl, 0) + 1
            handler.kernel_key = impl  # removal undoes exactly this, even if the model's implementation changes
            self.handlers = {**self.handlers, module: [*self.handlers.get(module, []), handler]}  # copy-on-write

    def remove(self, module: torch.nn.Module, handler: PatternHandler) -> None:
        impl, table = handler.kernel_key, _table()
        with self.lock:
            rest = [h for h in self.handlers.get(module, []) if h is not handler]
            self.handlers = {**{m: hs for m, hs in self.handlers.items() if m is not module}, **({module: rest} if rest else {})}
            self.users[impl] -= 1
            if self.users[impl]:
                return
            installed, prev = self.installed.pop(impl)
            if impl == "eager":
                owner, name = table.__dict__, "get_interface"
            else:
                owner, name = table._local_mapping, impl
            if owner.get(name) is installed:  # someone replaced it since: leave theirs
                if prev is _MISSING:
                    owner.pop(name, None)
                else:
                    owner[name] = prev

    def _install(self, impl: str) -> tuple[Callable, object]:
        table = _table()
        prev = table._local_mapping.get(impl, _MISSING)
        base = table._global_mapping.get(impl) if prev is _MISSING else prev
        if base is None:
            raise NotImplementedError(f"attention implementation {impl!r} is not registered in transformers")
        dispatcher = self.dispatcher(impl, base)
        table._local_mapping[impl] = dispatcher
        return dispatcher, prev

    def _install_eager(self) -> tuple[Callable, object]:
        table = _table()
        prev = table.__dict__.get("get_interface", _MISSING)
        original = table.get_interface

        def get_interface(attn_implementation, default):
            fn = original(attn_implementation, default)
            if fn is not default or attn_implementation not in (None, "eager"):
                return fn
            if default not in self._eager:
                self._eager[default] = self.dispatcher("eager", default)
            return self._eager[default]

        table.get_interface = get_interface
        return get_interface, prev

    def dispatcher(self, impl: str, kernel: Callable) -> Callable:
        """The attention function for `impl`: modules without an active handler go straight to `kernel`."""
        registry = self

        def mmlens_attention(module, query, key, value, attention_mask, *args, **kwargs):
            handlers = [h for h in registry.handlers.get(module, ()) if h.enabled()]
            if not handlers:
                return kernel(module, query, key, value, attention_mask, *args, **kwargs)
            return _tapped(impl, kernel, handlers, module, query, key, value, attention_mask, args, kwargs)

        return mmlens_attention


def _tapped(impl, kernel, handlers, module, query, key, value, attention_mask, args, kwargs):
    """One kernel call of a tapped module: probabilities to the handlers, edits back into the output."""
    nh, nq, dev = query.shape[1], query.shape[2], query.device
    if impl == "eager":
        out, weights = kernel(module, query, key, value, attention_mask, *args, **kwargs)
        edited, _ = fire_handlers(handlers, ProbsFor(lambda hi, ri: _pick(weights, hi, ri), nh, nq, dev))
        if edited is None:
            return out, weights
    else:
        bad = [k for k in _UNSUPPORTED_KWARGS if kwargs.get(k) is not None]
        if bad:
            raise NotImplementedError(
                f"{handlers[0].site.name}: recomputing attention with {bad} is not supported under {impl!r}; "
                "load the model with attn_implementation='eager'"
            )
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        causal = bool(is_causal) and attention_mask is None
        scale = kwargs.get("scaling")
        fn = lambda hi, ri: _probs(query, key, scale, attention_mask, causal, hi, ri)  # noqa: E731
        edited, full = fire_handlers(handlers, ProbsFor(fn, nh, nq, dev))
        if edited is None:
            out, weights = kernel(module, query, key, value, attention_mask, *args, **kwargs)
            if full is not None and _wants_graph(query):
                out = _through(out, _apply(full, value).transpose(1, 2))
            return out, weights
    return _apply(edited, value).transpose(1, 2).contiguous(), edited


def _pick(weights, hi, ri):
    """Heads `hi`, then query rows `ri`, of a (b, h, nq, nk) map (None: all)."""
    if hi is not None:
        weights = weights[:, hi]
    if ri is not None:
        weights = weights[:, :, ri]
    return weights


_MISSING = object()
KERNELS = _KernelTable()


# -------------------------------------------------------------------------------------------------- diffusers
class _ObserveSDPA(TorchFunctionMode):
    """Thread-local: sees every `F.scaled_dot_product_attention` issued while one tapped processor runs."""

    def __init__(self, handlers: list[PatternHandler]):
        super().__init__()
        self.handlers, self.fired = handlers, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.fired += 1
        sig = _SDPA_SIGNATURE.bind(*args, **kwargs)
        sig.apply_defaults()
        a = sig.arguments
        q, k, v = a["query"], a["key"], a["value"]
        fn = lambda hi, ri: _probs(q, k, a["scale"], a["attn_mask"], a["is_causal"], hi, ri)  # noqa: E731
        edited, full = fire_handlers(self.handlers, ProbsFor(fn, q.shape[1], q.shape[2], q.device))
        if edited is None:
            out = func(*args, **kwargs)
            return _through(out, _apply(full, v)) if full is not None and _wants_graph(q) else out
        return _apply(edited, v)


def _sdpa_signature(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """The argument names of F.scaled_dot_product_attention (a builtin without an inspectable signature)."""


_SDPA_SIGNATURE = inspect.signature(_sdpa_signature)


class _TapProcessor:
    """Installed as `attn.processor` while any session taps that module; calls the original processor."""

    def __init__(self, orig):
        self.orig = orig
        self.handlers: list[PatternHandler] = []

    def __call__(self, attn, *args, **kwargs):
        handlers = [h for h in self.handlers if h.enabled()]
        if not handlers:
            return self.orig(attn, *args, **kwargs)
        observer = _ObserveSDPA(handlers)
        own = attn.__dict__.get("get_attention_scores", _MISSING)
        attn.get_attention_scores = self._scores(attn, handlers, observer)
        try:
            with observer:
                out = self.orig(attn, *args, **kwargs)
        finally:
            if own is _MISSING:
                attn.__dict__.pop("get_attention_scores", None)
            else:
                attn.get_attention_scores = own
        if not observer.fired:
            raise NotImplementedError(
                f"{handlers[0].site.name}: processor {type(self.orig).__name__} computed attention without "
                "F.scaled_dot_product_attention or attn.get_attention_scores, so its probabilities cannot be observed; "
                "supported: AttnProcessor2_0, JointAttnProcessor2_0, the classic AttnProcessor and others built on them"
            )
        return out

    @staticmethod
    def _scores(attn, handlers, observer):
        """The classic processor computes probabilities with `attn.get_attention_scores` (batch*heads, q, k)."""
        orig_scores = type(attn).get_attention_scores.__get__(attn)

        def scores(query, key, attention_mask=None):
            observer.fired += 1
            probs = orig_scores(query, key, attention_mask)
            probs4 = probs.unflatten(0, (probs.shape[0] // attn.heads, attn.heads))
            edited, _ = fire_handlers(handlers, ProbsFor(lambda hi, ri: _pick(probs4, hi, ri), attn.heads,
                                                         probs4.shape[2], probs4.device))
            return probs if edited is None else edited.flatten(0, 1).to(probs.dtype)

        return scores


_TAP_LOCK = threading.Lock()


_TAP_CLASSES: dict[type, type] = {}


def _tap_class(proc_type: type) -> type:
    """A _TapProcessor subclass whose __call__ has the original's signature (diffusers filters kwargs by it)."""
    cls = _TAP_CLASSES.get(proc_type)
    if cls is None:
        cls = type(f"Tapped{proc_type.__name__}", (_TapProcessor,), {})
        call = lambda self, attn, *a, **k: _TapProcessor.__call__(self, attn, *a, **k)  # noqa: E731
        call.__signature__ = inspect.signature(proc_type.__call__)
        cls.__call__ = call
        _TAP_CLASSES[proc_type] = cls
    return cls


def tap_module(module, handler: PatternHandler) -> None:
    """Add `handler` to the module's tap processor, installing one if needed (through `set_processor`, which
    also handles processors that are nn.Modules: IP-Adapter, custom diffusion)."""
    with _TAP_LOCK:
        tap = module.processor
        if not isinstance(tap, _TapProcessor):
            tap = _tap_class(type(tap))(tap)
            module.set_processor(tap)
        tap.handlers = [*tap.handlers, handler]  # copy-on-write: a running call keeps its list
        handler.tap = tap


def untap_module(module, handler: PatternHandler) -> None:
    """Remove `handler`; the last one out restores the original processor, unless the user replaced the tap."""
    with _TAP_LOCK:
        tap = handler.tap
        tap.handlers = [h for h in tap.handlers if h is not handler]
        if not tap.handlers and module.processor is tap:
            module.set_processor(tap.orig)


def is_diffusers_attention(module: torch.nn.Module) -> bool:
    return hasattr(module, "processor") and hasattr(module, "set_processor")


def flush(handler: PatternHandler) -> torch.Tensor | None:
    """Join what one module forward produced (several kernel calls, e.g. per image in Qwen2-VL's ViT)."""
    parts, handler.pending = handler.pending, []
    if not parts:
        return None
    return join_calls(parts)


def join_calls(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-call maps (calls_i, ..., q_i, k_i) -> one map along dim 0, each zero-padded to the largest q and k."""
    if len(parts) == 1:
        return parts[0]
    nq = max(p.shape[-2] for p in parts)
    nk = max(p.shape[-1] for p in parts)
    return torch.cat([F.pad(p, (0, nk - p.shape[-1], 0, nq - p.shape[-2])) for p in parts], dim=0)
