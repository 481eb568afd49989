"""`Lens`: one model (or pipeline) seen through its adapter's canonical names."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .hooks.attention import check_selection
from .hooks.cache import ActivationCache
from .hooks.checks import (check_cache_options, check_grad, check_hook_map, check_model_inputs, check_pipeline_kwargs,
                           check_steps, default_guidance, default_steps, reject_unknown)
from .hooks.context import HookContext
from .hooks.names import ALIASES, natural_sorted, resolve
from .hooks.session import HookFn, HookSession
from .hooks.sites import Site, expand
from .hooks.steps import StepCache
from .hooks.tracking import StepTracker, guard_for
from .models.base import Adapter

Names = str | Sequence[str] | None
_HOOKS_ARGS = ("fns", "captures", "attn_rows", "attn_heads", "steps", "record_steps", "guidance")
_RUN_ARGS = ("names", "hooks", "cache_device", "cache_dtype", "attn_rows", "attn_heads", "grad")
_GENERATE_ARGS = ("names", "hooks", "steps", "record_steps", "cache_device", "cache_dtype", "attn_rows", "attn_heads",
                  "progress")


@contextlib.contextmanager
def _progress(pipeline, show: bool) -> Iterator[None]:
    """Hide a diffusers pipeline's progress bar for one call, then restore its own settings."""
    if show or not hasattr(pipeline, "set_progress_bar_config"):
        yield
        return
    had = "_progress_bar_config" in vars(pipeline)
    saved = dict(getattr(pipeline, "_progress_bar_config", {}))
    pipeline.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        if had:
            pipeline._progress_bar_config = saved
        else:
            del pipeline._progress_bar_config


class Lens:
    """A model plus canonical hook points. `lens.model` is the HF model or diffusers pipeline, unchanged.

        lens = mmlens.load("path/to/llava")
        out, cache = lens.run_with_cache(inputs, names="lm.blocks.*.resid_post")
        with lens.hooks({"vision.blocks.3.attn.out": lambda x, ctx: 0 * x}):
            lens(inputs)
    """

    def __init__(self, model: Any, adapter: Adapter, processor: Any = None):
        self.model = model
        self.processor = processor
        self.adapter = adapter
        self.sites: dict[str, Site] = expand(adapter.rows(), adapter.root())
        self._names = natural_sorted(self.sites)
        self._name_set = frozenset(self._names)
        self._resolved: dict[tuple[str, ...], tuple[str, ...]] = {}
        denoiser = getattr(adapter, "denoiser", None)
        self._steps = StepTracker(model, denoiser) if denoiser is not None else None
        self._guard = guard_for(model)

    # ---------------------------------------------------------------------------------------------- naming
    @property
    def family(self) -> str:
        return self.adapter.family

    @property
    def architecture(self) -> str:
        return self.adapter.name

    def hook_points(self, pattern: str | None = None) -> list[str]:
        """Every canonical name (natural order), or those matching a glob."""
        if pattern is None:
            return list(self._names)
        return resolve(pattern, self._names, where=self._table_file(), valid_set=self._name_set, ordered=True)

    def describe(self) -> str:
        """Hook points folded by block index: `vision.blocks.{0..23}.resid_post`."""
        groups: dict[str, list[str]] = {}
        for n in self.hook_points():
            key = re.sub(r"\.(\d+)\.", ".{}.", n, count=1)
            groups.setdefault(key, []).append(re.search(r"\.(\d+)\.", n).group(1) if key != n else "")
        lines = []
        for key, idx in groups.items():
            if key.count("{}") and idx and idx[0] != "":
                lo, hi = min(map(int, idx)), max(map(int, idx))
                lines.append(key.replace("{}", f"{{{lo}..{hi}}}" if lo != hi else str(lo)))
            else:
                lines.append(key)
        return "\n".join(lines)

    def resolve(self, names: Names, *, arg: str = "names") -> list[str]:
        """Names and globs -> canonical names (None: every site but attention maps); unknown ones raise
        UnknownNameError listing the closest valid names."""
        if names is None:
            return [n for n in self._names if self.sites[n].row.read != "pattern"]
        key = (names,) if isinstance(names, str) else tuple(names) if isinstance(names, (list, tuple)) else None
        if key is not None and not all(isinstance(p, str) for p in key):
            key = None  # resolve names what is wrong with it
        if key is not None and key in self._resolved:  # the sites never change: a pattern resolves once
            return list(self._resolved[key])
        out = resolve(names, self._names, where=self._table_file(), valid_set=self._name_set, arg=arg, ordered=True)
        # (an alias resolves every time, so its warning is never lost)
        if key is not None and len(self._resolved) < 4096 and not any(p.endswith(a) for p in key for a, _ in ALIASES):
            self._resolved[key] = tuple(out)
        return out

    def _table_file(self) -> str:
        return f"the name table in {type(self.adapter).__module__.replace('.', '/')}.py"

    # ------------------------------------------------------------------------------------------------ hooks
    @contextlib.contextmanager
    def hooks(
        self,
        fns: Mapping[str, HookFn | Sequence[HookFn]] | None = None,
        *,
        captures: Mapping[str, Sequence[HookFn]] | None = None,
        attn_rows=None,
        attn_heads=None,
        steps: Iterable[int] | None = None,
        record_steps: Iterable[int] | None = None,
        guidance: bool | None = None,
        **unknown,
    ) -> Iterator[HookSession]:
        """Hooks alive for the `with` block only, removed on exit also when the block raises.

        `fns` maps names or globs to `fn(value, ctx)`; a function returning a tensor replaces the value (cast to
        the value's dtype and device). `attn_rows`/`attn_heads` restrict computed attention probabilities to those
        query rows / heads (ints, negatives from the end, a bool mask or a slice; the same positions in every batch
        row); a dict `{glob: selection}` sets them per site.
        Diffusion only: `steps` limits denoiser hooks (`fns`) and `record_steps` denoiser captures to those step
        indices; text-encoder hooks always fire. `guidance` says whether the denoiser batch holds
        [uncond, cond] halves (default: ask the pipeline).
        Blocks may nest and exit in any order. A model serves one thread at a time: another thread's call while
        this block is open raises LensBusyError.
        """
        reject_unknown(unknown, _HOOKS_ARGS, "lens.hooks")
        with self._guard("lens.hooks"):
            session, _ = self._session(fns, captures, attn_rows, attn_heads, steps, record_steps, guidance)
            with contextlib.ExitStack() as stack:
                if self._steps is not None:
                    stack.enter_context(self._steps.track(guidance))
                stack.enter_context(session)
                yield session

    def _session(self, fns, captures, attn_rows, attn_heads, steps, record_steps, guidance,
                 n_steps: int | None = None) -> tuple[HookSession, tuple[set[int] | None, set[int] | None]]:
        """Validate every argument, then build (not enter) the session; also the (steps, record_steps) sets."""
        if self._steps is None:
            given = [k for k, v in (("steps", steps), ("record_steps", record_steps), ("guidance", guidance)) if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)}: denoising steps exist only in diffusion pipelines; "
                                 f"{self.architecture} is a {self.family} model")
        elif guidance is not None and not isinstance(guidance, bool):
            raise TypeError(f"guidance must be True, False or None; got {guidance!r:.40}")
        fire, record = check_steps(steps, "steps", n_steps), check_steps(record_steps, "record_steps", n_steps)
        denoiser = getattr(self.adapter, "denoiser", None)

        def is_denoiser(site: Site) -> bool:
            return denoiser is not None and (site.path.startswith(denoiser + ".") or site.path == denoiser)

        def at(step_set: set[int] | None, fn: HookFn) -> HookFn:
            def gated(value, ctx):
                return fn(value, ctx) if ctx.step is None or ctx.step in step_set else None
            return fn if step_set is None else gated

        fn_map = {n: [at(fire, f) for f in fs] for n, fs in self._expand_map(fns, "hooks").items()}
        cap_map = {n: [at(record, f) for f in fs] for n, fs in self._expand_map(captures, "captures").items()}
        state = self._steps.state if self._steps is not None else None

        def enabled(site: Site) -> bool:
            if not is_denoiser(site):
                return True
            return bool(site.name in fn_map and (fire is None or state.step in fire)
                        or site.name in cap_map and (record is None or state.step in record))

        def context(site: Site) -> HookContext:
            if is_denoiser(site):
                return HookContext(site.name, site.path, state.step, state.timestep, state.branches)
            return HookContext(site.name, site.path)

        session = HookSession(self.sites, fn_map, cap_map, context=context, enabled=enabled,
                              attn_rows=self._per_site(attn_rows, "attn_rows"),
                              attn_heads=self._per_site(attn_heads, "attn_heads"))
        return session, (fire, record)

    def _per_site(self, sel, arg: str):
        if not isinstance(sel, Mapping):
            return check_selection(sel, arg)
        return {name: check_selection(v, f"{arg}[{pattern!r}]") for pattern, v in sel.items()
                for name in self.resolve(pattern, arg=arg)}

    def _expand_map(self, fns, arg: str) -> dict[str, list[HookFn]]:
        out: dict[str, list[HookFn]] = {}
        for pattern, fn in check_hook_map(fns, arg).items():
            chain = list(fn) if isinstance(fn, (list, tuple)) else [fn]
            for name in self.resolve(pattern, arg=arg):
                out.setdefault(name, []).extend(chain)
        return out

    # ------------------------------------------------------------------------------------------------- runs
    @property
    def device(self) -> torch.device:
        """Where inputs go: the first real device of an accelerate device map, else the first parameter's."""
        m = self.model if isinstance(self.model, nn.Module) else getattr(self.model, self.adapter.denoiser)
        for dev in (getattr(m, "hf_device_map", None) or {}).values():
            if dev not in ("disk", "meta"):
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        return next(p.device for p in m.parameters() if p.device.type != "meta")

    @property
    def dtype(self) -> torch.dtype:
        m = self.model if isinstance(self.model, nn.Module) else getattr(self.model, self.adapter.denoiser)
        return next(m.parameters()).dtype

    def prepare(self, inputs: Mapping[str, Any] | None = None, *, where: str = "lens.prepare",
                suggest: Sequence[str] = (), **kwargs) -> dict[str, Any]:
        """Processor output or keyword tensors, checked, moved to the model's first device; floats in its dtype."""
        merged = check_model_inputs(self, inputs, kwargs, where, suggest)
        device, dtype = self.device, self.dtype
        return {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor) else v
                for k, v in merged.items()}

    def __call__(self, inputs: Mapping[str, Any] | None = None, **kwargs):
        """The model's forward on processor output (a diffusion pipeline: its __call__ with these keywords)."""
        with self._guard("lens(...)"):
            if self.family == "diffusion":
                if inputs is not None and not isinstance(inputs, Mapping):
                    raise TypeError(f"lens(...) on a pipeline takes keyword arguments (or a dict of them); got "
                                    f"{type(inputs).__name__}")
                merged = {**dict(inputs or {}), **kwargs}
                check_pipeline_kwargs(self, merged, "lens(...)")
                default_steps(self, merged)
                with self._steps.track(default_guidance(self, merged), from_call=True):
                    return self.model(**merged)
            return self.model(**self.prepare(inputs, where="lens(...)", **kwargs))

    def run_with_cache(
        self,
        inputs: Mapping[str, Any] | None = None,
        names: Names = None,
        *,
        hooks: Mapping[str, HookFn | Sequence[HookFn]] | None = None,
        cache_device: str | torch.device | None = None,
        cache_dtype: torch.dtype | None = None,
        attn_rows=None,
        attn_heads=None,
        grad: bool = False,
        **kwargs,
    ) -> tuple[Any, ActivationCache]:
        """One forward pass recording `names` (default: every site but attention maps).

        Returns the model's output and an ActivationCache. `cache_device="cpu"` and `cache_dtype` move values
        as they are recorded; `hooks` edit the run (the cache holds the edited values). `grad=True` runs with
        gradients and records the tensors the model really used, still in the graph, so
        `torch.autograd.grad(metric, cache[name])` works (attention maps then route the output through them).
        Other keywords go to the model's forward and must be parameters it accepts.
        """
        if self.family == "diffusion":
            check_grad(grad)
            if grad:
                raise ValueError("grad=True is not supported on diffusion pipelines (they sample under no_grad)")
            return self.generate(names=names, hooks=hooks, cache_device=cache_device, cache_dtype=cache_dtype,
                                 attn_rows=attn_rows, attn_heads=attn_heads, **{**dict(inputs or {}), **kwargs})
        check_cache_options(grad, cache_device, cache_dtype, attn_rows, attn_heads)
        cache = ActivationCache(cache_device, cache_dtype, keep_graph=grad)
        caps = {n: [lambda v, ctx: cache.record(ctx.name, v)] for n in self.resolve(names)}
        with self._guard("lens.run_with_cache"):
            prepared = self.prepare(inputs, where="lens.run_with_cache", suggest=_RUN_ARGS, **kwargs)
            with self.hooks(hooks, captures=caps, attn_rows=attn_rows, attn_heads=attn_heads), torch.set_grad_enabled(grad):
                output = self.model(**prepared)
        return output, cache

    def generate(
        self,
        prompt: str | list[str] | None = None,
        *,
        names: Names = None,
        hooks: Mapping[str, HookFn | Sequence[HookFn]] | None = None,
        steps: Iterable[int] | None = None,
        record_steps: Iterable[int] | None = None,
        cache_device: str | torch.device | None = None,
        cache_dtype: torch.dtype | None = None,
        attn_rows=None,
        attn_heads=None,
        progress: bool = True,
        **pipe_kwargs,
    ) -> tuple[Any, StepCache]:
        """Run the diffusion pipeline, recording `names` at every denoising step and guidance branch.

        `steps` limits `hooks` on denoiser sites to those step indices (0-based, negatives from the end),
        `record_steps` the recording. `progress=False` hides the pipeline's progress bar. Other keywords go to the
        pipeline and must be parameters of its __call__.
        Returns the pipeline output and a StepCache (`cache.get(name, step=t, branch="cond")`).
        """
        if self.family != "diffusion":
            raise TypeError(f"generate() records denoising steps; {self.architecture} is a {self.family} model. "
                            "Use run_with_cache, or model.generate for text generation.")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be True or False; got {progress!r:.40}")
        if prompt is not None:
            pipe_kwargs["prompt"] = prompt
        check_pipeline_kwargs(self, pipe_kwargs, "lens.generate", _GENERATE_ARGS)
        n_steps = default_steps(self, pipe_kwargs)
        cfg = default_guidance(self, pipe_kwargs)
        cache = StepCache(cache_device, cache_dtype)
        caps = {n: [lambda v, ctx: cache.record_ctx(ctx.name, v, ctx)] for n in self.resolve(names)}
        with self._guard("lens.generate"):
            session, (fire, record) = self._session(hooks, caps, attn_rows, attn_heads, steps, record_steps, None,
                                                    n_steps)
            seen: set[int] = set()
            with self._steps.track(cfg, from_call=True), session, _progress(self.model, progress):
                self._steps.restart()
                watch = getattr(self.model, self.adapter.denoiser).register_forward_pre_hook(
                    lambda *a: seen.add(self._steps.state.step))
                try:
                    with torch.no_grad():
                        output = self.model(**pipe_kwargs)
                finally:
                    watch.remove()
        for arg, wanted in (("steps", fire), ("record_steps", record)):
            if wanted and wanted - seen:
                warnings.warn(f"{arg}: steps {sorted(wanted - seen)} never ran (the pipeline ran steps "
                              f"{sorted(seen) if seen else 'none'}); their hooks did not fire", stacklevel=2)
        return output, cache

    def token_map(self, inputs: Mapping[str, Any]):
        """Modality, image index and (row, col) patch cell of every sequence position (generative VLMs)."""
        if self.family != "generative":
            raise TypeError(f"token_map is defined for generative VLMs; {self.architecture} is {self.family}")
        inputs = check_model_inputs(self, inputs, {}, "lens.token_map", for_forward=False)
        if not isinstance(inputs.get("input_ids"), torch.Tensor):
            raise ValueError("lens.token_map: inputs hold no input_ids tensor; pass what the processor returns "
                             "(return_tensors='pt')")
        return self.adapter.token_map(inputs, self.processor)

    # ---------------------------------------------------------------------------------------- read-out maps
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Generative VLMs: the LM's final norm then its unembedding, `(..., d_model) -> (..., vocab)`.

        `lens.unembed(cache["lm.blocks.{last}.resid_post"])` equals the model's logits; on earlier blocks it is
        the logit lens. Defined by each generative adapter (`models/readout.py`).
        """
        return self.adapter.unembed(resid)

    def project(self, x: torch.Tensor, tower: str = "vision", *, normalize: bool = False) -> torch.Tensor:
        """Contrastive models: a tower's residual stream into the joint embedding space (final norm, projection).

        CLIP: `(..., d_model) -> (..., d_proj)` for any residual vector (the class/EOS token's gives the model's
        embedding). SigLIP text: the same on the last token's vector; SigLIP vision pools by attention, so it takes
        whole token sequences `(batch, seq, d_model)`. `normalize=True` L2-normalises as the model does before its
        logits.
        """
        return self.adapter.project(x, tower, normalize=normalize)

    def __repr__(self) -> str:
        return (f"Lens({self.architecture}, {self.family}, {type(self.model).__name__}, "
                f"{len(self.sites)} hook points)")
