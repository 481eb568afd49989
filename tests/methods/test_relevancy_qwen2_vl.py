"""Relevancy through Qwen2-VL's vision tower (through_vision=True) against hand loops over plain HF outputs: the
eager model's LM attentions (`output_attentions`), its vision attentions (one eager kernel call per image, taken by
wrapping transformers' own `eager_attention_forward`), gradients from torch.autograd; mmlens runs SDPA through its
hooks. The window -> raster placement of the tower's tokens is written out here by hand."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmlens.methods.relevancy import relevancy
from mmlens.testing.tiny_models import qwen2_vl_inputs, sample_image, sample_inputs

SCALE = 4096.0  # a power of two: scaling the final norm (so the logit) up and back down again is exact


@contextlib.contextmanager
def louder(*lenses):
    """The logit times SCALE: Chefer's gradients grow with it, so the vision tower's term, ~1e-7 in the random tiny
    model, is large enough (a third of the map) for the comparison to test it."""
    ws = [lens.model.model.language_model.norm.weight for lens in lenses]
    with torch.no_grad():
        for w in ws:
            w.mul_(SCALE)
    try:
        yield
    finally:
        with torch.no_grad():
            for w in ws:
                w.div_(SCALE)


def tokenizer(lens):
    return getattr(lens.processor, "tokenizer", lens.processor)


def reference(eager, inputs, token, monkeypatch):
    """LM attentions, vision attentions [block][image] (1, heads, n, n) and the logit of `token` at the answer
    position: the rows are left-padded and end in '? </s>', so the last text word is at -2."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as qm

    calls = []
    orig = qm.eager_attention_forward

    def spy(module, *args, **kwargs):
        out, w = orig(module, *args, **kwargs)
        if isinstance(module, qm.VisionAttention):
            calls.append(w)
        return out, w

    monkeypatch.setattr(qm, "eager_attention_forward", spy)
    out = eager.model(**inputs, output_attentions=True)
    monkeypatch.undo()
    b = inputs["input_ids"].shape[0]
    depth = eager.model.config.vision_config.depth
    assert len(calls) == depth * b  # one call per image per block
    vision = [calls[i * b:(i + 1) * b] for i in range(depth)]
    logit = out.logits[:, -2, token]
    return out.attentions, vision, logit


def window_to_raster(h: int, w: int, merge: int = 2) -> list[tuple[int, int]]:
    """Tower token i: window i // merge**2 (raster over the merged grid), patch i % merge**2 within (raster)."""
    out = []
    for i in range(h * w):
        j, q = divmod(i, merge * merge)
        wr, wc = divmod(j, w // merge)
        out.append((wr * merge + q // merge, wc * merge + q % merge))
    return out


def chefer_matrix(atts, grads):
    n = atts[0].shape[-1]
    r = torch.eye(n)
    for a, g in zip(atts, grads):
        r = r + (g * a).clamp(min=0).mean(1)[0] @ r
    return r


def rollout_matrix(atts):
    n = atts[0].shape[-1]
    r = torch.eye(n)
    for a in atts:
        m = 0.5 * a.mean(1)[0] + 0.5 * torch.eye(n)
        r = (m / m.sum(-1, keepdim=True)) @ r
    return r


@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_qwen2_vl_through_vision_matches_hand_loops(tiny_lens, monkeypatch, method):
    lens, eager = tiny_lens("qwen2_vl"), tiny_lens("qwen2_vl", attn_implementation="eager")
    inputs = sample_inputs("qwen2_vl", lens, batch=2)
    images = [sample_image(0), sample_image(1)]
    tok = tokenizer(lens).convert_tokens_to_ids("red")
    ids = inputs["input_ids"]
    assert (ids[:, -2] == tokenizer(lens).convert_tokens_to_ids("?")).all()
    assert (ids[:, -1] == tokenizer(lens).eos_token_id).all()
    with louder(lens, eager):
        full = relevancy(lens, inputs, "red", method=method, through_vision=True, images=images)
        lm_only = relevancy(lens, inputs, "red", method=method, images=images)  # the default: LM level
        la, vis, logit = reference(eager, inputs, tok, monkeypatch)
        b, seq = ids.shape
        flat_v = [a for block in vis for a in block]
        if method == "chefer":
            grads = torch.autograd.grad(logit.sum(), [*la, *flat_v])
            lg, vg = grads[:len(la)], grads[len(la):]
    h = w = 8  # 32 px / patch 4
    place = window_to_raster(h, w)
    image = ids == lens.model.config.image_token_id
    want = torch.zeros(b, h, w)
    for r in range(b):
        # the LM: R = I; R += mean_h(relu(g A)) R per layer; row of the answer position ('?')
        lm_atts = [a[r:r + 1].detach() for a in la]
        if method == "chefer":
            row = chefer_matrix(lm_atts, [g[r:r + 1] for g in lg])[seq - 2]
        else:
            row = rollout_matrix(lm_atts)[seq - 2]
        merged = row[image[r]]  # 16 LM image tokens, raster order over the 4x4 merged grid
        torch.testing.assert_close(full.token_relevancy[r, 0], row, atol=1e-4, rtol=1e-4)
        # the merger: each window's 4 tower tokens get a quarter of its LM token's relevancy
        u = torch.stack([merged[i // 4] / 4 for i in range(h * w)])
        v_atts = [vis[blk][r].detach() for blk in range(len(vis))]
        if method == "chefer":
            v_grads = [vg[blk * b + r] for blk in range(len(vis))]
            u = u @ chefer_matrix(v_atts, v_grads)
        else:
            u = u @ rollout_matrix(v_atts)
        for i, (pr, pc) in enumerate(place):
            want[r, pr, pc] = u[i]
    assert full.maps.shape == (2, 1, 8, 8) and full.labels == ["red"] and full.targets == [[tok, tok]]
    assert full.meta["through_vision"] is True and lm_only.meta["through_vision"] is False
    torch.testing.assert_close(full.maps[:, 0], want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(full.scores[:, 0], logit.detach(), atol=1e-3, rtol=1e-5)
    # the tower's attention takes real part: the map is not just each merged cell split four ways
    split = lm_only.maps[:, 0].repeat_interleave(2, -1).repeat_interleave(2, -2) / 4
    assert (full.maps[:, 0] - split).abs().max() > 0.05 * full.maps.abs().max()
    torch.testing.assert_close(full.token_relevancy, lm_only.token_relevancy)


@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_planted_one_image_token_lights_exactly_its_four_patches(tiny_lens, method):
    """Vision attention edited to the identity; the LM's attention to the identity except the answer row, which reads
    only merged token q: the relevancy reaches q alone, and through the tower exactly the 4 patches of q's window."""
    lens = tiny_lens("qwen2_vl")
    inputs = sample_inputs("qwen2_vl", lens, batch=1)
    seq = inputs["input_ids"].shape[1]
    image_pos = (inputs["input_ids"][0] == lens.model.config.image_token_id).nonzero().flatten()
    q = 6  # merged cell (1, 2) of the 4x4 grid: patches rows 2-3, cols 4-5
    target_pos = int(image_pos[q])

    def identity(p, ctx):  # `0 * p` keeps the edit in the graph, so Chefer's gradients reach it
        return torch.eye(p.shape[-1], dtype=p.dtype).expand_as(p) + 0 * p

    def read_q(p, ctx):
        e = identity(p, ctx).clone()
        e[:, :, seq - 2] = 0  # the answer position, '?' before '</s>'
        e[:, :, seq - 2, target_pos] = 1
        return e

    fns = {"vision.blocks.*.attn.pattern": identity, "lm.blocks.*.attn.pattern": read_q}
    with louder(lens), lens.hooks(fns):
        res = relevancy(lens, inputs, "red", method=method, through_vision=True, images=[sample_image(0)])
    m = res.maps[0, 0]
    lit = torch.zeros(8, 8, dtype=torch.bool)
    lit[2:4, 4:6] = True
    assert (m[~lit] == 0).all()
    if method == "rollout":  # 2 LM layers: rownorm(0.5 A + 0.5 I) puts 1 - 0.5**2 on q, a quarter to each patch
        torch.testing.assert_close(m[lit], torch.full((4,), 0.75 / 4))
    else:  # Chefer: the tower adds only its diagonal, so each patch keeps at least its quarter
        lm_q = res.token_relevancy[0, 0, target_pos]
        assert lm_q > 0 and (m[lit] >= lm_q / 4 - 1e-6).all()


def test_default_stays_lm_level_and_grid_errors(tiny_lens):
    lens = tiny_lens("qwen2_vl")
    inputs = sample_inputs("qwen2_vl", lens, batch=1)
    res = relevancy(lens, inputs, "red", images=[sample_image(0)])
    assert res.maps.shape == (1, 1, 4, 4) and res.meta["through_vision"] is False
    wide = sample_image(1).resize((48, 32))  # an 8x12 patch grid next to an 8x8 one: maps cannot be stacked
    mixed = qwen2_vl_inputs(lens, [sample_image(0), wide], ["what colour is the square ?"] * 2)
    with pytest.raises(ValueError, match="patch grids .* differ"):
        relevancy(lens, mixed, "red", through_vision=True, images=[sample_image(0), wide])
    one = qwen2_vl_inputs(lens, [wide], ["what colour is the square ?"])
    res = relevancy(lens, one, "red", method="rollout", through_vision=True, images=[wide])
    assert res.maps.shape == (1, 1, 8, 12) and torch.isfinite(res.maps).all()
    lm = relevancy(lens, one, "red", method="rollout", images=[wide]).maps[0, 0]  # (4, 6) merged grid
    # rollout rows sum to 1, so the tower conserves the image tokens' total relevancy
    torch.testing.assert_close(res.maps.sum(), lm.sum(), atol=1e-5, rtol=1e-5)
