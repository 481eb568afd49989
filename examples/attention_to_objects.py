"""Where the vlm organism looks when it answers: the answer position's attention to the asked object's image
tokens against another object's, per LM layer, with the objects located by the world's ground-truth masks.

    .venv/bin/python examples/attention_to_objects.py

The primitives: `vlm_inputs` (the organism's prompt), `token_map(...).positions_in_mask` (image tokens under a
pixel mask), `attn_rows=[-1]` (only the answer row of every attention map: the prompt ends at 'answer :'),
`TokenMap.to_grid` (a map over the image's patch grid).
"""

from __future__ import annotations

import numpy as np
import torch

import mmlens.organisms as organisms
from mmlens.organisms.prompts import vlm_inputs
from mmlens.world import make_scene


def main(n_scenes: int = 40, first_seed: int = 10_000_500) -> dict:
    vlm = organisms.load("vlm")
    names = vlm.hook_points("lm.blocks.*.attn.pattern")
    asked, other, used = np.zeros(len(names)), np.zeros(len(names)), 0
    for seed in range(first_seed, first_seed + n_scenes):
        scene = make_scene(seed, n_objects=2, background=None)  # held-out seeds: no training pool uses them
        target, distractor = scene.objects
        if target.shape == distractor.shape:
            continue  # "the square" must name one object
        inputs = vlm_inputs(vlm, [scene], [f"what colour is the {target.shape} ?"])
        tm = vlm.token_map(inputs)
        on_target, on_other = tm.positions_in_mask(scene.masks[0]), tm.positions_in_mask(scene.masks[1])
        if len(on_target) == 0 or len(on_other) == 0:
            continue  # an object too small to cover half a patch
        _, cache = vlm.run_with_cache(inputs, names=names, attn_rows=[-1])
        for i, name in enumerate(names):
            row = cache[name][0, :, 0].mean(0)  # answer row, mean over heads: (seq,)
            asked[i] += float(row[on_target].sum())
            other[i] += float(row[on_other].sum())
        used += 1
        if used == 1:
            best = cache[names[1]][0, :, 0].mean(0)
            grid = tm.to_grid(best)  # (8, 8) over the image, CLS set apart
            print(f"scene {seed}: {scene.caption}; block 1 attention from the answer over the image (x100):")
            print(np.array2string((grid * 100).round().to(torch.int64).cpu().numpy(), max_line_width=120))
    asked, other = asked / used, other / used
    print(f"{used} scenes; attention mass of the answer position (mean over heads):")
    for name, a, o in zip(names, asked, other):
        print(f"  {name:28s} asked object {a:.3f}   other object {o:.3f}   ratio {a / o:.2f}")
    return {"names": names, "asked": asked, "other": other, "n": used}


if __name__ == "__main__":
    main()
