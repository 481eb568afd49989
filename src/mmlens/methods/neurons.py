"""Neuron descriptions: what makes an MLP neuron fire, what it writes out, and what an output depends on it for.

A neuron is one unit of an MLP's hidden activations, `mlp.post[..., n]` (the input of the down projection / fc2).

    top = top_activating(clip, batches, k=8)           # dataset examples (Olah et al. 2017; Bau et al. 2017)
    top.plot(layer=3, neuron=17)                        # where on the patch grid its top activations sit
    w = neuron_logit_weights(vlm, k=10)                 # tokens each neuron promotes (Geva et al. 2022)
    att = neuron_attribution(clip, inputs, metric)      # gradient x activation per neuron (layers, batch, neurons)
    out = ablate_neurons(clip, inputs, {"vision.blocks.3.mlp.post": [17, 40]}, mode="mean")

Why these three: top activations describe a neuron by its inputs, logit weights by its direct output (no data
needed), attribution by what one particular output needs from it; ablation checks the attribution causally.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..hooks.tokens import square_grid
from .direct_effects import norm_gain
from .result import Result, provenance, require_family

_DEFAULT = {"contrastive": "vision.blocks.*.mlp.post", "generative": "lm.blocks.*.mlp.post"}


def _names(lens, names) -> list[str]:
    resolved = lens.resolve(names)
    bad = [n for n in resolved if not n.endswith("mlp.post")]
    if bad:
        raise ValueError(f"neuron methods read MLP hidden activations (`*.mlp.post`); got {bad}")
    return resolved


def _as_bsn(v: Tensor, batch: int) -> Tensor:
    """(batch, seq, neurons); 2-D values (OPT's flattened (batch*seq, d)) are unflattened."""
    if v.dim() == 3:
        return v
    if v.dim() == 2 and v.shape[0] % batch == 0:
        return v.reshape(batch, -1, v.shape[-1])
    raise ValueError(f"mlp.post has shape {tuple(v.shape)}; expected (batch, seq, neurons)")


def _batch_size(inputs: Mapping) -> int:
    for key in ("input_ids", "pixel_values"):
        if isinstance(inputs.get(key), Tensor):
            return inputs[key].shape[0]
    raise ValueError("inputs hold neither input_ids nor pixel_values; pass what the processor returns")


# ------------------------------------------------------------------------------------------- top activating
@dataclass(repr=False)
class TopActivations(Result):
    """Per layer `names[l]` and neuron `neurons[n]` (index into mlp.post's last dim), its k largest activations over
    every position of every streamed sample, largest first: `values` (layers, neurons, k) float32, `batches` the
    batch index, `samples` the sample index over all batches (global), `positions` the sequence position,
    `rows`/`cols` the patch cell (-1: CLS, text or fewer than k seen). `grid`: [rows, cols] of the image patch grid
    (image towers and single-image VLM rows), or [] when none."""

    names: list[str]
    neurons: Tensor
    values: Tensor
    batches: Tensor
    samples: Tensor
    positions: Tensor
    rows: Tensor
    cols: Tensor
    grid: list

    def _layer(self, layer: int | str) -> int:
        return self.names.index(layer) if isinstance(layer, str) else layer

    def _neuron(self, neuron: int) -> int:
        hit = (self.neurons == neuron).nonzero().flatten()
        if not len(hit):
            raise ValueError(f"neuron {neuron} was not tracked; tracked: {self.neurons.tolist()[:20]}...")
        return int(hit[0])

    def patch_map(self, layer: int | str, neuron: int) -> Float[Tensor, "rows cols"]:
        """Sum of the neuron's top-k values at each patch cell (zero where none of its top-k sits)."""
        if not self.grid:
            raise ValueError("no patch grid: these activations were not read on image patches")
        li, ni = self._layer(layer), self._neuron(neuron)
        out = torch.zeros(*self.grid)
        r, c, v = self.rows[li, ni], self.cols[li, ni], self.values[li, ni]
        keep = (r >= 0) & (c >= 0) & torch.isfinite(v)
        out.index_put_((r[keep], c[keep]), v[keep], accumulate=True)
        return out

    def summary(self) -> str:
        layers, n, k = self.values.shape
        return f"TopActivations({self.meta.get('architecture')}: {layers} layers x {n} neurons x top {k})"

    def plot(self, layer: int | str = 0, neuron: int | None = None):
        """The neuron's top-k values (bars, labelled sample:position) and, with a patch grid, where they sit."""
        import matplotlib.pyplot as plt

        li = self._layer(layer)
        neuron = int(self.neurons[0]) if neuron is None else neuron
        ni = self._neuron(neuron)
        grid = bool(self.grid)
        fig, axes = plt.subplots(1, 2 if grid else 1, figsize=(7 if grid else 4, 2.8), squeeze=False)
        v = self.values[li, ni]
        ok = torch.isfinite(v)
        ax = axes[0, 0]
        ax.bar(range(int(ok.sum())), v[ok].numpy(), color="tab:orange")
        ax.set_xticks(range(int(ok.sum())), [f"{s}:{p}" for s, p in zip(self.samples[li, ni][ok].tolist(),
                                                                         self.positions[li, ni][ok].tolist())],
                      rotation=90, fontsize=6)
        ax.set_ylabel("activation", fontsize=7)
        ax.set_title(f"{self.names[li]} neuron {neuron}: top {len(v)} (sample:position)", fontsize=7)
        if grid:
            im = axes[0, 1].imshow(self.patch_map(li, neuron).numpy(), cmap="magma")
            axes[0, 1].set_title("top activations on the patch grid (summed)", fontsize=7)
            fig.colorbar(im, ax=axes[0, 1], fraction=0.046)
        fig.tight_layout()
        return fig


def _position_mask(lens, name: str, inputs: Mapping, v: Tensor, positions, tm) -> Tensor:
    """(batch, seq) bool: positions a neuron's top-k may come from."""
    b, s = v.shape[:2]
    mask = torch.ones(b, s, dtype=torch.bool)
    if name.startswith("lm.") and isinstance(inputs.get("attention_mask"), Tensor) and \
            inputs["attention_mask"].shape == (b, s):
        mask &= inputs["attention_mask"].bool().cpu()  # padding is no example
    if positions is None or positions == "all":
        return mask
    if positions == "patches":
        if name.startswith("lm."):
            return mask & (tm.row >= 0)
        g = square_grid(s)
        if g is None:
            raise ValueError(f"{name}: {s} tokens form no square patch grid; positions='patches' needs one")
        if g[2]:
            mask[:, 0] = False
        return mask
    idx = torch.as_tensor(positions)
    keep = torch.zeros(s, dtype=torch.bool)
    keep[idx] = True
    return mask & keep


def top_activating(lens, batches: Iterable[Mapping], *, names: str | Sequence[str] | None = None,
                   neurons: Sequence[int] | Tensor | None = None, k: int = 8, positions=None,
                   progress: bool = True) -> TopActivations:
    """Each neuron's k largest activations over a stream of batches (processor outputs), kept by a running top-k
    merge, so memory is O(layers x neurons x k) however many batches are streamed (all activations never are).

    `names`: mlp.post sites (default: the image tower's for contrastive models, the LM's for generative ones).
    `neurons`: indices into mlp.post's last dim (default all). `positions`: None (every position; LM padding is
    skipped), 'patches' (image patches only: CLIP's CLS at position 0 left out; LM image tokens), or a list of
    sequence positions. Positions map to (row, col) of the patch grid (image towers: raster order after CLS; LMs:
    the `TokenMap`). Ties are broken as `torch.topk` breaks them.
    """
    from tqdm.auto import tqdm

    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    resolved = _names(lens, names if names is not None else _DEFAULT.get(lens.family, "*.mlp.post"))
    sel = None if neurons is None else torch.as_tensor(neurons, dtype=torch.long)
    state: dict[str, list[Tensor]] = {}  # name -> [values (k, n), batch, sample, pos, row, col]
    grid: list = []
    seen = 0
    for bi, inputs in enumerate(tqdm(batches, desc="top_activating", disable=not progress)):
        bsz = _batch_size(inputs)
        tm = lens.token_map(inputs) if lens.family == "generative" and any(n.startswith("lm.") for n in resolved) \
            else None
        got: dict[str, Tensor] = {}

        def grab(v, ctx):
            got[ctx.name] = v.detach()

        with torch.no_grad(), lens.hooks(captures={n: [grab] for n in resolved}):
            lens(inputs)
        for name in resolved:
            v = _as_bsn(got.pop(name), bsz).float().cpu()
            if sel is not None:
                v = v[..., sel]
            b, s, n = v.shape
            mask = _position_mask(lens, name, inputs, v, positions, tm)
            flat = v.masked_fill(~mask[..., None], float("-inf")).reshape(b * s, n)
            kk = min(k, b * s)
            val, idx = flat.topk(kk, dim=0)  # (kk, n)
            samp, pos = idx // s, idx % s
            if name.startswith("lm.") and tm is not None:
                row, col = tm.row[samp, pos], tm.col[samp, pos]
                if not grid and tm.grids:
                    grid = list(tm.grids[0])
            else:
                g = square_grid(s)
                if g is None:
                    row = col = torch.full_like(pos, -1)
                else:
                    cell = pos - int(g[2])
                    row = torch.where(cell >= 0, cell // g[1], -1)
                    col = torch.where(cell >= 0, cell % g[1], -1)
                    grid = grid or [g[0], g[1]]
            new = [val, torch.full_like(idx, bi), samp + seen, pos, row, col]
            gone = val == float("-inf")  # masked-out positions: no example
            new = new[:1] + [x.masked_fill(gone, -1) for x in new[1:]]
            if name in state:
                new = [torch.cat([o, x]) for o, x in zip(state[name], new)]
                val, order = new[0].topk(min(k, new[0].shape[0]), dim=0)
                new = [val] + [x.gather(0, order) for x in new[1:]]
            state[name] = new
        seen += bsz
    if not state:
        raise ValueError("top_activating got no batches")
    out = []
    for name in resolved:
        vals = state[name]
        short = k - vals[0].shape[0]
        if short > 0:  # fewer than k positions seen: pad with -inf and -1
            vals = [torch.cat([x, x.new_full((short, x.shape[1]), float("-inf") if i == 0 else -1)])
                    for i, x in enumerate(vals)]
        out.append([x.T.contiguous() for x in vals])  # (neurons, k)
    stacked = [torch.stack([o[i] for o in out]) for i in range(6)]
    n_neurons = stacked[0].shape[1]
    return TopActivations(meta=provenance(lens, resolved, k=k, positions=positions if positions is None or
                                          isinstance(positions, str) else list(torch.as_tensor(positions).tolist()),
                                          samples_seen=seen),
                          names=resolved, neurons=sel if sel is not None else torch.arange(n_neurons),
                          values=stacked[0], batches=stacked[1], samples=stacked[2], positions=stacked[3],
                          rows=stacked[4], cols=stacked[5], grid=grid)


# ------------------------------------------------------------------------------------------- output weights
@dataclass(repr=False)
class NeuronWeightsResult(Result):
    """Per layer `names[l]` and neuron: the k labels its output weight column scores highest, `ids` (layers,
    neurons, k) into `labels` (the vocabulary, or the given texts), `scores` (layers, neurons, k) float32. Generative:
    logits (column through the final norm's gain and the unembedding); contrastive: cosine of the column's projection
    into the joint space with each text embedding."""

    names: list[str]
    ids: Tensor
    scores: Tensor
    labels: list[str]

    def top_labels(self, layer: int | str, neuron: int) -> list[str]:
        li = self.names.index(layer) if isinstance(layer, str) else layer
        return [self.labels[i] if self.labels else str(i) for i in self.ids[li, neuron].tolist()]

    def summary(self) -> str:
        layers, n, k = self.ids.shape
        return f"NeuronWeightsResult({self.meta.get('architecture')}: {layers} layers x {n} neurons, top {k})"

    def plot(self, layer: int | str = 0, neuron: int = 0):
        import matplotlib.pyplot as plt

        li = self.names.index(layer) if isinstance(layer, str) else layer
        fig, ax = plt.subplots(figsize=(4, 2.6))
        s = self.scores[li, neuron]
        ax.barh(range(len(s)), s.numpy()[::-1], color="tab:green")
        ax.set_yticks(range(len(s)), self.top_labels(li, neuron)[::-1], fontsize=6)
        ax.set_title(f"{self.names[li]} neuron {neuron}: what its output weights promote", fontsize=7)
        fig.tight_layout()
        return fig


def _out_columns(lens, name: str) -> Float[Tensor, "d_model neurons"]:
    mod = lens.sites[name].module
    if not isinstance(getattr(mod, "weight", None), Tensor) or mod.weight.dim() != 2:
        raise TypeError(f"{name}: {type(mod).__name__} has no 2-D weight to read neuron output columns from")
    return mod.weight.detach().float().cpu()  # nn.Linear: (out = d_model, in = neurons)


def neuron_logit_weights(lens, names: str | Sequence[str] | None = None, *, k: int = 10,
                         text_embeds: Float[Tensor, "texts d_embed"] | None = None,
                         texts: Sequence[str] | None = None) -> NeuronWeightsResult:
    """What each neuron writes, read straight through the model's read-out: no data needed.

    Generative: column n of the down projection (mlp.post feeds it, so `W_down[:, n]` is what neuron n adds per unit
    of activation), times the final norm's gain, through the unembedding (and OPT's project_out) -> top-k tokens.
    The norm's division by the residual's rms is left out: it depends on the input, scales every token alike and so
    leaves the ranking unchanged (Geva et al. 2022, "Transformer feed-forward layers build predictions by promoting
    concepts in the vocabulary space"). Biases do not depend on the neuron and are left out; Gemma 2's logit
    softcap is monotone and left out.

    Contrastive (CLIP; SigLIP pools by attention and has no per-token map): fc2's column times post_layernorm's
    weight (no centring, no std division: the analogue of the above, centring being a fixed projection that only
    removes the mean direction) through `visual_projection`, L2-normalised, scored by cosine against
    `text_embeds` (required; `texts` labels them).
    """
    require_family(lens, ("generative", "contrastive"), "neuron_logit_weights")
    resolved = _names(lens, names if names is not None else _DEFAULT[lens.family])
    model = lens.model
    cols = [_out_columns(lens, n) for n in resolved]
    d = cols[0].shape[0]
    if lens.family == "generative":
        if text_embeds is not None:
            raise ValueError("text_embeds apply to contrastive models; generative ones score the vocabulary")
        mods = lens.adapter.unembed_modules()
        norm, rest = (mods[0], mods[1:]) if not isinstance(mods[0], nn.Linear) else (None, mods)
        tok = getattr(lens.processor, "tokenizer", lens.processor)
        vocab = rest[-1].weight.shape[0]  # the unembedding's rows (may exceed the tokenizer's size: padding rows)
        labels = [t or "" for t in tok.convert_ids_to_tokens(list(range(vocab)))] if tok is not None else []
    else:
        if text_embeds is None:
            raise ValueError("contrastive models score neurons against texts: pass text_embeds (texts, d_embed)")
        proj = getattr(lens.adapter, "projections", {}).get("vision", ())
        if lens.architecture != "clip" or len(proj) != 2:
            raise ValueError(f"{lens.architecture}: neuron output weights need a per-token map into the joint space "
                             "(CLIP's post_layernorm + visual_projection); SigLIP pools by attention")
        norm, rest = (model.get_submodule(p) for p in proj)
        rest = [rest]
        labels = list(texts) if texts is not None else []
    gain = norm_gain(norm, d) if norm is not None else torch.ones(d)
    ids, scores = [], []
    for w in cols:
        x = w.T * gain  # (neurons, d_model)
        for m in rest:
            x = x @ m.weight.detach().float().cpu().T
        if text_embeds is not None:
            x = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(text_embeds.detach().float().cpu(),
                                                                             dim=-1).T
        s, i = x.topk(min(k, x.shape[-1]), dim=-1)
        ids.append(i)
        scores.append(s)
    return NeuronWeightsResult(meta=provenance(lens, resolved, k=k), names=resolved, ids=torch.stack(ids),
                               scores=torch.stack(scores), labels=labels)


# --------------------------------------------------------------------------------------------- attribution
@dataclass(repr=False)
class NeuronAttributionResult(Result):
    """`scores` (layers, batch, neurons) float32: gradient x activation of `metric` at each neuron of `names[l]`,
    summed over positions (a first-order estimate of the metric's change were the neuron zeroed, sign flipped)."""

    names: list[str]
    scores: Tensor

    def top(self, n: int = 20, *, reduce: str = "mean") -> list[tuple[str, int, float]]:
        """The n (name, neuron, score) with the largest score, averaged (or summed) over the batch."""
        s = self.scores.mean(1) if reduce == "mean" else self.scores.sum(1)
        val, idx = s.flatten().topk(min(n, s.numel()))
        width = s.shape[1]
        return [(self.names[i // width], i % width, v) for i, v in zip(idx.tolist(), val.tolist())]

    def summary(self) -> str:
        layers, b, n = self.scores.shape
        return f"NeuronAttributionResult({self.meta.get('architecture')}: {layers} layers x {b} rows x {n} neurons)"

    def plot(self, n: int = 20):
        """The n neurons with the largest mean attribution."""
        import matplotlib.pyplot as plt

        top = self.top(n)
        fig, ax = plt.subplots(figsize=(4, 0.15 * len(top) + 1))
        ax.barh(range(len(top)), [t[2] for t in top][::-1], color="tab:purple")
        ax.set_yticks(range(len(top)), [f"{nm.replace('.mlp.post', '')}:{i}" for nm, i, _ in top][::-1], fontsize=6)
        ax.set_title("gradient x activation (mean over rows)", fontsize=7)
        fig.tight_layout()
        return fig


def neuron_attribution(lens, inputs: Mapping, metric: Callable[[object], Tensor], *,
                       names: str | Sequence[str] | None = None, baseline: str = "zero") -> NeuronAttributionResult:
    """Gradient x activation of `metric(model_output)` at every neuron of `names`, summed over positions.

    `metric` maps the model's output to a scalar or to one value per batch row (summed before the backward pass; rows
    do not interact, so each row's scores are its own). One forward and one backward pass: cheap where ablating each
    neuron would need one pass per neuron; it is linear, so it misjudges neurons far from linear (check by ablation).
    `baseline='mean'` scores gradient x (activation - its mean over the batch's rows, per position): the first-order
    estimate of mean-ablation (`ablate_neurons(mode='mean')`), where 'zero' estimates zero-ablation.
    """
    if baseline not in ("zero", "mean"):
        raise ValueError(f"baseline must be 'zero' or 'mean'; got {baseline!r}")
    require_family(lens, ("generative", "contrastive"), "neuron_attribution")
    resolved = _names(lens, names if names is not None else _DEFAULT[lens.family])
    out, cache = lens.run_with_cache(inputs, names=resolved, grad=True)
    m = metric(out)
    if not isinstance(m, Tensor) or not m.requires_grad:
        raise ValueError("metric(output) must be a tensor computed from the output (it holds no gradient)")
    acts = [cache[n] for n in resolved]
    if not all(a.requires_grad for a in acts):
        raise ValueError("the recorded activations hold no gradient: the model's parameters are frozen "
                         "(requires_grad=False) up to these sites")
    grads = torch.autograd.grad(m.sum(), acts, allow_unused=True)
    bsz = _batch_size(inputs)
    scores = []
    for a, g in zip(acts, grads):
        a = _as_bsn(a, bsz)
        a = a - a.mean(0, keepdim=True) if baseline == "mean" else a
        ga = torch.zeros_like(a) if g is None else _as_bsn(g, bsz) * a
        scores.append(ga.detach().float().sum(1).cpu())
    return NeuronAttributionResult(meta=provenance(lens, resolved, baseline=baseline), names=resolved, scores=torch.stack(scores))


# ----------------------------------------------------------------------------------------------- ablation
def ablate_neurons(lens, inputs: Mapping, neurons: Mapping[str, Sequence[int] | Tensor], *, mode: str = "mean",
                   values: Mapping[str, Tensor] | None = None):
    """The model's output with the chosen neurons of each mlp.post site edited: `mode='zero'`, or `'mean'` (each
    neuron replaced at every position by its mean over this batch's rows, per position: mean-ablation, which keeps
    the typical activation and removes only what differs between inputs). `values[name]` (seq, len(neurons)) or
    broadcastable overrides the mean, e.g. a mean over a larger reference set. Equivalent to a `lens.hooks` edit
    returning a copy of mlp.post with those columns replaced."""
    if mode not in ("zero", "mean"):
        raise ValueError(f"mode must be 'zero' or 'mean'; got {mode!r}")
    idx = {r: torch.as_tensor(v, dtype=torch.long) for n, v in neurons.items() for r in _names(lens, [n])}
    bsz = _batch_size(inputs)

    def edit(v, ctx):
        i = idx[ctx.name].to(v.device)
        x = _as_bsn(v, bsz).clone()
        if values is not None and ctx.name in values:
            x[..., i] = values[ctx.name].to(x.device, x.dtype)
        elif mode == "zero":
            x[..., i] = 0
        else:
            x[..., i] = x[..., i].mean(0, keepdim=True)
        return x.reshape(v.shape)

    with torch.no_grad(), lens.hooks({n: edit for n in idx}):
        return lens(inputs)


__all__ = ["NeuronAttributionResult", "NeuronWeightsResult", "TopActivations", "ablate_neurons",
           "neuron_attribution", "neuron_logit_weights", "top_activating"]
