"""The expected outcome of a drawn case: the plan of a valid case, and which arguments are invalid only in context.

Each argument is drawn on its own (draw.py); only here are they read together: selections against the sites they
reach, steps against the entry point, hooks that fail where they really fire, grad=True against cache options.
"""

from __future__ import annotations

from typing import Any

import torch

from .cases import BAD_RETURNS, DIFFUSION, N_STEPS, PATTERN_EDITS, Arg, Case, Info, Plan, hook_items
from .resolve import _Bad, resolve, resolve_names, sel_index


def settle(case: Case, info: Info) -> None:
    """Decide what the drawn arguments mean together: the plan of a valid case, and which arguments are
    invalid only in context (selections vs the sites they reach, steps vs the entry point, grad combos)."""
    a, plan, diff = case.args, case.plan, case.arch in DIFFUSION
    plan.cfg = case.variant == "cfg"
    plan.branches_cfg = plan.cfg
    said = a.get("guidance")
    if said is not None and said.valid and not said.omit and bool(said.spec) != plan.cfg:
        said.valid, said.culprits = False, ("guidance",)  # contradicts the call's guidance_scale: an error
    # names and hooks
    if "names" in a and a["names"].valid:
        plan.records = resolve_names(a["names"], info)
        case.warns |= a["names"].label == "names:alias"
    hooks = a["hooks"]
    for key, chain, _ in hook_items(hooks):
        case.warns |= key.endswith(".probs")
        for n in resolve(key, info):
            plan.chains.setdefault(n, []).extend(chain)
    _settle_steps(case, diff)
    dt = a.get("cache_dtype")
    if dt is not None and dt.valid and dt.spec is not None:
        spec = dt.spec
        plan.cache_dtype = spec if isinstance(spec, torch.dtype) else getattr(torch, spec.removeprefix("torch."))
    # hooks that raise or return something wrong, where they really fire
    bad_sites = [n for n, ch in plan.chains.items() if _active(info, plan, n, "hook")
                 and any(k in BAD_RETURNS for k in ch)]
    raise_sites = [n for n, ch in plan.chains.items() if _active(info, plan, n, "hook") and "raise" in ch]
    if bad_sites:
        hooks.valid = False
        hooks.culprits = tuple(bad_sites)
    case.raises = bool(raise_sites)
    _settle_selections(case, info)
    # edits of probabilities computed for a subset of rows/heads
    clash = [n for n, ch in plan.chains.items() if _active(info, plan, n, "hook")
             and any(k in PATTERN_EDITS for k in ch)
             and (plan.rows.get(n) is not None or plan.heads.get(n) is not None)]
    if clash:
        a["edit+selection"] = Arg("edit+selection", valid=False, culprits=tuple(clash))
    _settle_grad(case, diff)


def _active(info: Info, plan: Plan, name: str, role: str) -> bool:
    """Whether the site `name` really runs its hooks (role "hook") or records (role "record") in this plan."""
    if name not in info.fires:
        return False
    if name not in info.denoiser:
        return True
    steps = plan.fire if role == "hook" else plan.record
    return steps is None or any(0 <= s < N_STEPS for s in steps)


def _settle_steps(case: Case, diff: bool) -> None:
    """steps / record_steps on pipelines: in range when the entry point knows the number of steps (not lens.hooks),
    never negative otherwise. On models without denoising steps, run_with_cache refuses any given."""
    a, plan = case.args, case.plan
    n_known = case.entry != "hooks"
    for arg in ("steps", "record_steps"):
        s = a.get(arg)
        if s is None or s.omit or not s.valid or not diff:
            continue
        val = s.spec[1]
        items = [0, 1] if isinstance(val, str) else list(val)
        out_of_range = (any(not -N_STEPS <= i < N_STEPS for i in items) if n_known else any(i < 0 for i in items))
        if out_of_range:
            s.valid, s.culprits = False, (arg,)
            continue
        setattr(plan, "fire" if arg == "steps" else "record", {i % N_STEPS if n_known else i for i in items})
    if case.entry == "run_with_cache" and not diff:
        for arg in ("steps", "record_steps"):
            if arg in a and not a[arg].omit:
                a[arg].valid, a[arg].culprits = False, (arg,)


def _settle_selections(case: Case, info: Info) -> None:
    """attn_rows / attn_heads: the spec per pattern site, invalid when it does not fit a site it reaches."""
    a, plan = case.args, case.plan
    for arg, dim in (("attn_rows", 2), ("attn_heads", 1)):
        s = a[arg]
        if s.omit or s.spec is None or not s.valid:
            continue
        per_site: dict[str, Any] = {}
        if s.spec[0] == "dict":
            for glob, sub in s.spec[1]:
                for n in resolve(glob, info):
                    per_site[n] = sub
        else:
            per_site = {n: s.spec for n in info.patterns}
        setattr(plan, "rows" if arg == "attn_rows" else "heads", per_site)
        reached = [n for n in dict.fromkeys([*plan.records, *plan.chains]) if n in per_site and n in info.shapes
                   and (n in plan.records and _active(info, plan, n, "record")
                        or n in plan.chains and _active(info, plan, n, "hook"))]
        for n in reached:
            try:
                sel_index(per_site[n], info.shapes[n][dim])
            except _Bad:
                s.valid, s.culprits = False, (arg,)
                break


def _settle_grad(case: Case, diff: bool) -> None:
    """grad=True: refused on pipelines, and together with cache options or selections."""
    a = case.args
    g = a.get("grad")
    if g is not None and g.valid and g.spec is True:
        if diff:
            g.valid, g.culprits = False, ("grad",)
        else:
            combo = [k for k in ("cache_device", "cache_dtype", "attn_rows", "attn_heads")
                     if not a[k].omit and a[k].spec is not None]
            if combo:
                a["grad+" + combo[0]] = Arg("grad+" + "+".join(combo), valid=False, culprits=tuple(combo))
