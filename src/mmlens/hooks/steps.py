"""Diffusion bookkeeping: which denoising step and guidance branch a hook is seeing, and a cache indexed by them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import ActivationCache
from .context import HookContext
from .names import resolve

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
    stacks every recorded step along dim 0.
    """

    def __init__(self, device=None, dtype=None):
        super().__init__(device, dtype)
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

    def get(self, name: str, step: int | None = None, branch: str | None = None) -> torch.Tensor:
        if name not in self._store:
            resolve(name, self._store, where="this cache (only the names asked for are recorded)")
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
        value, branches = vals[idx], metas[idx].branches or ("cond",)
        if branch is None:
            return value
        if branch not in branches:
            raise KeyError(f"step {metas[idx].step} ran branches {branches}; asked for {branch!r}")
        return value.chunk(len(branches), dim=0)[branches.index(branch)]

    def stack(self, name: str, branch: str | None = None) -> torch.Tensor:  # type: ignore[override]
        """(recorded steps, ...) for one denoiser site; branch picks one guidance half."""
        metas = self._meta[name]
        return torch.stack([self.get(name, m.step, branch) for m in metas])

    def __getitem__(self, name: str) -> torch.Tensor:
        metas = self._meta.get(name)
        if metas and metas[0].step is not None and len(metas) > 1:
            return self.stack(name)
        if metas and metas[0].step is None:
            return self.get(name)
        return super().__getitem__(name)
