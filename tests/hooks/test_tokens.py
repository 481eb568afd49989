"""Token maps match hand-computed positions."""

from __future__ import annotations

import numpy as np
import pytest
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


# ------------------------------------------------------------------------------- grids, to_grid, masks, answers
def test_grids_one_per_image_in_image_order(tiny_lens):
    for name, batch in (("llava", 2), ("llava_full", 1), ("paligemma", 2), ("qwen2_vl", 2)):
        lens = tiny_lens(name)
        assert lens.token_map(sample_inputs(name, lens, batch=batch)).grids == [(4, 4)] * batch, name
    lens = tiny_lens("blip2")
    assert lens.token_map(sample_inputs("blip2", lens, batch=2)).grids == []  # learned queries: no grid


def _two_images_one_row(lens):
    return dict(lens.processor(text=["<image> <image> what colour"], images=[sample_image(0), sample_image(1)],
                               return_tensors="pt"))


def test_to_grid_over_sequence_and_over_image_tokens(tiny_lens):
    lens = tiny_lens("llava_full")  # "<s> CLS p0 .. p15 what colour ...": CLS at 1, cell (r, c) at 2 + 4r + c
    inputs = sample_inputs("llava_full", lens, batch=2)
    tm = lens.token_map(inputs)
    n = inputs["input_ids"].shape[1]
    values = torch.arange(n, dtype=torch.float32) + 1000 * torch.arange(3.0)[:, None]  # (heads, seq)
    expected = torch.zeros(3, 4, 4)
    for h in range(3):
        for r in range(4):
            for c in range(4):
                expected[h, r, c] = 1000 * h + 2 + 4 * r + c
    assert torch.equal(tm.to_grid(values), expected)
    assert torch.equal(tm.to_grid(values, batch=1), expected)  # image=None: row 1's only image (global index 1)
    assert torch.equal(tm.to_grid(values, batch=1, image=1), expected)
    per_image = torch.arange(17.0)  # over the image's own tokens, CLS first
    assert torch.equal(tm.to_grid(per_image), torch.arange(1.0, 17.0).reshape(4, 4))
    with pytest.raises(ValueError, match=f"last dim 5.*{n}.*17"):
        tm.to_grid(torch.zeros(5))
    with pytest.raises(ValueError, match="image 0 is not in batch row 1"):
        tm.to_grid(values, batch=1, image=0)


def test_to_grid_picks_one_of_several_images(tiny_lens):
    lens = tiny_lens("llava")
    inputs = _two_images_one_row(lens)  # "<s> <image>x16 <image>x16 what colour </s>"
    tm = lens.token_map(inputs)
    assert tm.grids == [(4, 4), (4, 4)]
    values = torch.arange(float(inputs["input_ids"].shape[1]))
    assert torch.equal(tm.to_grid(values, image=1), torch.arange(17.0, 33.0).reshape(4, 4))
    with pytest.raises(ValueError, match="holds 2 images"):
        tm.to_grid(values)


def test_positions_in_mask_hand_made(tiny_lens):
    lens = tiny_lens("llava")  # 32x32 pixels, 4x4 patches of 8 px; cell (r, c) at sequence position 1 + 4r + c
    tm = lens.token_map(sample_inputs("llava", lens))
    mask = np.zeros((32, 32), bool)
    mask[0:8, 0:8] = True  # cell (0, 0): 1.0
    mask[8:12, 8:16] = True  # cell (1, 1): 32 / 64 = 0.5
    mask[16:19, 24:32] = True  # cell (2, 3): 24 / 64 = 0.375
    assert tm.positions_in_mask(mask).tolist() == [1, 6]
    assert tm.positions_in_mask(torch.as_tensor(mask), min_cover=0.3).tolist() == [1, 6, 12]
    assert tm.positions_in_mask(mask, min_cover=1.0).tolist() == [1]
    soft = np.zeros((32, 32), np.float32)
    soft[24:32, 0:8] = 0.6  # cell (3, 0) covered 0.6 in area
    assert tm.positions_in_mask(soft).tolist() == [13]
    assert tm.positions_in_mask(soft, min_cover=0.7).tolist() == []


def test_positions_in_mask_size_not_a_multiple_of_the_grid(tiny_lens):
    lens = tiny_lens("llava_full")  # CLS at 1 is never in a mask; cell (r, c) at 2 + 4r + c
    tm = lens.token_map(sample_inputs("llava_full", lens))
    mask = np.zeros((10, 10), bool)  # cells are 2.5 x 2.5 px
    mask[0:3, :] = True  # grid row 0 (px 0-2.5) fully covered; row 1 (px 2.5-5) 0.5 px of 2.5 = 0.2
    assert tm.positions_in_mask(mask, min_cover=0.25).tolist() == [2, 3, 4, 5]
    assert tm.positions_in_mask(mask, min_cover=0.2).tolist() == [2, 3, 4, 5, 6, 7, 8, 9]
    mask = np.zeros((10, 10), bool)
    mask[0:4, 0:4] = True  # px 2.5-4 of a 2.5-5 cell is 0.6 of it: (0, 0) 1.0, (0, 1) and (1, 0) 0.6, (1, 1) 0.36
    assert tm.positions_in_mask(mask, min_cover=0.36).tolist() == [2, 3, 6, 7]
    assert tm.positions_in_mask(mask, min_cover=0.37).tolist() == [2, 3, 6]
    assert tm.positions_in_mask(mask, min_cover=0.61).tolist() == [2]


def test_positions_in_mask_validates(tiny_lens):
    lens = tiny_lens("llava")
    tm = lens.token_map(sample_inputs("llava", lens))
    with pytest.raises(ValueError, match="2-D"):
        tm.positions_in_mask(np.zeros((1, 32, 32), bool))
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="min_cover"):
            tm.positions_in_mask(np.zeros((32, 32), bool), min_cover=bad)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tm.positions_in_mask(np.full((32, 32), 2.0))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tm.positions_in_mask(np.full((32, 32), 255, np.uint8))  # an 8-bit image mask is not a coverage
    blip = tiny_lens("blip2")
    with pytest.raises(ValueError, match="no patch grid"):
        blip.token_map(sample_inputs("blip2", blip)).positions_in_mask(np.ones((32, 32), bool))
    with pytest.raises(ValueError, match="no patch grid"):
        blip.token_map(sample_inputs("blip2", blip)).to_grid(torch.zeros(10))


def test_answer_positions_skip_padding_and_eos(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)  # right padding; the tokenizer appends </s> to each prompt
    tm = lens.token_map(inputs)
    ans = tm.answer_positions()
    assert ans.tolist() == [22, 25]  # 1 + 16 image tokens + 6 and 9 words, minus one
    assert [tm.tokens[b][p] for b, p in enumerate(ans.tolist())] == ["?", "?"]
    assert tm.tokens[0][23:] == ["</s>", "<pad>", "<pad>", "<pad>"] and tm.tokens[1][26] == "</s>"
    blip = tiny_lens("blip2")  # "<q>x4 <s> what colour is it </s>": queries and </s> skipped
    assert blip.token_map(sample_inputs("blip2", blip)).answer_positions().tolist() == [8]
    image_only = lens.token_map({"input_ids": torch.tensor([[2] + [lens.model.config.image_token_id] * 16 + [3]])})
    with pytest.raises(ValueError, match="no text"):
        image_only.answer_positions()


# ------------------------------------------------------------------------------------ the shipped vlm organism
VLM_PROMPT = "<image> {question} answer :"  # the organism's inference prompt (its first training turn)


@pytest.fixture(scope="module")
def vlm():
    from mmlens import organisms

    if "vlm" not in organisms.available():
        pytest.skip("needs the shipped vlm organism")
    return organisms.load("vlm")


def test_vlm_positions_in_mask_of_a_world_scene(vlm):
    """48x48 scene, 8x8 patches of 6 px; "<s> CLS p0 .. p63 ...": cell (r, c) at 2 + 8r + c."""
    from mmlens.world import make_scene

    scene = make_scene(3, size=48, n_objects=2)
    inputs = vlm.processor(text=[VLM_PROMPT.format(question="what colour is the cross ?")], images=[scene.pil()],
                           return_tensors="pt")
    tm = vlm.token_map(inputs)
    assert tm.grids == [(8, 8)]
    for i in range(len(scene.objects)):
        for field, min_cover in (("masks", 0.5), ("masks", 0.25), ("coverage", 0.3)):
            mask = getattr(scene, field)[i]
            cover = mask.astype(np.float64).reshape(8, 6, 8, 6).mean(axis=(1, 3))
            rows, cols = np.nonzero(cover >= min_cover)
            expected = (2 + 8 * rows + cols).tolist()
            assert expected, (i, field)
            assert tm.positions_in_mask(mask, min_cover).tolist() == expected


def test_vlm_answer_position_is_before_the_appended_eos(vlm):
    """Right padding plus the `</s>` the tokenizer appends: the answer is read at ':', and the logits there equal
    those at the last position of the same prompt run alone without `</s>` (the organism's training prompt)."""
    from mmlens.world import make_scene

    scenes = [make_scene(11, size=48), make_scene(12, size=48)]
    questions = ("what shape is the red object ?", "how many objects are there ?")  # 7 and 6 words: padding
    prompts = [VLM_PROMPT.format(question=q) for q in questions]
    tok = vlm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "right"
    try:
        inputs = dict(vlm.processor(text=prompts, images=[s.pil() for s in scenes], return_tensors="pt",
                                    padding=True))
    finally:
        tok.padding_side = side
    tm = vlm.token_map(inputs)
    ans = tm.answer_positions()
    assert [tm.tokens[b][p] for b, p in enumerate(ans.tolist())] == [":", ":"]
    assert [tm.tokens[b][p + 1] for b, p in enumerate(ans.tolist())] == ["</s>", "</s>"]
    assert int(ans[1]) < inputs["input_ids"].shape[1] - 2  # the shorter row is padded: -1 would read <pad>
    with torch.no_grad():
        logits = vlm(inputs).logits[torch.arange(2), ans]
        for b in range(2):
            alone = dict(vlm.processor(text=[prompts[b]], images=[scenes[b].pil()], return_tensors="pt"))
            assert alone["input_ids"][0, -1] == tok.eos_token_id
            alone = {k: v[:, :-1] if k in ("input_ids", "attention_mask") else v for k, v in alone.items()}
            torch.testing.assert_close(logits[b], vlm(alone).logits[0, -1], atol=1e-4, rtol=1e-4)
    words = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
    assert words[1] == {1: "one", 2: "two", 3: "three"}[len(scenes[1].objects)]
