"""Executing a case with mmlens: the drawn specs made real values, the call, and the harness around it.

`RunMixin.run(case)` makes the call under a watchdog with a leak snapshot around it, then has the oracle check a
successful valid call (`verify`, check.py). Mixed into `Fuzzer` (fuzzer.py), which gives it `lens`, `inputs`,
`pipe_kwargs`, `repair` and `timeout`.
"""

from __future__ import annotations

import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .cases import BAD_RETURNS, BOOM, DIFFUSION, EDITS, PROMPT, Arg, Case, CaseTimeout, FuzzHookError, Outcome, classify
from .resolve import sel_value
from .state import leaks, snapshot, watchdog


def hook_fn(kind: str, log: list):
    """A fresh hook function of `kind` (or the non-callable an invalid chain holds); "read" appends to `log`."""
    if kind == "read":
        def fn(x, ctx):
            log.append((ctx.name, ctx.path, ctx.step, ctx.branches, x.detach().clone()))
    elif kind == "none":
        def fn(x, ctx):
            return None
    elif kind == "raise":
        def fn(x, ctx):
            raise FuzzHookError(BOOM)
    elif kind in EDITS or kind in BAD_RETURNS:
        edit = EDITS[kind] if kind in EDITS else BAD_RETURNS[kind]

        def fn(x, ctx):
            return edit(x)
    elif kind == "int3":
        return 3
    elif kind == "str":
        return "fn"
    else:
        raise ValueError(kind)
    return fn


def hooks_value(arg: Arg, log: list):
    """The `hooks` argument of the call, its functions made fresh."""
    spec = arg.spec
    if spec is None:
        return None
    if isinstance(spec, tuple) and spec[0] == "list":
        return [(spec[1], hook_fn("read", log))]
    out = {}
    for key, chain, as_list in spec:
        fns = [hook_fn(k, log) for k in chain]
        out[key] = fns if as_list else fns[0]
    return out


def call_value(name: str, arg: Arg, log: list):
    """The value passed to mmlens for the drawn argument `name` (single-use values made fresh)."""
    if name == "hooks":
        return hooks_value(arg, log)
    if name == "names":
        kind, value = arg.spec
        return (n for n in value) if kind == "gen" else value
    if name in ("attn_rows", "attn_heads"):
        return sel_value(arg.spec)
    if name in ("steps", "record_steps"):
        v = arg.spec[1]
        return torch.tensor([0, 1]) if v == "tensor" else (list(v) if isinstance(v, list) else v)
    return arg.spec


class RunMixin:
    """Running a case with mmlens (mixed into Fuzzer)."""

    def _model_inputs(self, case: Case):
        """(positional inputs, keyword inputs) of a transformers call."""
        kind = case.args["inputs"].spec
        x = self.inputs(case.arch, case.variant)
        from ..tiny_models import sample_image

        if kind == "kwargs":
            return None, x
        if kind == "pil":
            return sample_image(0), {}
        if kind == "str":
            return PROMPT, {}
        if kind == "tensor":
            return x["pixel_values"], {}
        if kind == "lists":
            return {k: v.tolist() for k, v in x.items()}, {}
        if kind == "ndarray":
            return {**x, "pixel_values": x["pixel_values"].numpy()}, {}
        if kind == "mask":
            return {**x, "attention_mask": x["attention_mask"][..., :-1]}, {}
        if kind == "images_only":
            return {"pixel_values": x["pixel_values"]}, {}
        if kind == "no_pixels":
            return {k: v for k, v in x.items() if k != "pixel_values"}, {}
        if kind == "no_grid":
            return {k: v for k, v in x.items() if k != "image_grid_thw"}, {}
        if kind == "bad_patches":
            return {**x, "pixel_values": x["pixel_values"][:, :50]}, {}
        if kind == "wrong_size":
            return {**x, "pixel_values": F.interpolate(x["pixel_values"], size=(64, 64))}, {}
        return x, {}

    def _call(self, case: Case, log: list) -> Callable[[], Any]:
        """The mmlens call of a case, as a thunk (its single-use values made fresh)."""
        lens, a, diff = self.lens(case.arch), case.args, case.arch in DIFFUSION
        kw = {}
        for n in ("names", "hooks", "cache_device", "cache_dtype", "attn_rows", "attn_heads", "grad", "steps",
                  "record_steps", "progress", "guidance"):
            if n in a and not a[n].omit:
                kw[n] = call_value(n, a[n], log)
        extra = a["extra"]
        where, key = extra.spec if not extra.omit else (None, None)
        if diff:
            pipe = self._pipe_call(case.arch, case.variant, a["inputs"].spec)
        if case.entry == "hooks":
            fns = kw.pop("hooks", None)
            hk = {k: kw[k] for k in ("attn_rows", "attn_heads", "steps", "record_steps", "guidance") if k in kw}
            if where == "hooks":
                hk[key] = 1
            call_extra = {key: 1} if where == "model" else {}

            def go():
                with lens.hooks(fns, **hk):
                    if diff:
                        return lens(**pipe, **call_extra)
                    pos, kws = self._model_inputs(case)
                    return lens(pos, **kws, **call_extra)

            return go
        if where == "call":
            kw[key] = 1
        if case.entry == "generate":
            if not diff:
                return lambda: lens.generate(PROMPT, **kw)
            prompt = pipe.pop("prompt", None)
            if prompt is None:
                return lambda: lens.generate(**kw, **pipe)
            return lambda: lens.generate(prompt, **kw, **pipe)
        if diff:
            return lambda: lens.run_with_cache(pipe, **kw)
        pos, kws = self._model_inputs(case)
        if pos is None:
            return lambda: lens.run_with_cache(**kws, **kw)
        return lambda: lens.run_with_cache(pos, **kws, **kw)

    def run(self, case: Case) -> Outcome:
        """Execute one case: the call under a watchdog, a leak snapshot around it, then the oracle (valid cases)."""
        lens = self.lens(case.arch)
        log: list = []
        thunk = self._call(case, log)
        out = Outcome()
        before = snapshot(lens)
        t0 = time.perf_counter()
        result = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with watchdog(self.timeout):
                    result = thunk()
            except CaseTimeout:
                out.timed_out = True
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 - every kind is classified
                out.error = e
                out.trace = "".join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
        out.seconds = time.perf_counter() - t0
        out.timed_out |= out.seconds > self.timeout
        out.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
        out.leaked = leaks(before, snapshot(lens))
        if out.leaked:
            self.repair(case.arch)
        if out.error is None and not out.timed_out and case.valid and not case.raises:
            try:
                with watchdog(self.timeout):
                    out.mismatch = self.verify(case, result, log, out.warnings)
            except CaseTimeout:
                out.timed_out = True
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as e:  # noqa: BLE001
                out.mismatch = f"oracle failed on the result: {type(e).__name__}: {e}"
                out.trace = traceback.format_exc()[-1500:]
        return out

    def check(self, seed: int) -> tuple[Case, Outcome, str, str]:
        """Draw, run and classify the case of `seed`: (case, outcome, class, reason)."""
        case = self.case(seed)
        out = self.run(case)
        return (case, out, *classify(case, out))
