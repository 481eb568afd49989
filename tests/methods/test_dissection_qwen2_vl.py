"""Network dissection on Qwen2-VL's vision tower, which takes flattened patches in merge-window order: the per-unit
grids equal a plain HF forward of `model.visual` placed on the patch grid by walking the 2x2 merge windows by hand
(and the patch embeddings there equal those of the raster patch cut from the image); NetDissect labels a unit made
a red detector by a weight edit 'square'; CLIP-Dissect labels a planted unit; a lens without an image processor
(the tiny folder loads only its tokenizer) is refused clearly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import mmlens
from mmlens.lens import Lens
from mmlens.methods.dissection import (DissectionResult, clip_dissect, image_activations, iou_scores,
                                       labeller_similarities, net_dissect, soft_wpmi, unit_maps, unit_thresholds)

P = 4  # the tiny tower's patch size (merge 2, temporal patch 2, 32 dims, MLP 64)
SITE = "vision.blocks.1.mlp.post"
CONCEPTS = ["red", "blue", "green", "square", "circle"]


@pytest.fixture(scope="module")
def qwen(tiny_folder):
    """The tiny Qwen2-VL with its image processor attached (as Qwen2VLProcessor holds it); a private copy, so the
    weight edit below cannot leak into other tests' cached lens."""
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = tiny_folder("qwen2_vl")
    proc = SimpleNamespace(image_processor=AutoImageProcessor.from_pretrained(folder),
                           tokenizer=AutoTokenizer.from_pretrained(folder))
    return mmlens.load(folder, processor=proc)


def _noise(n: int, H: int, W: int, seed: int = 0) -> np.ndarray:
    return (np.random.RandomState(seed).rand(n, H, W, 3) * 255).astype(np.uint8)


def _plain_grids(lens, images: np.ndarray, module: str, pre: bool) -> torch.Tensor:
    """(images, units, h, w): the input (`pre`) or output of `module` (a path under model.visual) in a plain HF
    forward of the tower, each token put at its (row, col) by walking the 2x2 merge windows in raster order and the
    four patches of each window in raster order."""
    ip, visual = lens.processor.image_processor, lens.model.model.visual
    feats = ip(images=[Image.fromarray(i) for i in images], return_tensors="pt")
    got = {}
    mod = visual.get_submodule(module)
    if pre:
        h = mod.register_forward_pre_hook(lambda m, args: got.__setitem__("x", args[0].detach().float()))
    else:
        h = mod.register_forward_hook(lambda m, args, out: got.__setitem__("x", out.detach().float()))
    try:
        with torch.no_grad():
            visual(feats["pixel_values"], grid_thw=feats["image_grid_thw"])
    finally:
        h.remove()
    x, k, out = got["x"], 0, []
    for t, gh, gw in feats["image_grid_thw"].tolist():
        assert t == 1
        g = torch.full((x.shape[1], gh, gw), float("nan"))
        for wr in range(gh // 2):
            for wc in range(gw // 2):
                for r in range(2):
                    for c in range(2):
                        g[:, 2 * wr + r, 2 * wc + c] = x[k]
                        k += 1
        out.append(g)
    assert k == x.shape[0]
    return torch.stack(out)


def _cut_patch_embeds(lens, images: np.ndarray) -> torch.Tensor:
    """(images, d, h, w): the patch embedding of the raster patch at each (row, col), cut from the image by hand."""
    ip = lens.processor.image_processor
    x = (torch.tensor(images).float() / 255 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    n, H, W, _ = x.shape
    h, w = H // P, W // P
    patches = x.permute(0, 3, 1, 2).reshape(n, 3, h, P, w, P).permute(0, 2, 4, 1, 3, 5)  # (n, h, w, 3, P, P)
    flat = patches[:, :, :, :, None].expand(n, h, w, 3, 2, P, P).reshape(n * h * w, -1)  # both frames: the image
    with torch.no_grad():
        emb = lens.model.model.visual.patch_embed(flat).float()
    return emb.reshape(n, h, w, -1).permute(0, 3, 1, 2)


def test_unit_grids_equal_plain_forward_placed_by_hand(qwen):
    images = _noise(5, 16, 32)  # 4 x 8 patches: rows and columns cannot be swapped unseen
    ref = _plain_grids(qwen, images, "blocks.1.mlp.fc2", pre=True)
    assert ref.shape == (5, 64, 4, 8) and not ref.isnan().any()
    for bs in (2, 5):  # batching (and a last batch of one) changes nothing
        got = unit_maps(qwen, list(images), {SITE: range(64)}, batch_size=bs)
        assert got.maps.shape == (5, 64, 4, 8) and torch.equal(got.images, torch.from_numpy(images))
        torch.testing.assert_close(got.maps, ref, rtol=1e-4, atol=1e-5)
        means = image_activations(qwen, images, names=SITE, batch_size=bs)[SITE]
        torch.testing.assert_close(means, ref.mean((2, 3)), rtol=1e-4, atol=1e-5)
    # the placement means what it says: the embedding at (row, col) is that of the patch cut from there
    emb = unit_maps(qwen, images, {"vision.embed": range(32)}, batch_size=3).maps
    torch.testing.assert_close(emb, _cut_patch_embeds(qwen, images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(emb, _plain_grids(qwen, images, "patch_embed", pre=False), rtol=1e-5, atol=1e-5)


def _red_squares(n: int, H: int = 32, W: int = 48, seed: int = 0):
    """Dark noise images, each with one flat red square (side 10-16 px) at random; its mask."""
    rng = np.random.RandomState(seed)
    images = (rng.rand(n, H, W, 3) * 60).astype(np.uint8)
    masks = np.zeros((n, H, W), bool)
    for i in range(n):
        s = rng.randint(10, 17)
        y, x = rng.randint(0, H - s), rng.randint(0, W - s)
        images[i, y:y + s, x:x + s] = (220, 30, 30)
        masks[i, y:y + s, x:x + s] = True
    return images, masks


def test_net_dissect_labels_a_red_detector_unit(qwen):
    """Patch-embedding channel 5 made (red - green) summed over its patch: NetDissect labels it 'square' with the IoU
    that thresholds and IoU computed on the hand-placed plain forward give; decoy concepts lose; every other unit
    of both sites scores as that reference says too."""
    images, square = _red_squares(16)
    rng = np.random.RandomState(1)
    left = np.zeros_like(square)
    left[:, :, :24] = True
    masks = {"left": left, "square": square, "blob": rng.rand(*square.shape) > 0.8}
    proj = qwen.model.model.visual.patch_embed.proj
    saved = proj.weight.detach().clone()
    try:
        with torch.no_grad():
            proj.weight[5] = 0
            proj.weight[5, 0] = 1.0
            proj.weight[5, 1] = -1.0
        names = ["vision.embed", "vision.blocks.0.mlp.post"]
        res = net_dissect(qwen, images, masks, names=names, quantile=0.1, batch_size=5, progress=False)
        refs = [_plain_grids(qwen, images, "patch_embed", pre=False),
                _plain_grids(qwen, images, "blocks.0.mlp.fc2", pre=True)]
        thresholded = res.unit_maps(qwen, images, [("vision.embed", 5)], thresholded=True)
    finally:
        with torch.no_grad():
            proj.weight.copy_(saved)
    assert isinstance(res, DissectionResult) and res.method == "net_dissect" and res.names == names
    assert res.widths == [32, 64] and res.top_ids.shape == (2, 64, 3) and res.thresholds.shape == (2, 64)
    assert res.meta["grid"] == [8, 12] and res.thresholds[0, 32:].isnan().all()
    assert res.labels_for("vision.embed")[5] == "square"
    top = dict(res.top_concepts("vision.embed", 5))
    assert top["square"] > 0.5 and max(top["left"], top["blob"]) < 0.2  # 0.61 vs 0.09; tokens misplaced: 0.03
    stacked = torch.stack([torch.from_numpy(masks[c]) for c in res.concepts], 1)
    for s, ref in enumerate(refs):
        t = unit_thresholds(ref, 0.1)
        torch.testing.assert_close(res.thresholds[s, :res.widths[s]], t, rtol=1e-4, atol=1e-5)
        iou = iou_scores(ref, stacked, t).topk(3, dim=1).values
        torch.testing.assert_close(res.top_scores[s, :res.widths[s]], iou, rtol=1e-4, atol=1e-4)
    assert thresholded.maps.shape == (16, 1, 32, 48) and "square" in thresholded.labels[0]
    on = thresholded.maps[:, 0].bool().numpy()
    assert abs((on & square).sum() / (on | square).sum() - top["square"]) < 1e-5


def test_clip_dissect_planted_unit(qwen, tiny_lens):
    """A unit set, at every token of an image, to the labeller's cosine of that image with 'square' is labelled
    'square' by cos3 with score 1; soft-WPMI's labels are its value on the per-image means."""
    clip = tiny_lens("clip")
    images = _noise(20, 32, 32, seed=4)
    P_ = labeller_similarities(clip, images, CONCEPTS)
    c = CONCEPTS.index("square")
    seen = {"i": 0}

    def plant(v, ctx):  # (images * 64 tokens, units): the tower's value has no batch dim
        b = v.shape[0] // 64
        x = v.clone()
        x[:, 7] = P_[seen["i"]:seen["i"] + b, c].repeat_interleave(64).to(x.dtype)
        seen["i"] += b
        return x

    res = clip_dissect(qwen, images, CONCEPTS, labeller=clip, names=SITE, similarity="cos3", batch_size=6,
                       hooks={SITE: plant}, progress=False)
    assert seen["i"] == 20 and res.method == "clip_dissect/cos3"
    assert res.widths == [64] and res.top_ids.shape == (1, 64, 3) and len(res.labels_for(SITE)) == 64
    assert res.labels_for(SITE)[7] == "square" and abs(res.top_concepts(SITE, 7)[0][1] - 1) < 1e-4
    soft = clip_dissect(qwen, images, CONCEPTS, labeller=clip, names=SITE, similarity_kwargs={"top_k": 5},
                        batch_size=7, progress=False)
    v, i = soft_wpmi(image_activations(qwen, images, names=SITE)[SITE], P_, top_k=5).topk(3, dim=1)
    assert torch.equal(soft.top_ids[0], i)
    torch.testing.assert_close(soft.top_scores[0], v, rtol=1e-4, atol=1e-3)


def test_errors(qwen, tiny_lens):
    """Qwen2-VL is no longer refused (the tests above run it); a lens loaded without an image processor, or a
    non-tower site, is refused with a message saying what was wrong."""
    bare = tiny_lens("qwen2_vl")  # the tiny folder cannot build Qwen2VLProcessor: only the tokenizer loads
    images = _noise(2, 16, 16)
    for call in (lambda: image_activations(bare, images, names=SITE),
                 lambda: net_dissect(bare, images, {"a": np.zeros((2, 16, 16), bool)}, progress=False),
                 lambda: unit_maps(bare, images, {SITE: [0]})):
        with pytest.raises(TypeError, match="qwen2_vl has no image processor"):
            call()
    clip = tiny_lens("clip")
    blind = Lens(clip.model, clip.adapter, SimpleNamespace(image_processor=None, tokenizer=clip.processor.tokenizer))
    with pytest.raises(TypeError, match="clip_dissect's labeller: clip has no image processor"):
        clip_dissect(qwen, images, CONCEPTS, labeller=blind, progress=False)
    with pytest.raises(ValueError, match="image-tower sites"):
        image_activations(qwen, images, names="projector.out")
