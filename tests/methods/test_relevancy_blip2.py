"""BLIP-2 relevancy (Chefer et al. 2021's encoder-decoder rules through the Q-Former, attention rollout on the joint
query/image token set) against hand-written loops over plain HF outputs: an eager-attention copy of the tiny BLIP-2,
its attention weights from `output_attentions` (LM) and forward hooks on the eager attention modules (vision tower,
Q-Former self- and cross-attention, which return their weights), gradients from torch.autograd; mmlens runs the
default SDPA kernel through its hooks."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmlens.methods._relevancy_blip2 import residual_normalise
from mmlens.methods.relevancy import RelevancyResult, relevancy
from mmlens.testing.tiny_models import sample_inputs


# ----------------------------------------------------------------------------------------- the reference
def blip2_reference(lens, eager, inputs, token):
    """Attentions in forward order: vision blocks, then the Q-Former's ("self" | "cross", weights), then the LM's;
    the logit of `token` at the answer position (the last non-special text position, by hand)."""
    m = eager.model
    vision, qformer = [], []
    hooks = [layer.self_attn.register_forward_hook(lambda mod, a, o: vision.append(o[1]))
             for layer in m.vision_model.encoder.layers]
    for layer in m.qformer.encoder.layer:
        hooks.append(layer.attention.attention.register_forward_hook(lambda mod, a, o: qformer.append(("self", o[1]))))
        if layer.has_cross_attention:
            hooks.append(layer.crossattention.attention.register_forward_hook(
                lambda mod, a, o: qformer.append(("cross", o[1]))))
    try:
        out = m(**inputs, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    ids = inputs["input_ids"]
    special = torch.tensor(sorted(set(lens.processor.tokenizer.all_special_ids) | {m.config.image_token_id}))
    text = inputs["attention_mask"].bool() & ~torch.isin(ids, special)
    pos = torch.where(text, torch.arange(ids.shape[1]), -1).max(1).values
    logit = out.logits[torch.arange(ids.shape[0]), pos, token]
    return vision, qformer, out.language_model_outputs.attentions, logit, pos


def cam(a, g):
    """Eq. 5 for one batch row: mean_h relu(grad * A), (heads, n, m) -> (n, m)."""
    return (g * a).clamp(min=0).mean(0)


def handle_residual(r):
    """Eq. 8-9 as the paper's code writes it, (R - I) / its row sums + I, except that an empty row of R - I (0/0)
    stays the identity row where the paper's code zeroes the whole NaN product."""
    eye = torch.eye(r.shape[-1])
    hat = r - eye
    assert hat.diagonal().min() >= 0
    out = hat / hat.sum(-1, keepdim=True)
    return torch.nan_to_num(out, nan=0.0) + eye


@contextlib.contextmanager
def query_tokens(models, seed):
    """The tiny BLIP-2 is built with zero query tokens (so its first Q-Former self-attention carries no gradient
    and R_qq stays I there); seed=None keeps them, else the same random ones in every model, restored on exit."""
    if seed is None:
        yield
        return
    saved = [m.query_tokens.detach().clone() for m in models]
    new = torch.randn(saved[0].shape, generator=torch.Generator().manual_seed(seed))
    try:
        with torch.no_grad():
            for m in models:
                m.query_tokens.copy_(new)
        yield
    finally:
        with torch.no_grad():
            for m, q in zip(models, saved):
                m.query_tokens.copy_(q)


def chefer_map(vision, vg, qformer, qg, lm, lg, pos, qpos, through_vision=True):
    """One batch row: the LM's R (full matrix, R += Abar R per layer) read at `pos`; the vision tower's R_ii; the
    Q-Former's R_qq, R_qi (self: R += Abar R for both; cross: R_qi += Rbar_qq^T Abar Rbar_ii); the map is the LM row
    at the query positions times R_qi."""
    seq = lm[0].shape[-1]
    r = torch.eye(seq)
    for a, g in zip(lm, lg):
        r = r + cam(a, g) @ r
    row = r[pos]
    n = vision[0].shape[-1]
    r_ii = torch.eye(n)
    if through_vision:
        for a, g in zip(vision, vg):
            r_ii = r_ii + cam(a, g) @ r_ii
    q = qformer[0][1].shape[-1]
    r_qq, r_qi = torch.eye(q), torch.zeros(q, n)
    for (kind, a), g in zip(qformer, qg):
        c = cam(a, g)
        if kind == "self":
            r_qq, r_qi = r_qq + c @ r_qq, r_qi + c @ r_qi
        else:
            r_qi = r_qi + handle_residual(r_qq).t() @ (c @ handle_residual(r_ii))
    return row[qpos] @ r_qi, row


def rollout_map(vision, qformer, lm, pos, qpos, through_vision=True):
    """One batch row, on the joint token set [queries; image tokens]: J = blockdiag(I, vision rollout); a self-attention
    layer multiplies by blockdiag(rownorm(0.5 A + 0.5 I), I), a cross-attention layer by [[0.5 I, 0.5 A], [0, I]]."""
    def rn(a):
        m = 0.5 * a.mean(0) + 0.5 * torch.eye(a.shape[-1])
        return m / m.sum(-1, keepdim=True)

    r = torch.eye(lm[0].shape[-1])
    for a in lm:
        r = rn(a) @ r
    row = r[pos]
    n, q = vision[0].shape[-1], qformer[0][1].shape[-1]
    r_v = torch.eye(n)
    if through_vision:
        for a in vision:
            r_v = rn(a) @ r_v
    joint = torch.block_diag(torch.eye(q), r_v)
    for kind, a in qformer:
        if kind == "self":
            step = torch.block_diag(rn(a), torch.eye(n))
        else:
            step = torch.block_diag(0.5 * torch.eye(q), torch.eye(n))
            step[:q, q:] = 0.5 * a.mean(0)
        joint = step @ joint
    return row[qpos] @ joint[:q, q:], row


# ---------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method,seed", [("chefer", None), ("chefer", 0), ("rollout", 0)])
def test_blip2_maps_and_tokens_match_hand_loops(tiny_lens, method, seed):
    lens, eager = tiny_lens("blip2"), tiny_lens("blip2", attn_implementation="eager")
    inputs = sample_inputs("blip2", lens, batch=2)
    tok = lens.processor.tokenizer.convert_tokens_to_ids("red")
    with query_tokens([lens.model, eager.model], seed):
        full = relevancy(lens, inputs, "red", method=method)
        at_output = relevancy(lens, inputs, "red", method=method, through_vision=False)
        vision, qformer, lm, logit, pos = blip2_reference(lens, eager, inputs, tok)
    if method == "chefer":
        grads = torch.autograd.grad(logit.sum(), [*vision, *(a for _, a in qformer), *lm])
        vg, qg, lg = grads[:len(vision)], grads[len(vision):len(vision) + len(qformer)], grads[-len(lm):]
    image_id = lens.model.config.image_token_id
    assert [k for k, _ in qformer] == ["self", "cross", "self"]  # the tiny Q-Former: cross-attention every 2nd layer
    for b in range(2):
        qpos = (inputs["input_ids"][b] == image_id).nonzero().flatten()  # query j at the j-th image token
        if method == "chefer":  # zero query tokens: no value to read, so no gradient, at the first self-attention
            assert (cam(qformer[0][1][b], qg[0][b]).sum() > 0) == (seed is not None)
        for res, tv in ((full, True), (at_output, False)):
            if method == "chefer":
                want, row = chefer_map([a[b].detach() for a in vision], [g[b] for g in vg],
                                       [(k, a[b].detach()) for k, a in qformer], [g[b] for g in qg],
                                       [a[b].detach() for a in lm], [g[b] for g in lg], pos[b], qpos, tv)
            else:
                want, row = rollout_map([a[b].detach() for a in vision], [(k, a[b].detach()) for k, a in qformer],
                                        [a[b].detach() for a in lm], pos[b], qpos, tv)
            assert want[1:].abs().sum() > 0  # the map is not trivially zero
            torch.testing.assert_close(res.maps[b, 0], want[1:].reshape(4, 4), atol=1e-6, rtol=1e-4)  # CLS left out
            torch.testing.assert_close(res.token_relevancy[b, 0], row, atol=1e-6, rtol=1e-4)
    assert isinstance(full, RelevancyResult) and full.maps.shape == (2, 1, 4, 4) and full.labels == ["red"]
    assert full.targets == [[tok, tok]] and full.meta["through_vision"] is True
    assert at_output.meta["through_vision"] is False and full.method == f"relevancy ({method})"
    torch.testing.assert_close(full.scores[:, 0], logit.detach(), atol=1e-5, rtol=1e-5)
    toks = full.token_scores(1, "red")
    assert [t for t, _ in toks] == lens.processor.tokenizer.convert_ids_to_tokens(inputs["input_ids"][1].tolist())


def test_blip2_several_targets_and_predicted(tiny_lens):
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens, batch=2)
    both = relevancy(lens, inputs, ["red", "blue"])
    one = relevancy(lens, inputs, "blue")
    torch.testing.assert_close(both.maps[:, 1], one.maps[:, 0])
    pos = lens.token_map(inputs).answer_positions()
    with torch.no_grad():
        logits = lens.model(**inputs).logits[torch.arange(2), pos]
    pred = relevancy(lens, inputs)
    assert pred.labels == ["predicted"] and pred.targets == [logits.argmax(-1).tolist()]
    torch.testing.assert_close(pred.scores[:, 0], logits.max(-1).values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_blip2_map_lands_on_the_only_patch_the_queries_can_read(tiny_lens, method):
    """Planted: the vision tower's attention set to the identity (no patch mixes with another) and every query's
    cross-attention put on one patch token, so that patch is the only route from the image to the answer; the map
    must be zero everywhere else and positive there. Without the plant, the map spreads over the patches."""
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens, batch=2)
    k = 1 + 1 * 4 + 2  # vision token of cell (1, 2): CLS first, then raster order

    def identity(p, ctx):
        return p * 0 + torch.eye(p.shape[-1], dtype=p.dtype)

    def one_patch(p, ctx):
        return p * 0 + torch.nn.functional.one_hot(torch.tensor(k), p.shape[-1]).to(p.dtype)

    with lens.hooks({"vision.blocks.*.attn.pattern": identity, "qformer.blocks.0.cross.pattern": one_patch}):
        res = relevancy(lens, inputs, method=method)
    maps = res.maps[:, 0].flatten(1)
    assert (maps[:, 6] > 0).all()
    assert (maps[:, torch.arange(16) != 6] == 0).all()
    free = relevancy(lens, inputs, method=method).maps[:, 0].flatten(1)
    assert ((free > 0).sum(1) >= 8).all()  # the tiny model's own maps are spread out


def test_residual_normalise_rows():
    """Eq. 8-9: R - I row-normalised plus I; a row of R - I with no mass stays the identity row (0/0 := 0)."""
    r = torch.tensor([[[1.0, 0.0, 0.0], [0.5, 1.5, 1.0], [0.0, 0.0, 3.0]]])
    want = torch.tensor([[[1.0, 0.0, 0.0], [0.25, 1.25, 0.5], [0.0, 0.0, 2.0]]])
    torch.testing.assert_close(residual_normalise(r), want)


def test_blip2_errors(tiny_lens, monkeypatch):
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens, batch=2)
    with pytest.raises(TypeError, match="through_vision must be"):
        relevancy(lens, inputs, "red", through_vision="yes")
    with pytest.raises(ValueError, match="position must be"):
        relevancy(lens, inputs, "red", position=99)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        relevancy(lens, inputs, "zebra")
    two = dict(inputs)
    ids = inputs["input_ids"].clone()
    ids[0, 5:9] = lens.model.config.image_token_id  # a second run of query tokens in row 0
    two["input_ids"] = ids
    with pytest.raises(ValueError, match="exactly one image per batch row"):
        relevancy(lens, two, "red")
    with pytest.raises(ValueError, match="no input_ids"):
        relevancy(lens, {"pixel_values": inputs["pixel_values"]}, "red")
    short = sample_inputs("blip2", lens, batch=1)
    short["input_ids"] = short["input_ids"].clone()
    short["input_ids"][0, 3] = lens.processor.tokenizer.convert_tokens_to_ids("red")  # 3 query tokens of 4
    with pytest.raises(ValueError, match=r"the rows hold \[3\] query tokens; BLIP-2's Q-Former has 4"):
        relevancy(lens, short, "red")
    with pytest.raises(ValueError, match="method='grad'"):
        relevancy(lens, inputs, "red", method="grad")
    # an LM without hooked attention (BLIP-2 with T5): the names are what decides
    names = [n for n in lens.hook_points() if not n.startswith("lm.blocks.")]
    monkeypatch.setattr(lens, "hook_points", lambda pattern=None: names)
    with pytest.raises(TypeError, match="no hooked attention probabilities"):
        relevancy(lens, inputs, "red")
