"""Register hooks for a set of sites on enter, remove every one of them on exit, also when the run raises."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import KERNELS, PatternHandler, flush, is_diffusers_attention, tap_module, untap_module
from .context import HookContext
from .sites import Site
from .values import check_returned, from_view, get_input, get_output, is_view, set_input, set_output, to_view

HookFn = Callable[[torch.Tensor, HookContext], torch.Tensor | None]


class HookSession:
    """Plain torch hooks on exactly the requested sites, like baukit's TraceDict.

    `fns[name]` run in order on the site's value (in its canonical view); one that returns a tensor replaces
    the value for the rest of the chain and for the model. `captures[name]` then see the final value once per
    module call. `enabled(site)` false makes that site's hooks a pass-through (diffusion step ranges).
    Sessions are independent: they may nest and exit in any order; each removes exactly what it added.
    """

    def __init__(
        self,
        sites: dict[str, Site],
        fns: dict[str, list[HookFn]],
        captures: dict[str, list[HookFn]] | None = None,
        *,
        context: Callable[[Site], HookContext] | None = None,
        enabled: Callable[[Site], bool] | None = None,
        attn_rows=None,
        attn_heads=None,
    ):
        self.sites = sites
        self.fns = fns
        self.captures = captures or {}
        self.context = context or (lambda s: HookContext(s.name, s.path))
        self.enabled = enabled or (lambda site: True)
        self.attn_rows, self.attn_heads = attn_rows, attn_heads
        self._handles: list = []
        self._restore: list[Callable[[], None]] = []
        self._entered = False

    # -------------------------------------------------------------------------------------------------- plumbing
    def __enter__(self) -> HookSession:
        if self._entered:
            raise RuntimeError("a HookSession cannot be entered twice")
        self._entered = True
        try:
            self._register()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _remove(self) -> None:
        """Undo everything, each step even if an earlier one raised (the first error is raised at the end)."""
        steps = [h.remove for h in reversed(self._handles)] + list(reversed(self._restore))
        self._handles.clear()
        self._restore.clear()
        error = None
        for undo in steps:
            try:
                undo()
            except BaseException as e:  # noqa: BLE001  keep undoing; report the first failure
                error = error or e
        if error is not None:
            raise error

    def _run_chain(self, site: Site, value: torch.Tensor) -> torch.Tensor | None:
        ctx = self.context(site)
        new = None
        for fn in self.fns.get(site.name, ()):
            out = fn(value if new is None else new, ctx)
            if out is not None:
                new = check_returned(site, out, value)
        if new is None and is_view(site) and torch.is_grad_enabled() and value.requires_grad:
            new = value  # the model goes on from the view the hooks saw, so gradients reach it
        for fn in self.captures.get(site.name, ()):
            fn(value if new is None else new, ctx)
        return new

    # ------------------------------------------------------------------------------------------------ per kind
    def _register(self) -> None:
        for name in dict.fromkeys([*self.fns, *self.captures]):
            site = self.sites[name]
            if site.row.read == "out":
                self._handles.append(site.module.register_forward_hook(self._out_hook(site), with_kwargs=True))
                _recorders_last(site.module)
            elif site.row.read == "in":
                self._handles.append(site.module.register_forward_pre_hook(self._in_hook(site), with_kwargs=True))
            else:
                self._register_pattern(site)

    def _out_hook(self, site: Site):
        def hook(module, args, kwargs, output):
            if not self.enabled(site):
                return None
            full = get_output(site, output)
            if full is None:  # e.g. the text stream of SD3's last block (context_pre_only) returns None
                return None
            new = self._run_chain(site, to_view(site, full))
            return None if new is None else set_output(site, output, from_view(site, new, full))

        return hook

    def _in_hook(self, site: Site):
        def hook(module, args, kwargs):
            if not self.enabled(site):
                return None
            full = get_input(site, args, kwargs)
            new = self._run_chain(site, to_view(site, full))
            return None if new is None else set_input(site, args, kwargs, from_view(site, new, full))

        return hook

    def _register_pattern(self, site: Site) -> None:
        rows, heads = (sel.get(site.name) if isinstance(sel, dict) else sel for sel in (self.attn_rows, self.attn_heads))
        handler = PatternHandler(site, list(self.fns.get(site.name, ())), self.context, rows, heads,
                                 lambda s=site: self.enabled(s))
        module = site.module
        if is_diffusers_attention(module):
            tap_module(module, handler)
            self._restore.append(lambda: untap_module(module, handler))
        else:
            KERNELS.add(module, handler)
            self._restore.append(lambda: KERNELS.remove(module, handler))
        # a forward that raised after the kernel ran leaves its maps pending: every forward starts clean
        self._handles.append(module.register_forward_pre_hook(lambda m, a: handler.pending.clear()))
        self._handles.append(module.register_forward_hook(self._flush_hook(handler)))

    def _flush_hook(self, handler: PatternHandler):
        captures = self.captures.get(handler.site.name, ())

        def hook(module, args, output):
            value = flush(handler)
            if not self.enabled(handler.site):
                return None
            if value is None:
                raise RuntimeError(
                    f"{handler.site.name}: the attention kernel of {handler.site.path!r} ran without mmlens seeing it "
                    "(its attention function or processor was replaced after the hooks were registered?); "
                    "its probabilities cannot be recorded or edited"
                )
            ctx = self.context(handler.site)
            for fn in captures:
                fn(value, ctx)
            return None

        return hook


def _recorders_last(module: torch.nn.Module) -> None:
    """transformers 5 records `hidden_states` (and attentions) with forward hooks of its own, installed once at the
    first forward that asks for them, so usually before ours: LLaVA then read `hidden_states[vision_feature_layer]`
    as recorded before an edit, and the edit of that layer was lost. Its recorders move behind ours, so they record
    what the edit made, as the next layer sees it. (Reordering `_forward_hooks` is what torch's own `prepend` does.)"""
    hooks = module._forward_hooks
    for key, fn in list(hooks.items()):
        if getattr(fn, "__name__", "") == "output_capturing_hook":
            hooks.move_to_end(key)
