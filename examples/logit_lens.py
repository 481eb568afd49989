"""The logit lens on the vlm organism: at the answer position the asked colour is top-1 from block 1 on, and each
object's image tokens already decode as its colour before the LM has run a block (the organism's grounding).

    .venv/bin/python examples/logit_lens.py
"""

from __future__ import annotations

import mmlens.organisms as organisms
from mmlens.methods import logit_lens
from mmlens.organisms.prompts import vlm_inputs
from mmlens.world import make_scene


def main(seed: int = 10_000_321) -> dict:
    vlm = organisms.load("vlm")
    scene = make_scene(seed, n_objects=2, background="plain")
    target = scene.objects[0]
    inputs = vlm_inputs(vlm, [scene], [f"what colour is the {target.shape} ?"])
    print("scene:", scene.caption, "| asked:", target.shape, "| truth:", target.colour)

    # 1. the answer position, layer by layer (names: every residual stream, the embeddings first)
    names = ["lm.blocks.0.resid_pre", *vlm.hook_points("lm.blocks.*.resid_post")]
    at_answer = logit_lens(vlm, inputs, names=names, positions="answer")
    tops = [layer[0][0] for layer in at_answer.top_tokens(k=3)]
    for name, top in zip(names, tops):
        print(f"  {name:24s} top-3 at the answer: {top}")

    # 2. every position: P(target colour) over the image's patches, per layer, and inside the object's mask
    full = logit_lens(vlm, inputs, names=names)
    tm = vlm.token_map(inputs)
    inside = tm.positions_in_mask(scene.masks[0])
    p_inside = full.token_probs(target.colour)[:, 0, inside].mean(-1)
    for name, p in zip(names, p_inside.tolist()):
        print(f"  {name:24s} mean P({target.colour!r}) on the {target.shape}'s {len(inside)} patches: {p:.2f}")
    return {"top": tops, "truth": target.colour, "p_inside": p_inside, "grid": full.on_grid(full.token_probs(target.colour)[:, 0])}


if __name__ == "__main__":
    main()
