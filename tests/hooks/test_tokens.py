"""Token maps match hand-computed positions."""

from __future__ import annotations

import torch

from mmlens.hooks.tokens import MODALITIES
from mmlens.testing.tiny_models import qwen2_vl_inputs, sample_image, sample_inputs


def _expected_raster(n_rows, n_cols):
    return [(r, c) for r in range(n_rows) for c in range(n_cols)]


def test_llava_default_strategy(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)  # "<s> <image>x16 what colour ..." and a longer prompt
    tm = lens.token_map(inputs)
    ids = inputs["input_ids"]
    image_token = lens.model.config.image_token_id
    for b in range(2):
        pos = tm.positions("image", batch=b)
        assert pos.tolist() == (ids[b] == image_token).nonzero().flatten().tolist()
        assert len(pos) == 16  # (32 / 8) ** 2 patches, CLS dropped
        cells = list(zip(tm.row[b, pos].tolist(), tm.col[b, pos].tolist()))
        assert cells == _expected_raster(4, 4)
        assert set(tm.image[b, pos].tolist()) == {b}
    first = int(tm.positions("image", 0)[0])
    assert tm.tokens[0][first - 1] == "<s>" and tm.names(0)[first - 1] == "special"
    text = tm.positions("text", 0)
    assert [tm.tokens[0][p] for p in text] == ["what", "colour", "is", "the", "square", "?"]


def test_llava_full_strategy_keeps_cls(tiny_lens):
    lens = tiny_lens("llava_full")
    inputs = sample_inputs("llava_full", lens)
    tm = lens.token_map(inputs)
    pos = tm.positions("image")
    assert len(pos) == 17
    assert (tm.row[0, pos[0]].item(), tm.col[0, pos[0]].item()) == (-1, -1)  # CLS first
    assert list(zip(tm.row[0, pos[1:]].tolist(), tm.col[0, pos[1:]].tolist())) == _expected_raster(4, 4)


def test_qwen2_vl_merge_and_dynamic_resolution(tiny_lens):
    """32x32 -> 8x8 patches of 4 px -> 4x4 merged tokens; 48x32 (h x w) -> 12x8 -> 6x4."""
    lens = tiny_lens("qwen2_vl")
    from PIL import Image

    tall = Image.fromarray((torch.rand(48, 32, 3) * 255).byte().numpy())
    inputs = qwen2_vl_inputs(lens, [sample_image(0), tall], ["what colour", "what shape"])
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8], [1, 12, 8]]
    tm = lens.token_map(inputs)
    p0, p1 = tm.positions("image", batch=0), tm.positions("image", batch=1)
    assert len(p0) == 16 and len(p1) == 24
    assert list(zip(tm.row[0, p0].tolist(), tm.col[0, p0].tolist())) == _expected_raster(4, 4)
    assert list(zip(tm.row[1, p1].tolist(), tm.col[1, p1].tolist())) == _expected_raster(6, 4)
    assert tm.image[1, p1].unique().tolist() == [1]
    assert tm.grids == [(4, 4), (6, 4)]
    # vision_start / vision_end around the image are special; left padding of the shorter row is special too
    assert tm.tokens[0][int(p0[0]) - 1] == "<|vision_start|>" and tm.names(0)[int(p0[0]) - 1] == "special"
    assert tm.tokens[0][int(p0[-1]) + 1] == "<|vision_end|>"


def test_paligemma_image_first(tiny_lens):
    lens = tiny_lens("paligemma")
    inputs = sample_inputs("paligemma", lens)
    tm = lens.token_map(inputs)
    pos = tm.positions("image")
    assert pos.tolist() == list(range(16))  # PaliGemma puts the image tokens before <bos> and the prompt
    assert list(zip(tm.row[0, pos].tolist(), tm.col[0, pos].tolist())) == _expected_raster(4, 4)
    assert tm.names(0)[16] == "special"  # <s>


def test_blip2_query_tokens(tiny_lens):
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens, batch=2)
    tm = lens.token_map(inputs)
    for b in range(2):
        pos = tm.positions("query", batch=b)
        assert tm.query[b, pos].tolist() == [0, 1, 2, 3]
        assert (tm.row[b, pos] == -1).all()
    assert MODALITIES.index("query") == int(tm.modality[0, tm.positions("query")[0]])


def test_token_map_html_and_records(tiny_lens):
    lens = tiny_lens("llava")
    tm = lens.token_map(sample_inputs("llava", lens))
    assert "<span" in tm._repr_html_()
    rec = tm.to_records()[1]
    assert rec["modality"] == "image" and rec["row"] == 0 and rec["col"] == 0
