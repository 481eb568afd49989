"""Checking a successful valid call against the oracle: the output, the cache, what read-only hooks saw, gradients.

`CheckMixin.verify` returns None when everything agrees, else what differs. Mixed into `Fuzzer` (fuzzer.py), which
gives it `lens`, `info`, `_reference` and `_model_inputs`.
"""

from __future__ import annotations

import numpy as np
import torch

from .cases import DIFFUSION, Case, Info, Plan
from .oracle import _view
from .resolve import sel_index, select


class CheckMixin:
    """Comparing a successful valid call with the oracle (mixed into Fuzzer)."""

    def verify(self, case: Case, result, log: list, warned: list[str]) -> str | None:
        """None when a successful valid call agrees with the oracle, else what differs."""
        if case.warns and not any(w.startswith("FutureWarning") and "alias" in w for w in warned):
            return "a '.probs' alias was used but no FutureWarning was given"
        plan, info, diff = case.plan, self.info(case.arch, case.variant), case.arch in DIFFUSION
        sites = self.lens(case.arch).sites
        patterns = any(sites[n].row.read == "pattern" for n in [*plan.chains, *plan.records])
        call_kwargs = dict(case.args["inputs"].spec) if diff else {}
        inputs = None if diff else self._ref_inputs(case)
        ref = self._reference(case.arch, case.variant, plan, case.entry, call_kwargs, inputs=inputs)
        exact = not patterns
        tol = dict(atol=1e-5, rtol=1e-4) if exact else dict(atol=2e-4, rtol=2e-3)
        output, cache = (result, None) if case.entry == "hooks" else result
        # the model's output
        problem = _compare_outputs(output, ref.output, tol, diff)
        if problem:
            return f"model output differs from the plain-hook run: {problem}"
        # the cache
        if cache is not None:
            problem = _compare_cache(case, info, cache, ref, tol)
            if problem:
                return problem
        # what read-only hooks saw (value, name, path, step, guidance branches)
        problem = _compare_logs(case, info, log, ref.logs, tol)
        if problem:
            return problem
        g = case.args.get("grad")
        if cache is not None and g is not None and not g.omit and g.spec is True:
            return self._compare_grad(case, output, cache, inputs)
        return None

    def _ref_inputs(self, case: Case) -> dict:
        pos, kws = self._model_inputs(case)
        return {**(pos or {}), **kws}

    def _compare_grad(self, case, output, cache, inputs) -> str | None:
        """Gradients through the recorded tensors equal gradients through the plain hooks' tensors."""
        plan, sites = case.plan, self.lens(case.arch).sites
        names = [n for n in cache if sites[n].row.read != "pattern" and len(cache.calls(n)) == 1][:2]
        if not names or any(sites[n].row.read == "pattern" for n in plan.chains):
            return None
        metric = _metric(output)
        ref = self._reference(case.arch, case.variant, plan, case.entry, {}, grad_names=tuple(names), inputs=inputs)
        ref_metric = _metric(ref.output)
        if not metric.requires_grad or not ref_metric.requires_grad:  # an edit cast to an integer cuts the graph
            if metric.requires_grad != ref_metric.requires_grad:
                return (f"grad: the output is {'' if metric.requires_grad else 'not '}in the graph, the plain hooks' "
                        f"is {'' if ref_metric.requires_grad else 'not'}")
            return None
        got = torch.autograd.grad(metric, [cache[n] for n in names], allow_unused=True)
        fulls = [ref.graph.get(n) for n in names]
        if any(f is None for f in fulls):
            return None
        want = torch.autograd.grad(ref_metric, fulls, allow_unused=True)
        for n, g, w in zip(names, got, want):
            if w is None:
                if g is not None and g.abs().max() > 0:
                    return f"grad through {n}: nonzero, the plain hook's tensor gets none"
                continue
            if g is None:
                return f"grad through {n}: none reached the recorded tensor"
            problem = _close(f"grad through {n}", g, _view(sites[n], w), dict(atol=1e-5, rtol=1e-3), 0)
            if problem:
                return problem
        return None


def _selected(r, plan: Plan, info: Info, name: str):
    """The oracle's full map `r` of the pattern site `name`, cut to the plan's heads and rows by Python indexing."""
    shape = info.shapes[name]
    return select(r, sel_index(plan.heads.get(name), shape[1]), sel_index(plan.rows.get(name), shape[2]))


def _compare_cache(case, info, cache, ref, tol) -> str | None:
    """The cache holds what the plain hooks recorded: names, calls, steps, device, dtype, values."""
    plan, diff = case.plan, case.arch in DIFFUSION
    want = [n for n in plan.records if ref.records.get(n)]
    got = list(cache)
    if sorted(got) != sorted(want):
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        return f"cache names differ: missing {missing[:4]}, unexpected {extra[:4]}"
    dtype = plan.cache_dtype
    summary = {r["name"]: r for r in cache.summary()}
    for n in want:
        vals, refs = cache.calls(n), ref.records[n]
        if len(vals) != len(refs):
            return f"{n}: cache holds {len(vals)} calls, the plain hooks saw {len(refs)}"
        if diff and n in info.denoiser and summary[n].get("steps") != [s for s, _ in refs]:
            return f"{n}: recorded at steps {summary[n].get('steps')}, expected {[s for s, _ in refs]}"
        is_pat = n in info.shapes
        for k, (v, (_, r)) in enumerate(zip(vals, refs)):
            if v.device.type != "cpu":
                return f"{n}: recorded on {v.device}, expected cpu"
            want_dtype = dtype or r.dtype
            if v.dtype != want_dtype:
                return f"{n}: recorded as {v.dtype}, expected {want_dtype}"
            if is_pat:
                r = _selected(r, plan, info, n)
                problem = _check_probs(n, v, r.shape)
                if problem:
                    return problem
            problem = _close(n, v, r.to(want_dtype), tol, k)
            if problem:
                return problem
    return None


def _compare_logs(case, info, log, ref_logs, tol) -> str | None:
    """Read-only hooks saw what the plain hooks saw: per site, the calls, their ctx and values."""
    plan = case.plan
    by = lambda entries: {n: [e for e in entries if e[0] == n] for n in {e[0] for e in entries}}  # noqa: E731
    got, want = by(log), by(ref_logs)
    if sorted(got) != sorted(want):
        return f"read-only hooks fired on {sorted(got)[:4]}, plain hooks on {sorted(want)[:4]}"
    for n, entries in want.items():
        if len(got[n]) != len(entries):
            return f"hook on {n} ran {len(got[n])} times, the plain hook {len(entries)} times"
        for k, (g, w) in enumerate(zip(got[n], entries)):
            if g[1:4] != w[1:4]:
                return f"hook on {n}, call {k}: ctx (path, step, branches) = {g[1:4]}, expected {w[1:4]}"
            r = w[4]
            if n in info.shapes:
                r = _selected(r, plan, info, n)
            problem = _close(f"hook on {n}", g[4], r, tol, k)
            if problem:
                return problem
    return None


def _metric(output) -> torch.Tensor:
    t = next(v for v in output.values() if isinstance(v, torch.Tensor) and v.is_floating_point())
    return t.float().square().mean()


def _close(what, got, want, tol, k) -> str | None:
    if tuple(got.shape) != tuple(want.shape):
        return f"{what} (call {k}): shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    g, w = got.detach().float(), want.detach().float()
    if got.dtype in (torch.float16, torch.bfloat16):
        tol = dict(atol=max(tol["atol"], 1e-2), rtol=max(tol["rtol"], 1e-2))
    if not torch.allclose(g, w, **tol, equal_nan=True):
        return f"{what} (call {k}): values differ by up to {(g - w).abs().max().item():.3g}"
    return None


def _check_probs(name, p, shape) -> str | None:
    if tuple(p.shape) != tuple(shape):
        return f"{name}: shape {tuple(p.shape)}, the selection gives {tuple(shape)}"
    s = p.float().sum(-1)
    atol = 1e-2 if p.dtype in (torch.float16, torch.bfloat16) else 1e-4
    if not torch.allclose(s, torch.ones_like(s), atol=atol):
        return f"{name}: attention rows sum to {s.min().item():.4g}..{s.max().item():.4g}, not 1"
    return None


def _compare_outputs(got, want, tol, diff) -> str | None:
    if diff:
        g, w = np.asarray(got.images), np.asarray(want.images)
        if g.shape != w.shape:
            return f"images of shape {g.shape}, expected {w.shape}"
        err = float(np.abs(g - w).max())
        return None if err <= max(tol["atol"] * 10, 1e-4) else f"images differ by up to {err:.3g}"
    gk = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
    wk = {k: v for k, v in want.items() if isinstance(v, torch.Tensor)}
    if sorted(gk) != sorted(wk):
        return f"output fields {sorted(gk)}, expected {sorted(wk)}"
    for k in wk:
        problem = _close(k, gk[k], wk[k], tol, 0)
        if problem:
            return problem
    return None
