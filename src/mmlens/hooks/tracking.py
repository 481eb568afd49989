"""Bookkeeping shared by every session: which thread may use a model (one guard per model object), and, for a
diffusion Lens, which denoising step is running (one tracker per Lens, however many sessions nest or overlap)."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

from ..errors import LensBusyError
from .steps import BRANCHES_CFG, StepState


class UseGuard:
    """A model serves one thread at a time. Re-entrant in its thread (run_with_cache inside a hooks block),
    refused with a clear error from any other thread while a call or `with lens.hooks()` block is open: hooks
    live on the shared modules, so a second thread would run the first one's edits and fill its caches."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.owner: int | None = None
        self.depth = 0

    @contextlib.contextmanager
    def __call__(self, what: str) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self.owner is not None and self.owner != me:
                raise LensBusyError(
                    f"{what}: this model is in use by another thread ({self.owner}) inside an mmlens call or hooks "
                    "block. A model serves one thread at a time: load one Lens per thread, or serialise the calls "
                    "(e.g. with a threading.Lock)"
                )
            self.owner, self.depth = me, self.depth + 1
        try:
            yield
        finally:
            with self._lock:
                self.depth -= 1
                if self.depth == 0:
                    self.owner = None


_GUARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_GUARDS_LOCK = threading.Lock()


def guard_for(model: Any) -> UseGuard:
    """The guard of a model object, shared by every Lens over it."""
    with _GUARDS_LOCK:
        guard = _GUARDS.get(model)
        if guard is None:
            guard = _GUARDS[model] = UseGuard()
        return guard


class StepTracker:
    """Counts denoiser calls of one pipeline: one pre-hook, installed by the first session that needs it and
    removed by the last, so nested sessions see each step once. A new pipeline call (the scheduler's timesteps
    tensor is replaced by `set_timesteps`) restarts the count at 0."""

    def __init__(self, pipeline: Any, denoiser: str):
        self.pipeline, self.denoiser = pipeline, denoiser
        self.state = StepState()
        self._users = 0
        self._handle = None
        self._marker: Any = None
        self._said: list[list] = []  # [guidance] of each open lens.hooks() block (removed by identity)
        self._seen: list[list] = []  # [guidance_scale > 1] of each pipeline call mmlens is making

    @contextlib.contextmanager
    def track(self, guidance: bool | None, *, from_call: bool = False) -> Iterator[StepState]:
        """Count steps for the block. `guidance`: whether the denoiser batch holds [uncond, cond] halves, as the
        user said (`lens.hooks(guidance=...)`) or as a call's guidance_scale implies (`from_call`); when both are
        known and disagree, the denoiser's first call raises instead of labelling the batch wrongly."""
        if self._users == 0:
            module = getattr(self.pipeline, self.denoiser)
            self._handle = module.register_forward_pre_hook(self._pre, with_kwargs=True)
            self.restart()
        self._users += 1
        stack, entry = (self._seen if from_call else self._said), [guidance]
        stack.append(entry)
        try:
            yield self.state
        finally:
            stack[:] = [e for e in stack if e is not entry]  # blocks may exit in any order
            self._users -= 1
            if self._users == 0:
                self._handle.remove()
                self._handle = None
                self.restart()

    def restart(self) -> None:
        self.state.reset()
        self._marker = None

    def _pre(self, module, args, kwargs) -> None:
        state = self.state
        marker = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        if marker is not self._marker:
            state.calls, self._marker = 0, marker
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        said, seen = (next((e[0] for e in reversed(st) if e[0] is not None), None) for st in (self._said, self._seen))
        if said is not None and seen is not None and said != seen:
            raise ValueError(f"lens.hooks(guidance={said}) but this call runs {'with' if seen else 'without'} "
                             "classifier-free guidance (its guidance_scale); drop guidance= or make them agree")
        cfg = next((g for g in (said, seen, getattr(self.pipeline, "do_classifier_free_guidance", None))
                    if g is not None), None)
        state.step = state.calls
        state.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t
        # None: the pipeline does not say (PixArt keeps it in a local variable) and neither did the caller
        state.branches = None if cfg is None else BRANCHES_CFG if cfg else ("cond",)
        state.calls += 1
