"""The oracle: the same model run with plain torch hooks instead of mmlens.

`reference(lens, plan, call)` runs `call()` (the model, not mmlens) with hooks on `lens.sites[name].module` that do
what `plan` says: the same edits in the same order, the values read and recorded, gated per denoising step by a
counter on the denoiser. Attention probabilities are observed by `_Observe` (a torch function mode): recomputed from
the arguments of each `F.scaled_dot_product_attention` call, or read from an eager softmax; edited probabilities are
fed back as `p @ v` (SDPA) or in place of the softmax.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .cases import EDITS, Plan


def _ref_get(site, output):
    pick = site.row.pick
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(pick, str):
        return output[pick]
    if hasattr(output, "to_tuple"):
        return output.to_tuple()[pick or 0]
    return output[pick or 0]


def _ref_set(site, output, new):
    pick = site.row.pick
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(pick, str):
        output[pick] = new
        return output
    if hasattr(output, "to_tuple"):
        output[list(output.keys())[pick or 0]] = new
        return output
    items = list(output)
    items[pick or 0] = new
    return tuple(items) if isinstance(output, tuple) else items


def _view(site, t):
    if site.row.part is not None:
        k, n = site.row.part
        t = t.chunk(n, dim=-1)[k]
    if site.row.heads:
        t = t.unflatten(-1, (-1, site.head_dim))
    return t


def _unview(site, new, full):
    if site.row.heads:
        new = new.flatten(-2)
    if site.row.part is not None:
        k, n = site.row.part
        chunks = list(full.chunk(n, dim=-1))
        chunks[k] = new
        new = torch.cat(chunks, dim=-1)
    return new


@dataclasses.dataclass
class _Ctx:
    name: str
    path: str
    step: int | None = None
    timestep: float | None = None
    branches: tuple[str, ...] | None = None


@dataclasses.dataclass
class _Ref:
    output: Any = None
    records: dict[str, list[tuple[int | None, torch.Tensor]]] = dataclasses.field(default_factory=dict)
    logs: list[tuple] = dataclasses.field(default_factory=list)
    graph: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # in-graph full tensors (grad)


def _sdpa_probs(q, k, mask, is_causal, scale):
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    low = torch.finfo(torch.float32).min
    if mask is not None:
        s = s.masked_fill(~mask, low) if mask.dtype == torch.bool else s + mask.float()
    elif is_causal:
        nq, nk = s.shape[-2:]
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=s.device).tril().logical_not(), low)
    return F.softmax(s, dim=-1)


def _sdpa_args(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, is_causal, scale


class _Observe(TorchFunctionMode):
    """Inside an attention module of interest (pushed by its pre-hook), see the probabilities: eager softmax
    (transformers loaded with eager attention, diffusers' classic processor) or SDPA (recomputed). A handler
    may return edited probabilities; the module then goes on with them (softmax) or with `p @ v` (SDPA)."""

    def __init__(self):
        super().__init__()
        self.stack: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.stack:
            return func(*args, **kwargs)
        handler = self.stack[-1]
        if func is F.scaled_dot_product_attention:
            q, k, v, mask, causal, scale = _sdpa_args(*args, **kwargs)
            p = _sdpa_probs(q, k, mask, causal, scale)
            new = handler(p)
            if new is None:
                return func(*args, **kwargs)
            if v.shape[-3] != new.shape[-3]:
                v = v.repeat_interleave(new.shape[-3] // v.shape[-3], dim=-3)
            return torch.matmul(new.to(v.dtype), v)
        if func in (F.softmax, torch.Tensor.softmax, torch.softmax):
            p = func(*args, **kwargs)
            flat = p.dim() == 3  # diffusers' classic get_attention_scores: (batch * heads, q, k)
            p4 = p.unflatten(0, (-1, handler.heads)) if flat else p
            new = handler(p4)
            if new is None:
                return p
            return (new.flatten(0, 1) if flat else new).to(p.dtype)
        return func(*args, **kwargs)


class _PlainHooks:
    """The hooks of one reference run and what they saw (`ref`). A site of the denoiser fires at the steps of
    `plan.fire` and records at those of `plan.record`, counted by a pre-hook on the denoiser."""

    def __init__(self, lens, plan: Plan, grad_names: tuple[str, ...]):
        self.lens, self.plan, self.grad_names = lens, plan, grad_names
        self.den = getattr(lens.adapter, "denoiser", None)
        self.ref = _Ref()
        self.step: int | None = None
        self.observer = _Observe()
        self.handles: list = []

    def install(self, names: list[str]) -> None:
        if self.den is not None:
            self.handles.append(getattr(self.lens.model, self.den).register_forward_pre_hook(self._count))
        for name in names:
            site = self.lens.sites[name]
            if site.row.read == "out":
                self.handles.append(site.module.register_forward_hook(self._out_hook(site)))
            elif site.row.read == "in":
                self.handles.append(site.module.register_forward_pre_hook(self._in_hook(site), with_kwargs=True))
            else:
                h = _PatternHandler(self, site)
                self.handles.append(site.module.register_forward_pre_hook(h.pre))
                self.handles.append(site.module.register_forward_hook(h.post))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _count(self, mod, args):
        self.step = 0 if self.step is None else self.step + 1

    def is_den(self, site) -> bool:
        return self.den is not None and (site.path == self.den or site.path.startswith(self.den + "."))

    def ctx_of(self, site) -> _Ctx:
        if self.is_den(site):
            return _Ctx(site.name, site.path, self.step, None,
                        ("uncond", "cond") if self.plan.branches_cfg else ("cond",))
        return _Ctx(site.name, site.path)

    def gates(self, site) -> tuple[bool, bool]:
        """(whether the site's hooks fire, whether it records) at the current step."""
        if not self.is_den(site):
            return True, True
        step, plan = self.step, self.plan
        return (plan.fire is None or step in plan.fire), (plan.record is None or step in plan.record)

    def chain(self, site, value, ctx, fire):
        """The site's hook kinds in order: reads logged, edits applied (cast back). -> (value, edited)."""
        cur, edited = value, False
        if fire:
            for kind in self.plan.chains.get(site.name, ()):
                if kind == "read":
                    self.ref.logs.append((ctx.name, ctx.path, ctx.step, ctx.branches, cur.detach().clone()))
                elif kind in EDITS:
                    cur, edited = EDITS[kind](cur).to(dtype=value.dtype, device=value.device), True
        return cur, edited

    def record(self, site, value, ctx, rec) -> None:
        if rec and site.name in self.plan.records:
            self.ref.records.setdefault(site.name, []).append((ctx.step, value.detach().clone()))

    def through(self, site, full, fire, rec):
        """A module's full tensor through the site's view, chain and record. -> (new full tensor, edited)."""
        ctx = self.ctx_of(site)
        cur, edited = self.chain(site, _view(site, full), ctx, fire)
        self.record(site, cur, ctx, rec)
        new = _unview(site, cur, full) if edited else full
        if site.name in self.grad_names:
            self.ref.graph[site.name] = new
        return new, edited

    def _out_hook(self, site):
        def hook(mod, args, output):
            fire, rec = self.gates(site)
            full = _ref_get(site, output)
            if full is None or not (fire or rec):
                return None
            new, edited = self.through(site, full, fire, rec)
            return _ref_set(site, output, new) if edited else None
        return hook

    def _in_hook(self, site):
        def hook(mod, args, kwargs):
            fire, rec = self.gates(site)
            if not (fire or rec):
                return None
            if args:
                full = args[0]
            else:
                key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items()
                                                                             if isinstance(v, torch.Tensor))
                full = kwargs[key]
            new, edited = self.through(site, full, fire, rec)
            if not edited:
                return None
            return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, key: new})
        return hook


class _PatternHandler:
    """The probabilities of one attention module: pushed on the observer while the module runs, called by it with
    each kernel call's probabilities (edited ones are returned), recorded padded and stacked when the module ends."""

    def __init__(self, hooks: _PlainHooks, site):
        self.hooks, self.site, self.parts = hooks, site, []
        self.heads = getattr(site.module, "heads", None)

    def __call__(self, p):
        fire, rec = self.hooks.gates(self.site)
        if not (fire or rec):
            return None
        ctx = self.hooks.ctx_of(self.site)
        cur, edited = self.hooks.chain(self.site, p, ctx, fire)
        self.parts.append(cur)
        return cur if edited else None

    def pre(self, mod, args):
        self.parts = []
        self.hooks.observer.stack.append(self)

    def post(self, mod, args, output):
        self.hooks.observer.stack.remove(self)
        fire, rec = self.hooks.gates(self.site)
        if not self.parts:
            if fire or rec:
                raise RuntimeError(f"oracle saw no attention probabilities in {self.site.path}")
            return None
        parts = self.parts
        nq, nk = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
        value = torch.cat([F.pad(p, (0, nk - p.shape[-1], 0, nq - p.shape[-2])) for p in parts], dim=0)
        self.hooks.record(self.site, value, self.hooks.ctx_of(self.site), rec)
        return None


def reference(lens, plan: Plan, call: Callable[[], Any], grad_names: tuple[str, ...] = ()) -> _Ref:
    """`call()` (the model itself, not mmlens) under plain hooks doing what `plan` says; `grad_names`: sites whose
    in-graph full tensors are kept (`_Ref.graph`) for gradient checks."""
    touched = list(dict.fromkeys([*plan.chains, *plan.records]))
    patterns = [n for n in touched if lens.sites[n].row.read == "pattern"]
    hooks = _PlainHooks(lens, plan, grad_names)
    try:
        hooks.install(touched)
        with hooks.observer if patterns else contextlib.nullcontext():
            hooks.ref.output = call()
    finally:
        hooks.remove()
    return hooks.ref
