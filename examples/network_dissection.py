"""Network dissection of the clip organism's image tower: name every MLP neuron with a colour or a shape, two ways.

CLIP-Dissect needs only the concept words and a contrastive labeller (here the organism labels its own tower);
NetDissect needs pixel masks (here the world's object masks of each colour and shape). Then: how often the two
agree, and the best 'red' neuron by IoU: what CLIP-Dissect calls it, and whether it really prefers red scenes
(world ground truth: its mean activation on red scenes against the others, in std units).

    .venv/bin/python examples/network_dissection.py
"""

from __future__ import annotations

import numpy as np

import mmlens.organisms as organisms
from mmlens.methods.dissection import clip_dissect, image_activations, net_dissect
from mmlens.world import single_object_scene
from mmlens.world.scene import BACKGROUNDS, COLOURS, SHAPES


def main(n: int = 160, names=("vision.blocks.2.mlp.post", "vision.blocks.3.mlp.post")) -> dict:
    clip = organisms.load("clip")
    scenes = [single_object_scene(10_002_000 + k, background=BACKGROUNDS[k % 4]) for k in range(n)]
    images = np.stack([s.image for s in scenes])
    concepts = [*COLOURS, *SHAPES]

    # CLIP-Dissect: the organism's text tower knows only 'a {colour} {shape}', so each concept is a prompt ensemble
    texts = {c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS} | {s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES}
    cd = clip_dissect(clip, images, texts, labeller=clip, names=names, similarity_kwargs={"top_k": 20},
                      progress=False)
    print(cd.summary())

    # NetDissect: the pixels of each colour's and each shape's objects
    masks = {c: np.stack([s.masks[0] & (c in (s.objects[0].colour, s.objects[0].shape)) for s in scenes])
             for c in concepts}
    nd = net_dissect(clip, images, masks, names=names, quantile=0.005, progress=False)
    print(nd.summary())

    agree = {name: float((cd.labels[i] == nd.labels[i]).float().mean()) for i, name in enumerate(cd.names)}
    for name, a in agree.items():
        counts = cd.counts()[cd.names.index(name)]
        common = ", ".join(f"{cd.concepts[j]} {int(counts[j])}" for j in counts.argsort(descending=True)[:3])
        print(f"  {name:26s} CLIP-Dissect and NetDissect agree on {a:.2f} of the units; most common: {common}")
    site, unit, iou = nd.best_units("red", 1)[0]
    said = cd.top_concepts(site, unit)[0][0]
    act = image_activations(clip, images, names=site)[site][:, unit]
    red = np.array([s.objects[0].colour == "red" for s in scenes])
    d = float((act[red].mean() - act[~red].mean()) / act.std())
    print(f"  best 'red' unit by IoU: {site}[{unit}] (IoU {iou:.2f}); CLIP-Dissect says {said!r}; on red scenes it "
          f"is {d:.1f} std above the others")
    maps = nd.unit_maps(clip, images[:4], [(site, unit)], thresholded=True)  # where it fires, as NetDissect saw it
    return {"clip_dissect": cd, "net_dissect": nd, "agree": agree, "red_unit": (site, unit, iou), "said": said,
            "red_selectivity": d, "maps": maps}


if __name__ == "__main__":
    main()
