"""Diffusion bookkeeping: which denoising step and guidance branch a hook is seeing, and a cache indexed by them."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from .cache import ActivationCache, _is_glob
from .context import HookContext

BRANCHES_CFG = ("uncond", "cond")  # diffusers pipelines batch [negative, positive]


@dataclass
class StepState:
    """Updated by a pre-hook on the denoiser at every call: one call per denoising step."""

    step: int | None = None
    timestep: float | None = None
    branches: tuple[str, ...] | None = None
    calls: int = 0

    def reset(self) -> None:
        self.step, self.timestep, self.branches, self.calls = None, None, None, 0


class StepCache(ActivationCache):
    """An ActivationCache whose values also carry (step, timestep, branches).

    Denoiser sites fire once per step; text-encoder sites once per prompt encoding (the pipeline encodes
    the prompt, then the negative prompt), never per step.
    `get(name, step=t, branch="cond")` returns one step and one guidance half; `stack(name, branch=...)`
    stacks every recorded step along dim 0 (a glob: names, then steps). A glob in `get` or `cache[...]` gives a
    dict name -> what that one name gives. `save` keeps the per-call metadata, so `load` gives back a StepCache.
    """

    format = "mmlens.StepCache"

    def __init__(self, device=None, dtype=None, keep_graph=False):
        super().__init__(device, dtype, keep_graph)
        self._meta: dict[str, list[HookContext]] = {}

    def record_ctx(self, name: str, value: torch.Tensor, ctx: HookContext) -> None:
        self.record(name, value)
        self._meta.setdefault(name, []).append(ctx)

    @property
    def steps(self) -> list[int]:
        return sorted({c.step for metas in self._meta.values() for c in metas if c.step is not None})

    @property
    def timesteps(self) -> dict[int, float]:
        return {c.step: c.timestep for metas in self._meta.values() for c in metas if c.step is not None}

    def get(self, name: str, step: int | None = None, branch: str | None = None):  # type: ignore[override]
        if _is_glob(name):
            return {n: self.get(n, step, branch) for n in self._names(name)}
        (name,) = self._names(name)
        if name not in self._meta:  # recorded without step context
            return super().__getitem__(name)
        metas, vals = self._meta[name], self._store[name]
        if metas[0].step is None:  # text encoder: one call per prompt encoding, cond first
            branches = [b for b in BRANCHES_CFG[::-1]][: len(vals)]
            want = branch or "cond"
            if want not in branches:
                raise KeyError(f"{name!r} has branches {branches}; asked for {want!r}")
            return vals[branches.index(want)]
        if step is None:
            if len(vals) > 1:
                raise KeyError(f"{name!r} was recorded at steps {[m.step for m in metas]}; pass step=")
            idx = 0
        else:
            idxs = [k for k, m in enumerate(metas) if m.step == step]
            if not idxs:
                raise KeyError(f"{name!r} has no value at step {step}; recorded steps: {[m.step for m in metas]}")
            idx = idxs[0]
        value, branches = vals[idx], metas[idx].branches
        if branch is None:
            return value
        if branches is None:
            raise ValueError(f"{name!r}: step {metas[idx].step} ran without mmlens knowing whether the batch holds "
                             "[uncond, cond] halves (a direct pipeline call); call through lens(...) or "
                             "lens.generate(...), or pass guidance= to lens.hooks()")
        if branch not in branches:
            raise KeyError(f"step {metas[idx].step} ran branches {branches}; asked for {branch!r}")
        return branch_rows(value, branches, branch)

    def stack(self, name: str, branch: str | None = None) -> torch.Tensor:  # type: ignore[override]
        """(recorded steps, ...) for one denoiser site, (names, steps, ...) for a glob, as `ActivationCache.stack`
        stacks names along dim 0; branch picks one guidance half."""
        if _is_glob(name):
            return torch.stack([self.stack(n, branch) for n in self._names(name)])
        (name,) = self._names(name)
        metas = self._meta.get(name)
        if not metas or metas[0].step is None:
            raise ValueError(f"{name!r} was not recorded per denoising step (text encoder: once per prompt "
                             f"encoding); use cache.get({name!r}, branch=...) or cache.calls({name!r})")
        return torch.stack([self.get(name, m.step, branch) for m in metas])

    def __getitem__(self, name: str):
        if _is_glob(name):
            return {n: self[n] for n in self._names(name)}
        (name,) = self._names(name)
        metas = self._meta.get(name)
        if metas and metas[0].step is not None and len(metas) > 1:
            return self.stack(name)
        if metas and metas[0].step is None:
            return self.get(name)
        return super().__getitem__(name)

    def summary(self) -> list[dict]:
        rows = super().summary()
        for r in rows:
            r["steps"] = [m.step for m in self._meta.get(r["name"], []) if m.step is not None]
        return rows

    def _metadata(self) -> dict[str, str]:  # per name, one [step, timestep, branches, module path] per call
        calls = {n: [[m.step, m.timestep, None if m.branches is None else list(m.branches), m.path] for m in metas]
                 for n, metas in self._meta.items()}
        return {**super()._metadata(), "calls": json.dumps(calls, default=float)}

    def _load_metadata(self, meta: dict[str, str], path) -> None:
        try:
            calls = json.loads(meta["calls"])
            for n, rows in calls.items():
                if n not in self._store or len(rows) != len(self._store[n]):
                    raise ValueError(f"{n!r}: {len(rows)} calls described, {len(self._store.get(n, []))} stored")
                self._meta[n] = [HookContext(n, p, s, t, tuple(b) if b is not None else None) for s, t, b, p in rows]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: corrupt StepCache metadata ({e})") from None


def branch_rows(value: torch.Tensor, branches: tuple[str, ...], branch: str) -> torch.Tensor:
    """The rows of one guidance branch of a denoiser batch laid out as `branches` (e.g. [uncond; cond])."""
    return value.chunk(len(branches), dim=0)[branches.index(branch)]
