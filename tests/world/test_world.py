"""The world: deterministic scenes, correct masks/captions/answers, pairs, spurious split, and the judge."""

from __future__ import annotations

import numpy as np
import pytest

from mmlens.world import (COLOURS, SHAPES, counterfactual_pair, detect, make_scene, single_object_scene,
                          spurious_split)
from mmlens.world.questions import KINDS


def test_scenes_are_deterministic_and_seed_dependent():
    a, b, c = make_scene(11), make_scene(11), make_scene(12)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    assert not np.array_equal(a.image, c.image)


def test_masks_boxes_and_pixels_agree():
    for seed in range(30):
        s = make_scene(seed)
        assert s.masks.shape == (len(s.objects), 48, 48)
        assert not (s.masks.sum(0) > 1).any()  # objects never overlap
        for obj, m, (x0, y0, x1, y1) in zip(s.objects, s.masks, s.boxes):
            ys, xs = np.nonzero(m)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x0, y0, x1, y1)
            inner = s.coverage[list(s.objects).index(obj)] > 0.99
            assert (s.image[inner] == COLOURS[obj.colour]).all()
            assert abs((x0 + x1) / 2 / 48 - obj.x) < 0.05


def test_questions_answers_follow_the_scene():
    s = make_scene(5, n_objects=3)
    qa = s.questions()
    kinds = {k for _, _, k in qa}
    assert kinds == set(KINDS)
    for q, a, k in qa:
        if k == "colour_of_shape":
            shape = q.split()[4]
            assert a == next(o.colour for o in s.objects if o.shape == shape)
        if k == "count":
            assert a == "three"
        if k == "exists":
            name = " ".join(q.split()[3:5])
            assert (a == "yes") == (name in {o.name for o in s.objects})
    assert sum(a == "no" for _, a, k in qa if k == "exists") == 1  # one absent object asked about


@pytest.mark.parametrize("attr", ["colour", "shape", "size", "position"])
def test_counterfactual_pairs_differ_in_exactly_one_attribute(attr):
    for seed in range(10):
        clean, corrupt = counterfactual_pair(seed, attr)
        i = corrupt.meta["changed_object"]
        for k, (a, b) in enumerate(zip(clean.objects, corrupt.objects)):
            fields = {f for f in ("shape", "colour", "size", "x", "y", "r") if getattr(a, f) != getattr(b, f)}
            if k != i:
                assert not fields
            else:
                expected = {"colour": {"colour"}, "shape": {"shape"}, "size": {"size", "r"}, "position": {"x"}}[attr]
                assert fields == expected
        changed = (clean.coverage[i] > 0) | (corrupt.coverage[i] > 0)
        assert np.array_equal(clean.image[~changed], corrupt.image[~changed])  # other pixels identical


def test_spurious_split_plants_the_cue_only_in_train():
    train, test = spurious_split(400, 400, seed=1)
    assert np.mean([s.meta["cue"] for s in train]) > 0.9
    assert np.mean([s.meta["cue"] for s in test]) < 0.4
    assert {s.label for s in test} == set(SHAPES)


def test_judge_reads_every_scene_exactly():
    for seed in range(200):
        s = make_scene(seed, background=None)
        got = sorted((d.colour, d.shape) for d in detect(s.image))
        assert got == sorted((o.colour, o.shape) for o in s.objects), seed


def test_judge_can_fail():
    """Noise is not an object; a grey image has no object; a wrong colour is called wrong."""
    rng = np.random.RandomState(0)
    assert detect(np.full((48, 48, 3), 40, np.uint8)) == []
    s = single_object_scene(3, colour="red", shape="circle")
    img = s.image.copy()
    img[s.masks[0]] = COLOURS["blue"]
    assert detect(img)[0].colour == "blue"
    noisy = (rng.rand(48, 48, 3) * 255).astype(np.uint8)
    found = detect(noisy)
    assert all(d.iou < 0.9 for d in found)
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((48, 48)))
