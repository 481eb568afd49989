"""Attribution patching (Nanda 2023; Syed et al. 2023; Kramár et al. 2024): every patch's effect estimated at once
by a first-order Taylor expansion, (source - base activation) . d metric / d activation, from one forward on each
input and one backward on the base run.

    est = attribution_patching(vlm, clean, corrupt, "lm.blocks.*.resid_pre", positions=regions, metric=m)
    exact = patch(vlm, clean, corrupt, "lm.blocks.*.resid_pre", positions=regions, metric=m)
    torch.corrcoef(torch.stack([est.values.flatten(), exact.values.flatten()]))   # the same PatchResult shape

The estimate is linear: it is exact for a patch whose effect on the metric is linear and degrades where attention
saturates or nonlinearities bend (AtP*'s corrections are not implemented; `patch` gives the exact values to check
the candidates the estimate ranks first). Positions, heads and directions mean what they mean in `patch`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._grad import frozen as _frozen, leaf as _leaf
from ._targets import columns, is_flat, layout_dims
from .patching import DIRECTIONS, PatchResult, _as_run, _batch, _check_pair, _merge, _metric_values, _seq
from .result import provenance, require_family


def _per_position(delta_grad: Tensor, site, batch: int) -> Tensor:
    """(batch, seq[, heads]) contributions: the product summed over every other dim."""
    if is_flat(site):
        delta_grad = delta_grad.reshape(batch, -1, *delta_grad.shape[1:])
    seq_dim, head_dim = layout_dims(site)
    keep = [d for d in (0, seq_dim, head_dim) if d is not None]
    x = delta_grad.float().permute(*keep, *[d for d in range(delta_grad.dim()) if d not in keep])
    return x.reshape(*x.shape[: len(keep)], -1).sum(-1)


def attribution_patching(lens, clean, corrupt, names, *, positions=None, heads: Sequence[int] | None = None,
                         metric: Callable[[Any], Tensor], direction: str = "denoise") -> PatchResult:
    """Linear estimates of `patch(lens, clean, corrupt, names, ...)`: a PatchResult with method="attribution" whose
    `per_example` = base metric + (source - base) . gradient, summed over each column's positions (and each head).

    No `window`: patching k sites together blocks the paths from the earlier ones through the later ones, which a
    sum of per-site total-derivative estimates counts twice; use `patch(window=k)` for window restoration."""
    require_family(lens, ("generative", "contrastive"), "attribution_patching")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; allowed: {DIRECTIONS}")
    names = lens.resolve(names)
    clean_run, corrupt_run = _as_run(clean, "clean"), _as_run(corrupt, "corrupt")
    _check_pair(clean_run, corrupt_run)
    base, src = (corrupt_run, clean_run) if direction == "denoise" else (clean_run, corrupt_run)
    b = _batch(lens, base.inputs)
    head_list = [int(h) for h in heads] if heads is not None else []
    for n in names:
        seq_dim, head_dim = layout_dims(lens.sites[n])
        if positions is not None and seq_dim is None:
            raise ValueError(f"positions: {n} has no sequence dim ({lens.sites[n].row.layout})")
        if head_list and head_dim is None:
            raise ValueError(f"heads: {n} has no head dim ({lens.sites[n].row.layout}); heads apply to attn.z, "
                             "attn.q/k/v and attn.pattern")

    with torch.no_grad():
        src_out, src_cache = lens.run_with_cache(src.inputs, names=names, hooks=src.hooks)
    model = lens.model if isinstance(lens.model, torch.nn.Module) else None
    with _frozen(model) if model is not None else contextlib.nullcontext():
        base_out, cache = lens.run_with_cache(base.inputs, names=names, grad=True,
                                              hooks=_merge(base.hooks, {n: _leaf for n in names}))
        m = metric(base_out)
        if torch.as_tensor(m).shape != (b,):
            raise ValueError(f"metric(output) must return one value per example, shape ({b},); got "
                             f"{tuple(torch.as_tensor(m).shape)}")
        acts = [cache[n] for n in names]
        grads = torch.autograd.grad(m.sum(), acts, allow_unused=True)
    seq = _seq(lens, names, {n: src_cache[n] for n in names}, b)
    labels, masks = columns(positions, b, seq)

    contrib = {}
    for n, a, g in zip(names, acts, grads):
        if g is None:
            g = torch.zeros_like(a)
        delta = src_cache[n].to(a.device, torch.float32) - a.detach().float()
        contrib[n] = _per_position(delta * g.float(), lens.sites[n], b).cpu()  # (batch, seq[, heads]) or (batch,)

    base_m = m.detach().float().cpu()
    src_m = _metric_values(metric, src_out, 1, b)[0]
    # one (columns, batch, seq) weight tensor for every site: a Python loop over columns x sites costs more than the
    # model's forward on a GPU when every image position is its own column (~18k columns at LLaVA-7B's 32 x 576)
    weights = None if all(mask is None for mask in masks) else \
        torch.stack([torch.ones(b, seq) if mask is None else mask.float() for mask in masks])
    rows = []
    for n in names:
        for h in head_list or [None]:
            c = contrib[n]
            c = c[..., h] if h is not None else c.sum(-1) if c.dim() == 3 else c
            flat = c.reshape(b, -1)
            sums = flat.sum(-1).expand(len(masks), b) if weights is None else torch.einsum("bs,cbs->cb", flat, weights)
            rows.append(base_m + sums)
    clean_m, corrupt_m = (src_m, base_m) if direction == "denoise" else (base_m, src_m)
    return PatchResult(meta=provenance(lens, names), names=list(names), heads=head_list, columns=labels,
                       per_example=torch.stack(rows), clean=clean_m, corrupt=corrupt_m, direction=direction,
                       window=1, method="attribution")
