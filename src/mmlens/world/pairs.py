"""Counterfactual pairs: two scenes identical except for one attribute of one object (for patching)."""

from __future__ import annotations

import numpy as np

from .scene import COLOURS, SHAPES, SIZES, Scene, apart, make_scene

ATTRIBUTES = ("colour", "shape", "size", "position")


def counterfactual_pair(seed: int, attribute: str = "colour", *, index: int | None = None, **scene_kw) -> tuple[Scene, Scene]:
    """(clean, corrupted): `attribute` of object `index` changed, everything else (pixels included) equal.

    Colour and shape changes keep the scene's objects distinct; a position change mirrors the object
    horizontally (left <-> right) when that keeps it clear of the others, else it tries another seed.
    """
    if attribute not in ATTRIBUTES:
        raise ValueError(f"unknown attribute {attribute!r}; allowed: {ATTRIBUTES}")
    rng = np.random.RandomState(seed + 7_919)
    for attempt in range(100):
        clean = make_scene(seed + attempt * 100_003, **scene_kw)
        i = int(rng.randint(len(clean.objects))) if index is None else index
        o = clean.objects[i]
        if attribute == "colour":
            choices = [c for c in COLOURS if c not in {x.colour for x in clean.objects}]
            change = {"colour": str(rng.choice(choices))}
        elif attribute == "shape":
            choices = [s for s in SHAPES if s not in {x.shape for x in clean.objects}]
            if not choices:
                continue
            change = {"shape": str(rng.choice(choices))}
        elif attribute == "size":
            other = "small" if o.size == "large" else "large"
            change = {"size": other, "r": float(np.mean(SIZES[other]))}
        else:
            change = {"x": 1.0 - o.x}
        corrupted = clean.with_object(i, **change)
        if apart(corrupted.objects, corrupted.size):
            corrupted.meta.update(changed_object=i, attribute=attribute, before=getattr(o, attribute if attribute != "position" else "side"))
            return clean, corrupted
    raise RuntimeError(f"no valid {attribute} counterfactual near seed {seed}")
