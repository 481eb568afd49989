"""TextSpan (Gandelsman, Efros and Steinhardt 2024, "Interpreting CLIP's image representation via text-based
decomposition"): name each attention head of a CLIP / SigLIP image tower by the few texts that span what it writes
into the image embedding, and read the per-patch split of those writes as a zero-shot segmenter.

    ts = textspan(clip, images, texts=pool, heads="all", k=5)   # per head: top k texts, variance each explains
    ts.top("blocks.3.attn.head1")                                # [('red', 0.41), ('blue', 0.22), ...]
    ts.head_labels({"colour": colours, "shape": shapes})         # {'blocks.3.attn.head1': 'colour', ...}
    seg = text_segmentation(clip, images, ["red", "square"])     # MapResult over the patches
    seg.iou(masks, label="red")

Why greedy over a text pool. A head's direct contributions over many images (`direct_effects`, divided by each
image's embedding norm so that they add up to the normalised embedding the logits use) vary in a low-dimensional
subspace. Its principal components are directions with no name; TextSpan instead chooses, K times, the text
whose direction carries the most of the remaining variance and projects that direction out of both the
contributions and the pool (so the next text explains something new: the chosen directions are orthogonal and
the variances they explain add up). The texts found are the head's description, and the share of variance they
explain says how well the description fits.

`texts` is a list of strings, or a dict label -> list of prompts whose normalised embeddings are averaged (prompt
ensembling, Radford et al. 2021: 'red' as the mean of 'a red square', 'a red circle', ... for a text encoder
that never saw a single word); `text_embeds` (texts, d) skips the text encoder (a large pool embedded once).
"""

from __future__ import annotations

import fnmatch
import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .direct_effects import HEAD_MLP_SPLITS, DirectEffectsResult, direct_effects, split_pooling_mlp
from .maps import MapResult, grid_of, images_uint8
from .result import Result, provenance, require_family

_HEAD = re.compile(r"^blocks\.(\d+)\.attn\.head(\d+)$")
HEADS_HELP = "'last' (the last block's heads), 'all', a glob such as 'blocks.3.attn.head*', or a list of labels/globs"


# ----------------------------------------------------------------------------------------------- text side
def _features(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.pooler_output


@torch.no_grad()
def encode_texts(lens, texts, *, batch_size: int = 256) -> tuple[list[str], Float[Tensor, "texts d_embed"]]:
    """(labels, L2-normalised text embeddings, float32 on CPU) of a contrastive model's text tower.

    `texts`: a list of strings, or a dict label -> prompt or list of prompts (their normalised embeddings averaged,
    then normalised again: prompt ensembling). SigLIP texts are padded to the tokenizer's max length, as it was
    trained; CLIP pools at the end-of-text token, so padding does not change its embedding."""
    require_family(lens, "contrastive", "encode_texts")
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings or a dict label -> prompts; got the string {texts!r:.40} "
                        "(write [text] for one)")
    if isinstance(texts, Mapping):
        labels = list(texts)
        groups = [[p] if isinstance(p, str) else list(p) for p in texts.values()]
    elif isinstance(texts, Sequence):
        labels, groups = list(texts), [[t] for t in texts]
    else:
        raise TypeError(f"texts must be a list of strings or a dict label -> prompts; got {type(texts).__name__}")
    flat = [p for g in groups for p in g]
    if not labels or any(not g for g in groups):
        raise ValueError("texts is empty (or a label has no prompts); give at least one text")
    bad = [p for p in [*labels, *flat] if not isinstance(p, str)]
    if bad:
        raise TypeError(f"texts must be strings; got {type(bad[0]).__name__} {bad[0]!r:.40}")
    tok = getattr(lens.processor, "tokenizer", lens.processor)
    if lens.architecture == "siglip":
        length = getattr(tok, "model_max_length", None)
        cap = lens.model.config.text_config.max_position_embeddings
        pad = dict(padding="max_length", max_length=min(length, cap) if length and length < 10**6 else cap)
    else:
        pad = dict(padding=True)
    out = []
    for i in range(0, len(flat), batch_size):
        enc = tok(flat[i:i + batch_size], return_tensors="pt", truncation=True, **pad)
        enc = {k: v.to(lens.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if lens.architecture == "siglip":
            enc.pop("attention_mask", None)  # SigLIP attends to its padding, as trained
        out.append(_features(lens.model.get_text_features(**enc)).float().cpu())
    emb = nn.functional.normalize(torch.cat(out), dim=-1)
    sizes = torch.tensor([len(g) for g in groups])
    idx = torch.repeat_interleave(torch.arange(len(groups)), sizes)
    mean = torch.zeros(len(groups), emb.shape[-1]).index_add_(0, idx, emb) / sizes[:, None]
    return labels, nn.functional.normalize(mean, dim=-1)


def _text_side(lens, texts, text_embeds) -> tuple[list[str], Tensor]:
    if text_embeds is None:
        if texts is None:
            raise ValueError("pass texts (a list of strings or a dict label -> prompts) or text_embeds with their "
                             "labels in texts: mmlens ships no default text pool")
        return encode_texts(lens, texts)
    emb = torch.as_tensor(text_embeds).detach().float().cpu()
    labels = list(texts) if texts is not None else [f"text{i}" for i in range(len(emb))]
    if emb.dim() != 2 or emb.shape[0] != len(labels):
        raise ValueError(f"text_embeds must be (texts, d_embed) with one row per label in texts ({len(labels)}); "
                         f"got {tuple(emb.shape)}")
    return labels, nn.functional.normalize(emb, dim=-1)


# ---------------------------------------------------------------------------------------------- image side
def pixel_inputs(lens, images_or_inputs) -> dict:
    """{'pixel_values': ...} from processor output (a mapping with pixel_values) or raw images (PIL, (H, W, 3)
    arrays, or a list of them), through the lens's image processor."""
    if isinstance(images_or_inputs, Mapping):
        if "pixel_values" not in images_or_inputs:
            raise ValueError(f"inputs hold no pixel_values (keys: {sorted(images_or_inputs)}); pass processor output "
                             "with images, or the images themselves")
        return {"pixel_values": torch.as_tensor(images_or_inputs["pixel_values"])}
    images = images_or_inputs if isinstance(images_or_inputs, (list, tuple)) else [images_or_inputs]
    if not images:
        raise ValueError("no images given")
    ip = getattr(lens.processor, "image_processor", lens.processor)
    return {"pixel_values": torch.as_tensor(ip(images=list(images), return_tensors="pt")["pixel_values"])}


def seen_images(lens, pixel_values: Tensor) -> Tensor:
    """(n, H, W, 3) uint8: what the model saw, pixel_values un-normalised with the image processor's mean and std."""
    ip = getattr(lens.processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    pv = pixel_values.detach().float().cpu()
    if mean is None or std is None:
        return images_uint8(pv)
    x = pv * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _direct(lens, images_or_inputs, batch_size: int, per_position: bool = False) -> DirectEffectsResult:
    """`direct_effects` over the images in batches (or a DirectEffectsResult passed in), parts concatenated."""
    if isinstance(images_or_inputs, DirectEffectsResult):
        if per_position and not images_or_inputs.by_position.numel():
            raise ValueError("the DirectEffectsResult passed has no by_position split: compute it with "
                             "direct_effects(..., per_position=True) or pass the images")
        return images_or_inputs
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    pv = pixel_inputs(lens, images_or_inputs)["pixel_values"]
    parts = [direct_effects(lens, {"pixel_values": pv[i:i + batch_size]}, per_position=per_position)
             for i in range(0, len(pv), batch_size)]
    first = parts[0]
    if len(parts) == 1:
        return first
    by_position = torch.cat([p.by_position for p in parts]) if per_position else first.by_position
    return DirectEffectsResult(meta=first.meta, labels=first.labels, terms=torch.cat([p.terms for p in parts]),
                               by_position=by_position, logit_scale=first.logit_scale, logit_bias=first.logit_bias)


def select_heads(labels: Sequence[str], heads) -> list[str]:
    """Head labels ('blocks.{i}.attn.head{h}') among `labels` that `heads` picks (see HEADS_HELP)."""
    all_heads = [lb for lb in labels if _HEAD.match(lb)]
    if not all_heads:
        raise ValueError("no attention heads among the components")
    if heads == "all":
        return all_heads
    if heads == "last":
        last = max(int(_HEAD.match(lb).group(1)) for lb in all_heads)
        return [lb for lb in all_heads if int(_HEAD.match(lb).group(1)) == last]
    if isinstance(heads, str):
        pats = [heads]
    elif isinstance(heads, Sequence) and heads and all(isinstance(h, str) for h in heads):
        pats = list(heads)
    else:
        raise TypeError(f"heads must be {HEADS_HELP}; got {heads!r:.60}")
    out = [lb for lb in all_heads if any(fnmatch.fnmatchcase(lb, p) for p in pats)]
    unmatched = [p for p in pats if not any(fnmatch.fnmatchcase(lb, p) for lb in all_heads)]
    if unmatched:
        raise ValueError(f"heads {unmatched} match no head; heads look like {all_heads[0]!r} .. {all_heads[-1]!r} "
                         f"(allowed: {HEADS_HELP})")
    return out


# ------------------------------------------------------------------------------------------------ the greedy
def text_span(contributions: Float[Tensor, "n d"], text_embeds: Float[Tensor, "texts d"], k: int, *,
              eps: float = 1e-4) -> tuple[Tensor, Tensor, float]:
    """The greedy TextSpan basis of one head: (chosen text indices (k,), fraction of the head's variance each
    explains (k,), the head's total variance).

    Both the contributions and the text embeddings are centred (over images, over the pool). K times: every
    remaining text is normalised; the text whose direction carries the most variance of the contributions is
    chosen; its direction is projected out of the contributions and of every text. Texts whose remaining norm has
    fallen below `eps` x their centred norm (the chosen ones, and texts spanned by them) are not chosen again.
    """
    c = contributions.detach().double()
    t = text_embeds.detach().double()
    if c.dim() != 2 or t.dim() != 2 or c.shape[1] != t.shape[1]:
        raise ValueError(f"contributions (n, d) and text_embeds (texts, d) must share d; got {tuple(c.shape)} and "
                         f"{tuple(t.shape)}")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= t.shape[0]:
        raise ValueError(f"k must be an int in [1, {t.shape[0]}] (the number of texts); got {k!r}")
    c = c - c.mean(0, keepdim=True)
    t = t - t.mean(0, keepdim=True)
    norm0 = t.norm(dim=-1)
    total = float((c ** 2).sum(1).mean())
    chosen, explained = [], []
    for _ in range(k):
        norms = t.norm(dim=-1)
        alive = norms > eps * norm0.clamp_min(1e-12)
        if not alive.any():
            break
        u = t / norms.clamp_min(1e-30)[:, None]
        var = ((c @ u.T) ** 2).mean(0)
        var[~alive] = -1.0
        j = int(var.argmax())
        d = u[j]
        chosen.append(j)
        explained.append(float(var[j]) / total if total > 0 else 0.0)
        c = c - (c @ d)[:, None] * d
        t = t - (t @ d)[:, None] * d
    return torch.tensor(chosen, dtype=torch.long), torch.tensor(explained, dtype=torch.float32), total


# -------------------------------------------------------------------------------------------------- result
@dataclass(repr=False)
class TextSpanResult(Result):
    """Per head (`heads[i]`, 'blocks.{l}.attn.head{h}'): `texts[i]` its top k texts in the greedy order,
    `indices` (heads, k) their rows in `pool`, `explained` (heads, k) the fraction of the head's variance each
    explains (orthogonal directions: they add up), `variance` (heads,) the head's total variance (trace of the
    covariance of its contributions to the normalised embedding), `share` (heads,) its share of the embedding's
    variance `E<c - mean c, e - mean e> / E|e - mean e|^2` (additive over all components, may be negative)."""

    heads: list[str]
    texts: list[list[str]]
    pool: list[str]
    indices: Tensor
    explained: Tensor
    variance: Tensor
    share: Tensor

    def _row(self, head: str | int) -> int:
        if isinstance(head, int):
            if not -len(self.heads) <= head < len(self.heads):
                raise IndexError(f"head index {head} out of range for {len(self.heads)} heads")
            return head % len(self.heads)
        if head not in self.heads:
            raise KeyError(f"no head {head!r}; heads: {self.heads[:4]}{' ...' if len(self.heads) > 4 else ''}")
        return self.heads.index(head)

    def top(self, head: str | int) -> list[tuple[str, float]]:
        """(text, fraction of the head's variance it explains) in the greedy order."""
        i = self._row(head)
        return list(zip(self.texts[i], self.explained[i].tolist()))

    def explained_total(self) -> Float[Tensor, "heads"]:
        """The fraction of each head's variance its k texts explain together."""
        return self.explained.sum(1)

    def head_labels(self, categories: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
        """Each head named by the category (e.g. {'colour': [...], 'shape': [...]}) that most of its top texts
        belong to; ties go to the category whose texts explain more variance; None when no top text is in any."""
        if not isinstance(categories, Mapping) or not categories:
            raise TypeError("categories must be a non-empty dict name -> list of texts of the pool")
        sets = {name: set([ts] if isinstance(ts, str) else ts) for name, ts in categories.items()}
        out = {}
        for i, head in enumerate(self.heads):
            best, key = None, (0, 0.0)
            for name, members in sets.items():
                hit = [j for j, t in enumerate(self.texts[i]) if t in members]
                cand = (len(hit), float(self.explained[i, hit].sum()) if hit else 0.0)
                if hit and cand > key:
                    best, key = name, cand
            out[head] = best
        return out

    def summary(self) -> str:
        h, k = self.explained.shape
        return (f"TextSpanResult({self.meta.get('architecture')}: {h} heads x top {k} texts from a pool of "
                f"{len(self.pool)}; mean variance explained {float(self.explained_total().mean()):.2f})")

    def rows(self) -> list[dict]:
        """One dict per head: head, share, explained (total), and its texts with their variance fractions."""
        return [{"head": hd, "share": round(float(self.share[i]), 4),
                 "explained": round(float(self.explained[i].sum()), 4),
                 "texts": ", ".join(f"{t} ({v:.2f})" for t, v in self.top(i))} for i, hd in enumerate(self.heads)]

    def to_html(self) -> str:
        """A table: a row per head with its share of the embedding's variance and its top texts."""
        body = "".join(f"<tr><td>{html.escape(r['head'])}</td><td>{r['share']:.3f}</td><td>{r['explained']:.2f}</td>"
                       f"<td>{html.escape(r['texts'])}</td></tr>" for r in self.rows())
        return ("<table><tr><th>head</th><th>variance share</th><th>explained by its texts</th><th>top texts "
                f"(variance explained)</th></tr>{body}</table>")

    def _repr_html_(self) -> str:
        return f"<div><b>{html.escape(self.summary())}</b><br/>{self.to_html()}</div>"

    def to_report(self, report, title: str | None = None, **plot_kw) -> None:
        super().to_report(report, title, **plot_kw)
        report.table(self.rows())

    def plot(self, heads: Sequence[str | int] | None = None, top: int = 3):
        """Per head, the variance its top texts explain as stacked bars, the first `top` texts written on them;
        the head's share of the embedding's variance on the right."""
        import matplotlib.pyplot as plt

        rows = [self._row(h) for h in heads] if heads is not None else list(range(len(self.heads)))
        fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.0))
        cmap = plt.get_cmap("tab10")
        for y, i in enumerate(rows):
            left = 0.0
            for j, (text, v) in enumerate(self.top(i)):
                ax.barh(y, v, left=left, color=cmap(j % 10), edgecolor="white", height=0.8)
                if j < top and v > 0.04:
                    ax.text(left + v / 2, y, text, ha="center", va="center", fontsize=6, clip_on=True)
                left += v
            ax.text(1.01, y, f"{float(self.share[i]):+.2f}", va="center", fontsize=6,
                    transform=ax.get_yaxis_transform())
        ax.set_yticks(range(len(rows)), [self.heads[i] for i in rows], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of the head's variance explained (greedy text basis)", fontsize=7)
        ax.set_title("TextSpan: each head's text basis (right: share of the embedding's variance)", fontsize=8)
        fig.tight_layout()
        return fig


# ------------------------------------------------------------------------------------------------ techniques
def textspan(lens, images_or_inputs, texts=None, *, heads="last", k: int = 5, text_embeds: Tensor | None = None,
             batch_size: int = 64) -> TextSpanResult:
    """TextSpan over the heads of a CLIP or SigLIP image tower (see the module docstring).

    `images_or_inputs`: images (PIL, arrays), processor output with pixel_values, or a `DirectEffectsResult`
    already computed on them. `texts`: the pool (list of strings or dict label -> prompts; required: the pool
    is the question asked, and mmlens ships none); `text_embeds` (texts, d) instead of encoding. `heads`:
    'last', 'all', a glob or a list of labels/globs. Each head's contributions are its direct-effect terms divided
    by each image's embedding norm (they sum to the normalised image embedding). Needs at least 2 images.
    """
    require_family(lens, "contrastive", "textspan")
    labels, emb = _text_side(lens, texts, text_embeds)
    de = _direct(lens, images_or_inputs, batch_size)
    if de.terms.shape[0] < 2:
        raise ValueError(f"textspan needs at least 2 images (variance over images); got {de.terms.shape[0]}")
    if emb.shape[1] != de.terms.shape[-1]:
        raise ValueError(f"text embeddings have {emb.shape[1]} dims; the image embedding has {de.terms.shape[-1]}")
    chosen = select_heads(de.labels, heads)
    contrib = de.terms / de.total().norm(dim=-1)[:, None, None]
    emb_c = contrib.sum(1) - contrib.sum(1).mean(0)
    denom = float((emb_c ** 2).sum(1).mean())
    idx, expl, var, share = [], [], [], []
    for hd in chosen:
        c = contrib[:, de.labels.index(hd)]
        j, e, v = text_span(c, emb, k)
        if len(j) < k:  # the pool spans fewer than k directions: pad with -1 / 0
            j = torch.cat([j, torch.full((k - len(j),), -1)])
            e = torch.cat([e, torch.zeros(k - len(e))])
        idx.append(j)
        expl.append(e)
        var.append(v)
        share.append(float(((c - c.mean(0)) * emb_c).sum(1).mean()) / denom if denom > 0 else 0.0)
    idx = torch.stack(idx)
    return TextSpanResult(meta=provenance(lens, de.meta.get("names"), k=k, n_images=int(de.terms.shape[0])),
                          heads=chosen, texts=[[labels[j] for j in row if j >= 0] for row in idx.tolist()],
                          pool=labels, indices=idx, explained=torch.stack(expl), variance=torch.tensor(var),
                          share=torch.tensor(share))


SIGLIP_HEAD_MLP = (*HEAD_MLP_SPLITS, "none")


@torch.no_grad()
def _siglip_tokens(lens, pv: Tensor, head_mlp: str = "integrated") -> tuple[Tensor, Tensor]:
    """SigLIP: each final token's term in the image features (batch, seq, d) and the features (batch, d).

    The pooled vector, with the probe's attention weights a_hj of the actual run, is exactly
    `sum_j sum_h a_hj V_h(x_j) O_h` plus out_proj's bias: the first part is token j's own ('none' stops there, the
    split before the head's MLP was split: its maps leave out that bias and the MLP). Otherwise out_proj's bias goes
    to the tokens by the probe's attention averaged over heads (abar_j, summing to 1), each token gets its share of
    the head's MLP term (`split_pooling_mlp`: 'integrated' or 'linearised'), and what those shares leave of the
    exact MLP term (features minus pooled, minus the shares) goes by abar_j too: a token's part of what no token
    explains is the part of the pooled vector the probe read from it. The terms then sum to the features exactly."""
    model = lens.model
    vm = model.vision_model
    p = next(vm.parameters())
    out = vm(pixel_values=pv.to(p.device, p.dtype))
    x = out.last_hidden_state  # post_layernorm applied: what the head reads
    head = vm.head
    mha = head.attention
    b, seq, d = x.shape
    _, attn = mha(head.probe.repeat(b, 1, 1), x, x, need_weights=True, average_attn_weights=False)
    h = attn.shape[1]
    a = attn.float().cpu()[:, :, 0]  # (batch, heads, seq)
    wv = mha.in_proj_weight.detach().float().cpu()[2 * d:]
    bv = mha.in_proj_bias.detach().float().cpu()[2 * d:] if mha.in_proj_bias is not None else torch.zeros(d)
    v = (x.float().cpu() @ wv.T + bv).reshape(b, seq, h, d // h)
    per = torch.einsum("bsht,bhs->bsht", v, a).reshape(b, seq, d) @ mha.out_proj.weight.detach().float().cpu().T
    feats = out.pooler_output.float().cpu()
    if head_mlp == "none":
        return per, feats
    abar = a.mean(1)[..., None]  # (batch, seq, 1)
    if mha.out_proj.bias is not None:
        per = per + abar * mha.out_proj.bias.detach().float().cpu()
    per = per + split_pooling_mlp(head, per, mlp=head_mlp)
    return per + abar * (feats - per.sum(1))[:, None], feats


def text_segmentation(lens, images_or_inputs, texts=None, *, heads="all", text_embeds: Tensor | None = None,
                      relative: bool = False, batch_size: int = 4, head_mlp: str = "integrated") -> MapResult:
    """A zero-shot segmenter from the patch-level decomposition (TextSpan, section 5): each patch's direct
    contribution to the normalised image embedding, projected on a text's embedding, is how much that patch makes
    the image match the text; the map over patches is a `MapResult` (labels: the texts).

    CLIP: `direct_effects(..., per_position=True)`, the chosen `heads` ('all' by default; 'last', a glob or a list)
    split by the key position their class-token query read, summed over heads; the class token itself is dropped
    (CLIP has no pooling head: `head_mlp` does not apply there).
    SigLIP: each final token's term in the image features through the attention-pooling head (`heads` must stay
    'all': the tower's own heads are not split by position there). `head_mlp` says what becomes of the head's
    residual MLP, `embed = p + mlp(layernorm(p))`: 'integrated' (default) gives each token its share of it,
    Integrated Gradients along p from 0 with the layernorm's scale held (exact up to the quadrature: the shares add
    up to the MLP term less its image-independent output at p = 0); 'linearised' the first-order share at the
    actual p (as TextSpan linearises CLIP's final norm; misses the MLP's curvature); both place what the shares
    leave by the probe's attention, so the maps add up over the patches to the image-text cosine. 'none' leaves the
    MLP and out_proj's bias out (the maps then add up to the pooled attention output alone). On a random tiny
    SigLIP the linearised shares leave ~30% of the MLP term's norm unexplained, the integrated ones ~1e-6.
    `relative=True` subtracts, per patch, the mean over the texts' maps: what favours this text over the others.
    """
    require_family(lens, "contrastive", "text_segmentation")
    if lens.architecture not in ("clip", "siglip"):
        raise TypeError(f"text_segmentation decomposes CLIP and SigLIP image towers; got {lens.architecture}")
    if not isinstance(relative, bool):
        raise TypeError(f"relative must be True or False; got {relative!r:.40}")
    if head_mlp not in SIGLIP_HEAD_MLP:
        raise ValueError(f"head_mlp must be one of {SIGLIP_HEAD_MLP} (what the SigLIP maps do with the pooling "
                         f"head's MLP); got {head_mlp!r:.40}")
    labels, emb = _text_side(lens, texts, text_embeds)
    if lens.architecture == "siglip":
        if heads != "all":
            raise ValueError(f"heads={heads!r}: on SigLIP the map splits the pooling head by token, not the tower's "
                             "heads by position; leave heads='all'")
        if isinstance(images_or_inputs, DirectEffectsResult):
            raise TypeError("SigLIP maps are computed from the images: pass images or processor output")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        pv = pixel_inputs(lens, images_or_inputs)["pixel_values"]
        per, feats = zip(*(_siglip_tokens(lens, pv[i:i + batch_size], head_mlp)
                           for i in range(0, len(pv), batch_size)))
        per, feats = torch.cat(per), torch.cat(feats)
        if emb.shape[1] != per.shape[-1]:
            raise ValueError(f"text embeddings have {emb.shape[1]} dims; the image embedding has {per.shape[-1]}")
        vals = torch.einsum("bsd,td->bts", per, emb) / feats.norm(dim=-1)[:, None, None]
        names, used = ["vision.head"], f"siglip pooling head, per token; head mlp: {head_mlp}"
    else:
        if isinstance(images_or_inputs, DirectEffectsResult):
            raise TypeError("text_segmentation needs the images (to draw the maps over): pass images or processor "
                            "output")
        pv = pixel_inputs(lens, images_or_inputs)["pixel_values"]
        de = _direct(lens, {"pixel_values": pv}, batch_size, per_position=True)
        chosen = select_heads(de.labels, heads)
        if emb.shape[1] != de.terms.shape[-1]:
            raise ValueError(f"text embeddings have {emb.shape[1]} dims; the image embedding has {de.terms.shape[-1]}")
        rows = torch.tensor([de.labels.index(h) for h in chosen])
        per = de.by_position[:, rows].sum(1)[:, 1:]  # (batch, patches, d): the CLS key dropped
        vals = torch.einsum("bsd,td->bts", per, emb) / de.total().norm(dim=-1)[:, None, None]
        names, used = de.meta.get("names"), f"{len(chosen)} heads by key position"
    if relative:
        vals = vals - vals.mean(1, keepdim=True)
    maps = grid_of(vals)
    meta = provenance(lens, names, heads=heads if isinstance(heads, str) else list(heads), relative=relative,
                      split=used)
    return MapResult(meta=meta, maps=maps.float(), images=seen_images(lens, pv), labels=labels,
                     method="text_segmentation" + (" (relative)" if relative else ""))


__all__ = ["TextSpanResult", "encode_texts", "text_segmentation", "text_span", "textspan"]
