"""Direct effects (Gandelsman et al. 2024, "Interpreting CLIP's image representation via text-based
decomposition"; direct logit attribution for LMs): the model's output written as a sum of what each head, MLP and
the embeddings add to the residual stream, each taken straight through the read-out (final norm, projection or
unembedding), with the final norm linearised at the scale of the actual final residual.

    de = direct_effects(clip, inputs)            # terms (batch, components, d_proj); de.total() == image features
    de.by_layer()                                # summed per layer: embed, blocks.{i}.attn, blocks.{i}.mlp
    de.scores(text_embeds)                       # each component's share of each image-text logit
    de.mean_ablation(text_embeds, labels)        # zero-shot accuracy left when a group is mean-ablated
    dla = direct_logit_attribution(vlm, inputs, "red")   # terms (batch, components): the logit of 'red'

Why linearise: a norm divides by the residual's own scale, so no term has a direct effect on its own. Held at the
scale the model really used, the norm is linear and the terms sum exactly to the model's output; a term then says
what it adds given everything else present (the direct path only: nothing it does through later layers).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .result import Result, provenance, require_family, token_id

_BLOCK = re.compile(r"^blocks\.(\d+)\.(attn|mlp)")


def _group(label: str) -> str:
    """A component's layer group: 'blocks.3.attn.head1' -> 'blocks.3.attn'; others are their own group."""
    m = _BLOCK.match(label)
    return f"blocks.{m.group(1)}.{m.group(2)}" if m else label


def _groups(labels: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(_group(lb) for lb in labels))


def _select(labels: Sequence[str], which) -> Tensor:
    """Bool mask over components: `which` is a callable on labels, a glob, or a list of globs / group names."""
    if callable(which):
        return torch.tensor([bool(which(lb)) for lb in labels])
    pats = [which] if isinstance(which, str) else list(which)
    return torch.tensor([any(fnmatch.fnmatchcase(lb, p) or _group(lb) == p for p in pats) for lb in labels])


def _sum_by_group(labels: Sequence[str], terms: Tensor) -> tuple[list[str], Tensor]:
    names = _groups(labels)
    idx = torch.tensor([names.index(_group(lb)) for lb in labels])
    out = terms.new_zeros(terms.shape[0], len(names), *terms.shape[2:])
    out.index_add_(1, idx, terms)
    return names, out


def _plot_groups(names: list[str], share: Tensor, title: str, ylabel: str):
    """Bars per layer: attention and MLP side by side; embed and read-out terms at the ends."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * len(names) + 1), 2.6))
    colours = ["tab:blue" if n.endswith(".attn") else "tab:orange" if n.endswith(".mlp") else "tab:gray" for n in names]
    ax.bar(range(len(names)), share.numpy(), color=colours)
    ax.set_xticks(range(len(names)), [n.replace("blocks.", "") for n in names], rotation=90, fontsize=6)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel(ylabel, fontsize=7)
    ax.set_title(title + " (blue: attention, orange: MLP)", fontsize=8)
    fig.tight_layout()
    return fig


@dataclass(repr=False)
class DirectEffectsResult(Result):
    """`terms` (batch, components, d_embed), float32: each component's direct contribution to the (unnormalised)
    image embedding; `labels[c]` names component c ('embed', 'ln_post.bias', 'blocks.{i}.attn.head{h}',
    'blocks.{i}.attn.bias', 'blocks.{i}.mlp'; SigLIP also 'head.bias', 'head.mlp'). `terms.sum(1)` is the model's
    image features. `by_position` (batch, components, seq, d_embed) splits each head's term by the key position it
    read (zeros for non-head components), or is an empty tensor when not asked for. `logit_scale`/`logit_bias`:
    the model's, so that `scores` are logits."""

    labels: list[str]
    terms: Tensor
    by_position: Tensor
    logit_scale: float
    logit_bias: float

    def total(self) -> Float[Tensor, "batch d_embed"]:
        """The sum of all terms: the model's image features (`get_image_features`), unnormalised."""
        return self.terms.sum(1)

    def by_layer(self) -> tuple[list[str], Float[Tensor, "batch groups d_embed"]]:
        """Terms summed per layer group: 'embed', 'blocks.{i}.attn' (heads and bias), 'blocks.{i}.mlp', and the
        read-out's own terms; the groups still sum to `total()`."""
        return _sum_by_group(self.labels, self.terms)

    def scores(self, text_embeds: Float[Tensor, "texts d_embed"]) -> Float[Tensor, "batch components texts"]:
        """Each component's contribution to each image-text logit: `logit_scale * term . text / |total|`. Summed over
        components (plus `logit_bias`) this is the model's `logits_per_image` for L2-normalised `text_embeds`."""
        text = text_embeds.detach().float().cpu()
        norm = self.total().norm(dim=-1)[:, None, None]
        return self.logit_scale * torch.einsum("bcd,td->bct", self.terms, text) / norm

    def ablated_total(self, which) -> Float[Tensor, "batch d_embed"]:
        """The image features with the components `which` selects (callable on labels, glob, or list of globs /
        group names such as 'blocks.3.attn') replaced by their mean over the batch: mean-ablation of the direct path
        only, as TextSpan does (later layers still saw the real values; nothing is re-run)."""
        mask = _select(self.labels, which)
        terms = self.terms.clone()
        terms[:, mask] = self.terms[:, mask].mean(0, keepdim=True)
        return terms.sum(1)

    def zero_shot_accuracy(self, text_embeds: Tensor, labels: Sequence[int] | Tensor, *, ablate=None) -> float:
        """Share of images whose best text is `labels[i]`, optionally with `ablate` mean-ablated (`ablated_total`)."""
        labels = torch.as_tensor(labels)
        if labels.shape != (self.terms.shape[0],):
            raise ValueError(f"labels must hold one text index per image ({self.terms.shape[0]}); got "
                             f"{tuple(labels.shape)}")
        img = self.total() if ablate is None else self.ablated_total(ablate)
        sims = nn.functional.normalize(img, dim=-1) @ text_embeds.detach().float().cpu().T  # scale, bias: no effect
        return (sims.argmax(-1) == labels).float().mean().item()

    def mean_ablation(self, text_embeds: Tensor, labels: Sequence[int] | Tensor) -> dict[str, float]:
        """Zero-shot accuracy left with each layer group mean-ablated, and with all attention / all MLPs
        ('none': nothing ablated, the model's own accuracy). Computed from the terms alone (direct path)."""
        out = {"none": self.zero_shot_accuracy(text_embeds, labels)}
        for g in _groups(self.labels):
            out[g] = self.zero_shot_accuracy(text_embeds, labels, ablate=[g])
        out["attn"] = self.zero_shot_accuracy(text_embeds, labels, ablate="blocks.*.attn*")
        out["mlp"] = self.zero_shot_accuracy(text_embeds, labels, ablate="blocks.*.mlp")
        return out

    def summary(self) -> str:
        b, c, d = self.terms.shape
        heads = sum(".head" in lb for lb in self.labels)
        return (f"DirectEffectsResult({self.meta.get('architecture')}: {b} images x {c} components ({heads} heads) "
                f"x {d} dims{'' if not self.by_position.numel() else ', split by position'})")

    def plot(self, text_embeds: Tensor | None = None, labels: Sequence[int] | Tensor | None = None):
        """Per layer group, the mean share of the image embedding's direct effect: its projection on the total
        (`g . total / |total|^2`, shares sum to 1); with `text_embeds` and `labels`, its share of the logit of
        the labelled text instead."""
        names, g = self.by_layer()
        if text_embeds is not None and labels is not None:
            text = text_embeds.detach().float().cpu()[torch.as_tensor(labels)]  # (batch, d)
            part = torch.einsum("bgd,bd->bg", g, text)
            share = (part / part.sum(1, keepdim=True)).mean(0)
            return _plot_groups(names, share, "share of the labelled text's logit", "share")
        tot = self.total()
        share = (torch.einsum("bgd,bd->bg", g, tot) / (tot * tot).sum(-1, keepdim=True)).mean(0)
        return _plot_groups(names, share, "direct effect: share of the image embedding", "share")


@dataclass(repr=False)
class DirectLogitResult(Result):
    """`terms` (batch, components), float32: each component's direct contribution to the logit of `token` at
    `positions[b]`, through the final norm (at the actual residual's scale) and the unembedding. `labels` as in
    `DirectEffectsResult` ('embed': the LM's input at that position, image features merged; 'ln_final.bias' for
    LayerNorm LMs). `terms.sum(1)` is the model's logit."""

    labels: list[str]
    terms: Tensor
    token: int
    positions: Tensor

    def total(self) -> Float[Tensor, "batch"]:
        return self.terms.sum(1)

    def by_layer(self) -> tuple[list[str], Float[Tensor, "batch groups"]]:
        return _sum_by_group(self.labels, self.terms)

    def summary(self) -> str:
        b, c = self.terms.shape
        return f"DirectLogitResult({self.meta.get('architecture')}: {b} rows x {c} components, token {self.token})"

    def plot(self, batch: int | None = None):
        """Each layer group's contribution to the logit (mean over rows, or one row)."""
        names, g = self.by_layer()
        v = g.mean(0) if batch is None else g[batch]
        return _plot_groups(names, v, f"direct logit attribution to token {self.token}", "logit")


# --------------------------------------------------------------------------------------------------- helpers
def _heads(z: Tensor, o: nn.Linear) -> Tensor:
    """(batch, heads, d_head) values at one query row -> (batch, heads, d_model): each head through its slice of o."""
    b, h, dh = z.shape
    w = o.weight.detach().float().cpu().T.reshape(h, dh, -1)  # (heads, d_head, d_model)
    return torch.einsum("bhk,hkd->bhd", z.float(), w)


def norm_gain(norm: nn.Module, d: int) -> Tensor:
    """A final norm's elementwise gain, without dividing by the residual's scale: LayerNorm's weight; RMSNorm's read
    off the module itself (`norm(ones) * sqrt(1 + eps)`, so Gemma's 1 + w and each family's own formula are used)."""
    if isinstance(norm, nn.LayerNorm):
        return norm.weight.detach().float().cpu() if norm.weight is not None else torch.ones(d)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if eps is None:
        raise TypeError(f"expected a LayerNorm or RMSNorm as the final norm; got {type(norm).__name__}")
    p = next(norm.parameters())
    with torch.no_grad():
        out = norm(torch.ones(1, d, device=p.device, dtype=p.dtype)).float().cpu()[0]
    return out * (1 + eps) ** 0.5


def _norm_linear(norm: nn.Module, resid: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor | None]:
    """The final norm as a linear map at the scale of `resid` (batch, d), plus its bias (LayerNorm) or None.

    LayerNorm: t -> w * (t - mean(t)) / std(resid). RMSNorm (Llama, Qwen2, Gemma's 1 + w): t -> g * t / rms(resid),
    g = `norm_gain(norm)`."""
    resid = resid.float()
    gain = norm_gain(norm, resid.shape[-1])
    if isinstance(norm, nn.LayerNorm):
        mu = resid.mean(-1, keepdim=True)
        std = ((resid - mu) ** 2).mean(-1, keepdim=True).add(norm.eps).sqrt()
        bias = norm.bias.detach().float().cpu() if norm.bias is not None else None
        return (lambda t: gain * (t - t.mean(-1, keepdim=True)) / std.view(-1, *[1] * (t.dim() - 2), 1)), bias
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    rms = (resid ** 2).mean(-1, keepdim=True).add(eps).sqrt()
    return (lambda t: gain * t / rms.view(-1, *[1] * (t.dim() - 2), 1)), None


HEAD_MLP_SPLITS = ("integrated", "linearised")


@torch.no_grad()
def split_pooling_mlp(head: nn.Module, terms: Float[Tensor, "batch n d"], *, mlp: str = "integrated",
                      steps: int = 16) -> Float[Tensor, "batch n d"]:
    """Each term's share (float32, CPU) of a SigLIP pooling head's MLP term `head.mlp(head.layernorm(p))`, where
    `p = terms.sum(1)` is the attention-pooled vector and the terms are any split of it (tokens, components).

    The layernorm is held at p's own scale, as TextSpan linearises CLIP's final norm: `layernorm(p) = b + sum_n u_n`
    with `u_n = w * (t_n - mean(t_n)) / std(p)`, linear in the terms. (Its true Jacobian would not do: layernorm is
    scale-invariant, so it maps p itself to zero and the shares would add up to nothing.) Then, with J(z) the MLP's
    Jacobian, applied to all the u_n at once by a jvp batched over them (no d x d matrix is formed):

    - 'linearised': share_n = J(layernorm(p)) u_n, first order at the input the model really had;
    - 'integrated': share_n = (integral over a in [0, 1] of J(b + a sum u)) u_n by Gauss-Legendre with `steps`
      nodes: Integrated Gradients from the baseline p = 0 along the straight line to p, so the shares add up to
      `mlp(layernorm(p)) - mlp(b)` (completeness), up to the quadrature's error.

    What the shares leave of the exact MLP term (mlp(b), the image-independent output at the baseline, plus the
    curvature or quadrature error) is not placed here: the caller decides (see `text_segmentation`)."""
    if mlp not in HEAD_MLP_SPLITS:
        raise ValueError(f"mlp must be one of {HEAD_MLP_SPLITS}; got {mlp!r:.40}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int (quadrature nodes); got {steps!r:.40}")
    ln, f = head.layernorm, head.mlp
    dev = next(f.parameters()).device
    params = {k: v.detach().float().to(dev) for k, v in f.named_parameters()}
    t = terms.detach().float().to(dev)
    d = t.shape[-1]
    w = ln.weight.detach().float().to(dev) if ln.weight is not None else torch.ones(d, device=dev)
    b = ln.bias.detach().float().to(dev) if ln.bias is not None else torch.zeros(d, device=dev)
    p = t.sum(1)
    std = p.var(-1, unbiased=False, keepdim=True).add(ln.eps).sqrt()  # (batch, 1)
    u = w * (t - t.mean(-1, keepdim=True)) / std[:, None]  # (batch, n, d)
    if mlp == "linearised":
        nodes, weights = [1.0], [1.0]
    else:
        import numpy as np

        x, wq = np.polynomial.legendre.leggauss(steps)
        nodes, weights = ((x + 1) / 2).tolist(), (wq / 2).tolist()
    total = u.sum(1)
    if _is_fc_act_fc(f, b + total):
        # fc2(act(fc1 z)): J(z) u = W2 diag(act'(fc1 z)) W1 u, and only the diagonal moves along the path, so the
        # nodes' derivatives are averaged first and each term goes through W1 and W2 once (not once per node)
        W1, b1, W2 = params["fc1.weight"], params.get("fc1.bias"), params["fc2.weight"]
        slope = 0
        for a, wt in zip(nodes, weights):
            pre = torch.nn.functional.linear(b + a * total, W1, b1)  # (batch, d_mlp)
            slope = slope + wt * torch.func.jvp(f.activation_fn, (pre,), (torch.ones_like(pre),))[1]
        return (((u @ W1.T) * slope[:, None]) @ W2.T).cpu()
    fn = lambda z: torch.func.functional_call(f, params, (z,))  # noqa: E731
    out = torch.zeros_like(u)
    for a, wt in zip(nodes, weights):
        z = b + a * total  # (batch, d): the point on the path
        jv = torch.func.vmap(lambda v: torch.func.jvp(fn, (z,), (v,))[1], in_dims=1, out_dims=1)(u)
        out += wt * jv
    return out.cpu()


def _is_fc_act_fc(f: nn.Module, z: Tensor) -> bool:
    """Whether `f` is SigLIP's MLP shape, fc2(activation_fn(fc1(z))), checked on `z` (a subclass may differ)."""
    if not all(isinstance(getattr(f, k, None), nn.Linear) for k in ("fc1", "fc2")) or \
            not callable(getattr(f, "activation_fn", None)):
        return False
    x = z.to(f.fc1.weight.dtype)
    return torch.allclose(f(x).float(), f.fc2(f.activation_fn(f.fc1(x))).float(), rtol=1e-4, atol=1e-5)


def _blocks(lens, prefix: str) -> int:
    return 1 + max(int(n.split(".")[2]) for n in lens.hook_points(f"{prefix}.blocks.*.resid_post"))


def _block_terms(lens, cache, prefix: str, n_blocks: int, o_path: Callable[[int], nn.Module], pos: Tensor):
    """Labels and (batch, components, d_model) terms of every block at the residual positions `pos` (batch,)."""
    rows = torch.arange(pos.shape[0])
    labels, terms = [], []
    for i in range(n_blocks):
        z = cache[f"{prefix}.blocks.{i}.attn.z"][rows, pos]  # (batch, heads, d_head)
        o = o_path(i)
        terms.append(_heads(z, o))
        labels += [f"blocks.{i}.attn.head{h}" for h in range(z.shape[1])]
        if o.bias is not None:
            terms.append(o.bias.detach().float().cpu().expand(len(rows), 1, -1))
            labels.append(f"blocks.{i}.attn.bias")
        mlp = cache[f"{prefix}.blocks.{i}.mlp.out"]
        mlp = mlp.reshape(len(rows), -1, mlp.shape[-1]) if mlp.dim() == 2 else mlp  # OPT: (batch * seq, d)
        terms.append(mlp[rows, pos].float()[:, None])
        labels.append(f"blocks.{i}.mlp")
    return labels, terms


def _o_proj(lens, prefix: str, i: int) -> nn.Module:
    return lens.model.get_submodule(lens.sites[f"{prefix}.blocks.{i}.attn.out"].path)


# ------------------------------------------------------------------------------------------------ techniques
@torch.no_grad()
def direct_effects(lens, inputs, *, per_position: bool = False, head_mlp: str = "block") -> DirectEffectsResult:
    """The image embedding of a CLIP or SigLIP model as a sum of per-head, per-MLP and embedding terms (TextSpan).

    CLIP: `visual_projection(post_layernorm(resid_final[:, 0]))`. The residual at CLS is the pre-LN embeddings plus
    every block's attention and MLP output; post_layernorm is linearised with the actual residual's std (each
    term mean-centred, divided by that std, times the LN weight) and its bias is its own term 'ln_post.bias'. Each
    block's attention splits into heads as `attn.z` (the CLS query row) times that head's columns of out_proj's
    weight; out_proj's bias is its own term 'blocks.{i}.attn.bias'. Everything after the norm is linear, so the
    terms sum exactly (fp32: ~1e-6) to `get_image_features`.

    SigLIP: the image embedding is the attention-pooling head on post_layernorm of every token:
    `p = MHA(probe, x, x)`, `embed = p + mlp(layernorm(p))`. Linearised: post_layernorm of each token at that
    token's actual std, and the probe's attention weights of the actual run held fixed, so
    `p = sum_j a_hj V_h(x_j)` is linear in each component's per-token contribution; the terms are each
    component's share of `p` ('ln_post.bias' carries post_layernorm's bias through V and out_proj; 'head.bias' the
    V and out_proj biases). The residual MLP of the head is not linear and has no exact split: it is one component
    'head.mlp', computed as the exact difference to `get_image_features`, so the total still matches.
    `head_mlp='integrated'` or `'linearised'` (SigLIP only; default 'block': one component) splits that MLP term
    over the components as well (`split_pooling_mlp`: each component's share of it, added to the component's term);
    'head.mlp' then holds only what the split leaves ('integrated': about mlp(layernorm.bias), the same for every
    image, plus the quadrature's error).

    `per_position=True` (CLIP only) also fills `positions` (batch, components, seq, d_embed): each head's term
    split by the key position it attended to (`pattern[cls, j] * v_j` through out_proj and the read-out), summing
    over positions to the head's term. Not offered for SigLIP: there the natural split is by pooled token, not by
    head source, and is left out.
    """
    require_family(lens, "contrastive", "direct_effects")
    from ..models.readout import _tower_path

    model, arch = lens.model, lens.architecture
    if arch not in ("clip", "siglip"):
        raise TypeError(f"direct_effects decomposes CLIP and SigLIP image towers; got {arch}")
    if "pixel_values" not in inputs:
        raise ValueError("direct_effects needs images: pass processor output with pixel_values")
    if head_mlp not in ("block", *HEAD_MLP_SPLITS):
        raise ValueError(f"head_mlp must be one of {('block', *HEAD_MLP_SPLITS)}; got {head_mlp!r:.40}")
    if head_mlp != "block" and arch != "siglip":
        raise ValueError(f"head_mlp={head_mlp!r} splits SigLIP's pooling-head MLP; {arch} has none (leave 'block')")
    if per_position and arch != "clip":
        raise ValueError("per_position=True is implemented for CLIP's class token only (see the docstring)")
    tower_cls = lens.adapter.tower_classes["vision"]
    paths = [_tower_path(model, p, "vision", tower_cls) for p in lens.adapter.projections["vision"]]
    if None in paths:
        raise ValueError(f"{type(model).__name__} lacks the image read-out {lens.adapter.projections['vision']}")
    ln_post, readout = (model.get_submodule(p) for p in paths)
    n = _blocks(lens, "vision")
    embed_name = "vision.ln_pre" if "vision.ln_pre" in lens.sites else "vision.embed"
    names = [embed_name, f"vision.blocks.{n - 1}.resid_post", *lens.hook_points("vision.blocks.*.attn.z"),
             *lens.hook_points("vision.blocks.*.mlp.out")]
    if per_position:
        names += lens.hook_points("vision.blocks.*.attn.v") + lens.hook_points("vision.blocks.*.attn.pattern")
    call = model.vision_model if hasattr(model, "vision_model") else model
    prepared = {"pixel_values": torch.as_tensor(inputs["pixel_values"]).to(lens.device, lens.dtype)}
    out, cache = _run(lens, call, prepared, names, per_position)
    pooled = out.pooler_output  # CLIP: post_layernorm(CLS); SigLIP: the head's output, the image features
    features = (readout(pooled) if arch == "clip" else pooled).float().cpu()
    batch, seq = cache[embed_name].shape[:2]
    o = lambda i: _o_proj(lens, "vision", i)  # noqa: E731

    def seq_terms(pos: Tensor):
        labels, terms = _block_terms(lens, cache, "vision", n, o, pos)
        rows = torch.arange(batch)
        return ["embed", *labels], [cache[embed_name][rows, pos].float()[:, None], *terms]

    if arch == "clip":
        cls = torch.zeros(batch, dtype=torch.long)
        labels, terms = seq_terms(cls)
        lin, bias = _norm_linear(ln_post, cache[f"vision.blocks.{n - 1}.resid_post"][:, 0])
        w = readout.weight.detach().float().cpu()
        parts = lin(torch.cat(terms, 1)) @ w.T  # (batch, components, d_proj)
        if bias is not None:  # post_layernorm's bias, added once, through the projection
            parts = torch.cat([parts, (bias @ w.T).expand(batch, 1, -1)], 1)
            labels.append("ln_post.bias")
        if readout.bias is not None:
            parts = torch.cat([parts, readout.bias.detach().float().cpu().expand(batch, 1, -1)], 1)
            labels.append("proj.bias")
        pos_terms = torch.zeros(0)
        if per_position:
            pos_terms = _clip_positions(lens, cache, n, labels, lin, w, batch, seq)
        meta = provenance(lens, names, per_position=per_position, embed=embed_name)
        return DirectEffectsResult(meta=meta, labels=labels, terms=parts, by_position=pos_terms,
                                   logit_scale=model.logit_scale.exp().item() if hasattr(model, "logit_scale") else 1.0,
                                   logit_bias=0.0)

    # SigLIP: every token's terms, linearised post_layernorm per token, the probe's weights held fixed
    all_terms, labels = [], None
    for j in range(seq):
        labels, terms = seq_terms(torch.full((batch,), j, dtype=torch.long))
        all_terms.append(torch.cat(terms, 1))
    tok = torch.stack(all_terms, 2)  # (batch, components, seq, d_model)
    resid = cache[f"vision.blocks.{n - 1}.resid_post"].float()  # (batch, seq, d_model)
    lin, bias = _norm_linear(ln_post, resid.reshape(batch * seq, -1))
    normed = lin(tok.permute(0, 2, 1, 3).reshape(batch * seq, tok.shape[1], -1))  # (batch*seq, components, d)
    normed = normed.reshape(batch, seq, tok.shape[1], -1).permute(0, 2, 1, 3)
    head = readout
    mha = head.attention
    ln_p = next(ln_post.parameters())
    x = ln_post(resid.to(ln_p.device, ln_p.dtype))  # the cache lives on CPU; the head on the model's device
    probe = head.probe.repeat(batch, 1, 1)
    pooled, attn = mha(probe, x, x, need_weights=True, average_attn_weights=False)  # attn (batch, heads, 1, seq)
    h = attn.shape[1]
    d = resid.shape[-1]
    wv = mha.in_proj_weight.detach().float().cpu()[2 * d:]
    bv = mha.in_proj_bias.detach().float().cpu()[2 * d:] if mha.in_proj_bias is not None else torch.zeros(d)
    wo, bo = mha.out_proj.weight.detach().float().cpu(), mha.out_proj.bias
    a = attn.float().cpu()[:, :, 0]  # (batch, heads, seq)

    def through(v: Tensor) -> Tensor:
        """(batch, components, seq, d) tokens -> (batch, components, d): V per head, weighted by a, out_proj."""
        vv = (v @ wv.T).reshape(*v.shape[:-1], h, d // h)  # (batch, comp, seq, heads, dh)
        mixed = torch.einsum("bcshk,bhs->bchk", vv, a).reshape(*v.shape[:2], d)
        return mixed @ wo.T

    parts = [through(normed)]
    labels = list(labels)
    if bias is not None:
        parts.append(through(bias.expand(batch, 1, seq, d)))
        labels.append("ln_post.bias")
    # V's bias passes through the weighted sum unchanged (the weights sum to 1), then out_proj and its bias
    hb = bv @ wo.T + (bo.detach().float().cpu() if bo is not None else 0)
    parts.append(hb.expand(batch, 1, d))
    labels.append("head.bias")
    parts = torch.cat(parts, 1)
    if head_mlp != "block":  # each component's share of the MLP term; 'head.mlp' keeps what is left
        parts = parts + split_pooling_mlp(head, parts, mlp=head_mlp)
    rest = features - parts.sum(1)  # the head's residual MLP on layernorm(pooled): non-linear, exact difference
    parts = torch.cat([parts, rest[:, None]], 1)
    labels.append("head.mlp")
    meta = provenance(lens, names, per_position=False, embed=embed_name, head_mlp=head_mlp)
    return DirectEffectsResult(meta=meta, labels=labels, terms=parts, by_position=torch.zeros(0),
                               logit_scale=model.logit_scale.exp().item() if hasattr(model, "logit_scale") else 1.0,
                               logit_bias=model.logit_bias.item() if hasattr(model, "logit_bias") else 0.0)


def _run(lens, call, prepared, names, per_position):
    """The image tower alone, recording `names` in float32 on CPU (the CLS query row only for patterns)."""
    cache = {}
    caps = {nm: [lambda v, ctx: cache.__setitem__(ctx.name, v.detach().float().cpu())] for nm in names}
    rows = {"vision.blocks.*.attn.pattern": [0]} if per_position else None
    with lens.hooks(captures=caps, attn_rows=rows):
        out = call(pixel_values=prepared["pixel_values"])
    return out, cache


def _clip_positions(lens, cache, n, labels, lin, w, batch, seq) -> Tensor:
    """(batch, components, seq, d_proj): head h of block i split by key j: pattern[h, cls, j] * v_j,h @ O_h."""
    out = torch.zeros(batch, len(labels), seq, w.shape[0])
    for i in range(n):
        v = cache[f"vision.blocks.{i}.attn.v"]  # (batch, seq, heads, dh)
        pat = cache[f"vision.blocks.{i}.attn.pattern"][:, :, 0]  # (batch, heads, seq)
        o = _o_proj(lens, "vision", i)
        h, dh = v.shape[2], v.shape[3]
        wo = o.weight.detach().float().cpu().T.reshape(h, dh, -1)
        per = torch.einsum("bhs,bshk,hkd->bhsd", pat, v, wo)  # (batch, heads, seq, d_model)
        first = labels.index(f"blocks.{i}.attn.head0")
        out[:, first:first + h] = lin(per.reshape(batch, h * seq, -1)).reshape(batch, h, seq, -1) @ w.T
    return out


@torch.no_grad()
def direct_logit_attribution(lens, inputs, token: int | str, *, position: str | int = "answer") -> DirectLogitResult:
    """The logit of `token` at `position` of a generative VLM as a sum over the embedding, every head
    (`attn.z` times its slice of o_proj), o_proj's bias if any, and every MLP, each through the final norm
    linearised at the actual final residual's scale (RMSNorm: exact; LayerNorm: mean-centred, its bias a
    separate term 'ln_final.bias') and the unembedding row of `token`.

    `position`: 'answer' (each row's `TokenMap.answer_positions`) or an int (negatives from the end, every row).
    Models whose logits pass a non-linear softcap (Gemma 2) are refused: no exact linear split exists.
    """
    require_family(lens, "generative", "direct_logit_attribution")
    model = lens.model
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise ValueError(f"{lens.architecture}: final_logit_softcapping is not linear; no exact direct attribution")
    mods = lens.adapter.unembed_modules()
    if len(mods) != 2:
        raise TypeError(f"direct_logit_attribution reads one final norm and the unembedding; {lens.architecture} "
                        f"applies {[type(m).__name__ for m in mods]}")
    norm, unembed = mods
    if isinstance(token, str):
        token = token_id(token, getattr(lens.processor, "tokenizer", lens.processor).get_vocab())
    n = _blocks(lens, "lm")
    names = ["lm.blocks.0.resid_pre", f"lm.blocks.{n - 1}.resid_post", *lens.hook_points("lm.blocks.*.attn.z"),
             *lens.hook_points("lm.blocks.*.mlp.out")]
    _, cache = lens.run_with_cache(inputs, names=names, cache_device="cpu", cache_dtype=torch.float32)
    batch, seq = cache["lm.blocks.0.resid_pre"].shape[:2]
    if position == "answer":
        pos = lens.token_map(inputs).answer_positions().long().cpu()
    elif isinstance(position, int) and -seq <= position < seq:
        pos = torch.full((batch,), position % seq, dtype=torch.long)
    else:
        raise ValueError(f"position must be 'answer' or an int in [{-seq}, {seq - 1}]; got {position!r}")
    rows = torch.arange(batch)
    labels, terms = _block_terms(lens, cache, "lm", n, lambda i: _o_proj(lens, "lm", i), pos)
    labels = ["embed", *labels]
    terms = torch.cat([cache["lm.blocks.0.resid_pre"][rows, pos].float()[:, None], *terms], 1)
    lin, bias = _norm_linear(norm, cache[f"lm.blocks.{n - 1}.resid_post"][rows, pos])
    u = unembed.weight.detach().float().cpu()[token]  # (d_model,)
    logit = lin(terms) @ u
    if bias is not None:
        logit = torch.cat([logit, (bias @ u).expand(batch, 1)], 1)
        labels.append("ln_final.bias")
    if getattr(unembed, "bias", None) is not None:
        logit = torch.cat([logit, unembed.bias.detach().float().cpu()[token].expand(batch, 1)], 1)
        labels.append("unembed.bias")
    return DirectLogitResult(meta=provenance(lens, names, position=position), labels=labels, terms=logit,
                             token=token, positions=pos)


__all__ = ["DirectEffectsResult", "DirectLogitResult", "direct_effects", "direct_logit_attribution",
           "split_pooling_mlp"]
