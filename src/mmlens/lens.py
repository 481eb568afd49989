"""`Lens`: one model (or pipeline) seen through its adapter's canonical names."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .hooks.cache import ActivationCache
from .hooks.context import HookContext
from .hooks.names import natural_sorted, resolve
from .hooks.session import HookFn, HookSession
from .hooks.sites import Site, expand
from .hooks.steps import BRANCHES_CFG, StepCache, StepState
from .models.base import Adapter

Names = str | Sequence[str] | None


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
        self._state = StepState()

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
        return resolve(pattern, self._names, where=self._table_file(), valid_set=self._name_set)

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

    def resolve(self, names: Names) -> list[str]:
        if names is None:
            return [n for n in self._names if self.sites[n].row.read != "pattern"]
        return resolve(names, self._names, where=self._table_file(), valid_set=self._name_set)

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
    ) -> Iterator[HookSession]:
        """Hooks alive for the `with` block only, removed on exit also when the block raises.

        `fns` maps names or globs to `fn(value, ctx)`; a function returning a tensor replaces the value.
        `attn_rows`/`attn_heads` restrict computed attention probabilities to those query rows / heads (the same
        positions in every batch row); a dict `{glob: selection}` sets them per site.
        Diffusion: `steps` limits denoiser hooks (`fns`) and `record_steps` denoiser captures to those step
        indices; text-encoder hooks always fire. `guidance` says whether the denoiser batch holds
        [uncond, cond] halves (default: ask the pipeline).
        """
        denoiser = getattr(self.adapter, "denoiser", None)

        def is_denoiser(site: Site) -> bool:
            return denoiser is not None and (site.path.startswith(denoiser + ".") or site.path == denoiser)

        def at(step_set: set[int] | None, fn: HookFn) -> HookFn:
            def gated(value, ctx):
                return fn(value, ctx) if ctx.step is None or ctx.step in step_set else None
            return fn if step_set is None else gated

        fire, record = (None if s is None else set(s) for s in (steps, record_steps))
        fn_map = {n: [at(fire, f) for f in fs] for n, fs in self._expand_map(fns or {}).items()}
        cap_map = {n: [at(record, f) for f in fs] for n, fs in self._expand_map(captures or {}).items()}

        def enabled(site: Site) -> bool:
            if not is_denoiser(site):
                return True
            step = self._state.step
            return bool(site.name in fn_map and (fire is None or step in fire)
                        or site.name in cap_map and (record is None or step in record))

        def context(site: Site) -> HookContext:
            if is_denoiser(site):
                s = self._state
                return HookContext(site.name, site.path, s.step, s.timestep, s.branches)
            return HookContext(site.name, site.path)

        session = HookSession(self.sites, fn_map, cap_map, context=context, enabled=enabled,
                              attn_rows=self._per_site(attn_rows), attn_heads=self._per_site(attn_heads))
        with contextlib.ExitStack() as stack:
            if denoiser is not None:
                stack.enter_context(self._track_steps(guidance))
            stack.enter_context(session)
            yield session

    def _per_site(self, sel):
        if not isinstance(sel, Mapping):
            return sel
        return {name: v for pattern, v in sel.items() for name in self.resolve(pattern)}

    def _expand_map(self, fns: Mapping[str, HookFn | Sequence[HookFn]]) -> dict[str, list[HookFn]]:
        out: dict[str, list[HookFn]] = {}
        for pattern, fn in fns.items():
            chain = list(fn) if isinstance(fn, (list, tuple)) else [fn]
            for name in self.resolve(pattern):
                out.setdefault(name, []).extend(chain)
        return out

    @contextlib.contextmanager
    def _track_steps(self, guidance: bool | None):
        module = getattr(self.model, self.adapter.denoiser)
        state = self._state
        state.reset()

        def pre(mod, args, kwargs):
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            cfg = guidance if guidance is not None else bool(getattr(self.model, "do_classifier_free_guidance", False))
            state.step = state.calls
            state.timestep = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else t
            state.branches = BRANCHES_CFG if cfg else ("cond",)
            state.calls += 1

        handle = module.register_forward_pre_hook(pre, with_kwargs=True)
        try:
            yield state
        finally:
            handle.remove()
            state.reset()

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

    def prepare(self, inputs: Mapping[str, Any] | None = None, **kwargs) -> dict[str, Any]:
        """Processor output or keyword tensors, moved to the model's first device; floats in its dtype."""
        merged = {**dict(inputs or {}), **kwargs}
        out = {}
        for k, v in merged.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device)
                if v.is_floating_point():
                    v = v.to(self.dtype)
            out[k] = v
        return out

    def __call__(self, inputs: Mapping[str, Any] | None = None, **kwargs):
        if self.family == "diffusion":
            return self.model(**{**dict(inputs or {}), **kwargs})
        return self.model(**self.prepare(inputs, **kwargs))

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
        as they are recorded; `hooks` edit the run (the cache holds the edited values).
        """
        if self.family == "diffusion":
            return self.generate(names=names, hooks=hooks, cache_device=cache_device, cache_dtype=cache_dtype,
                                 attn_rows=attn_rows, attn_heads=attn_heads, **{**dict(inputs or {}), **kwargs})
        cache = ActivationCache(cache_device, cache_dtype)
        caps = {n: [lambda v, ctx: cache.record(ctx.name, v)] for n in self.resolve(names)}
        with self.hooks(hooks, captures=caps, attn_rows=attn_rows, attn_heads=attn_heads), torch.set_grad_enabled(grad):
            output = self(inputs, **kwargs)
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
        **pipe_kwargs,
    ) -> tuple[Any, StepCache]:
        """Run the diffusion pipeline, recording `names` at every denoising step and guidance branch.

        `steps` limits `hooks` on denoiser sites to those step indices (0-based), `record_steps` the recording.
        Returns the pipeline output and a StepCache (`cache.get(name, step=t, branch="cond")`).
        """
        if self.family != "diffusion":
            raise TypeError(f"generate() records denoising steps; {self.architecture} is a {self.family} model. "
                            "Use run_with_cache, or model.generate for text generation.")
        if prompt is not None:
            pipe_kwargs["prompt"] = prompt
        guidance = pipe_kwargs.get("guidance_scale")
        cfg = None if guidance is None else guidance > 1
        cache = StepCache(cache_device, cache_dtype)
        caps = {n: [lambda v, ctx: cache.record_ctx(ctx.name, v, ctx)] for n in self.resolve(names)}
        with self.hooks(hooks, captures=caps, attn_rows=attn_rows, attn_heads=attn_heads, steps=steps,
                        record_steps=record_steps, guidance=cfg):
            with torch.no_grad():
                output = self.model(**pipe_kwargs)
        return output, cache

    def token_map(self, inputs: Mapping[str, Any]):
        """Modality, image index and (row, col) patch cell of every sequence position (generative VLMs)."""
        if self.family != "generative":
            raise TypeError(f"token_map is defined for generative VLMs; {self.architecture} is {self.family}")
        return self.adapter.token_map(dict(inputs), self.processor)

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
        embedding). `normalize=True` L2-normalises as the model does before its logits.
        """
        return self.adapter.project(x, tower, normalize=normalize)

    def __repr__(self) -> str:
        return (f"Lens({self.architecture}, {self.family}, {type(self.model).__name__}, "
                f"{len(self.sites)} hook points)")
