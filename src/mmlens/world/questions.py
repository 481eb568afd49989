"""Question/answer pairs with one-word answers, generated from a scene's known facts."""

from __future__ import annotations

import numpy as np

from .scene import COLOURS, SHAPES, Scene

NUMBERS = {1: "one", 2: "two", 3: "three"}
KINDS = ("colour_of_shape", "shape_of_colour", "count", "left_right", "exists")


def left_right(a, b) -> tuple[str, str, str]:
    """'is the {a} left of the {b} ?' (by centre x)."""
    return f"is the {a.name} left of the {b.name} ?", "yes" if a.x < b.x else "no", "left_right"


def questions(scene: Scene, rng: np.random.RandomState) -> list[tuple[str, str, str]]:
    """(question, answer, kind) for every question type the scene supports.

    `exists` asks about one present object and one absent one (colour or shape swapped), so half its answers
    are "no": the hallucination probe.
    """
    objs = scene.objects
    qa: list[tuple[str, str, str]] = []
    shapes = [o.shape for o in objs]
    colours = [o.colour for o in objs]
    for o in objs:
        if shapes.count(o.shape) == 1:
            qa.append((f"what colour is the {o.shape} ?", o.colour, "colour_of_shape"))
        if colours.count(o.colour) == 1:
            qa.append((f"what shape is the {o.colour} object ?", o.shape, "shape_of_colour"))
    qa.append(("how many objects are there ?", NUMBERS[len(objs)], "count"))
    if len(objs) >= 2:
        a, b = rng.choice(len(objs), size=2, replace=False)
        oa, ob = objs[a], objs[b]
        qa.append(left_right(oa, ob))
    present = objs[rng.randint(len(objs))]
    qa.append((f"is there a {present.name} ?", "yes", "exists"))
    names = {o.name for o in objs}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in names]
    # prefer near misses: a present colour with another shape, or a present shape with another colour
    near = [n for n in absent if n.split()[0] in colours or n.split()[1] in shapes]
    pool = near or absent
    qa.append((f"is there a {pool[rng.randint(len(pool))]} ?", "no", "exists"))
    return qa
