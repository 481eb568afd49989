"""Logit lens (nostalgebraist 2020; on image tokens: Neo et al. 2024): read each layer's residual stream through the
model's own final norm and unembedding, as if the network stopped there. Its contrastive analogue, `joint_lens`,
projects each layer of an image tower into the joint image-text space and scores it against the texts.

    res = logit_lens(vlm, inputs, positions="answer")      # (layers, batch, positions, vocab)
    res.top_tokens(k=3)[-1][0][0]                           # the last layer's top 3 at the answer
    res.plot_image("red")                                   # P("red") per layer over the image's patch grid
    jl = joint_lens(clip, inputs); jl.accuracy(labels)      # zero-shot accuracy per layer
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .result import Result, provenance, require_family, token_id


@dataclass(repr=False)
class LogitLensResult(Result):
    """`logits` (layers, batch, positions, vocab), float32: layer k's residual at `positions[b]` through the final
    norm and unembedding. `names[k]` is layer k's hook point; `positions` (batch, n) the sequence positions read;
    `row`/`col` (batch, n) their patch cell (-1: not an image patch), `image` (batch, n) their image index (-1: none)
    and `grids` each image's (rows, cols); `vocab` the tokenizer's id -> string (empty if the lens had none)."""

    names: list[str]
    positions: Tensor
    logits: Tensor
    row: Tensor
    col: Tensor
    image: Tensor
    grids: list
    vocab: list[str]

    def probs(self) -> Float[Tensor, "layers batch positions vocab"]:
        return self.logits.softmax(-1)

    def top(self, k: int = 1) -> tuple[Float[Tensor, "layers batch positions k"], Int[Tensor, "layers batch positions k"]]:
        """Probabilities and ids of the k most likely tokens at every layer and position."""
        return self.probs().topk(k, dim=-1)

    def top_tokens(self, k: int = 1) -> list:
        """[layer][batch][position] -> the k most likely token strings."""
        _, ids = self.top(k)
        decode = (lambda i: self.vocab[i]) if self.vocab else str
        return [[[[decode(i) for i in pos] for pos in b] for b in layer] for layer in ids.tolist()]

    def token_id(self, token: str | int) -> int:
        """A word's id (its word-initial piece where the vocabulary marks one: `▁red`, `Ġred`)."""
        return token_id(token, self.vocab)

    def token_probs(self, token: str | int) -> Float[Tensor, "layers batch positions"]:
        """Probability of one token (string or id) at every layer and position."""
        return self.probs()[..., self.token_id(token)]

    def on_grid(self, values: Tensor, batch: int = 0, image: int | None = None) -> Tensor:
        """(..., positions) values of one batch row -> (..., rows, cols) over an image's patch grid (NaN where a
        patch's position was not read)."""
        cells = (self.row[batch] >= 0) & ((self.image[batch] == image) if image is not None else True)
        imgs = self.image[batch][cells].unique().tolist()
        if len(imgs) != 1:
            raise ValueError(f"batch row {batch} reads patches of images {imgs}; pass image= (one of them)"
                             if imgs else f"no image patch was read in batch row {batch} (positions=None reads all)")
        rows, cols = self.grids[imgs[0]]
        out = torch.full((*values.shape[:-1], rows, cols), float("nan"))
        out[..., self.row[batch][cells], self.col[batch][cells]] = values[..., cells].float().cpu()
        return out

    def summary(self) -> str:
        layers, b, n, v = self.logits.shape
        return f"LogitLensResult({self.meta.get('architecture')}: {layers} layers x {b} rows x {n} positions x {v} vocab)"

    def plot(self, batch: int = 0, max_positions: int = 48):
        """Top-1 token and its probability per layer (rows) and position (columns)."""
        import matplotlib.pyplot as plt

        p, ids = self.top(1)
        p, ids = p[:, batch, :max_positions, 0], ids[:, batch, :max_positions, 0]
        fig, ax = plt.subplots(figsize=(0.55 * p.shape[1] + 2, 0.45 * p.shape[0] + 1.2))
        ax.imshow(p.numpy(), aspect="auto", cmap="Blues", vmin=0, vmax=1)
        for (li, pi), tid in zip(torch.cartesian_prod(torch.arange(p.shape[0]), torch.arange(p.shape[1])).tolist(),
                                 ids.flatten().tolist()):
            ax.text(pi, li, (self.vocab[tid] if self.vocab else str(tid))[:6], ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(self.names)), [n.replace(".resid_post", "") for n in self.names], fontsize=7)
        ax.set_xticks(range(p.shape[1]), self.positions[batch, :max_positions].tolist(), fontsize=6)
        ax.set_xlabel("position")
        ax.set_title("logit lens: top-1 token (colour: its probability)", fontsize=8)
        return fig

    def plot_image(self, token: str | int, batch: int = 0, image: int | None = None):
        """P(token) at each image patch, one panel per layer, laid over the image's patch grid."""
        import matplotlib.pyplot as plt

        grid = self.on_grid(self.token_probs(token)[:, batch], batch, image)  # (layers, rows, cols)
        fig, axes = plt.subplots(1, len(self.names), figsize=(1.8 * len(self.names), 2.1), squeeze=False)
        for ax, g, name in zip(axes[0], grid, self.names):
            ax.imshow(g.numpy(), cmap="magma", vmin=0, vmax=1)
            ax.set_title(name.replace(".resid_post", ""), fontsize=7)
            ax.axis("off")
        fig.suptitle(f"logit lens: P({token!r}) per image patch", fontsize=8)
        return fig


def _positions(tm, positions, seq: int, batch: int, mask: Tensor | None = None) -> Int[Tensor, "batch n"]:
    """`positions` as (batch, n) indices; an explicit position that is padding in some row is refused (with right
    padding, -1 of a short row is a pad token: use 'answer', or left padding)."""
    pos = _position_indices(tm, positions, seq, batch)
    if mask is not None and positions is not None and not isinstance(positions, str):
        pad = mask.cpu()[torch.arange(batch)[:, None], pos] == 0
        if pad.any():
            b, k = pad.nonzero()[0].tolist()
            raise ValueError(f"position {int(pos[b, k])} is padding in batch row {b}; use positions='answer', pad "
                             "on the left, or per-row positions (a (batch, n) tensor)")
    return pos


def _position_indices(tm, positions, seq: int, batch: int) -> Int[Tensor, "batch n"]:
    if positions is None:
        return torch.arange(seq).expand(batch, seq)
    if isinstance(positions, str):
        if positions != "answer":
            raise ValueError(f"positions={positions!r}; allowed: None (all), 'answer', a list of ints, or a (batch, n) "
                             "tensor")
        return tm.answer_positions()[:, None]
    pos = torch.as_tensor(positions, dtype=torch.long)
    if pos.dim() == 1:
        pos = pos.expand(batch, -1)
    if pos.dim() != 2 or pos.shape[0] != batch:
        raise ValueError(f"positions must be 1-D (the same in every row) or (batch={batch}, n); got {tuple(pos.shape)}")
    if pos.numel() and (pos.min() < -seq or pos.max() >= seq):
        raise ValueError(f"positions out of range for a sequence of {seq} (allowed: {-seq} to {seq - 1})")
    return pos % seq


@torch.no_grad()
def logit_lens(lens, inputs, *, names: str | Sequence[str] = "lm.blocks.*.resid_post",
               positions: str | Sequence[int] | Tensor | None = None) -> LogitLensResult:
    """Each of `names` (residual streams of the LM) through the model's final norm and unembedding (`lens.unembed`).

    `positions`: None (every position; the result is (layers, batch, seq, vocab), so pass positions on a large
    vocabulary), 'answer' (each row's `TokenMap.answer_positions`, where the next-token prediction is read), a list
    of ints (negatives from the end, the same in every row) or a (batch, n) tensor. The last block's residual gives
    the model's own logits.
    """
    return read_out(lens, inputs, names, positions, "logit_lens")


def read_out(lens, inputs, names, positions, technique: str, translate=None) -> LogitLensResult:
    """The residuals `names` at `positions`, each optionally translated (`translate(k, resid)`, the tuned lens),
    through `lens.unembed`: what the logit lens and the tuned lens share."""
    require_family(lens, "generative", technique)
    resolved = lens.resolve(names)
    _, cache = lens.run_with_cache(inputs, names=resolved)
    tm = lens.token_map(inputs)
    seq, batch = tm.modality.shape[1], tm.modality.shape[0]
    pos = _positions(tm, positions, seq, batch, inputs.get("attention_mask"))
    rows = torch.arange(batch)[:, None]
    logits = []
    for k, name in enumerate(resolved):
        resid = cache[name]
        if resid.dim() != 3 or resid.shape[:2] != (batch, seq):
            raise ValueError(f"{name}: {technique} reads (batch, seq, d_model) residual streams; got {tuple(resid.shape)}")
        h = resid[rows, pos.to(resid.device)]
        logits.append(lens.unembed(h if translate is None else translate(k, h)).float().cpu())
    tok = getattr(lens.processor, "tokenizer", lens.processor)
    vocab = tok.convert_ids_to_tokens(list(range(logits[0].shape[-1]))) if hasattr(tok, "convert_ids_to_tokens") else []
    vocab = [v if v is not None else "" for v in vocab]
    return LogitLensResult(meta=provenance(lens, resolved, lens_kind="tuned" if translate else "logit"),
                           names=resolved, positions=pos, logits=torch.stack(logits), row=tm.row[rows, pos],
                           col=tm.col[rows, pos], image=tm.image[rows, pos], grids=[list(g) for g in tm.grids],
                           vocab=vocab)


@dataclass(repr=False)
class JointLensResult(Result):
    """`logits` (layers, images, texts), float32: layer k of the image tower projected into the joint space and
    compared with the texts as the model's own logits are (scale, bias). The last layer gives `logits_per_image`."""

    names: list[str]
    logits: Tensor

    def accuracy(self, labels: Sequence[int] | Tensor) -> Float[Tensor, "layers"]:
        """Zero-shot accuracy per layer: the share of images whose best text is `labels[i]`."""
        labels = torch.as_tensor(labels)
        if labels.shape != (self.logits.shape[1],):
            raise ValueError(f"labels must hold one text index per image ({self.logits.shape[1]}); got "
                             f"{tuple(labels.shape)}")
        return (self.logits.argmax(-1) == labels).float().mean(-1)

    def summary(self) -> str:
        layers, i, t = self.logits.shape
        return f"JointLensResult({self.meta.get('architecture')}: {layers} layers x {i} images x {t} texts)"

    def plot(self, labels: Sequence[int] | Tensor | None = None):
        """Zero-shot accuracy per layer given `labels`, else the mean top-text probability per layer."""
        import matplotlib.pyplot as plt

        y = self.accuracy(labels) if labels is not None else self.logits.softmax(-1).amax(-1).mean(-1)
        fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * len(self.names)), 2.4))
        ax.plot(range(len(self.names)), y.numpy(), marker="o")
        ax.set_xticks(range(len(self.names)), [n.removeprefix("vision.").replace(".resid_post", "")
                                               for n in self.names], fontsize=6, rotation=45)
        ax.set_xlabel("image-tower layer")
        ax.set_ylabel("zero-shot accuracy" if labels is not None else "mean top probability", fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title("joint lens", fontsize=8)
        return fig


@torch.no_grad()
def joint_lens(lens, inputs, *, names: str | Sequence[str] = "vision.blocks.*.resid_post") -> JointLensResult:
    """Each image-tower layer projected into the joint space (`lens.project`) and scored against the texts of
    `inputs` with the model's own scale (and SigLIP's bias): the logit lens of a contrastive model.

    CLIP reads the class token of each layer; SigLIP pools every token with its attention head.
    """
    require_family(lens, "contrastive", "joint_lens")
    resolved = lens.resolve(names)
    out, cache = lens.run_with_cache(inputs, names=[*resolved, "text_embeds"])
    text = cache["text_embeds"].float()
    model = lens.model
    scale = model.logit_scale.exp().float()
    bias = getattr(model, "logit_bias", None)
    siglip = lens.architecture == "siglip"
    logits = []
    for name in resolved:
        resid = cache[name]
        img = lens.project(resid if siglip else resid[:, 0], "vision", normalize=True).float()
        lg = img @ text.T * scale
        logits.append((lg if bias is None else lg + bias.float()).cpu())
    return JointLensResult(meta=provenance(lens, resolved), names=resolved, logits=torch.stack(logits))
