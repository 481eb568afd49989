"""Attention knockout between token groups (Geva et al. 2023, "Dissecting recall"; on VLMs: Neo et al. 2024, Basu
et al. 2024): block the attention from a group of query positions to a group of key positions in a window of layers,
and measure what that does to a metric.

    red, blue = tok.convert_tokens_to_ids(["red", "blue"])
    res = knockout(vlm, inputs, edges={"image->last": ("image", "last"), "text->last": ("text", "last")},
                   window=1, metric=lambda out: out.logits[:, -1, red] - out.logits[:, -1, blue])
    res.values          # (windows, edges, batch): the metric with each knockout
    res.baseline        # (batch,): the metric without
    res.effect()        # relative change (values - baseline) / |baseline|
    res.plot()          # heat map windows x edges

How. At every `.attn.pattern` site of a window the probabilities from each target query to each source key are set
to 0 and every edited query row is renormalised over the keys it keeps: exactly a softmax with those logits at -inf,
as Geva et al. mask them. The module's output is then `edited_probs @ v` (see `hooks/attention.py`). A query row whose
every attended key is knocked out would have nothing left: it is left unchanged and counted in a warning (and in
`meta["rows_left_unchanged"]`).

Batching. Several (window, edge) combinations run in one forward: the inputs are repeated along dim 0 (every input
tensor concatenated with itself: for Qwen2-VL that also stacks pixel_values (patches, dim) and image_grid_thw), and
each copy gets its own knockout. `metric(output)` sees one copy at a time (the output's rows of that copy), as in
`patch`, and returns one value per example, `(batch,)`.

Families. Generative VLMs: the LM's self-attention by default; groups may be the strings "image" (image tokens,
BLIP-2's query tokens), "text", "last" (each row's last non-padding position) or "answer" (each row's last text
token, `TokenMap.answer_positions`). Contrastive models (CLIP, SigLIP): the vision tower by default (positions are
patch-sequence positions, CLS first for CLIP); only the knocked-out tower's inputs are repeated, so the batch is the
images (or the texts, for text-tower layers). Diffusion pipelines: the denoiser's cross-attention (SD, PixArt; SD3:
its joint attention over [image tokens, text tokens], so text token t is key n_image + t), in the "cond" half of the
guided batch only (positions of the prompt's tokens mean nothing in the negative prompt), for the denoising `steps`
asked; an edge may give key positions only (all queries, i.e. every latent pixel). One generation runs per (window,
edge), each from the same noise (the generator's state is restored before each; a CPU generator seeded 0 is used when
neither `generator` nor `latents` is given); `metric` gets the pipeline's output and returns one value per image.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from .patching import _slice_output
from .result import Result, provenance, require_family

STRINGS = ("image", "text", "last", "answer")
GROUP_HELP = ("None (every position), 'image', 'text', 'last' or 'answer' (generative VLMs), a list / range / 1-D "
              "tensor of positions shared by all batch rows, or a (batch, seq) bool tensor")
MAX_ROWS = 64


@dataclass(repr=False)
class KnockoutResult(Result):
    """`values` (windows, edges, batch), float32: the metric with edge `edges[j]` knocked out in every layer of window
    `i` (`sites[i]` its `.attn.pattern` sites, `windows[i]` its label); `baseline` (batch,) the metric without."""

    windows: list[str]
    sites: list[list[str]]
    edges: list[str]
    values: Tensor
    baseline: Tensor

    def effect(self) -> Float[Tensor, "windows edges batch"]:
        """Relative change `(values - baseline) / |baseline|` (inf or NaN where the baseline is 0: read `values`)."""
        return (self.values - self.baseline) / self.baseline.abs()

    def summary(self) -> str:
        w, e, b = self.values.shape
        return (f"KnockoutResult({self.meta.get('architecture')}: {w} windows of {self.meta.get('window', '?')} "
                f"layers x {e} edges x {b} rows)")

    def plot(self, what: str = "effect", batch: int | None = None):
        """Heat map windows (rows) x edges (columns) of `what` ('effect' or 'values'), averaged over the batch rows
        (`batch=i`: row i only)."""
        import matplotlib.pyplot as plt

        if what not in ("effect", "values"):
            raise ValueError(f"what must be 'effect' or 'values'; got {what!r}")
        data = self.effect() if what == "effect" else self.values
        data = data.mean(-1) if batch is None else data[..., batch]
        w, e = data.shape
        fig, ax = plt.subplots(figsize=(1.2 * e + 2.6, 0.38 * w + 1.3))
        if what == "effect":
            lim = float(data.nan_to_num(0, 0, 0).abs().max()) or 1.0
            im = ax.imshow(data.numpy(), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
        else:
            im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis")
        for i in range(w):
            for j in range(e):
                ax.text(j, i, f"{float(data[i, j]):.2g}", ha="center", va="center", fontsize=6)
        ax.set_yticks(range(w), self.windows, fontsize=7)
        ax.set_xticks(range(e), self.edges, fontsize=7, rotation=30, ha="right")
        fig.colorbar(im, ax=ax, fraction=0.05)
        rows = "mean over rows" if batch is None else f"row {batch}"
        label = "relative change of the metric" if what == "effect" else "metric"
        ax.set_title(f"attention knockout: {label} ({rows})", fontsize=8)
        fig.tight_layout()
        return fig


# ------------------------------------------------------------------------------------------------ token groups
@dataclass
class _Group:
    """One side of an edge: 'all', 'idx' (1-D positions, shared by every row), 'mask' ((rows, n) bool) or 'str'."""

    kind: str
    value: Any = None
    string: str | None = None  # the group name a 'mask' was resolved from

    def materialise(self, n: int, where: str) -> Bool[Tensor, "rows n"]:
        """(1 or batch, n) bool over an attention axis of length n."""
        if self.kind == "all":
            return torch.ones(1, n, dtype=torch.bool)
        if self.kind == "idx":
            lo, hi = int(self.value.min()), int(self.value.max())
            if lo < -n or hi >= n:
                bad = lo if lo < -n else hi
                raise ValueError(f"{where}: position {bad} is out of range ({n} positions; allowed {-n} to {n - 1})")
            out = torch.zeros(1, n, dtype=torch.bool)
            out[0, self.value % n] = True
            return out
        if self.value.shape[1] != n:
            raise ValueError(f"{where}: the bool mask has {self.value.shape[1]} positions per row; that axis has {n}")
        return self.value


def _group(g, where: str) -> _Group:
    if g is None:
        return _Group("all")
    if isinstance(g, str):
        if g not in STRINGS:
            raise ValueError(f"{where} is {g!r}; allowed: {GROUP_HELP}")
        return _Group("str", g)
    if hasattr(g, "__array__") and not isinstance(g, Tensor):
        g = torch.as_tensor(g)
    if isinstance(g, Tensor):
        if g.dtype == torch.bool:
            if g.dim() not in (1, 2):
                raise ValueError(f"{where}: a bool mask must be (seq,) or (batch, seq); got shape {tuple(g.shape)}")
            g = g[None] if g.dim() == 1 else g
            empty = (~g.any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"{where} is empty in batch rows {empty}: the bool mask selects no position there")
            return _Group("mask", g.cpu())
        if g.is_floating_point() or g.is_complex():
            raise TypeError(f"{where} must be {GROUP_HELP}; got a {g.dtype} tensor")
        if g.dim() != 1:
            raise ValueError(f"{where}: positions must be 1-D (shared by all rows; per-row groups: a (batch, seq) bool "
                             f"tensor); got shape {tuple(g.shape)}")
        if g.numel() == 0:
            raise ValueError(f"{where} is empty; allowed: {GROUP_HELP} selecting at least one position")
        return _Group("idx", g.long().cpu())
    if isinstance(g, (bool, int)):
        raise TypeError(f"{where} must be {GROUP_HELP}; got the scalar {g!r} (write [{g!r}] for one position)")
    if isinstance(g, (Sequence, range)) and not isinstance(g, bytes):
        items = list(g)
        if not items:
            raise ValueError(f"{where} is empty; allowed: {GROUP_HELP} selecting at least one position")
        bad = [x for x in items if isinstance(x, bool) or not hasattr(x, "__index__")]
        if bad:
            raise TypeError(f"{where} must be {GROUP_HELP}; it holds {type(bad[0]).__name__} {bad[0]!r}")
        return _Group("idx", torch.tensor([int(x) for x in items], dtype=torch.long))
    raise TypeError(f"{where} must be {GROUP_HELP}; got {type(g).__name__}")


def _is_pair(v) -> bool:
    if isinstance(v, tuple):
        return len(v) == 2
    return isinstance(v, list) and len(v) == 2 and not any(isinstance(x, (bool, int)) for x in v)


def _parse_edges(edges, diffusion: bool) -> tuple[list[str], list[tuple[_Group, _Group]]]:
    if not isinstance(edges, Mapping):
        raise TypeError(f"edges must be a dict label -> (source_keys, target_queries); got {type(edges).__name__}")
    if not edges:
        raise ValueError("edges is empty; give at least one label -> (source_keys, target_queries)")
    labels, groups = [], []
    for label, v in edges.items():
        if not isinstance(label, str):
            raise TypeError(f"edges: labels must be strings; got {type(label).__name__} {label!r}")
        if _is_pair(v):
            src, tgt = v
        elif diffusion:
            src, tgt = v, None  # key positions only: every latent pixel queries
        else:
            raise TypeError(f"edges[{label!r}] must be a (source_keys, target_queries) pair; got {type(v).__name__} "
                            f"{v!r:.60}")
        groups.append((_group(src, f"edges[{label!r}] source keys"), _group(tgt, f"edges[{label!r}] target queries")))
        labels.append(label)
    return labels, groups


def _resolve_strings(lens, inputs, groups, labels) -> None:
    """'image' / 'text' / 'last' / 'answer' -> (batch, seq) bool masks, through the token map."""
    named = [(k, side, g) for k, pair in enumerate(groups) for side, g in zip(("source keys", "target queries"), pair)
             if g.kind == "str"]
    if not named:
        return
    if lens.family != "generative":
        k, side, g = named[0]
        raise ValueError(f"edges[{labels[k]!r}] {side} is {g.value!r}: group names resolve through the token map of a "
                         f"generative VLM; {lens.architecture} is a {lens.family} model: give positions")
    from ..hooks.tokens import MODALITIES

    tm = lens.token_map(inputs)
    mod = tm.modality
    b, seq = mod.shape
    mask = inputs.get("attention_mask")
    for k, side, g in named:
        if g.value == "image":
            m = (mod == MODALITIES.index("image")) | (mod == MODALITIES.index("query"))
        elif g.value == "text":
            m = mod == MODALITIES.index("text")
        else:
            if g.value == "last":
                last = (torch.full((b,), seq - 1) if mask is None else
                        seq - 1 - torch.as_tensor(mask).cpu().flip(1).long().argmax(1))
            else:
                last = tm.answer_positions()
            m = torch.zeros(b, seq, dtype=torch.bool)
            m[torch.arange(b), last] = True
        empty = (~m.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"edges[{labels[k]!r}] {side} {g.value!r} is empty in batch rows {empty} (no such token)")
        g.kind, g.value, g.string = "mask", m, g.value


# ------------------------------------------------------------------------------------------------- layers
def _denoiser_site(lens, name: str) -> bool:
    den = getattr(lens.adapter, "denoiser", None)
    path = lens.sites[name].path
    return den is not None and (path == den or path.startswith(den + "."))


def _default_sites(lens) -> list[str]:
    patterns = lens.hook_points("*.pattern")
    if lens.family == "generative":
        return [n for n in patterns if n.startswith("lm.")]
    if lens.family == "contrastive":
        return [n for n in patterns if n.startswith("vision.")]
    den = [n for n in patterns if _denoiser_site(lens, n)]
    return [n for n in den if ".cross." in n] or [n for n in den if ".joint." in n]


def _sites(lens, layers) -> list[str]:
    default = _default_sites(lens)
    if layers is None:
        if not default:
            raise ValueError(f"{lens.architecture} has no default knockout sites; pass layers= as `.pattern` names")
        return default
    if isinstance(layers, (str, int)) and not isinstance(layers, bool):
        layers = [layers]
    if hasattr(layers, "tolist"):  # tensors, numpy arrays
        layers = layers.tolist()
    if not isinstance(layers, (Sequence, range)):
        raise TypeError(f"layers must be None, block indices (ints) or `.pattern` names / globs; got {layers!r:.60}")
    if not len(layers):
        raise ValueError("layers is empty; pass None for the default sites, or at least one block index or name")
    items = list(layers)
    if all(isinstance(x, str) for x in items):
        names = lens.resolve(items, arg="layers")
        bad = [n for n in names if lens.sites[n].row.read != "pattern"]
        if bad:
            raise ValueError(f"layers: {bad[0]!r} is not an attention-pattern site; knockout edits `.attn.pattern` "
                             f"sites, e.g. {default[:2]}")
    elif all(hasattr(x, "__index__") and not isinstance(x, (bool, str)) for x in items):
        n = len(default)
        out_of = [int(x) for x in items if not -n <= int(x) < n]
        if out_of:
            raise ValueError(f"layers: block {out_of[0]} does not exist; the default knockout sites "
                             f"({default[0]} ...) are blocks 0 to {n - 1} (or give `.pattern` names)")
        names = [default[int(x) % n] for x in items]
    else:
        raise TypeError(f"layers must be all ints (block indices) or all strings (`.pattern` names / globs); got "
                        f"{layers!r:.80}")
    if len(set(names)) != len(names):
        raise ValueError(f"layers names a site twice: {names}")
    if lens.family == "contrastive":
        towers = {n.split(".", 1)[0] for n in names}
        if len(towers) > 1:
            raise ValueError(f"layers mix the towers {sorted(towers)}; knock out one tower at a time (its inputs are "
                             "the ones repeated)")
    if lens.family == "diffusion":
        bad = [n for n in names if not _denoiser_site(lens, n)]
        if bad:
            raise ValueError(f"layers: {bad[0]!r} is not in the denoiser; diffusion knockout edits the denoiser's "
                             f"attention at each step (e.g. {default[:2]})")
    return names


def _short(name: str) -> str:
    return name.removesuffix(".pattern").removesuffix(".attn")


def _label(names: list[str]) -> str:
    first, last = _short(names[0]), _short(names[-1])
    if len(names) == 1:
        return first
    a, b = re.match(r"^(.*\.)(\d+)$", first), re.match(r"^(.*\.)(\d+)$", last)
    if a and b and a.group(1) == b.group(1):
        return f"{first}-{b.group(2)}"
    return f"{first}..{last}"


# ------------------------------------------------------------------------------------------------- the edit
class _Counter:
    def __init__(self):
        self.empty, self.sites = 0, set()


def knock_out(probs: Float[Tensor, "b h q k"], targets: Bool[Tensor, "b q"], sources: Bool[Tensor, "b k"],
              counter: _Counter | None = None, name: str = "") -> Tensor | None:
    """`probs` with every (target query, source key) entry zeroed and each edited query row renormalised (a softmax
    with those logits at -inf); None when nothing changes. Rows that would keep nothing stay as they were. Only the
    query rows some batch row targets are read and rewritten (a "last" target touches one row of the map)."""
    qi = targets.any(0).nonzero().flatten()
    if qi.numel() == 0 or not bool(sources.any()):
        return None
    mask = (targets[:, qi, None] & sources[:, None, :])[:, None]  # (b, 1, nq, k)
    p = probs[:, :, qi].float()
    kept = p.masked_fill(mask, 0)
    removed = p.masked_fill(~mask, 0).sum(-1)
    denom = kept.sum(-1, keepdim=True)
    hit = removed > 0
    empty = hit & (denom[..., 0] <= 0)
    if counter is not None and bool(empty.any()):
        counter.empty += int(empty.sum())
        counter.sites.add(name)
    change = hit & ~empty
    if not bool(change.any()):
        return None
    out = probs.clone()
    out[:, :, qi] = torch.where(change[..., None], kept / denom.clamp_min(torch.finfo(torch.float32).tiny),
                                p).to(probs.dtype)
    return out


# ------------------------------------------------------------------------------------------------- running
def _check_metric(m, rows: int, where: str) -> Tensor:
    if not isinstance(m, Tensor):
        raise TypeError(f"metric(output) must return a torch.Tensor with one value per batch row, shape ({rows},); "
                        f"got {type(m).__name__} {where}")
    if m.shape != (rows,):
        raise ValueError(f"metric(output) returned shape {tuple(m.shape)} {where}; it must return one value per batch "
                         f"row, shape ({rows},)")
    return m.detach().float().cpu()


def _repeat(inputs: Mapping, keys: set[str], m: int) -> dict:
    return {k: torch.cat([v] * m) if k in keys and m > 1 else v for k, v in inputs.items()}


@torch.no_grad()
def knockout(lens, inputs: Mapping[str, Any], *, edges: Mapping[str, Any], layers=None, window: int = 1,
             metric: Callable[[Any], Tensor], batch_size: int | None = None, steps=None) -> KnockoutResult:
    """Knock out attention edges per window of `window` consecutive layers; one result row per window start.

    `edges`: label -> (source_keys, target_queries), each side None (all positions), "image" / "text" / "last" /
    "answer" (generative VLMs, through `lens.token_map`), a list / range / 1-D tensor of positions shared by all rows
    (negatives count from the end), or a (batch, seq) bool tensor; for diffusion a single group gives key positions
    only (every latent pixel queries). `layers`: block indices into the default sites (the LM's self-attention for
    generative VLMs, the vision tower for CLIP/SigLIP, the denoiser's cross- or joint-attention for diffusion) or
    `.pattern` names / globs. `metric(output)` -> (batch,) tensor, one value per example (`mmlens.metrics`), called
    on each knocked-out copy of the batch separately. `batch_size`: rows per
    forward (None: all, at most 64; at least one copy of the inputs per forward; diffusion runs one generation per
    combination). `steps`: diffusion only, the denoising steps knocked out (default all).
    """
    require_family(lens, ("generative", "contrastive", "diffusion"), "knockout")
    diffusion = lens.family == "diffusion"
    if not callable(metric):
        raise TypeError(f"metric must be a function output -> (batch,) tensor; got {type(metric).__name__}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window must be an int >= 1 (layers knocked out together); got {window!r:.40}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an int >= 1 (rows per forward); got {batch_size!r:.40}")
    if steps is not None and not diffusion:
        raise ValueError(f"steps: denoising steps exist only in diffusion pipelines; {lens.architecture} is a "
                         f"{lens.family} model")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict (processor output, or a diffusion pipeline's keywords); got "
                        f"{type(inputs).__name__}")
    inputs = dict(inputs)
    sites = _sites(lens, layers)
    if window < 1 or window > len(sites):
        raise ValueError(f"window must be between 1 and the number of layers ({len(sites)}); got {window}")
    windows = [sites[i:i + window] for i in range(len(sites) - window + 1)]
    labels, groups = _parse_edges(edges, diffusion)
    _resolve_strings(lens, inputs, groups, labels)

    if diffusion:
        run = _diffusion_runner(lens, inputs)
        repeat_keys, n_rows = set(), 0
    else:
        repeat_keys, n_rows = _batch_keys(lens, inputs, sites)
        run = None

    # baseline, recording each site's attention shape and kernel calls (hooks returning None edit nothing)
    calls: dict[str, list] = {s: [] for s in sites}

    def probe(v, ctx):
        calls[ctx.name].append((tuple(v.shape), ctx.branches))

    out = run({s: probe for s in sites}, None) if diffusion else _forward(lens, inputs, {s: probe for s in sites})
    geometry, n_rows = _check_sites(calls, n_rows, diffusion)
    baseline = _check_metric(metric(out), n_rows, "on the unedited inputs" + (" (one value per generated image)"
                                                                             if diffusion else ""))

    # every group, materialised once per axis length, checked against every site
    for k, (src, tgt) in enumerate(groups):
        for g, side in ((src, "source keys"), (tgt, "target queries")):
            if g.kind == "mask" and g.value.shape[0] not in (1, n_rows):
                raise ValueError(f"edges[{labels[k]!r}] {side}: the bool mask has {g.value.shape[0]} rows; the batch "
                                 f"has {n_rows}")
    mats: dict[tuple[int, int, int], Tensor] = {}

    def mat(k: int, side: int, n: int, site: str) -> Tensor:
        key = (k, side, n)
        if key not in mats:
            g = groups[k][side]
            what = "source keys" if side == 0 else "target queries"
            where = f"edges[{labels[k]!r}] {what} at {site}"
            if g.string:
                where += f" ({g.string!r} names positions of the LM's {g.value.shape[1]}-token sequence)"
            mats[key] = g.materialise(n, where).expand(n_rows, n)
        return mats[key]

    for site in sites:
        q, kk = geometry[site]
        for k in range(len(groups)):
            mat(k, 0, kk, site), mat(k, 1, q, site)

    combos = [(w, e) for w in range(len(windows)) for e in range(len(groups))]
    counter = _Counter()
    values = torch.empty(len(windows), len(groups), n_rows)
    per = 1 if diffusion else max(1, (batch_size or MAX_ROWS) // n_rows)
    for start in range(0, len(combos), per):
        chunk = combos[start:start + per]
        fns = {}
        for site in sites:
            active = [site in windows[w] for w, _ in chunk]
            if not any(active):
                continue
            q, kk = geometry[site]
            tgt = torch.cat([mat(e, 1, q, site) if a else torch.zeros(n_rows, q, dtype=torch.bool)
                             for (_, e), a in zip(chunk, active)])
            src = torch.cat([mat(e, 0, kk, site) for _, e in chunk])
            fns[site] = _edit(tgt, src, counter, diffusion)
        if diffusion:
            out = run(fns, steps)
        else:
            out = _forward(lens, _repeat(inputs, repeat_keys, len(chunk)), fns)
        n = len(chunk) * n_rows
        got = torch.cat([_check_metric(metric(out if len(chunk) == 1 else _slice_output(out, c * n_rows, (c + 1) * n_rows, n)),
                                       n_rows, f"on the knocked-out run {c} of a batched forward")
                         for c in range(len(chunk))])
        for c, (w, e) in enumerate(chunk):
            values[w, e] = got[c * n_rows:(c + 1) * n_rows]
    if counter.empty:
        warnings.warn(f"knockout: {counter.empty} attention rows (batch row x head x query) at "
                      f"{sorted(counter.sites)} attend only to knocked-out keys; they were left unchanged (a softmax "
                      "with every logit at -inf is undefined)", stacklevel=2)
    meta = provenance(lens, sites, window=window, rows_left_unchanged=counter.empty,
                      steps=sorted(int(s) for s in steps) if steps is not None else None)
    return KnockoutResult(meta=meta, windows=[_label(w) for w in windows], sites=windows, edges=labels,
                          values=values, baseline=baseline)


def _edit(tgt: Tensor, src: Tensor, counter: _Counter, diffusion: bool):
    cache: dict[Any, tuple[Tensor, Tensor]] = {}

    def fn(probs, ctx):
        b = probs.shape[0]
        key = (probs.device, b, ctx.branches)
        if key not in cache:
            t, s = tgt, src
            if diffusion and ctx.branches:
                if "cond" not in ctx.branches:
                    return None
                nb, i = len(ctx.branches), ctx.branches.index("cond")
                per = b // nb
                t = torch.zeros(b, tgt.shape[1], dtype=torch.bool)
                t[i * per:(i + 1) * per] = tgt
                s = torch.cat([src] * nb)
            if t.shape[0] != b or t.shape[1] != probs.shape[2] or s.shape[1] != probs.shape[3]:
                raise ValueError(f"{ctx.name}: attention of shape {tuple(probs.shape)} does not match the groups "
                                 f"({t.shape[0]} rows, {t.shape[1]} queries, {s.shape[1]} keys); the inputs changed "
                                 "shape between the baseline and the knockout?")
            cache[key] = (t.to(probs.device), s.to(probs.device))
        t, s = cache[key]
        return knock_out(probs, t, s, counter, ctx.name)

    return fn


def _batch_keys(lens, inputs: dict, sites: list[str]) -> tuple[set[str], int]:
    """Which inputs are repeated per copy, and the batch size the knocked-out attention sees."""
    tensors = {k for k, v in inputs.items() if isinstance(v, Tensor)}
    if lens.family == "generative":
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("knockout: inputs hold no (batch, seq) input_ids tensor; pass what the processor returns "
                             "(return_tensors='pt')")
        return tensors, ids.shape[0]
    vision = sites[0].startswith("vision.")
    keys = {k for k in tensors if k.startswith("pixel") == vision}
    lead = inputs.get("pixel_values" if vision else "input_ids")
    if not isinstance(lead, Tensor):
        raise ValueError(f"knockout: layers are in the {'vision' if vision else 'text'} tower but inputs hold no "
                         f"{'pixel_values' if vision else 'input_ids'} tensor")
    return keys, lead.shape[0]


def _forward(lens, inputs: dict, fns: dict):
    with lens.hooks(fns):
        return lens(inputs)


def _diffusion_runner(lens, inputs: dict):
    """Generations from the same noise: the generator's state is restored before each run."""
    gen = inputs.get("generator")
    if gen is None and inputs.get("latents") is None:
        gen = inputs["generator"] = torch.Generator().manual_seed(0)
    gens = gen if isinstance(gen, (list, tuple)) else [gen] if gen is not None else []
    states = [g.get_state() for g in gens]

    def run(fns, steps_):
        for g, s in zip(gens, states):
            g.set_state(s)
        out, _ = lens.generate(names=[], hooks=fns, steps=steps_, progress=False, **inputs)
        return out

    return run


def _check_sites(calls: dict[str, list], n_rows: int, diffusion: bool) -> tuple[dict[str, tuple[int, int]], int]:
    """Each site's (queries, keys), and the batch rows: a site's batch must line up with the input rows (one kernel
    call per forward); in a diffusion pipeline, the rows of one guidance branch (prompts x images per prompt)."""
    geometry = {}
    for site, seen in calls.items():
        if not seen:
            raise ValueError(f"layers: {site} did not run in this forward (a layer these inputs skip?)")
        shapes = {s for s, _ in seen}
        if len({s[2:] for s in shapes}) > 1:
            raise ValueError(f"layers: {site} ran with several attention shapes {sorted(shapes)}; knockout needs one")
        (b, _, q, k), branches = seen[0]
        if diffusion:
            per = b // len(branches) if branches else b
            if n_rows and per != n_rows:
                raise ValueError(f"layers: {site} sees {per} rows per guidance branch, other sites {n_rows}")
            n_rows = per
        elif len(seen) != 1 or b != n_rows:
            raise ValueError(f"layers: {site} ran {len(seen)} attention call(s) of batch {b} per forward for "
                             f"{n_rows} input rows (e.g. Qwen2-VL's vision tower attends per image), so its rows do "
                             "not line up with the inputs; knock out other layers")
        geometry[site] = (q, k)
    return geometry, n_rows


__all__ = ["KnockoutResult", "knock_out", "knockout"]
