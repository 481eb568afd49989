"""Relevancy and gradient maps on the vlm organism: ask "what colour is the {shape} ?" about one of 2-3 objects and
see whether the map of the answer's logit points at that object (pointing game: the map's peak inside its mask).

Relevancy (Chefer et al. 2021) weights each attention map by its gradient and carries the LM's relevancy at the image
tokens through the vision tower; rollout (Abnar & Zuidema 2020) multiplies the attention maps alone; integrated
gradients and occlusion go through the pixels (Captum, input_ids held fixed). Chance is the asked object's share of
the image.

    .venv/bin/python examples/relevancy_maps.py
"""

from __future__ import annotations

import torch

import mmlens.organisms as organisms
from mmlens.methods.gradient_maps import gradient_map
from mmlens.methods.relevancy import relevancy
from mmlens.organisms.prompts import binding_scenes, vlm_inputs


def main(n_scenes: int = 12, seed: int = 10_000_900) -> dict:
    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    scenes, questions = binding_scenes(n_scenes, seed)
    truth = torch.tensor(tok.convert_tokens_to_ids([s.objects[0].colour for s in scenes]))
    inputs = vlm_inputs(vlm, scenes, questions)
    masks = torch.stack([torch.from_numpy(s.masks[0]) for s in scenes])  # the asked object, (scenes, 48, 48)

    maps = {"chefer": relevancy(vlm, inputs, truth),  # one map per scene: its own true colour
            "rollout": relevancy(vlm, inputs, truth, method="rollout"),
            "integrated_gradients": gradient_map(vlm, inputs, truth, steps=16, internal_batch_size=128),
            "occlusion": gradient_map(vlm, inputs, truth, method="occlusion", window=12)}  # 2x2 patches per window
    hits = {m: r.pointing_game(masks, 0).float().mean().item() for m, r in maps.items()}
    ious = {m: r.iou(masks, 0).mean().item() for m, r in maps.items()}
    chance = masks.float().mean().item()
    print(f"{n_scenes} scenes, 'what colour is the <shape> ?': does the map peak on that object? (chance {chance:.2f})")
    for m in maps:
        print(f"  {m:22s} pointing game {hits[m]:.2f}   mIoU {ious[m]:.2f}")
    question = maps["chefer"].token_scores(0, 0)[:-1]  # the last position is the answer's own (relevancy 1 + ...)
    words = sorted(((t, v) for t, v in question if not t.startswith("<")), key=lambda x: -x[1])[:3]
    print(f"  most relevant question words for scene 0 ({questions[0]!r}): {[w for w, _ in words]}")
    return {"pointing_game": hits, "miou": ious, "chance": chance, "results": maps, "top_words": words}


if __name__ == "__main__":
    main()
