"""Relevancy through BLIP-2's Q-Former: Chefer, Gur & Wolf 2021's rules for an encoder-decoder (their DETR case),
with the image patches as the encoder tokens and the Q-Former's learned queries as the decoder queries.

    vision tower, R_ii = I:        R_ii += Abar R_ii                       (eq. 6, per vision block)
    Q-Former self-attention:       R_qq += Abar R_qq;  R_qi += Abar R_qi    (eq. 6-7; R_qq = I, R_qi = 0 at first)
    Q-Former cross-attention:      R_qi += Rbar_qq^T Abar Rbar_ii           (eq. 10)
                                   R_qq += Abar R_iq = 0                    (eq. 11: image tokens never read queries)
    Rbar_xx = rownorm(R_xx - I) + I                                         (eq. 8-9)

with Abar = mean_heads(relu(dlogit/dA * A)) (eq. 5) for the explained logit. The language model is a causal
self-attention over [projected queries; text]: its relevancy row r at the answer position (the generative path's
rule) has one entry per query, and the map over the vision tokens is r[queries] @ R_qi. Why: the queries have no
patch cell, so their relevancy has to be carried to the patches by what each query read from the image (its
cross-attention, gradient-weighted), after the image tokens' own mixing (Rbar_ii) and the queries' mixing among
themselves (Rbar_qq^T); the row normalisation keeps the residual (identity) part of each from drowning the rest.

Rows of R_xx - I that sum to 0 (no relevancy reached that token beyond itself) normalise to 0, so Rbar_xx keeps its
identity row there. That happens when the queries start at zero (the tiny BLIP-2; DETR's decoder): the first
self-attention reads zero values, gets no gradient, and R_qq is still I at the first cross-attention. The paper's
code divides 0/0 there and zeroes the NaN product, dropping that whole cross-attention update; here each query keeps
its own cross-attention.

Rollout (no gradient) on the joint token set [queries; image tokens]: rownorm(0.5 A + 0.5 I) per self-attention
layer, and a cross-attention layer's query row is half its own residual, half its head-averaged cross-attention
(0.5 [I | A]), the image rows staying the vision tower's rollout; the LM's rollout row is read the same way.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from .relevancy import (RelevancyResult, _propagate, _rollout, generative_result, generative_setup, patch_grid,
                        target_factors)


def residual_normalise(r: Float[Tensor, "b n n"]) -> Float[Tensor, "b n n"]:
    """Eq. 8-9: Rbar = rownorm(R - I) + I; rows of R - I summing to 0 stay 0."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    hat = r - eye
    s = hat.sum(-1, keepdim=True)
    return torch.where(s > 0, hat / s.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(hat)) + eye


def vision_matrix(mats: list[Tensor], method: str, b: int, n: int) -> Float[Tensor, "b n n"]:
    """The vision tower's full R_ii (chefer: I + Abar R per block; rollout: the product of the layer factors);
    the identity without layers (the map at the tower's output)."""
    r = torch.eye(n).repeat(b, 1, 1)
    for m in mats:
        r = r + m @ r if method == "chefer" else m @ r
    return r


def query_matrix(layers: list[tuple[str, Tensor]], r_ii: Float[Tensor, "b n n"], method: str
                 ) -> Float[Tensor, "b q n"]:
    """R_qi after the Q-Former's layers, in forward order: ("self", factor (b, q, q)) / ("cross", factor (b, q, n));
    chefer factors are Abar, rollout factors rownorm(0.5 A + 0.5 I) (self) and mean_heads(A) (cross)."""
    b, q = r_ii.shape[0], next(m.shape[1] for _, m in layers)
    r_qq, r_qi = torch.eye(q).repeat(b, 1, 1), torch.zeros(b, q, r_ii.shape[-1])
    r_ii_bar = residual_normalise(r_ii) if method == "chefer" else r_ii
    for kind, m in layers:
        if kind == "self":
            r_qq, r_qi = (r_qq + m @ r_qq, r_qi + m @ r_qi) if method == "chefer" else (m @ r_qq, m @ r_qi)
        elif method == "chefer":
            r_qi = r_qi + residual_normalise(r_qq).transpose(1, 2) @ m @ r_ii_bar
        else:
            r_qq, r_qi = 0.5 * r_qq, 0.5 * r_qi + 0.5 * m @ r_ii
    return r_qi


def blip2_relevancy(lens, inputs: dict, target, method: str, position, through_vision, images) -> RelevancyResult:
    """`relevancy` for BLIP-2 (decoder LM): LM row at the answer -> queries -> Q-Former -> vision tokens."""
    tv = True if through_vision is None else through_vision
    if not isinstance(tv, bool):
        raise TypeError(f"through_vision must be True, False or None; got {through_vision!r:.40}")
    lm_names = [n for n in lens.hook_points() if n.startswith("lm.blocks.") and n.endswith(".attn.pattern")]
    if not lm_names:
        raise TypeError(f"relevancy: this BLIP-2's language model ({type(lens.model.language_model).__name__}) has no "
                        "hooked attention probabilities (T5's are not named); decoder-only LMs (OPT) are supported")
    tm, b, seq, pos, targets = generative_setup(lens, inputs, target, position)
    n_query = lens.model.config.num_query_tokens
    qpos = [tm.positions("query", batch=r) for r in range(b)]
    if any(len(p) != n_query for p in qpos):
        raise ValueError(f"relevancy: the rows hold {[len(p) for p in qpos]} query tokens; BLIP-2's Q-Former has "
                         f"{n_query} per image")
    q_layers = []
    for i in range(len(lens.hook_points("qformer.blocks.*.attn.pattern"))):
        q_layers.append((f"qformer.blocks.{i}.attn.pattern", "self"))
        if f"qformer.blocks.{i}.cross.pattern" in lens.sites:
            q_layers.append((f"qformer.blocks.{i}.cross.pattern", "cross"))
    q_names = [n for n, _ in q_layers]
    v_names = lens.hook_points("vision.blocks.*.attn.pattern") if tv else []
    names = lm_names + q_names + v_names
    rows = torch.arange(b)
    kinds = ["lm"] * len(lm_names) + [kd for _, kd in q_layers] + ["vision"] * len(v_names)
    ids, scores, atts, factors = target_factors(
        lens, inputs, names, pos, targets, method,
        lambda i, a: a.detach().float().mean(1).cpu() if kinds[i] == "cross" else _rollout(a))
    n_lm, n_q = len(lm_names), len(q_names)
    n_img = atts[n_lm + [kd for _, kd in q_layers].index("cross")].shape[-1]
    off, side = patch_grid(n_img)
    tok_rel, maps = [], []
    for k in range(len(targets)):
        e = torch.zeros(b, seq)
        e[rows, pos] = 1.0
        v = _propagate(e, factors[k][:n_lm], method)  # (b, seq): each LM position's relevancy for the answer
        tok_rel.append(v)
        r_q = torch.zeros(b, n_query)
        for r in range(b):
            r_q[r, tm.query[r, qpos[r]]] = v[r, qpos[r]]
        r_ii = vision_matrix(factors[k][n_lm + n_q:], method, b, n_img)
        r_qi = query_matrix([(kd, m) for (_, kd), m in zip(q_layers, factors[k][n_lm:n_lm + n_q])], r_ii, method)
        u = (r_q[:, None] @ r_qi)[:, 0]  # (b, vision tokens)
        maps.append(u[:, off:].reshape(b, side, side))
    return generative_result(lens, inputs, images, names, method, tv, position, tm, targets, ids, scores, maps,
                             tok_rel)
