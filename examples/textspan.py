"""TextSpan and SpLiCE on the clip organism: name every attention head of its image tower by the texts that span
what it writes (Gandelsman et al. 2024), then write single images as a few concepts (Bhalla et al. 2024).

    .venv/bin/python examples/textspan.py
"""

from __future__ import annotations

import mmlens.organisms as organisms
from mmlens.methods.splice import splice
from mmlens.methods.textspan import textspan
from mmlens.world import single_object_scene
from mmlens.world.scene import COLOURS, SHAPES


def main(n: int = 96, seed: int = 10_000_700) -> dict:
    clip = organisms.load("clip")
    scenes = [single_object_scene(seed + k) for k in range(n)]
    images = [s.pil() for s in scenes]
    # the organism's text encoder only saw 'a {colour} {shape}': a word is the mean of its captions' embeddings
    colours = {c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS}
    shapes = {s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES}
    ts = textspan(clip, images, {**colours, **shapes}, heads="all", k=3)
    labels = ts.head_labels({"colour": list(colours), "shape": list(shapes)})
    print(ts.summary())
    for head, name in labels.items():
        texts = ", ".join(f"{t} {v:.2f}" for t, v in ts.top(head))
        print(f"  {head:20s} {str(name):7s} {texts}")
    sp = splice(clip, images, {**colours, **shapes})
    print(sp.summary())
    hits = 0
    for i, s in enumerate(scenes):
        top = sp.top(i, 2)
        hits += {c for c, _ in top} == {s.objects[0].colour, s.objects[0].shape}
        if i < 4:
            print(f"  {s.short_caption:18s} = " + " + ".join(f"{w:.2f} {c}" for c, w in sp.top(i, 4)))
    print(f"  top-2 concepts are the object's colour and shape in {hits}/{n} images")
    return {"labels": labels, "textspan": ts, "splice": sp, "hit_rate": hits / n}


if __name__ == "__main__":
    main()
