"""MapResult: upsampling, segmentation, IoU and the pointing game against hand-computed values; persistence."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.methods.maps import MapResult, grid_of, images_uint8, iou, normalise, pointing_game, upsample

matplotlib.use("Agg")


def _result(maps, size=4):
    n = maps.shape[0]
    return MapResult(meta={"architecture": "test"}, maps=maps, images=torch.zeros(n, size, size, 3, dtype=torch.uint8),
                     labels=[f"w{i}" for i in range(maps.shape[1])], method="hand")


def test_iou_and_pointing_game_by_hand():
    pred = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    mask = torch.tensor([[0, 1, 1], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert iou(pred, mask).item() == pytest.approx(1 / 3)
    assert iou(torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 2, dtype=torch.bool)).item() == 1.0
    heat = torch.tensor([[0.0, 0.2, 0.9], [0.1, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert pointing_game(heat, mask).item() is True
    assert pointing_game(heat.flip(-1), mask).item() is False


def test_upsample_normalise_grid():
    m = torch.arange(4.0).reshape(1, 2, 2)
    up = upsample(m, 4)
    assert up.shape == (1, 4, 4)
    # bilinear, align_corners=False: corner pixels copy the corner cells, the mean is kept
    assert up[0, 0, 0] == 0 and up[0, -1, -1] == 3 and up.mean() == pytest.approx(1.5)
    n = normalise(torch.tensor([[[2.0, 4.0], [6.0, 10.0]]]))
    torch.testing.assert_close(n, torch.tensor([[[0.0, 0.25], [0.5, 1.0]]]))
    assert normalise(torch.ones(1, 2, 2)).abs().sum() == 0
    torch.testing.assert_close(grid_of(torch.arange(6.0), rows=2), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(ValueError, match="do not form"):
        grid_of(torch.arange(7.0))


def test_segment_iou_pointing_on_result(tmp_path):
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0, 0, 0] = 1.0   # image 0, label w0: top-left cell
    maps[1, 0, 1, 1] = 1.0   # image 1, label w0: bottom-right cell
    res = _result(maps)
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, :2, :2] = True
    hits = res.pointing_game(masks, "w0")
    assert hits.tolist() == [True, False]
    seg = res.segment(0.4, "w0")
    assert seg.shape == (2, 1, 4, 4) and seg[0, 0, 0, 0] and not seg[0, 0, 3, 3]
    want = iou(normalise(upsample(maps[:, 0], (4, 4))) > 0.4, masks)
    torch.testing.assert_close(res.iou(masks, "w0"), want)
    # one label per image equals each image's own map
    per = res.iou(masks, ["w0", "w1"])
    torch.testing.assert_close(per, torch.stack([res.iou(masks, "w0")[0], res.iou(masks, "w1")[1]]))
    assert res.pointing_game(masks, ["w1", "w0"]).tolist() == [res.pointing_game(masks, "w1")[0].item(), False]
    with pytest.raises(ValueError, match="one per image"):
        res.iou(masks, ["w0"])
    res.save(tmp_path / "m")
    back = MapResult.load(tmp_path / "m")
    torch.testing.assert_close(back.maps, res.maps)
    assert back.labels == res.labels and back.method == "hand"
    assert isinstance(res.plot(), Figure)
    assert "2 images x 2 maps" in res.summary()


def test_map_errors():
    res = _result(torch.zeros(2, 1, 2, 2))
    with pytest.raises(ValueError, match=r"expected \(2, 4, 4\)"):
        res.iou(torch.zeros(3, 4, 4, dtype=torch.bool), "w0")
    with pytest.raises(KeyError, match="labels"):
        res.map("nope")
    with pytest.raises(ValueError, match="threshold"):
        res.segment(1.5)
    with pytest.raises(ValueError, match="'mean'"):
        res.iou(torch.zeros(2, 4, 4, dtype=torch.bool), "w0", threshold="median")


def test_mean_threshold_keeps_what_a_fraction_of_the_peak_drops():
    # a heavy-tailed map: one spike (10) over a plateau (1) on the object's 2x2 cells, 0 elsewhere, at pixel level
    maps = torch.zeros(1, 1, 4, 4)
    maps[0, 0, :2, :2] = 1.0
    maps[0, 0, 0, 0] = 10.0
    res = _result(maps)  # images 4x4: no upsampling
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, :2, :2] = True
    assert res.iou(mask, "w0", threshold=0.4).item() == pytest.approx(1 / 4)  # only the spike passes 0.4 of the range
    assert res.iou(mask, "w0", threshold="mean").item() == 1.0  # mean 13/16: the plateau passes, the zeros do not
    assert torch.equal(res.segment("mean")[0, 0], mask[0])


def test_images_uint8_forms():
    arr = (np.random.RandomState(0).rand(2, 5, 5, 3) * 255).astype(np.uint8)
    assert torch.equal(images_uint8(arr), torch.from_numpy(arr))
    assert images_uint8(arr[0]).shape == (1, 5, 5, 3)
    t = torch.zeros(1, 3, 5, 5) - 1  # [-1, 1] float
    assert images_uint8(t).max() == 0
    with pytest.raises(ValueError, match="RGB"):
        images_uint8(np.zeros((2, 5, 5)))
