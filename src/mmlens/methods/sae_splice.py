"""Run a model with a sparse autoencoder in its forward pass: the SAE's reconstruction in place of the activation
(`sae_spliced`), or the activation with chosen features clamped or boosted (`steer_features`).

    with sae_spliced(vlm, sae):                        # at sae.cfg.hook_name, every position
        out = vlm(inputs)                              # what the model does when it only has the SAE's features
    with sae_spliced(vlm, sae, error_term=True):       # x_hat + (x - x_hat): the clean output, exactly, with the
        out = vlm(inputs)                              # features in the graph (attribution through features)
    with steer_features(sd, sae, {123: 8.0}, steps=range(0, 10), branches="cond"):
        images, _ = sd.generate("a square")            # feature 123 held at 8 over the first 10 steps
    with steer_features(vlm, sae, {7: 4.0}, mode="add", positions=-1):
        vlm.model.generate(**vlm.prepare(inputs))      # 4 * W_dec[7] added at the last position

The edit is the same on every family because it works on tokens: (batch, seq, d) sequences, (batch, d) pooled
values, head-split (batch, seq, heads, d_head) values as (batch, seq, heads * d_head), and diffusion feature maps
(batch, C, h, w) with channels last, one token per pixel (positions then index the h * w cells in raster order).

Steering keeps what the SAE does not explain (`error_term=True`, the default): the new activation is
x + decode(f') - decode(f) = x + (f' - f) W_dec / input_scale, with f = encode(x) and f' the edited features, so a
position whose features are left alone keeps its exact activation and the SAE's reconstruction error never enters
(Templeton et al. 2024 steer this way). `error_term=False` gives decode(f') instead.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .steering import _check_branches, _check_positions, _selection, _to_tokens

STEER_MODES = ("clamp", "add")


# ------------------------------------------------------------------------------------------ public API
@contextlib.contextmanager
def sae_spliced(lens, sae, *, names=None, error_term: bool = False, positions=None, steps=None, branches=None,
                guidance: bool | None = None) -> Iterator[Any]:
    """For the `with` block, the activation at the SAE's site becomes its reconstruction `sae(x)`.

    `names`: the hook point(s) (default `sae.cfg.hook_name`; a glob or list applies the same SAE at each).
    `error_term=True` adds x - sae(x), so the model's output is exactly the clean one while gradients flow through
    the SAE's features (`x + sae(x) - sae(x).detach()`: equal values to the bit, the graph through the features).
    `positions` (None: every position; ints, negatives from the end; a (batch, seq) or (seq,) bool mask), `steps`,
    `branches` and `guidance` (diffusion) choose where, as in `methods.steering.steering`. Hooks go through
    `lens.hooks`: removed on exit, also when the block raises.
    """
    fns = _plan_splice(lens, sae, names, error_term, positions, branches)
    with lens.hooks(fns, steps=steps, guidance=guidance) as session:
        yield session


@contextlib.contextmanager
def steer_features(lens, sae, features: Mapping[int, float], *, mode: str = "clamp", names=None, positions=None,
                   steps=None, branches=None, error_term: bool = True, guidance: bool | None = None) -> Iterator[Any]:
    """For the `with` block, the SAE features in `features` ({index: value}) are edited at the SAE's site.

    mode "clamp": the feature's activation set to `value` (0 ablates it); "add": `value` added to it, i.e.
    value * W_dec[feature] / input_scale added to the activation. With `error_term` (default) the rest of the
    activation is kept exactly: x + decode(f') - decode(f); without, the activation becomes decode(f').
    `positions`, `steps`, `branches`, `guidance`: where and when, as in `sae_spliced`.
    """
    if mode not in STEER_MODES:
        raise ValueError(f"mode={mode!r}; allowed: {STEER_MODES}")
    idx, vals = _check_features(features, sae.cfg.d_sae)
    fns = _plan(lens, sae, names, positions, branches,
                lambda site, pos, chosen: _steer_fn(site, sae, idx, vals, mode, error_term, pos, chosen))
    with lens.hooks(fns, steps=steps, guidance=guidance) as session:
        yield session


def site_names(lens, sae, names=None, *, one: bool = False) -> list[str]:
    """The canonical sites an SAE applies to: `names` (names, globs) or its `cfg.hook_name`; attention maps and,
    with `one`, more than one site are refused."""
    if names is None:
        names = sae.cfg.hook_name
        if names is None:
            raise ValueError("this SAE's cfg.hook_name is None, so it names no site; pass name= (a hook point such "
                             "as 'vision.blocks.2.resid_post')")
    resolved = lens.resolve(names, arg="name" if one else "names")
    for n in resolved:
        if lens.sites[n].row.read == "pattern":
            raise ValueError(f"{n!r} is an attention pattern; an SAE reads activations (residual streams, attention "
                             "and MLP outputs)")
    if one and len(resolved) != 1:
        raise ValueError(f"name={names!r} matches {len(resolved)} sites {resolved[:6]}; give exactly one")
    return resolved


# ------------------------------------------------------------------------------------------- plumbing
def _check_features(features, d_sae: int) -> tuple[list[int], list[float]]:
    if not isinstance(features, Mapping) or not features:
        raise TypeError(f"features must be a non-empty dict {{feature index: value}}; got {type(features).__name__} "
                        f"{features!r:.60}")
    idx, vals = [], []
    for f, v in features.items():
        try:
            i = operator.index(f)
        except TypeError:
            raise TypeError(f"feature indices must be ints; got {type(f).__name__} {f!r:.40}") from None
        if not 0 <= i < d_sae:
            raise ValueError(f"feature {i} is out of range: this SAE has d_sae={d_sae} (0 to {d_sae - 1})")
        if isinstance(v, Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"feature {i}: the value must be a finite number; got {v!r:.40}")
        idx.append(i)
        vals.append(float(v))
    return idx, vals


def _plan(lens, sae, names, positions, branches, make: Callable) -> dict[str, Callable]:
    pos = _check_positions(positions)
    chosen = _check_branches(lens, branches)
    return {n: make(lens.sites[n], pos, chosen) for n in site_names(lens, sae, names)}


def _plan_splice(lens, sae, names, error_term, positions, branches) -> dict[str, Callable]:
    if not isinstance(error_term, bool):
        raise TypeError(f"error_term must be True or False; got {error_term!r:.40}")
    return _plan(lens, sae, names, positions, branches,
                 lambda site, pos, chosen: _splice_fn(site, sae, error_term, pos, chosen))


def _sae_input(x: Tensor, sae, site) -> Tensor:
    """x (..., d) as the SAE's dtype and device, after checking its width."""
    if x.shape[-1] != sae.cfg.d_in:
        raise ValueError(f"{site.name!r} has {x.shape[-1]} features per token; this SAE reads d_in={sae.cfg.d_in}"
                         + (f" (trained on {sae.cfg.hook_name!r})" if sae.cfg.hook_name else ""))
    p = sae.W_enc
    return x.to(p.device, p.dtype)


def _splice_fn(site, sae, error_term: bool, pos, chosen) -> Callable:
    def splice(value: Tensor, ctx) -> Tensor:
        x, back = _to_tokens(value, site)
        xs = _sae_input(x, sae, site)
        x_hat = sae(xs)
        # error term: x itself plus an exact zero that carries the features' graph (x + 0 is x to the bit)
        new = x + (x_hat - x_hat.detach()).to(x) if error_term else x_hat.to(x.device)
        sel = _selection(x, site.name, pos, chosen, ctx)
        if sel is not None:
            new = torch.where(sel[..., None], new, x.to(new.dtype))
        return back(new.to(value.dtype))

    return splice


def _steer_fn(site, sae, idx: list[int], vals: list[float], mode: str, error_term: bool, pos, chosen) -> Callable:
    def steer(value: Tensor, ctx) -> Tensor:
        x, back = _to_tokens(value, site)
        xs = _sae_input(x, sae, site)
        f = sae.encode(xs)
        cols = torch.as_tensor(idx, device=f.device)
        target = torch.as_tensor(vals, device=f.device, dtype=f.dtype)
        delta = torch.zeros_like(f)  # f' - f, only in the chosen columns
        delta[..., cols] = target - f[..., cols] if mode == "clamp" else target.expand_as(f[..., cols])
        if error_term:  # x + decode(f') - decode(f), without the rounding of two decodes
            new = x + ((delta @ sae.W_dec) / sae.input_scale).to(x)
        else:
            new = sae.decode(f + delta).to(x.device)
        sel = _selection(x, site.name, pos, chosen, ctx)
        if sel is not None:
            new = torch.where(sel[..., None], new, x.to(new.dtype))
        return back(new.to(value.dtype))

    return steer


__all__ = ["STEER_MODES", "sae_spliced", "site_names", "steer_features"]
