"""TextSpan and the patch-decomposition segmenter against hand-written loops and plain PyTorch / HF references."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from mmlens.methods import Result, direct_effects
from mmlens.methods.maps import MapResult
from mmlens.methods.textspan import TextSpanResult, encode_texts, text_segmentation, text_span, textspan
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_image, sample_inputs

matplotlib.use("Agg")

POOL = ["a red square", "a blue circle", "green", "the photo of a cross", "yellow triangle", "left", "right",
        "a small purple object", "two objects", "orange"]


def _images(n: int):
    return [sample_image(100 + i) for i in range(n)]


def _text_ref(lens, texts):
    """Normalised text features through the model alone; SigLIP padded to its max length without a mask."""
    tok = lens.processor.tokenizer
    m = lens.model
    if lens.architecture == "siglip":
        enc = tok(texts, padding="max_length", max_length=m.config.text_config.max_position_embeddings,
                  return_tensors="pt")
        enc = {"input_ids": enc["input_ids"]}
    else:
        enc = dict(tok(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = m.get_text_features(**enc)
    out = out if isinstance(out, torch.Tensor) else out.pooler_output
    return nn.functional.normalize(out.float(), dim=-1)


def _greedy_by_hand(c, t, k):
    """TextSpan as plain loops: centre both; k times pick the text direction of largest variance, project it out."""
    c = (c - c.mean(0)).double()
    t = (t - t.mean(0)).double()
    n0 = [float(t[m].norm()) for m in range(len(t))]
    total = float((c ** 2).sum()) / len(c)
    picked, frac = [], []
    for _ in range(k):
        best, best_var = None, -1.0
        for m in range(len(t)):
            n = float(t[m].norm())
            if n <= 1e-4 * n0[m]:
                continue
            u = t[m] / n
            var = float(((c @ u) ** 2).mean())
            if var > best_var:
                best, best_var = m, var
        u = t[best] / t[best].norm()
        picked.append(best)
        frac.append(best_var / total)
        c = c - torch.outer(c @ u, u)
        t = t - torch.outer(t @ u, u)
    return picked, frac


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_textspan_matches_hand_greedy(tiny_lens, name):
    lens = tiny_lens(name)
    images = _images(6)
    res = textspan(lens, images, POOL, heads="all", k=3, batch_size=4)  # two batches
    text = _text_ref(lens, POOL)
    pv = lens.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    de = direct_effects(lens, {"pixel_values": pv})
    norm = de.total().norm(dim=-1)[:, None]
    n_heads = lens.model.config.vision_config.num_attention_heads * lens.model.config.vision_config.num_hidden_layers
    assert len(res.heads) == n_heads and res.indices.shape == (n_heads, 3)
    emb = de.total() / norm
    emb = emb - emb.mean(0)
    for i, head in enumerate(res.heads):
        c = de.terms[:, de.labels.index(head)] / norm
        picked, frac = _greedy_by_hand(c, text, 3)
        assert res.indices[i].tolist() == picked, head
        assert res.texts[i] == [POOL[j] for j in picked]
        torch.testing.assert_close(res.explained[i], torch.tensor(frac, dtype=torch.float32), atol=1e-5, rtol=1e-4)
        cc = c - c.mean(0)
        torch.testing.assert_close(res.variance[i], (cc ** 2).sum(1).mean(), atol=1e-6, rtol=1e-4)
        share = (cc * emb).sum(1).mean() / (emb ** 2).sum(1).mean()
        torch.testing.assert_close(res.share[i], share, atol=1e-5, rtol=1e-4)
    assert bool((res.explained_total() <= 1 + 1e-5).all())


def test_heads_selection_and_precomputed_inputs(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    de = direct_effects(lens, inputs)
    last = textspan(lens, de, POOL, k=2)  # a DirectEffectsResult is reused, not recomputed
    assert last.heads == [f"blocks.1.attn.head{h}" for h in range(4)]
    one = textspan(lens, inputs, POOL, heads=["blocks.0.attn.head2"], k=2)
    assert one.heads == ["blocks.0.attn.head2"]
    glob = textspan(lens, inputs, POOL, heads="blocks.0.attn.head*", k=2)
    assert glob.heads == [f"blocks.0.attn.head{h}" for h in range(4)]
    emb = _text_ref(lens, POOL)
    pre = textspan(lens, inputs, POOL, heads="all", k=2, text_embeds=emb * 3)  # rows are normalised
    ref = textspan(lens, inputs, POOL, heads="all", k=2)
    assert pre.indices.tolist() == ref.indices.tolist()
    torch.testing.assert_close(pre.explained, ref.explained, atol=1e-5, rtol=1e-4)


def test_planted_text_basis_is_recovered():
    """Contributions built as random combinations of 3 known (centred) text directions of a 40-text pool, with
    decreasing scales: the greedy picks exactly those texts, biggest first, and they explain all the variance."""
    g = torch.Generator().manual_seed(0)
    pool = nn.functional.normalize(torch.randn(40, 32, generator=g), dim=-1)
    centred = pool - pool.mean(0)
    planted = [7, 21, 3]
    scales = torch.tensor([3.0, 1.5, 0.7])
    coef = torch.randn(500, 3, generator=g) * scales
    c = coef @ centred[planted] + 5.0  # an offset: removed by the centring
    idx, frac, total = text_span(c, pool, 3)
    assert idx.tolist() == planted
    assert float(frac.sum()) > 0.999 and bool((frac[:-1] >= frac[1:]).all())
    # with noise the planted texts still come first; a 4th pick explains only the noise
    noisy = c + 0.05 * torch.randn(500, 32, generator=g)
    idx, frac, _ = text_span(noisy, pool, 4)
    assert idx[:3].tolist() == planted and float(frac[3]) < 0.01


def test_text_span_stops_at_the_pool_rank():
    """A pool spanning 2 directions (after centring): later picks would be numerical noise and are not made."""
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    pool = torch.stack([a, b, (a + b) / 2 ** 0.5])  # centred: rank 2
    idx, frac, _ = text_span(torch.randn(50, 8), pool, 3)
    assert len(idx) == 2 and len(set(idx.tolist())) == 2


def test_head_labels_and_result_io(tiny_lens, tmp_path):
    res = TextSpanResult(meta={"architecture": "clip"}, heads=["blocks.1.attn.head0", "blocks.1.attn.head1",
                                                                "blocks.1.attn.head2"],
                         texts=[["red", "blue", "square"], ["square", "red", "circle"], ["left", "right", "red"]],
                         pool=["red", "blue", "square", "circle", "left", "right"],
                         indices=torch.tensor([[0, 1, 2], [2, 0, 3], [4, 5, 0]]),
                         explained=torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.25, 0.1], [0.4, 0.3, 0.1]]),
                         variance=torch.tensor([1.0, 2.0, 3.0]), share=torch.tensor([0.5, 0.3, 0.01]))
    cats = {"colour": ["red", "blue"], "shape": ["square", "circle"]}
    assert res.head_labels(cats) == {"blocks.1.attn.head0": "colour", "blocks.1.attn.head1": "shape",
                                     "blocks.1.attn.head2": "colour"}
    # a tie (one colour, one shape) goes to the category whose texts explain more
    tie = res.head_labels({"colour": ["red"], "shape": ["square"]})
    assert tie["blocks.1.attn.head0"] == "colour" and tie["blocks.1.attn.head1"] == "shape"
    assert res.head_labels({"size": ["small"]}) == dict.fromkeys(res.heads)
    assert res.top("blocks.1.attn.head1")[0] == ("square", pytest.approx(0.3))
    torch.testing.assert_close(res.explained_total(), torch.tensor([0.8, 0.65, 0.8]))
    back = Result.load(res.save(tmp_path / "ts"))
    assert isinstance(back, TextSpanResult) and back.texts == res.texts and torch.equal(back.indices, res.indices)
    assert isinstance(res.plot(), Figure)
    assert "blocks.1.attn.head1" in res._repr_html_() and "square (0.30)" in res.to_html()
    with pytest.raises(KeyError, match="no head"):
        res.top("blocks.9.attn.head0")
    with pytest.raises(TypeError, match="categories"):
        res.head_labels(["red"])


def test_encode_texts_ensembles(tiny_lens):
    lens = tiny_lens("clip")
    labels, emb = encode_texts(lens, {"red": ["a red square", "a red circle"], "blue": "a blue circle"})
    ref = _text_ref(lens, ["a red square", "a red circle", "a blue circle"])
    assert labels == ["red", "blue"]
    torch.testing.assert_close(emb[0], nn.functional.normalize(ref[:2].mean(0), dim=0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[1], ref[2], atol=1e-5, rtol=1e-5)


def _clip_patch_terms_by_hand(model, pv):
    """(batch, heads_total, patches+1, d_proj): pattern[h, cls, j] * v_j,h @ O_h through the linearised post-LN and
    the projection, attention recomputed from q/k/v projections of each layer's normalised input."""
    vm = model.vision_model
    with torch.no_grad():
        out = vm(pixel_values=pv, output_hidden_states=True)
        hs = out.hidden_states
        resid = hs[-1][:, 0]
        ln = vm.post_layernorm
        std = (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
        terms = []
        for i, layer in enumerate(vm.encoder.layers):
            at = layer.self_attn
            x = layer.layer_norm1(hs[i])
            b, s, d = x.shape
            h = at.num_heads
            q = at.q_proj(x).view(b, s, h, -1).transpose(1, 2)
            k = at.k_proj(x).view(b, s, h, -1).transpose(1, 2)
            v = at.v_proj(x).view(b, s, h, -1).transpose(1, 2)
            p = ((q @ k.transpose(-1, -2)) * at.scale).softmax(-1)[:, :, 0]  # (b, h, s): the CLS query row
            dh = d // h
            for hh in range(h):
                t = (p[:, hh, :, None] * v[:, hh]) @ at.out_proj.weight[:, hh * dh:(hh + 1) * dh].T  # (b, s, d)
                t = ln.weight * (t - t.mean(-1, keepdim=True)) / std[:, None]
                terms.append(model.visual_projection(t))
    return torch.stack(terms, 1), model.get_image_features(pixel_values=pv)


def test_clip_segmentation_by_hand(tiny_lens):
    lens = tiny_lens("clip")
    images = _images(3)
    texts = ["a red square", "green", "left"]
    seg = text_segmentation(lens, images, texts, batch_size=2)
    assert isinstance(seg, MapResult) and seg.labels == texts and seg.maps.shape == (3, 3, 4, 4)
    assert seg.images.shape == (3, 32, 32, 3) and seg.images.dtype == torch.uint8
    torch.testing.assert_close(seg.images.float(), torch.stack([torch.as_tensor(np.asarray(im))
                                                                for im in images]).float(), atol=1.0, rtol=0)
    pv = lens.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    terms, feats = _clip_patch_terms_by_hand(lens.model, pv)
    feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    text = _text_ref(lens, texts)
    ref = torch.einsum("bcsd,td->bts", terms[:, :, 1:], text) / feats.norm(dim=-1)[:, None, None]
    torch.testing.assert_close(seg.maps.flatten(-2), ref, atol=1e-5, rtol=1e-4)
    last = text_segmentation(lens, images, texts, heads="last")  # only block 1's 4 heads
    ref_last = torch.einsum("bcsd,td->bts", terms[:, 4:, 1:], text) / feats.norm(dim=-1)[:, None, None]
    torch.testing.assert_close(last.maps.flatten(-2), ref_last, atol=1e-5, rtol=1e-4)
    rel = text_segmentation(lens, images, texts, relative=True)
    torch.testing.assert_close(rel.maps, seg.maps - seg.maps.mean(1, keepdim=True))


def test_siglip_segmentation_sums_to_pooled(tiny_lens):
    lens = tiny_lens("siglip")
    images = _images(2)
    seg = text_segmentation(lens, images, POOL[:2], head_mlp="none")
    assert seg.maps.shape == (2, 2, 4, 4)
    m = lens.model
    pv = lens.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    head = m.vision_model.head
    with torch.no_grad():
        x = m.vision_model(pixel_values=pv).last_hidden_state
        pooled = head.attention(head.probe.repeat(2, 1, 1), x, x)[0][:, 0]
        feats = m.vision_model(pixel_values=pv).pooler_output
    text = _text_ref(lens, POOL[:2])
    ref = (pooled - head.attention.out_proj.bias) @ text.T / feats.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(seg.maps.sum((-1, -2)), ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="leave heads='all'"):
        text_segmentation(lens, images, POOL[:2], heads="last")


def test_errors(tiny_lens):
    clip = tiny_lens("clip")
    inputs = sample_inputs("clip", clip, batch=2)
    with pytest.raises(ValueError, match="pass texts"):
        textspan(clip, inputs)
    with pytest.raises(TypeError, match="list of strings"):
        textspan(clip, inputs, "a red square")
    with pytest.raises(ValueError, match="match no head"):
        textspan(clip, inputs, POOL, heads="blocks.7.attn.head*")
    with pytest.raises(TypeError, match="heads must be"):
        textspan(clip, inputs, POOL, heads=3)
    with pytest.raises(ValueError, match="k must be an int"):
        textspan(clip, inputs, POOL, k=len(POOL) + 1)
    with pytest.raises(ValueError, match="at least 2 images"):
        textspan(clip, _images(1), POOL)
    with pytest.raises(ValueError, match="one row per label"):
        textspan(clip, inputs, POOL, text_embeds=torch.randn(3, 32))
    with pytest.raises(ValueError, match="no pixel_values"):
        textspan(clip, {"input_ids": inputs["input_ids"]}, POOL)
    with pytest.raises(ValueError, match="batch_size"):
        textspan(clip, inputs, POOL, batch_size=0)
    with pytest.raises(TypeError, match="contrastive"):
        textspan(tiny_lens("llava"), inputs, POOL)
    with pytest.raises(TypeError, match="needs the images"):
        text_segmentation(clip, direct_effects(clip, inputs), POOL)


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_organism_has_colour_and_shape_heads():
    """On the clip organism, with colours and shapes (prompt ensembles) in the pool, some head's text basis is
    mostly colours and some other head's mostly shapes."""
    import mmlens.organisms as organisms
    from mmlens.world import single_object_scene
    from mmlens.world.scene import COLOURS, SHAPES

    clip = organisms.load("clip")
    scenes = [single_object_scene(20_000 + i) for i in range(96)]
    pool = {**{c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS},
            **{s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES}}
    res = textspan(clip, [s.pil() for s in scenes], pool, heads="all", k=3)
    names = res.head_labels({"colour": list(COLOURS), "shape": list(SHAPES)})
    assert "colour" in names.values() and "shape" in names.values()
