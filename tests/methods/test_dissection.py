"""Network dissection against hand-written references: numpy for the similarity functions and NetDissect's
thresholds and IoU, plain HF forwards (pre-hooks on fc2, get_image_features / get_text_features) for the
activations and the labeller, and planted units whose label is known."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.errors import UnknownNameError
from mmlens.methods import Result
from mmlens.methods.dissection import (DissectionResult, _bilinear, clip_dissect, cos3, cos_similarity,
                                       image_activations, iou_scores, labeller_similarities, net_dissect, soft_wpmi,
                                       unit_maps, unit_thresholds, wpmi)
from mmlens.methods.maps import MapResult, upsample
from mmlens.organisms import available

matplotlib.use("Agg")

CONCEPTS = ["red", "blue", "green", "square", "circle"]
SITE = "vision.blocks.1.mlp.post"


# ------------------------------------------------------------------------------------------ numpy references
def np_cos3(A, P):
    a = (A - A.mean(0)) ** 3
    p = (P - P.mean(0)) ** 3
    out = np.zeros((A.shape[1], P.shape[1]))
    for u in range(A.shape[1]):
        for c in range(P.shape[1]):
            out[u, c] = a[:, u] @ p[:, c] / max(np.linalg.norm(a[:, u]), 1e-3) / max(np.linalg.norm(p[:, c]), 1e-3)
    return out


def np_pmi(A, P, top_k, a, lam, soft, p_start=0.998, p_end=0.97, min_prob=1e-7):
    n, units = A.shape
    k = min(top_k, n)
    e = np.exp(a * P - (a * P).max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    given = np.zeros((units, P.shape[1]))
    for u in range(units):
        for r, i in enumerate(np.argsort(-A[:, u])[:k]):
            w = p_start - r / k * (p_start - p_end) if soft else 1.0
            given[u] += np.log(1 + w * (prob[i] - 1) + min_prob)
    m = given.max(0)
    prior = m + np.log(np.exp(given - m).mean(0))
    return given - lam * prior


def np_upsample(x, H, W):
    """Bilinear, align_corners=False, by hand: (h, w) -> (H, W)."""
    h, w = x.shape

    def axis(n_out, n_in):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, fr = axis(H, h)
    c0, c1, fc = axis(W, w)
    top = x[r0][:, c0] * (1 - fc) + x[r0][:, c1] * fc
    bot = x[r1][:, c0] * (1 - fc) + x[r1][:, c1] * fc
    return top * (1 - fr[:, None]) + bot * fr[:, None]


def np_netdissect(acts, masks, quantile):
    """acts (N, U, h, w), masks (N, C, H, W) -> thresholds (U,), IoU (U, C)."""
    n, units = acts.shape[:2]
    H, W = masks.shape[-2:]
    thr, iou = np.zeros(units), np.zeros((units, masks.shape[1]))
    for u in range(units):
        vals = np.sort(acts[:, u].ravel())[::-1]
        thr[u] = vals[max(1, int(np.ceil(quantile * vals.size))) - 1]
        if thr[u] <= vals.min():
            continue
        on = np.stack([np_upsample(acts[i, u], H, W) >= thr[u] for i in range(n)])
        for c in range(masks.shape[1]):
            inter = (on & masks[:, c]).sum()
            union = (on | masks[:, c]).sum()
            iou[u, c] = inter / union if union else 0.0
    return thr, iou


# ----------------------------------------------------------------------------------- pure functions
def test_similarity_functions_against_numpy():
    rng = np.random.RandomState(0)
    A, P = rng.randn(40, 6), rng.rand(40, 5) * 0.4
    At, Pt = torch.tensor(A, dtype=torch.float32), torch.tensor(P, dtype=torch.float32)
    np.testing.assert_allclose(cos3(At, Pt).numpy(), np_cos3(A, P), rtol=1e-4, atol=1e-5)
    ref = (A / np.linalg.norm(A, axis=0)).T @ (P / np.linalg.norm(P, axis=0))
    np.testing.assert_allclose(cos_similarity(At, Pt).numpy(), ref, rtol=1e-4, atol=1e-5)
    for k in (7, 100):  # 100 > 40 images: every image is in every unit's example set
        np.testing.assert_allclose(soft_wpmi(At, Pt, top_k=k).numpy(), np_pmi(A, P, k, 10.0, 1.0, True),
                                   rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(wpmi(At, Pt, top_k=k, a=3.0, lam=0.5).numpy(), np_pmi(A, P, k, 3.0, 0.5, False),
                                   rtol=1e-4, atol=1e-3)
    # a unit that is a concept's similarity up to a positive affine map: cos3 = 1 with it, at any scale of P (the
    # paper's norm clamp would shrink small-spread columns: here it only silences constant ones)
    At[:, 2] = 3 * Pt[:, 4] + 1
    for scale in (1.0, 1e-2):
        got = cos3(At, Pt * scale)
        assert abs(float(got[2, 4]) - 1) < 1e-5 and int(got[2].argmax()) == 4
    Pt[:, 1] = 0.3
    assert (cos3(At, Pt)[:, 1] == 0).all()
    with pytest.raises(ValueError, match="same images"):
        cos3(At[:5], Pt)


def test_thresholds_and_iou_against_numpy():
    rng = np.random.RandomState(1)
    acts = rng.randn(6, 4, 4, 4).astype(np.float32)
    acts[:, 3] = 0.5  # a constant unit selects everything: scored 0
    masks = rng.rand(6, 3, 12, 12) > 0.6
    masks[:, 2] = False  # a concept that never appears
    for q in (0.005, 0.1, 0.3):
        thr, ref = np_netdissect(acts, masks, q)
        t = unit_thresholds(torch.tensor(acts), q)
        np.testing.assert_allclose(t.numpy(), thr, rtol=1e-6)
        got = iou_scores(torch.tensor(acts), torch.tensor(masks), t)
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-6)
        assert (got[3] == 0).all() and (got[:, 2] == 0).all()
    assert float(unit_thresholds(torch.tensor(acts), 0.005)[0]) == acts[:, 0].max()  # k = ceil(0.48) = 1: the max
    with pytest.raises(ValueError, match="quantile"):
        unit_thresholds(torch.tensor(acts), 0.0)
    x = torch.randn(3, 5, 8, 8)  # the fast bilinear upsampling is maps.upsample's
    torch.testing.assert_close(_bilinear(x, (48, 40)), upsample(x, (48, 40)), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- tiny models
def _images(n, seed=0, size=32):
    return np.random.RandomState(seed).randint(0, 256, (n, size, size, 3)).astype(np.uint8)


def _plain_mean_acts(model, tower_path, fc2_path, pixel_values, cls: bool):
    store = {}
    fc2 = model.get_submodule(fc2_path)
    h = fc2.register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach().float()))
    try:
        with torch.no_grad():
            model.get_submodule(tower_path)(pixel_values=pixel_values)
    finally:
        h.remove()
    return store["x"][:, int(cls):]


@pytest.mark.parametrize("name,tower,cls", [("clip", "vision_model", True), ("llava", "model.vision_tower", True),
                                            ("siglip", "vision_model", False)])
def test_image_activations_against_plain_forward(tiny_lens, name, tower, cls):
    lens = tiny_lens(name)
    images = _images(5)
    from PIL import Image

    pil = [Image.fromarray(i) for i in images]
    pix = lens.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    ref = _plain_mean_acts(lens.model, tower, f"{tower}.encoder.layers.1.mlp.fc2", pix, cls)
    for bs in (2, 5):  # batching changes nothing
        got = image_activations(lens, images, names=SITE, batch_size=bs)
        torch.testing.assert_close(got[SITE], ref.mean(1), rtol=1e-5, atol=1e-5)
    grid = unit_maps(lens, list(images), {SITE: [0, 7]}, batch_size=3)
    assert isinstance(grid, MapResult) and grid.maps.shape == (5, 2, 4, 4) and grid.labels == [f"{SITE}:0", f"{SITE}:7"]
    torch.testing.assert_close(grid.maps[:, 1].flatten(1), ref[..., 7], rtol=1e-5, atol=1e-5)  # row-major patches
    assert torch.equal(grid.images, torch.from_numpy(images))


def _plain_similarities(clip, images, concepts):
    from PIL import Image

    m = clip.model
    enc = clip.processor.tokenizer(concepts, padding=True, return_tensors="pt")
    pil = [Image.fromarray(i) for i in images]
    pix = clip.processor.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        t = m.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output
        v = m.get_image_features(pixel_values=pix).pooler_output
    t, v = t / t.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
    return v @ t.T, t


def test_labeller_similarities_against_plain_hf(tiny_lens):
    clip = tiny_lens("clip")
    images = _images(6, seed=3)
    ref, t = _plain_similarities(clip, images, CONCEPTS)
    torch.testing.assert_close(labeller_similarities(clip, images, CONCEPTS, batch_size=4), ref, rtol=1e-5, atol=1e-5)
    # a prompt ensemble: the normalised mean of its texts' normalised embeddings
    got = labeller_similarities(clip, images, {"warm": ["red", "green"], "blue": "blue"}, batch_size=6)
    torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=1e-5, atol=1e-5)
    # cos(v, (t_red + t_green) / |t_red + t_green|) = (cos(v, t_red) + cos(v, t_green)) / |t_red + t_green|
    torch.testing.assert_close(got[:, 0], (ref[:, 0] + ref[:, 2]) / (t[0] + t[2]).norm(), rtol=1e-5, atol=1e-5)


def _plant(values: torch.Tensor, unit: int):
    """A hook setting `unit` at every token to values[image] (per image, or per patch when 2-D), in stream order."""
    state = {"i": 0}

    def fn(v, ctx):
        b = v.shape[0]
        x = v.clone()
        val = values[state["i"]:state["i"] + b].to(x.dtype)
        if val.dim() == 1:
            x[..., unit] = val[:, None]
        else:  # per patch, CLS left at 0
            x[:, 0, unit] = 0
            x[:, 1:, unit] = val
        state["i"] += b
        return x

    return fn


@pytest.mark.parametrize("target", ["clip", "llava"])
def test_clip_dissect_planted_unit(tiny_lens, target):
    """A unit made equal to the labeller's own similarity with concept 'square' is labelled 'square' by cos3 with
    score 1; soft-WPMI's result is the composition of the checked parts; runs are deterministic and batch-free."""
    clip, lens = tiny_lens("clip"), tiny_lens(target)
    images = _images(24, seed=5)
    P, _ = _plain_similarities(clip, images, CONCEPTS)
    c = CONCEPTS.index("square")
    res = clip_dissect(lens, images, CONCEPTS, labeller=clip, names=SITE, similarity="cos3", batch_size=5,
                       hooks={SITE: _plant(P[:, c], 7)}, progress=False)
    assert isinstance(res, DissectionResult) and res.method == "clip_dissect/cos3"
    width = lens.model.config.vision_config.intermediate_size
    assert res.widths == [width] and res.top_ids.shape == (1, width, 3) and len(res.labels_for(SITE)) == width
    assert res.labels_for(SITE)[7] == "square" and abs(res.top_concepts(SITE, 7)[0][1] - 1) < 1e-4
    again = clip_dissect(lens, images, CONCEPTS, labeller=clip, names=SITE, similarity="cos3", batch_size=24,
                         hooks={SITE: _plant(P[:, c], 7)}, progress=False)
    assert torch.equal(again.top_ids, res.top_ids)
    torch.testing.assert_close(again.top_scores, res.top_scores, rtol=1e-4, atol=1e-5)

    soft = clip_dissect(lens, images, CONCEPTS, labeller=clip, names=["vision.blocks.0.mlp.post", SITE],
                        similarity_kwargs={"top_k": 6}, batch_size=7, progress=False)
    for s, site in enumerate(soft.names):
        ref = soft_wpmi(image_activations(lens, images, names=site)[site], P, top_k=6)
        v, i = ref.topk(3, dim=1)
        assert torch.equal(soft.top_ids[s], i)
        torch.testing.assert_close(soft.top_scores[s], v, rtol=1e-4, atol=1e-3)
    assert soft.meta["labeller"]["architecture"] == "clip" and soft.meta["n_images"] == 24


def _square_scenes(n, seed=0, size=32):
    """Noise images, each with one flat red square (side 10-14 px) placed at random; its mask."""
    rng = np.random.RandomState(seed)
    images = (rng.rand(n, size, size, 3) * 80).astype(np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        s = rng.randint(10, 15)
        y, x = rng.randint(0, size - s, 2)
        images[i, y:y + s, x:x + s] = (220, 40, 40)
        masks[i, y:y + s, x:x + s] = True
    return images, masks


def test_net_dissect_planted_unit(tiny_lens):
    """A unit whose patch map is the square's coverage of each patch is labelled 'square', with NetDissect's IoU
    as the numpy reference computes it from that map; decoy concepts lose."""
    lens = tiny_lens("clip")
    images, square = _square_scenes(20)
    cover = torch.tensor(square.reshape(20, 4, 8, 4, 8).mean((2, 4)), dtype=torch.float32)  # (images, 4, 4)
    rng = np.random.RandomState(2)
    left = np.zeros_like(square)
    left[:, :, :16] = True
    masks = {"left": left, "square": square, "blob": rng.rand(*square.shape) > 0.8}
    hooks = lambda: {"vision.blocks.0.mlp.post": _plant(cover.flatten(1), 3)}  # noqa: E731  (fresh: counts images)
    res = net_dissect(lens, images, masks, names="vision.blocks.0.mlp.post", quantile=0.1, batch_size=6,
                      hooks=hooks(), progress=False)
    assert res.method == "net_dissect" and res.concepts == ["left", "square", "blob"]
    assert res.labels_for(0)[3] == "square"
    thr, ref = np_netdissect(cover[:, None].numpy(), np.stack([masks[c] for c in res.concepts], 1), 0.1)
    assert abs(float(res.thresholds[0, 3]) - thr[0]) < 1e-6
    got = {c: s for c, s in res.top_concepts(0, 3)}
    for j, c in enumerate(res.concepts):
        assert abs(got[c] - ref[0, j]) < 1e-5
    assert got["square"] > 0.3 and ("vision.blocks.0.mlp.post", 3) in [b[:2] for b in res.best_units("square")]
    # the maps it scored: the planted coverage; thresholded, NetDissect's binary maps at image resolution
    plain = res.unit_maps(lens, images, [("vision.blocks.0.mlp.post", 3)], hooks=hooks())
    torch.testing.assert_close(plain.maps[:, 0], cover)
    binary = res.unit_maps(lens, images, [("vision.blocks.0.mlp.post", 3)], thresholded=True, hooks=hooks())
    assert binary.maps.shape == (20, 1, 32, 32) and "square" in binary.labels[0]
    on = binary.maps[:, 0].bool().numpy()
    assert abs((on & square).sum() / (on | square).sum() - got["square"]) < 1e-5


def test_result_roundtrip_plot_and_lookups(tiny_lens, tmp_path):
    clip = tiny_lens("clip")
    res = clip_dissect(clip, _images(12, seed=9), CONCEPTS, labeller=clip, names="vision.blocks.*.mlp.post",
                       similarity="cos3", top=2, batch_size=6, progress=False)
    back = Result.load(res.save(tmp_path / "d"))
    assert isinstance(back, DissectionResult) and back.names == res.names and back.concepts == CONCEPTS
    assert torch.equal(back.top_ids, res.top_ids) and back.labels_for(1) == res.labels_for(SITE)
    counts = res.counts()
    assert counts.shape == (2, 5) and counts.sum(1).tolist() == res.widths
    rows = res.table(2)
    assert all(r["concept"] in CONCEPTS for r in rows) and len(rows) <= 10
    best = res.best_units(rows[0]["concept"])
    assert [b[2] for b in best] == sorted((b[2] for b in best), reverse=True)
    assert isinstance(res.plot(), Figure) and isinstance(res.plot(min_score=0.5), Figure)
    assert "clip_dissect/cos3" in res.summary() and "<table>" in res._repr_html_()
    maps = res.unit_maps(clip, _images(3, seed=9))  # default: each concept's best unit
    assert maps.maps.shape[:2] == (3, len(maps.labels)) and maps.labels
    with pytest.raises(KeyError, match="not dissected"):
        res.labels_for("vision.blocks.0.mlp.pre")
    with pytest.raises(ValueError, match="thresholds"):
        res.unit_maps(clip, _images(3), thresholded=True)


def test_errors(tiny_lens):
    clip, llava = tiny_lens("clip"), tiny_lens("llava")
    images = _images(4)
    with pytest.raises(UnknownNameError):
        clip_dissect(clip, images, CONCEPTS, labeller=clip, names="vision.blocks.9.mlp.post", progress=False)
    with pytest.raises(ValueError, match="image-tower sites"):
        clip_dissect(clip, images, CONCEPTS, labeller=clip, names="text.blocks.0.mlp.post", progress=False)
    with pytest.raises(TypeError, match="contrastive"):
        clip_dissect(clip, images, CONCEPTS, labeller=llava, progress=False)
    with pytest.raises(ValueError, match="similarity='nope'"):
        clip_dissect(clip, images, CONCEPTS, labeller=clip, similarity="nope", progress=False)
    with pytest.raises(TypeError, match="list of concept"):
        clip_dissect(clip, images, "red", labeller=clip, progress=False)
    good = np.zeros((4, 32, 32), bool)
    with pytest.raises(ValueError, match="masks are 16x16; the images are 32x32"):
        net_dissect(clip, images, {"a": np.zeros((4, 16, 16), bool)}, progress=False)
    with pytest.raises(ValueError, match="masks hold 3 images; 4"):
        net_dissect(clip, images, {"a": good[:3]}, progress=False)
    with pytest.raises(ValueError, match="one shape"):
        net_dissect(clip, images, {"a": good, "b": good[:, :16]}, progress=False)
    with pytest.raises(ValueError, match="quantile"):
        net_dissect(clip, images, {"a": good}, quantile=1.5, progress=False)
    with pytest.raises(ValueError, match="masks hold 4 images; 3"):  # a stream has no len: checked after the run
        net_dissect(clip, (im for im in images[:3]), {"a": good}, progress=False)
    with pytest.raises(IndexError, match="out of range"):
        unit_maps(clip, images, {SITE: [10_000]})
    with pytest.raises(ValueError, match="not globs"):
        unit_maps(clip, images, {"vision.blocks.*.mlp.post": [0]})
    with pytest.raises(ValueError, match="no images"):
        image_activations(clip, [], names=SITE)


# ------------------------------------------------------------------------------------------- organism
@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_organism_labels_a_planted_red_unit():
    """On the clip organism (target and labeller), a unit planted as each patch's share of red pixels is labelled
    'red' by both CLIP-Dissect (words only) and NetDissect (the world's red-object masks)."""
    import mmlens.organisms as organisms
    from mmlens.world import single_object_scene
    from mmlens.world.scene import COLOURS, SHAPES

    clip = organisms.load("clip")
    scenes = [single_object_scene(10_000_500 + k, background="plain") for k in range(60)]
    images = np.stack([s.image for s in scenes])
    red = (np.abs(images.astype(int) - np.array(COLOURS["red"])).sum(-1) < 60).astype(np.float32)
    share = torch.tensor(red.reshape(60, 8, 6, 8, 6).mean((2, 4))).flatten(1)
    site = "vision.blocks.2.mlp.post"
    concepts = {c: [f"a {c} {s}" for s in SHAPES] for c in reversed(COLOURS)}  # 'red' last: no index-0 luck
    res = clip_dissect(clip, images, concepts, labeller=clip, names=site, similarity_kwargs={"top_k": 10},
                       hooks={site: _plant(share, 11)}, progress=False)
    assert res.labels_for(site)[11] == "red"
    masks = {c: np.stack([s.masks[0] if s.objects[0].colour == c else np.zeros_like(s.masks[0]) for s in scenes])
             for c in reversed(COLOURS)}
    nd = net_dissect(clip, images, masks, names=site, quantile=0.01, hooks={site: _plant(share, 11)}, progress=False)
    assert nd.labels_for(site)[11] == "red" and nd.top_concepts(site, 11)[0][1] > 0.3
