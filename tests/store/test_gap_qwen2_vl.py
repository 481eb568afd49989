"""Qwen2-VL's vision tower takes flattened patches in merge-window order: `merge_window_grid` reproduces the image
processor's own patch order, and a store of the tower's sites places every token at the (row, col) its patch came
from (the stored patch embeddings equal the patch embedding of the raster patch there), per image and example;
projector.out tokens sit on the merged grid the LM's token map uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens.store import MODALITIES, ActivationStore, stream_activations, write_activations
from mmlens.store.layout import merge_window_grid
from mmlens.testing.tiny_models import qwen2_vl_inputs, sample_image

IMAGE = MODALITIES.index("image")
P = 4  # the tiny model's patch size (merge 2, temporal patch 2)
STEP = 3  # red levels between patches: 64 patches fit in 0..255


def _coded_image(H: int, W: int) -> np.ndarray:
    """Patch (r, c) is one colour: red = STEP * its raster index, green the complement."""
    h, w = H // P, W // P
    a = np.zeros((H, W, 3), np.uint8)
    a[..., 0] = np.kron(np.arange(h * w).reshape(h, w), np.ones((P, P), dtype=np.int64)) * STEP
    a[..., 1] = 255 - a[..., 0]
    return a


def _image_processor(lens):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(lens.model.name_or_path)


def test_merge_window_grid_is_the_image_processors_patch_order(tiny_lens):
    ip = _image_processor(tiny_lens("qwen2_vl"))
    for H, W in ((32, 32), (16, 32), (32, 16)):  # non-square both ways: rows and cols cannot be swapped unseen
        feats = ip(images=[Image.fromarray(_coded_image(H, W))], return_tensors="pt")
        (t, h, w), = feats["image_grid_thw"].tolist()
        assert (t, h, w) == (1, H // P, W // P)
        red = feats["pixel_values"][:, : 2 * P * P] * ip.image_std[0] + ip.image_mean[0]  # channel 0, both frames
        raster = (red[:, 0] * 255 / STEP).round().long()  # the raster index each row's patch was cut from
        assert torch.equal(red.amax(1), red.amin(1))  # each row is one patch
        rc = merge_window_grid(t, h, w, ip.merge_size)
        assert torch.equal(raster, rc[:, 0] * w + rc[:, 1])
    assert merge_window_grid(1, 2, 4, 2).tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert torch.equal(merge_window_grid(2, 2, 2, 2), torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]]).repeat(2, 1))
    with pytest.raises(ValueError, match="merge windows"):
        merge_window_grid(1, 3, 4, 2)


def _raster_patch_embeds(lens, ip, img: np.ndarray) -> torch.Tensor:
    """(h, w, d) the tower's patch embedding of the raster patch at each (row, col), cut from the image by hand."""
    x = (torch.tensor(img).float() / 255 - torch.tensor(ip.image_mean)) / torch.tensor(ip.image_std)
    h, w = img.shape[0] // P, img.shape[1] // P
    patches = x.permute(2, 0, 1).reshape(3, h, P, w, P).permute(1, 3, 0, 2, 4)  # (h, w, 3, P, P)
    flat = patches[:, :, :, None].expand(h, w, 3, 2, P, P).reshape(h * w, -1)  # (C, T, P, P) per patch
    with torch.no_grad():
        return lens.model.model.visual.patch_embed(flat).reshape(h, w, -1)


def test_vision_tower_tokens_sit_where_their_patch_came_from(tiny_lens, tmp_path):
    lens = tiny_lens("qwen2_vl")
    ip = _image_processor(lens)
    imgs = [np.array(sample_image(0)), np.array(sample_image(1))[:16], np.array(sample_image(2))[:, :16]]
    data = [qwen2_vl_inputs(lens, [Image.fromarray(imgs[0]), Image.fromarray(imgs[1])], ["what colour", "red"]),
            qwen2_vl_inputs(lens, [Image.fromarray(imgs[2])], ["is it a circle ?"])]
    names = ["vision.embed", "vision.blocks.1.resid_post", "vision.blocks.0.attn.q"]
    store = write_activations(lens, data, names, tmp_path / "q", dtype="float32", shard_tokens=50, progress=False)
    m = store.meta
    sizes = [(8, 8), (4, 8), (8, 4)]
    assert len(store) == sum(h * w for h, w in sizes) and store.d == {names[0]: 32, names[1]: 32, names[2]: 32}
    assert (m["modality"] == IMAGE).all() and (m["image"] == 0).all() and (m["token"] == -1).all()
    assert torch.equal(m["example"], torch.tensor([0] * 64 + [1] * 32 + [2] * 32))
    emb = store.tensor("vision.embed")
    for e, (img, (h, w)) in enumerate(zip(imgs, sizes)):
        sel = m["example"] == e
        r, c = m["row"][sel].long(), m["col"][sel].long()
        assert torch.equal(torch.sort(r * w + c).values, torch.arange(h * w))  # every cell once
        assert torch.equal(m["position"][sel].long(), torch.arange(h * w))
        torch.testing.assert_close(emb[sel], _raster_patch_embeds(lens, ip, img)[r, c], atol=1e-5, rtol=1e-5)
    _, cache = lens.run_with_cache(data[0], names=names)  # the other sites: the tower's rows, in its order
    first = m["example"] < 2
    torch.testing.assert_close(store.tensor(names[1], where=first), cache[names[1]])
    torch.testing.assert_close(store.tensor(names[2], where=first), cache[names[2]].flatten(1))
    got = torch.cat(list(ActivationStore(tmp_path / "q").batches(names[1], 16, seed=0, buffer_tokens=64)))
    assert got.shape == (128, 32)  # SAE-able


def test_projector_tokens_sit_on_the_merged_grid(tiny_lens):
    lens = tiny_lens("qwen2_vl")
    inputs = qwen2_vl_inputs(lens, [sample_image(3), Image.fromarray(np.array(sample_image(4))[:16])], ["a", "b"])
    (acts, meta), = list(stream_activations(lens, [inputs], "projector.out"))
    _, cache = lens.run_with_cache(inputs, names="projector.out")
    torch.testing.assert_close(acts["projector.out"], cache["projector.out"])
    tm = lens.token_map(inputs)  # the LM's image tokens of each row, in order: the same (row, col)
    for b in range(2):
        pos = tm.positions("image", b)
        sel = meta["example"] == b
        assert torch.equal(meta["row"][sel].long(), tm.row[b, pos])
        assert torch.equal(meta["col"][sel].long(), tm.col[b, pos])
    assert int(meta["row"][meta["example"] == 1].max()) == 1 and int(meta["col"][meta["example"] == 1].max()) == 3
    with pytest.raises(ValueError, match="same token rows"):
        next(stream_activations(lens, [inputs], ["vision.embed", "projector.out"]))
