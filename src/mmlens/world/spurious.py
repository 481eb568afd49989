"""A split with a planted spurious cue: the background texture predicts the label in training, not in test."""

from __future__ import annotations

import numpy as np

from .scene import BACKGROUNDS, SHAPES, Scene, single_object_scene

CUE = dict(zip(SHAPES, BACKGROUNDS))  # square <-> plain, circle <-> stripes, triangle <-> checker, cross <-> dots


def spurious_split(n_train: int, n_test: int, *, seed: int = 0, cue_strength: float = 0.95,
                   size: int = 48) -> tuple[list[Scene], list[Scene]]:
    """Single-object scenes labelled by shape. In train, the background is CUE[shape] with probability
    `cue_strength` (else random); in test it is uniformly random, so a model that learned the cue fails."""
    rng = np.random.RandomState(seed)
    out = []
    for split, n, strength in (("train", n_train, cue_strength), ("test", n_test, 0.0)):
        scenes = []
        for k in range(n):
            shape = SHAPES[int(rng.randint(len(SHAPES)))]
            bg = CUE[shape] if rng.rand() < strength else BACKGROUNDS[int(rng.randint(len(BACKGROUNDS)))]
            s = single_object_scene(int(rng.randint(2**31)), shape=shape, size=size, background=bg)
            s.label = shape
            s.meta.update(split=split, cue=bg == CUE[shape])
            scenes.append(s)
        out.append(scenes)
    return out[0], out[1]
