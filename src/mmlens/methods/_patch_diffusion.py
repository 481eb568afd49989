"""`patch` on diffusion pipelines: the source prompt's activations put into the base prompt's run at chosen
denoising steps (and guidance branches), every patched run starting from the same initial latents.

The columns are step sets instead of token positions ({"early": range(0, 5), "late": range(15, 20)}); patched runs
go into the batch dimension (prompts and latents repeated), so k step ranges cost one pipeline call, not k.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..hooks.checks import default_steps
from .result import provenance

BRANCHES = ("uncond", "cond")


def step_columns(positions, n_steps: int) -> tuple[list[str], list[set[int]]]:
    """positions -> (labels, step sets): None = every step; an int or a list of ints = one column per step; a
    dict = named step ranges. Negative steps count from the end."""
    def steps(spec, label):
        spec = [spec] if isinstance(spec, int) else list(spec)
        if not spec:
            raise ValueError(f"positions[{label!r}] holds no step")
        out = set()
        for s in spec:
            if isinstance(s, bool) or not isinstance(s, int) or not -n_steps <= s < n_steps:
                raise ValueError(f"positions[{label!r}]: step {s!r} is not an int in [-{n_steps}, {n_steps}) "
                                 f"(num_inference_steps={n_steps})")
            out.add(s % n_steps)
        return out
    if positions is None:
        return ["all steps"], [set(range(n_steps))]
    if isinstance(positions, Mapping):
        return [str(k) for k in positions], [steps(v, str(k)) for k, v in positions.items()]
    if isinstance(positions, int):
        positions = [positions]
    if isinstance(positions, (Sequence, range)) and not isinstance(positions, str):
        return [f"step {p}" for p in positions], [steps(p, f"step {p}") for p in positions]
    raise TypeError(f"positions on a diffusion pipeline are denoising steps: None, an int, a list of ints or a dict "
                    f"{{name: steps}}; got {type(positions).__name__}")


def _prompts(kwargs: dict, what: str) -> list[str]:
    p = kwargs.get("prompt")
    if isinstance(p, str):
        return [p]
    if isinstance(p, (list, tuple)) and p and all(isinstance(x, str) for x in p):
        return list(p)
    raise ValueError(f"{what} must hold 'prompt' (a string or a list of strings); got {p!r:.60}")


def _latents(lens, kwargs: dict, batch: int, seed: int) -> Tensor:
    pipe = lens.model
    den = getattr(pipe, lens.adapter.denoiser)
    cfg = den.config
    size = getattr(cfg, "sample_size", 64)
    size = size if isinstance(size, int) else size[0]
    scale = pipe.vae_scale_factor
    h = kwargs.get("height") or size * scale
    w = kwargs.get("width") or size * scale
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.in_channels, h // scale, w // scale, generator=g)


def patch_diffusion(lens, clean: dict, corrupt: dict, names: list[str], *, positions, metric, direction: str,
                    groups: list[tuple[str, ...]], row_names: list[str], window: int, batch_size: int | None, engine: str, branches: Sequence[str] | None, seed: int,
                    metric_values, result_cls):
    """See `patch`: `clean` / `corrupt` are pipeline keyword arguments differing in their prompts."""
    for what, kw in (("clean", clean), ("corrupt", corrupt)):
        if not isinstance(kw, Mapping):
            raise TypeError(f"{what} must be the pipeline's keyword arguments (a dict with 'prompt'); got "
                            f"{type(kw).__name__}")
    denoiser = lens.adapter.denoiser + "."
    outside = [n for n in names if not lens.sites[n].path.startswith(denoiser)]
    if outside:
        raise ValueError(f"patch on a diffusion pipeline patches denoiser sites at denoising steps; {outside} lie "
                         f"outside the {lens.adapter.denoiser} (patch the text encoder by patching its output's "
                         "consumers, e.g. the cross-attention k/v)")
    if branches is not None:
        bad = [b for b in branches if b not in BRANCHES]
        if bad or not branches:
            raise ValueError(f"branches={branches!r}; allowed: a non-empty subset of {BRANCHES}")
    base, src = (corrupt, clean) if direction == "denoise" else (clean, corrupt)
    b = len(_prompts(base, "the base run"))
    if len(_prompts(src, "the source run")) != b:
        raise ValueError("clean and corrupt must hold as many prompts")
    common = {k: v for k, v in base.items() if k not in ("prompt", "latents")}
    common.setdefault("output_type", "np")
    n_steps = default_steps(lens, common)
    if n_steps is None:
        raise ValueError("pass num_inference_steps: the step columns are checked against it")
    common["num_inference_steps"] = n_steps
    labels, step_sets = step_columns(positions, n_steps)
    latents = base.get("latents")
    latents = _latents(lens, common, b, seed) if latents is None else latents
    src_kwargs = {k: v for k, v in src.items() if k not in ("prompt", "latents")}
    src_kwargs = {**common, **src_kwargs}
    union = sorted(set().union(*step_sets))
    src_out, cache = lens.generate(_prompts(src, "the source run"), names=names, record_steps=union, progress=False,
                                   latents=latents, **src_kwargs)
    base_out, _ = lens.generate(_prompts(base, "the base run"), names=[], progress=False, latents=latents, **common)
    src_m, base_m = metric_values(metric, src_out, 1, b)[0], metric_values(metric, base_out, 1, b)[0]

    windows = groups
    targets = [(w, c) for w in windows for c in range(len(step_sets))]
    per = 1 if engine == "loop" else max(1, (batch_size or 16) // b)
    values = torch.empty(len(targets), b)
    for lo in range(0, len(targets), per):
        chunk = targets[lo: lo + per]
        k = len(chunk)
        by_name: dict[str, list[tuple[int, set[int]]]] = {}
        for j, (w, c) in enumerate(chunk):
            for n in w:
                by_name.setdefault(n, []).append((j, step_sets[c]))

        def make(name, entries):
            def fn(value, ctx):
                hits = [j for j, steps in entries if ctx.step in steps]
                if not hits:
                    return None
                source = cache.get(name, step=ctx.step).to(value.device, value.dtype)
                halves = ctx.branches or (None,)
                n_src, n_val = len(source) // len(halves), len(value) // len(halves)
                out = value.clone()
                for h, branch in enumerate(halves):
                    if branches is not None and branch is not None and branch not in branches:
                        continue
                    for j in hits:
                        out[h * n_val + j * b: h * n_val + (j + 1) * b] = source[h * n_src: (h + 1) * n_src]
                return out
            return fn

        hooks = {n: make(n, e) for n, e in by_name.items()}
        out, _ = lens.generate(_prompts(base, "the base run") * k, names=[], hooks=hooks, progress=False,
                               latents=latents.repeat(k, 1, 1, 1), **common)
        values[lo: lo + k] = metric_values(metric, out, k, b)
    per_example = values.reshape(len(windows), len(step_sets), b)
    clean_m, corrupt_m = (src_m, base_m) if direction == "denoise" else (base_m, src_m)
    return result_cls(meta=provenance(lens, names, engine=engine, seed=seed, steps=n_steps), names=row_names,
                      heads=[], columns=labels, per_example=per_example, clean=clean_m, corrupt=corrupt_m,
                      direction=direction, window=window, method="patch")
