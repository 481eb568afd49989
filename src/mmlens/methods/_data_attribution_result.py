"""What training-data attribution returns, the model output functions it differentiates, and its baseline.

    res = trak.attribute(clip, test_inputs, contrastive_margin)       # or representation_similarity(...)
    res.scores                       # (targets, train examples): how much each training example supports each target
    res.top(5)                       # (values, indices) of the 5 highest-scoring training examples per target
    res.precision_at_k(planted)      # per target: the share of its top-k that are the planted examples
    res.html(train_images=imgs)      # a table of each target's top examples, with thumbnails

The output function. TRAK (Park et al. 2023) differentiates a *model output function* `f(z)`, one scalar per example,
not the loss. For classification it is the margin `log(p / (1 - p))` of the example's label, which both ready-made
functions give: `contrastive_margin` (CLIP, SigLIP: the image's label among the texts of the batch) and
`generative_margin` (generative VLMs: the answer token(s) among the vocabulary). Any callable
`output_fn(lens, inputs) -> Tensor (batch,)` works; two optional attributes make it faster and safer:

- `example_keys`: which input keys hold one row per example (the others, e.g. CLIP's text prompts, are shared by
  every example); a tuple, "all", or a function `(lens, inputs) -> keys or None`. Known keys let TRAK take
  per-example gradients in one vectorised pass (`torch.func.vmap`); without them it loops (always correct).
- `validate(lens, inputs)`: value checks on the whole batch, run once before the vectorised pass (data-dependent
  checks cannot run inside `vmap`).
"""

from __future__ import annotations

import base64
import html as html_lib
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .result import Result, provenance, require_family

EXTRA_KEYS = ("labels",)  # what the output functions read; representations leave them out of the forward


@dataclass(repr=False)
class AttributionResult(Result):
    """`scores` (targets, train), float32: row t scores every training example (in the order the training batches
    were given) for target t; higher means the example supports the target's output more. `method`: 'trak' or
    'representation_similarity'."""

    scores: Tensor
    method: str

    def top(self, k: int = 10) -> tuple[Float[Tensor, "targets k"], Tensor]:
        """(values, indices) of each target's `k` highest-scoring training examples, best first."""
        n = self.scores.shape[1]
        if not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k must be an int in [1, {n}] (the number of training examples); got {k!r}")
        v, i = self.scores.topk(k, dim=1)
        return v, i

    def precision_at_k(self, relevant, k: int | None = None) -> Float[Tensor, "targets"]:
        """Per target: the fraction of its top-`k` training examples that are `relevant` (a (train,) bool mask or
        a list of indices); `k` defaults to the number of relevant examples (then precision = recall)."""
        n = self.scores.shape[1]
        rel = torch.as_tensor(relevant)
        if rel.dtype != torch.bool:
            idx = rel.long().flatten()
            if idx.numel() and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"relevant indices must lie in [0, {n - 1}]; got {idx.tolist()}")
            rel = torch.zeros(n, dtype=torch.bool)
            rel[idx] = True
        if rel.shape != (n,):
            raise ValueError(f"relevant must be a ({n},) bool mask or a list of indices; got shape {tuple(rel.shape)}")
        k = int(rel.sum()) if k is None else k
        _, idx = self.top(k)
        return rel[idx].float().mean(1)

    def summary(self) -> str:
        t, n = self.scores.shape
        return f"AttributionResult({self.method}, {self.meta.get('architecture', '?')}: {t} targets x {n} examples)"

    def plot(self, k: int = 5, targets: int = 12):
        """Heat map of the scores (targets x training examples, each row scaled by its largest |score|), each
        target's top-`k` examples ringed."""
        import matplotlib.pyplot as plt

        s = self.scores[:targets]
        s = s / s.abs().amax(1, keepdim=True).clamp_min(1e-12)
        fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.04 * s.shape[1]), 0.3 * s.shape[0] + 1.4))
        ax.imshow(s.numpy(), aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        _, idx = self.scores[:targets].topk(min(k, s.shape[1]), dim=1)
        for t, row in enumerate(idx.tolist()):
            ax.scatter(row, [t] * len(row), s=14, facecolors="none", edgecolors="k", linewidths=0.7)
        ax.set_xlabel("training example", fontsize=8)
        ax.set_ylabel("target", fontsize=8)
        ax.set_title(f"{self.method}: scores / max |score| per target (rings: top {k})", fontsize=8)
        fig.tight_layout()
        return fig

    def html(self, k: int = 5, *, train_images=None, target_images=None, train_labels: Sequence[str] | None = None,
             target_labels: Sequence[str] | None = None) -> str:
        """An HTML table, one row per target: its image or label, then its top-`k` training examples (thumbnail
        or label, index and score). Images: (n, H, W, 3) uint8 arrays or lists of PIL images, in example order."""
        vals, idx = self.top(k)
        t, n = self.scores.shape
        for what, seq, size in (("train_images", train_images, n), ("train_labels", train_labels, n),
                                ("target_images", target_images, t), ("target_labels", target_labels, t)):
            if seq is not None and len(seq) != size:
                raise ValueError(f"{what} has {len(seq)} entries; the result has {size}")

        def cell(i: int, images, labels, extra: str = "") -> str:
            parts = []
            if images is not None:
                parts.append(f"<img src='{_thumb(images[i])}' width='64'/>")
            parts.append(html_lib.escape(labels[i] if labels is not None else f"#{i}") + extra)
            return "<td>" + "<br/>".join(parts) + "</td>"

        rows = []
        for r in range(t):
            tops = "".join(cell(j, train_images, train_labels, f" (#{j}, {v:.3g})" if train_labels else f" ({v:.3g})")
                           for j, v in zip(idx[r].tolist(), vals[r].tolist()))
            rows.append(f"<tr>{cell(r, target_images, target_labels)}{tops}</tr>")
        head = "<th>target</th>" + "".join(f"<th>top {j + 1}</th>" for j in range(k))
        return (f"<div><b>{html_lib.escape(self.summary())}</b><table style='border-collapse:collapse;font-size:12px'>"
                f"<tr>{head}</tr>{''.join(rows)}</table></div>")


def _thumb(image) -> str:
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --------------------------------------------------------------------------------------- model output functions
def _margin(logits: Tensor, hit: Tensor) -> Tensor:
    """log(p / (1 - p)) of the classes marked in the bool `hit` under softmax(`logits`) along the last dim: the
    logsumexp of the marked logits minus that of the others (for one class: TRAK's multi-class output function)."""
    return logits.masked_fill(~hit, float("-inf")).logsumexp(-1) - logits.masked_fill(hit, float("-inf")).logsumexp(-1)


def _one_hot(labels: Tensor, n: int) -> Tensor:
    return torch.arange(n, device=labels.device) == labels[..., None]  # a one-hot that vmap can batch


def _split_labels(inputs: Mapping, where: str) -> tuple[Tensor, dict]:
    if "labels" not in inputs:
        raise ValueError(f"{where} reads inputs['labels']: the index of each example's label; add it to the batch")
    return torch.as_tensor(inputs["labels"]), {k: v for k, v in inputs.items() if k != "labels"}


class _ContrastiveMargin:
    """`contrastive_margin(lens, inputs) -> (images,)`: for CLIP, log(p / (1 - p)) of the text `inputs['labels'][i]`
    among the batch's texts for image i (softmax over logits_per_image); for SigLIP, whose images and texts pair
    by independent sigmoids, the pair's logit (exactly log(p / (1 - p))). `inputs`: processor output with
    pixel_values (one per example), the texts (shared by all examples) and `labels`: (images,) text indices, or
    (CLIP) an (images, texts) bool mask, the log-odds of any marked text against the rest (e.g. every caption of
    one colour: the colour, whatever the shape)."""

    example_keys = ("pixel_values", "labels")

    def validate(self, lens, inputs: Mapping) -> None:
        require_family(lens, "contrastive", "contrastive_margin")
        labels, rest = _split_labels(inputs, "contrastive_margin")
        n_img = rest["pixel_values"].shape[0] if "pixel_values" in rest else None
        n_txt = rest["input_ids"].shape[0] if "input_ids" in rest else None
        if n_img is None or n_txt is None:
            raise ValueError("contrastive_margin needs images and texts: processor output with pixel_values and "
                             "input_ids")
        if labels.dtype == torch.bool:
            if lens.architecture == "siglip":
                raise ValueError("contrastive_margin: SigLIP scores each text on its own (sigmoid); give one text "
                                 "index per image, not a bool mask")
            if labels.shape != (n_img, n_txt) or not (labels.any(1) & ~labels.all(1)).all():
                raise ValueError(f"contrastive_margin: a bool labels mask must be ({n_img}, {n_txt}) with at least "
                                 f"one marked and one unmarked text per image; got shape {tuple(labels.shape)}")
            return
        if labels.dtype.is_floating_point or labels.shape != (n_img,) or (n_img and (
                labels.min() < 0 or labels.max() >= n_txt)):
            raise ValueError(f"contrastive_margin: labels must be ({n_img},) ints in [0, {n_txt - 1}] (one text index "
                             f"per image) or an ({n_img}, {n_txt}) bool mask; got {labels.dtype} "
                             f"{tuple(labels.shape)} {labels.tolist()[:8]}")

    def __call__(self, lens, inputs: Mapping) -> Float[Tensor, "images"]:
        labels, rest = _split_labels(inputs, "contrastive_margin")
        logits = lens.model(**lens.prepare(rest, where="contrastive_margin")).logits_per_image.float()
        labels = labels.to(logits.device)
        hit = labels if labels.dtype == torch.bool else _one_hot(labels.long(), logits.shape[-1])
        if lens.architecture == "siglip":
            return logits.masked_fill(~hit, 0).sum(-1)
        return _margin(logits, hit)

    def __repr__(self) -> str:
        return "contrastive_margin"


class _GenerativeMargin:
    """`generative_margin(lens, inputs) -> (batch,)`: log(p / (1 - p)) of the answer under the LM's next-token
    softmax. `inputs['labels']` either (batch,) token ids, the answer predicted at each row's last real position
    (the vlm organism's `logits[:, -1]`), or (batch, seq) Hugging Face causal-LM labels (position t's token is
    predicted at t - 1; -100 ignored), the per-token margins summed."""

    def example_keys(self, lens, inputs: Mapping):
        return None if "image_grid_thw" in inputs else "all"  # Qwen2-VL: pixel rows are patches, not examples

    def validate(self, lens, inputs: Mapping) -> None:
        require_family(lens, "generative", "generative_margin")
        labels, rest = _split_labels(inputs, "generative_margin")
        ids = rest.get("input_ids")
        if ids is None:
            raise ValueError("generative_margin needs input_ids (processor output)")
        if labels.dtype.is_floating_point or labels.shape not in ((ids.shape[0],), tuple(ids.shape)):
            raise ValueError(f"generative_margin: labels must be ({ids.shape[0]},) answer token ids or "
                             f"{tuple(ids.shape)} causal-LM labels; got {labels.dtype} {tuple(labels.shape)}")

    def __call__(self, lens, inputs: Mapping) -> Float[Tensor, "batch"]:
        labels, rest = _split_labels(inputs, "generative_margin")
        prepared = lens.prepare(rest, where="generative_margin")
        logits = lens.model(**prepared).logits.float()  # (batch, seq, vocab)
        labels = labels.to(logits.device).long()
        if labels.dim() == 1:
            mask = prepared.get("attention_mask")
            seq = logits.shape[1]
            if mask is None:
                last = logits[:, -1]
            else:  # each row's last real position (left or right padding)
                pos = torch.arange(seq, device=logits.device)
                at = pos == (mask.long() * pos).amax(-1, keepdim=True)
                last = (logits * at[..., None]).sum(1)
            return _margin(last, _one_hot(labels, last.shape[-1]))
        lab = labels[:, 1:]
        keep = lab != -100
        per = _margin(logits[:, :-1], _one_hot(lab.clamp_min(0), logits.shape[-1]))
        return (per * keep).sum(-1)

    def __repr__(self) -> str:
        return "generative_margin"


contrastive_margin = _ContrastiveMargin()
generative_margin = _GenerativeMargin()


# ---------------------------------------------------------------------------------------------------- baseline
@torch.no_grad()
def representations(lens, batches: Iterable[Mapping], name: str, position: str | int = "cls"
                    ) -> Float[Tensor, "n d"]:
    """One vector per example from hook point `name` over `batches` (float32, CPU): (batch, d) values as they are,
    (batch, seq, d) values at `position` ('cls': position 0, 'mean': the mean over real tokens, or an int)."""
    resolved = lens.resolve(name)
    if len(resolved) != 1:
        raise ValueError(f"name must pick one hook point; {name!r} matches {len(resolved)}: {resolved[:4]}")
    out = []
    for inputs in batches:
        inputs = {k: v for k, v in inputs.items() if k not in EXTRA_KEYS}  # the output functions' labels
        _, cache = lens.run_with_cache(inputs, names=resolved, cache_device="cpu", cache_dtype=torch.float32)
        v = cache[resolved[0]]
        if v.dim() == 3:
            if position == "cls":
                v = v[:, 0]
            elif position == "mean":
                mask = inputs.get("attention_mask")
                if isinstance(mask, Tensor) and tuple(mask.shape) == tuple(v.shape[:2]):
                    w = mask.float().cpu()[..., None]
                    v = (v * w).sum(1) / w.sum(1).clamp_min(1)
                else:
                    v = v.mean(1)
            elif isinstance(position, int) and not isinstance(position, bool) and -v.shape[1] <= position < v.shape[1]:
                v = v[:, position]
            else:
                raise ValueError(f"position must be 'cls', 'mean' or an int in [{-v.shape[1]}, {v.shape[1] - 1}]; "
                                 f"got {position!r}")
        elif v.dim() != 2:
            raise ValueError(f"{resolved[0]} gives values of shape {tuple(v.shape)}; representation_similarity reads "
                             "(batch, d) or (batch, seq, d)")
        out.append(v)
    if not out:
        raise ValueError("no batches given")
    return torch.cat(out)


def representation_similarity(lens, target_inputs: Mapping | Iterable[Mapping], train_batches: Iterable[Mapping],
                              *, name: str, position: str | int = "cls") -> AttributionResult:
    """The baseline TRAK is compared with: cosine similarity between each target's representation at hook point
    `name` and each training example's (e.g. `name="image_embeds"`, or `"vision.blocks.3.resid_post"` at the CLS
    position). Similar inputs need not be the ones that taught the model its answer, which is what this baseline
    cannot tell apart. `labels` are left out of the forward, so TRAK's batches serve as they are."""
    targets = [target_inputs] if isinstance(target_inputs, Mapping) else list(target_inputs)
    t = torch.nn.functional.normalize(representations(lens, targets, name, position), dim=-1)
    x = torch.nn.functional.normalize(representations(lens, train_batches, name, position), dim=-1)
    if t.shape[1] != x.shape[1]:
        raise ValueError(f"targets give {t.shape[1]}-dim representations but training examples {x.shape[1]}")
    meta = provenance(lens, lens.resolve(name), technique="representation_similarity", position=position)
    return AttributionResult(meta=meta, scores=t @ x.T, method="representation_similarity")


__all__ = ["AttributionResult", "contrastive_margin", "generative_margin", "representation_similarity",
           "representations"]
