"""Activation patching and causal tracing (Meng et al. 2022; Zhang and Nanda 2024; in VLMs Palit et al. 2023, Basu et
al. 2024, Golovanevsky et al. 2024): run the corrupt input, put the clean run's activation back at one site and
position, and see how much of the clean behaviour returns.

    m = metrics.logit_diff(answer_ids, wrong_ids)
    res = patch(vlm, clean, corrupt, "lm.blocks.*.resid_pre", positions={"object": obj, "rest": rest}, metric=m)
    res.recovery()               # (names, regions): (patched - corrupt) / (clean - corrupt), mean over examples
    res.plot()

    noisy = gaussian_noise(vlm, clean, positions=image_positions)        # ROME-style corruption of the image tokens
    trace = patch(vlm, clean, noisy, "lm.blocks.*.resid_pre", positions=range(seq), metric=m, window=3)

`positions`: None (the whole activation, one column), an int or a list of ints (one column each), a dict of named
regions (each an int list for every example, a list of per-example lists, or a bool mask; `TokenMap` gives image
regions from object masks), or a bool mask. `heads`: ints; patch those heads only (hook points with a head dim:
`attn.z/q/k/v`, `attn.pattern`), one result row per (name, head). `direction="denoise"` patches clean into the
corrupt run (restoration); "noise" patches corrupt into the clean run (which sites are necessary). `window=k`
patches k consecutive names at once (causal tracing's window restoration); `names` as a dict {label: names} patches
each group's sites together, one row per label ({"cross-attention k/v": "unet.*.cross.[kv]"}).

Speed: the patches go into the batch dimension, and in the block stack a patch at layer l starts from the reference
run's states entering layer l; in a causal LM the positions before the first patched one are reused from the
reference's key/value cache. `engine="loop"` runs one forward per patch (the reference the fast path equals).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..metrics import recovery as _recovery
from ._replay import NotReplayable, Stack, record, run_from
from ._targets import columns, is_flat, layout_dims
from .result import Result, provenance, require_family

DIRECTIONS = ("denoise", "noise")
ENGINES = ("auto", "replay", "batched", "loop")


# ------------------------------------------------------------------------------------------------- corruptions
@dataclass
class Corruption:
    """A corrupt run given as the clean inputs plus hooks that corrupt them (`gaussian_noise`). The hooks see the
    batch repeated k times when the engine batches k patches (rows k*batch + b are example b)."""

    inputs: dict
    hooks: dict[str, Callable] = field(default_factory=dict)
    description: str = ""


def gaussian_noise(lens, inputs: dict, positions, *, name: str | None = None, scale: float = 3.0, seed: int = 0
                   ) -> Corruption:
    """ROME's corruption: Gaussian noise added at `positions` of `name`'s value (default: the input of the first
    LM block, where image features are already merged: the embeddings the LM reads), with standard deviation
    `scale` x the standard deviation of that value over the given inputs' tokens (Meng et al. use 3 x the
    embeddings' spread). The noise is drawn once (seeded), so every patched run sees the same corruption."""
    require_family(lens, ("generative", "contrastive"), "gaussian_noise")
    name = name or ("lm.blocks.0.resid_pre" if lens.family == "generative" else "vision.blocks.0.resid_pre")
    (name,) = lens.resolve(name, arg="name")
    _, cache = lens.run_with_cache(inputs, names=[name])
    value = cache[name]
    seq_dim, _ = layout_dims(lens.sites[name])
    if seq_dim != 1 or value.dim() != 3:
        raise ValueError(f"gaussian_noise adds noise to (batch, seq, d) values; {name} is {lens.sites[name].row.layout}")
    _, (mask,) = columns({"noise": positions} if not isinstance(positions, Mapping) else positions, *value.shape[:2])
    g = torch.Generator().manual_seed(seed)
    std = float(value.float().std())
    noise = torch.randn(value.shape, generator=g) * (scale * std) * mask[..., None]
    b = value.shape[0]

    def add(x, ctx):
        return x + noise.to(x.device, x.dtype).repeat(len(x) // b, 1, 1)

    return Corruption(dict(inputs), {name: add},
                      f"Gaussian noise (sd {scale} x {std:.3g}) at {int(mask.sum())} positions of {name}")


def replace_tokens(inputs: dict, replacements: Mapping[int, int | Sequence[int]]) -> dict:
    """Symmetric token replacement (Zhang and Nanda 2024 prefer it to noise: the corrupt run stays in distribution):
    a copy of `inputs` with `input_ids[:, position]` set to a token id (one for every example, or one per example).
    Pair it with the unchanged inputs as clean / corrupt; the shapes stay equal by construction."""
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor):
        raise ValueError("replace_tokens needs inputs with an input_ids tensor")
    new = ids.clone()
    seq = ids.shape[-1]
    for pos, tok in replacements.items():
        if not isinstance(pos, int) or not -seq <= pos < seq:
            raise ValueError(f"replace_tokens: position {pos!r} is out of range for a sequence of {seq}")
        t = torch.as_tensor(tok, dtype=ids.dtype).reshape(-1)
        if t.numel() not in (1, ids.shape[0]):
            raise ValueError(f"replace_tokens: {t.numel()} token ids at position {pos}; give one, or one per example "
                             f"({ids.shape[0]})")
        new[:, pos] = t
    return {**inputs, "input_ids": new}


# ------------------------------------------------------------------------------------------------------ result
@dataclass(repr=False)
class PatchResult(Result):
    """`values` (rows, columns): the metric of the patched run, mean over examples; `per_example` (rows, columns,
    batch). Rows are `names` (the first name of each window), crossed with `heads` when heads were patched
    (row k = names[k // len(heads)], heads[k % len(heads)]); columns are `columns` (positions or regions).
    `clean` / `corrupt` (batch,): the metric of the two unpatched runs. `method`: "patch", "attribution" (a
    linear estimate) or "knockout"."""

    names: list[str]
    heads: list[int]
    columns: list[str]
    per_example: Tensor
    clean: Tensor
    corrupt: Tensor
    direction: str
    window: int
    method: str

    @property
    def values(self) -> Float[Tensor, "rows columns"]:
        return self.per_example.mean(-1)

    @property
    def row_labels(self) -> list[str]:
        if not self.heads:
            return list(self.names)
        return [f"{n}[h{h}]" for n in self.names for h in self.heads]

    def recovery(self, per_example: bool = False) -> Tensor:
        """(patched - corrupt) / (clean - corrupt): 1 = the clean metric restored (denoise), 0 = nothing; for
        direction="noise" 1 - recovery is the share of the clean behaviour the patch destroyed. Mean over examples
        of the per-example ratio (examples whose clean and corrupt metrics tie are left out)."""
        r = _recovery(self.per_example, self.clean, self.corrupt)
        return r if per_example else r.nanmean(-1)

    def summary(self) -> str:
        return (f"PatchResult({self.meta.get('architecture')}, {self.method}, {self.direction}: "
                f"{len(self.row_labels)} rows x {len(self.columns)} columns x {self.per_example.shape[-1]} examples)")

    def plot(self, normalise: bool = True):
        import matplotlib.pyplot as plt

        v = self.recovery() if normalise else self.values
        rows, cols = v.shape
        fig, ax = plt.subplots(figsize=(min(12, 1.6 + 0.45 * cols), min(12, 1.0 + 0.22 * rows)))
        lim = float(v.abs().nan_to_num().max()) or 1.0
        im = ax.imshow(v.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(rows), self.row_labels, fontsize=6)
        ax.set_xticks(range(cols), self.columns, fontsize=6, rotation=60 if cols > 3 else 0, ha="right" if cols > 3 else "center")
        what = "recovery (patched - corrupt) / (clean - corrupt)" if normalise else "metric"
        ax.set_title(f"{self.method} ({self.direction}): {what}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        return fig


# -------------------------------------------------------------------------------------------------- the engine
@dataclass
class _Target:
    names: tuple[str, ...]
    col: int
    head: int | None
    start: int | None  # first stack block touched (None: a name outside the stack)
    p0: int  # first patched position (0: the whole activation)


@dataclass
class _Run:
    inputs: dict
    hooks: dict


def _as_run(x, what: str) -> _Run:
    if isinstance(x, Corruption):
        return _Run(dict(x.inputs), dict(x.hooks))
    if isinstance(x, Mapping):
        return _Run(dict(x), {})
    raise TypeError(f"{what} must be processor outputs (a dict) or a Corruption (gaussian_noise); got {type(x).__name__}")


def _batch(lens, inputs: dict) -> int:
    """Examples in a run: images for a contrastive model (its texts are the classes), sequences otherwise."""
    key = "pixel_values" if lens.family == "contrastive" else "input_ids"
    x = inputs.get(key)
    if not isinstance(x, Tensor):
        raise ValueError(f"patch needs {key} (a tensor) in the inputs of a {lens.family} model")
    return x.shape[0]


def _seq(lens, names: list[str], source: dict[str, Tensor], batch: int) -> int:
    """The sequence length the position columns index: the same for every name with a sequence dim."""
    lengths = {n: (source[n].shape[0] // batch if is_flat(lens.sites[n]) else source[n].shape[d])
               for n in names if (d := layout_dims(lens.sites[n])[0]) is not None}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"positions index one sequence, but these names have different lengths: {lengths}; "
                         "patch them in separate calls")
    return next(iter(lengths.values()), 0)


def _check_pair(clean: _Run, corrupt: _Run) -> None:
    for k in set(clean.inputs) & set(corrupt.inputs):
        a, b = clean.inputs[k], corrupt.inputs[k]
        if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape != b.shape:
            raise ValueError(f"clean and corrupt {k!r} have shapes {tuple(a.shape)} and {tuple(b.shape)}: a patch "
                             "moves activations position by position, so both must tokenise to the same shapes "
                             "(pad the shorter, or pick counterfactuals of equal length)")


def _repeat(lens, inputs: dict, k: int) -> dict:
    """The whole batch k times: every tensor concatenated k times along dim 0 (also Qwen2-VL's pixel rows and
    image_grid_thw, whose dim 0 counts patches and images, so example b of copy j is row j*batch + b throughout).
    A contrastive model's texts are the classes every image is scored against: only its image inputs repeat."""
    def repeats(key, v):
        return isinstance(v, Tensor) and v.dim() > 0 and k > 1 and (lens.family != "contrastive"
                                                                    or key.startswith(("pixel", "image", "spatial")))
    return {key: torch.cat([v] * k) if repeats(key, v) else v for key, v in inputs.items()}


def _slice_output(out, lo: int, hi: int, n: int):
    """Rows lo:hi of every (n, ...) tensor, array or list of a model or pipeline output (other fields dropped)."""
    if isinstance(out, Tensor):
        return out[lo:hi]
    items = out.items() if isinstance(out, Mapping) else vars(out).items()
    kept = {k: v[lo:hi] for k, v in items
            if (isinstance(v, (Tensor, np.ndarray)) and v.ndim and v.shape[0] == n) or (isinstance(v, list) and len(v) == n)}
    try:
        return type(out)(**kept)
    except TypeError:
        return _Output(**kept)


class _Output(dict):
    """What a metric sees from a replayed run: `logits` (rows, seq, vocab) of a generative VLM (for a metric with a
    `position`, a broadcast view of that position's row: reading another position is not supported), or
    `logits_per_image` (rows, texts) and `image_embeds` of a contrastive model; attribute or key access."""

    __getattr__ = dict.get


def _metric_values(metric, out, k: int, b: int) -> Tensor:
    vals = []
    for j in range(k):
        v = metric(_slice_output(out, j * b, (j + 1) * b, k * b))
        v = torch.as_tensor(v)
        if v.shape != (b,):
            raise ValueError(f"metric(output) must return one value per example, shape ({b},); got {tuple(v.shape)}")
        vals.append(v.detach().float().cpu())
    return torch.stack(vals)


def _selector(value: Tensor, mask: Tensor | None, head: int | None, seq_dim: int | None, head_dim: int | None,
              p0: int) -> Tensor | None:
    """A bool tensor broadcastable to one example block of `value` marking what a target replaces (None: all)."""
    if mask is None and head is None:
        return None
    shape = [1] * value.dim()
    sel = torch.ones(shape, dtype=torch.bool, device=value.device)
    if mask is not None:
        m = mask[:, p0:].to(value.device)
        shape_m = [1] * value.dim()
        shape_m[0], shape_m[seq_dim] = m.shape[0], m.shape[1]
        sel = sel & m.reshape(shape_m)
    if head is not None:
        h = torch.zeros(value.shape[head_dim], dtype=torch.bool, device=value.device)
        h[head] = True
        shape_h = [1] * value.dim()
        shape_h[head_dim] = len(h)
        sel = sel & h.reshape(shape_h)
    return sel


def _patch_hooks(lens, chunk: list[_Target], masks: list, source: dict[str, Tensor], b: int, p0: int) -> dict:
    """One hook per name: for every target of the chunk at that name, rows j*b..j*b+b take the source's values
    (at the target's positions / head)."""
    by_name: dict[str, list[tuple[int, _Target]]] = {}
    for j, t in enumerate(chunk):
        for n in t.names:
            by_name.setdefault(n, []).append((j, t))

    rows_total = len(chunk) * b

    def make(name, entries):
        seq_dim, head_dim = layout_dims(lens.sites[name])
        flat = is_flat(lens.sites[name])
        src_full = source[name].reshape(b, -1, *source[name].shape[1:]) if flat else source[name]

        def fn(value, ctx):
            if flat:  # (rows * seq, d) -> (rows, seq, d) and back
                return fn_rows(value.reshape(rows_total, -1, *value.shape[1:])).reshape(value.shape)
            return fn_rows(value)

        def fn_rows(value):
            src = src_full.to(value.device, value.dtype)
            if p0:
                src = src.narrow(seq_dim, p0, src.shape[seq_dim] - p0)
            if src.shape[1:] != value.shape[1:]:
                raise ValueError(f"{name}: the source run's value {tuple(src.shape)} does not fit the patched run's "
                                 f"{tuple(value.shape)}")
            out = value.clone()
            for j, t in entries:
                rows = slice(j * b, (j + 1) * b)
                sel = _selector(value, masks[t.col], t.head, seq_dim, head_dim, p0)
                out[rows] = src if sel is None else torch.where(sel, src, out[rows])
            return out
        return fn

    return {n: make(n, e) for n, e in by_name.items()}


def _merge(*maps: dict) -> dict:
    out: dict[str, list] = {}
    for m in maps:
        for k, v in m.items():
            out.setdefault(k, []).extend(v if isinstance(v, (list, tuple)) else [v])
    return out


def _contrastive_output(lens, x: Tensor, ref_out) -> _Output:
    """A replayed image tower's last block output -> the model's image embeddings and image-text logits."""
    emb = lens.project(x, "vision", normalize=True)
    if emb.dim() == 3:
        emb = emb[:, 0]
    text = ref_out.text_embeds.to(emb.dtype)
    text = text / text.norm(dim=-1, keepdim=True)
    logits = emb @ text.T * lens.model.logit_scale.exp().to(emb.dtype)
    bias = getattr(lens.model, "logit_bias", None)
    if bias is not None:
        logits = logits + bias.to(emb.dtype)
    return _Output(logits_per_image=logits, image_embeds=emb)


def _generative_output(lens, x: Tensor, ref_logits: Tensor | None, rows: Tensor, p0: int, position: int | None
                       ) -> _Output:
    """A replayed LM's last block output (rows, seq - p0, d) -> logits: only at `position` when the metric says
    which it reads (earlier than p0: the reference's, which the patch cannot change), else every position."""
    seq = x.shape[1] + p0
    if position is not None:
        pos = position % seq
        if pos >= p0:
            lg = lens.unembed(x[:, pos - p0: pos - p0 + 1])
        else:
            lg = ref_logits[:, pos: pos + 1].index_select(0, rows.to(ref_logits.device))
        # a (rows, seq, vocab) view of the one row: the metric indexes `position` as it would a full output
        return _Output(logits=lg.expand(lg.shape[0], seq, lg.shape[-1]))
    lg = lens.unembed(x)
    if p0:
        lg = torch.cat([ref_logits[:, :p0].index_select(0, rows.to(ref_logits.device)).to(lg.dtype), lg], dim=1)
    return _Output(logits=lg)


def _auto_rows(lens, seq: int) -> int:
    """Rows per forward: on CUDA what half the free memory holds at a rough per-row activation cost, on CPU 64
    (larger batches stop paying there)."""
    if lens.device.type != "cuda":
        return 64
    cfg = lens.model.config.get_text_config() if hasattr(lens.model, "config") else None
    d = getattr(cfg, "hidden_size", 1024) or 1024
    heads = getattr(cfg, "num_attention_heads", 16) or 16
    inter = getattr(cfg, "intermediate_size", 4 * d) or 4 * d
    vocab = getattr(cfg, "vocab_size", 0) or 0
    item = torch.finfo(lens.dtype).bits // 8
    # residual/attention/MLP activations, the attention matrix, and the logits over every position (kept by HF)
    per_row = max(seq, 1) * (8 * d + 2 * inter + 2 * heads * max(seq, 1) + 2 * vocab) * item
    free = torch.cuda.mem_get_info(lens.device)[0]
    return int(max(1, min(4096, free // 2 // per_row)))


def _groups(lens, names, window: int) -> tuple[list[tuple[str, ...]], list[str]]:
    """The sites patched together per result row: windows of `window` consecutive names (row = the first name), or
    a dict {label: names or glob} (one row per label, its sites patched together)."""
    if isinstance(names, Mapping):
        if window != 1:
            raise ValueError("window: give either a dict of site groups or window > 1, not both")
        if not names:
            raise ValueError("names: an empty dict names no site")
        return [tuple(lens.resolve(v, arg=f"names[{k!r}]")) for k, v in names.items()], [str(k) for k in names]
    flat = lens.resolve(names)
    return [tuple(flat[i:i + window]) for i in range(len(flat))], list(flat)


@torch.no_grad()
def patch(lens, clean, corrupt, names, *, positions=None, heads: Sequence[int] | None = None,
          metric: Callable[[Any], Tensor], direction: str = "denoise", window: int = 1,
          batch_size: int | None = None, engine: str = "auto", progress: bool = False,
          branches: Sequence[str] | None = None, seed: int = 0) -> PatchResult:
    """The metric of the `corrupt` run with `clean`'s activation patched in, per name (x head) and position column.

    `clean`, `corrupt`: processor outputs of equal shapes, or a `Corruption` (clean inputs + corrupting hooks, e.g.
    `gaussian_noise`). `metric(output) -> Tensor (batch,)` (`mmlens.metrics`). `batch_size`: patched rows per
    forward (default: adapted to free memory). `engine`: "auto" (replay the block stack where possible, else
    batched full forwards), "replay", "batched", or "loop" (one forward per patch, the reference).

    Diffusion pipelines: `clean` / `corrupt` are pipeline keyword arguments (prompts differ, the rest shared),
    `names` denoiser sites, `positions` denoising steps (a dict of named step ranges, a list of steps, None = all);
    `branches` patches only those guidance halves ("uncond", "cond"); every run starts from the same latents
    (drawn from `seed` unless given as `latents`). `metric` reads the pipeline output (`output.images`).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r}; allowed: {DIRECTIONS}")
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; allowed: {ENGINES}")
    if not callable(metric):
        raise TypeError(f"metric must be a callable output -> Tensor (batch,); got {type(metric).__name__} "
                        "(see mmlens.metrics)")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int; got {window!r}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive int or None; got {batch_size!r}")
    groups, row_names = _groups(lens, names, window)
    names = list(dict.fromkeys(n for g in groups for n in g))
    if lens.family == "diffusion":
        if heads is not None:
            raise ValueError("heads: not supported on diffusion pipelines (patch a site's whole value per step)")
        from ._patch_diffusion import patch_diffusion

        return patch_diffusion(lens, clean, corrupt, names, positions=positions, metric=metric, direction=direction,
                               groups=groups, row_names=row_names, window=window, batch_size=batch_size,
                               engine=engine, branches=branches, seed=seed,
                               metric_values=_metric_values, result_cls=PatchResult)
    if branches is not None:
        raise ValueError(f"branches: guidance branches exist only in diffusion pipelines; {lens.architecture} is a "
                         f"{lens.family} model")
    clean_run, corrupt_run = _as_run(clean, "clean"), _as_run(corrupt, "corrupt")
    _check_pair(clean_run, corrupt_run)
    base, src = (corrupt_run, clean_run) if direction == "denoise" else (clean_run, corrupt_run)
    b = _batch(lens, base.inputs)
    if lens.family == "contrastive" and any(not n.startswith("vision.") for n in names):
        raise ValueError(f"patch on a contrastive model patches the image tower (names vision.*), whose rows are the "
                         f"images scored against the texts as classes; got {[n for n in names if not n.startswith('vision.')]}")
    head_list = [int(h) for h in heads] if heads is not None else []
    for n in names:
        seq_dim, head_dim = layout_dims(lens.sites[n])
        if positions is not None and seq_dim is None:
            raise ValueError(f"positions: {n} has no sequence dim ({lens.sites[n].row.layout}); patch it whole "
                             "(positions=None)")
        if head_list and head_dim is None:
            raise ValueError(f"heads: {n} has no head dim ({lens.sites[n].row.layout}); heads apply to attn.z, "
                             "attn.q/k/v and attn.pattern")

    # the source activations, the reference (base) run, and the metric of both unpatched runs
    src_out, src_cache = lens.run_with_cache(src.inputs, names=names, hooks=src.hooks)
    source = {n: src_cache[n] for n in names}
    seq = _seq(lens, names, source, b)
    if positions is not None and not seq:
        raise ValueError(f"positions: none of {names} has a sequence dim; patch them whole (positions=None)")
    labels, masks = columns(positions, b, seq)
    stack = Stack.of(lens) if engine in ("auto", "replay") else None
    ref = None
    if stack is not None and not base.hooks:  # corrupting hooks inside the stack would fire twice on a replay
        try:
            ref = record(lens, stack, base.inputs)
        except NotReplayable:
            if engine == "replay":
                raise
    elif engine == "replay":
        raise NotReplayable("engine='replay' needs a block stack and a corrupt run given as inputs (not hooks)")
    base_out = ref.output if ref is not None else lens.run_with_cache(base.inputs, names=[], hooks=base.hooks)[0]
    src_m, base_m = _metric_values(metric, src_out, 1, b)[0], _metric_values(metric, base_out, 1, b)[0]
    clean_m, corrupt_m = (src_m, base_m) if direction == "denoise" else (base_m, src_m)

    windows = groups
    targets = []
    for w in windows:
        layers = [stack.layer_of(lens, n) for n in w] if ref is not None else [None]
        start = None if any(lay is None for lay in layers) else min(layers)
        for h in head_list or [None]:
            for c, m in enumerate(masks):
                p0 = int(m.any(0).nonzero()[0]) if (m is not None and ref is not None and ref.causal) else 0
                targets.append(_Target(w, c, h, start, p0))
    order = sorted(range(len(targets)), key=lambda i: (targets[i].start is None, targets[i].start or 0, targets[i].p0))
    rows_per = batch_size or _auto_rows(lens, seq)
    per_chunk = 1 if engine == "loop" else max(1, rows_per // b)
    position = getattr(metric, "position", None)
    values = torch.empty(len(targets), b)

    chunks, cur = [], []
    for i in order:
        t = targets[i]
        if cur and (len(cur) == per_chunk or (targets[cur[0]].start is None) != (t.start is None)):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)

    from tqdm.auto import tqdm

    def run_chunk(idx: list[int]) -> Tensor:
        chunk = [targets[i] for i in idx]
        k = len(chunk)
        if ref is not None and chunk[0].start is not None:
            p0 = min(t.p0 for t in chunk)
            rows = torch.arange(b).repeat(k)
            x = run_from(lens, stack, ref, min(t.start for t in chunk), rows, p0,
                         _patch_hooks(lens, chunk, masks, source, b, p0))
            if lens.family == "generative":
                out = _generative_output(lens, x, ref.output.logits if p0 else None, rows, p0, position)
            else:
                out = _contrastive_output(lens, x, ref.output)
        else:
            hooks = _merge(base.hooks, _patch_hooks(lens, chunk, masks, source, b, 0))
            out, _ = lens.run_with_cache(_repeat(lens, base.inputs, k), names=[], hooks=hooks)
        return _metric_values(metric, out, k, b)

    cap = [len(max(chunks, key=len))] if chunks else [1]  # patches per forward; halved at each OOM, kept after

    def run_or_split(idx: list[int]) -> None:
        """Out of GPU memory: the chunk runs in halves, and later chunks at that size (the estimate in _auto_rows is
        rough). The retry happens outside the `except` block, so the failed attempt's activations are freed first."""
        if len(idx) > cap[0]:
            step = cap[0]  # cap may shrink inside the loop; the pieces stay this size
            for lo in range(0, len(idx), step):
                run_or_split(idx[lo: lo + step])
            return
        try:
            values[idx] = run_chunk(idx)
            return
        except torch.OutOfMemoryError:
            if len(idx) == 1:
                raise
        cap[0] = max(1, len(idx) // 2)
        torch.cuda.empty_cache()
        run_or_split(idx)

    for idx in tqdm(chunks, desc="patch", disable=not progress):
        run_or_split(idx)

    n_heads = max(1, len(head_list))
    per_example = values.reshape(len(windows), n_heads, len(masks), b).reshape(len(windows) * n_heads, len(masks), b)
    return PatchResult(meta=provenance(lens, names, engine=engine), names=row_names, heads=head_list,
                       columns=labels, per_example=per_example, clean=clean_m, corrupt=corrupt_m,
                       direction=direction, window=window, method="patch")
