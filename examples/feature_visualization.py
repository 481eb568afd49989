"""Feature visualisation on the clip organism (Olah et al. 2017): the image that most excites the joint space's
'red' direction, found by gradient ascent on a Fourier-parametrised image, beside the world images that excite it
most; the world's judge checks both.

    .venv/bin/python examples/feature_visualization.py
"""

from __future__ import annotations

import torch

import mmlens.organisms as organisms
from mmlens.methods.feature_viz import direction, visualize
from mmlens.world import single_object_scene
from mmlens.world.judge import classify
from mmlens.world.scene import SHAPES


def main(n: int = 2, steps: int = 96, pool: int = 48, k: int = 6, seed: int = 10_000_900) -> dict:
    clip = organisms.load("clip")
    texts = clip.processor(text=[f"a red {s}" for s in SHAPES], return_tensors="pt", padding=True)
    with torch.no_grad():
        text = clip.model.get_text_features(**texts.to(clip.device)).pooler_output.float()
    red = torch.nn.functional.normalize(text, dim=-1).mean(0)  # 'red', whatever the shape
    scenes = [single_object_scene(seed + i) for i in range(pool)]
    res = visualize(clip, direction("vision.proj", red), steps=steps, n=n, dataset=[s.image for s in scenes], k=k)
    print(res.summary())
    colours = [classify(im.numpy())[0] for im in res.images]
    top = [scenes[int(i)].objects[0].colour for i in res.example_indices]
    rise = (res.trace[-4:].mean(0) - res.trace[:4].mean(0)).tolist()
    fmt = lambda v: [round(x, 2) for x in v.tolist()]  # noqa: E731
    print(f"  objective over the steps: {fmt(res.trace[0])} -> {fmt(res.trace[-1])}; final {fmt(res.values)}")
    print(f"  the judge's colour of each visualisation: {colours}")
    print(f"  top {k} of {pool} world images by the same objective: {top} (values {fmt(res.example_values)})")
    return {"result": res, "colours": colours, "top_colours": top, "rise": rise}


if __name__ == "__main__":
    main()
