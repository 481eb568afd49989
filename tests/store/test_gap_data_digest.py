"""Resuming checks the data, not only its length: every batch's content digest is in the part file, and a resumed
(or complete) store given other data of the same length (a changed pixel, prompt or token id, a reordering, a
shorter stream) is refused naming the first differing batch and its examples, before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmlens.store import write_activations
from mmlens.store.inputs import Batch, batch_digest
from mmlens.testing.tiny_models import sample_image

from .test_resume import Dying

NAME = "vision.blocks.1.resid_post"
PART = "parts/rank-00000-of-00001.json"


def _one_pixel_changed(img):
    a = np.array(img)
    a[5, 7, 1] ^= 1
    return a


def test_resume_with_other_data_of_the_same_length_is_refused(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    imgs = [sample_image(i) for i in range(6)]
    folder = tmp_path / "s"
    kw = dict(dtype="float32", batch_size=2, shard_tokens=30, progress=False)
    with pytest.raises(KeyboardInterrupt):
        write_activations(lens, Dying(imgs, 5), NAME, folder, **kw)
    part = json.loads((folder / PART).read_text())
    assert part["items_done"] == 4
    assert part["batches"] == [[2, batch_digest(Batch("image", imgs[0:2], torch.tensor([0, 1]), 2))],
                               [4, batch_digest(Batch("image", imgs[2:4], torch.tensor([2, 3]), 4))]]
    before = (folder / PART).read_text()
    for other, bad in (([*imgs[:3], _one_pixel_changed(imgs[3]), *imgs[4:]], r"batch 1 of rank 0 \(examples 2\.\.3"),
                       ([imgs[1], imgs[0], *imgs[2:]], r"batch 0 of rank 0 \(examples 0\.\.1"),  # reordered
                       ([sample_image(i + 10) for i in range(6)], r"batch 0 of rank 0")):
        with pytest.raises(ValueError, match=f"other data than the store was written from: {bad}.*content digest"):
            write_activations(lens, other, NAME, folder, **kw)
        assert (folder / PART).read_text() == before  # refused before writing anything
    resumed = write_activations(lens, [np.array(im) for im in imgs], NAME, folder, **kw)  # same pixels as arrays
    assert resumed.complete and len(resumed) == 6 * 17
    whole = write_activations(lens, imgs, NAME, tmp_path / "whole", **kw)
    assert torch.equal(resumed.tensor(NAME), whole.tensor(NAME))
    # a complete store is checked too: other data never gets the old store back silently
    with pytest.raises(ValueError, match=r"batch 2 of rank 0 \(examples 4\.\.5"):
        write_activations(lens, [*imgs[:4], imgs[5], imgs[4]], NAME, folder, **kw)
    again = write_activations(lens, imgs, NAME, folder, **kw)
    assert torch.equal(again.tensor(NAME), whole.tensor(NAME))


def test_prompts_token_ids_and_streams(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    name = "text.blocks.0.resid_post"
    texts = ["a red square", "red", "a blue circle", "blue"]
    kw = dict(batch_size=1, shard_tokens=1, progress=False)
    write_activations(lens, texts, name, tmp_path / "t", **kw)
    with pytest.raises(ValueError, match=r"batch 2 of rank 0 \(example 2, text items\)"):
        write_activations(lens, ["a red square", "red", "a blue square", "blue"], name, tmp_path / "t", **kw)
    tok = lens.processor.tokenizer
    enc = [dict(tok([t], return_tensors="pt")) for t in texts[:2]]
    write_activations(lens, enc, name, tmp_path / "p", **kw)
    changed = [enc[0], {**enc[1], "input_ids": enc[1]["input_ids"].flip(1)}]  # same shapes, other token order
    with pytest.raises(ValueError, match=r"batch 1 of rank 0 \(example 1, processed items\)"):
        write_activations(lens, changed, name, tmp_path / "p", **kw)
    write_activations(lens, [dict(e) for e in enc], name, tmp_path / "p", **kw)  # equal tensors: accepted

    def stream(items, alive=None):  # no len(): the item count is unknown, only the digests can tell
        for i, x in enumerate(items):
            if i == alive:
                raise KeyboardInterrupt("killed")
            yield x

    with pytest.raises(KeyboardInterrupt):
        write_activations(lens, stream(texts, alive=3), name, tmp_path / "g", **kw)
    with pytest.raises(ValueError, match="the data ends before the 3 items rank 0 already wrote"):
        write_activations(lens, stream(texts[:2]), name, tmp_path / "g", **kw)
    done = write_activations(lens, stream(texts), name, tmp_path / "g", **kw)
    assert done.complete and sorted(set(done.meta["example"].tolist())) == [0, 1, 2, 3]
