"""Direct effects on the clip organism (TextSpan, Gandelsman et al. 2024): the image embedding split into what each
attention head and MLP writes straight into it, and how much zero-shot accuracy each part carries.

    .venv/bin/python examples/direct_effects.py
"""

from __future__ import annotations

import torch

import mmlens.organisms as organisms
from mmlens.methods import direct_effects
from mmlens.organisms.prompts import PROMPTS
from mmlens.world import single_object_scene


def main(n: int = 48, seed: int = 10_000_500) -> dict:
    clip = organisms.load("clip")
    backgrounds = ["plain", "stripes", "checker", "dots"]
    scenes = [single_object_scene(seed + k, background=backgrounds[k % 4]) for k in range(n)]
    inputs = clip.processor(text=PROMPTS, images=[s.pil() for s in scenes], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = clip.model(**clip.prepare(inputs))
    labels = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    de = direct_effects(clip, inputs)
    # the terms sum to the unnormalised image features; normalised they are the model's image_embeds
    gap = (torch.nn.functional.normalize(de.total(), dim=-1) - out.image_embeds.float().cpu()).abs().max().item()
    print(f"{de.summary()}; |normalised total - image_embeds| = {gap:.1e}")
    # each layer group's share of the true class's logit (direct path), mean over images
    names, groups = de.by_layer()
    part = torch.einsum("bgd,bd->bg", groups, out.text_embeds.float().cpu()[labels])
    share = (part / part.sum(1, keepdim=True)).mean(0)
    for name, v in zip(names, share.tolist()):
        print(f"  {name:16s} share of the true class's logit: {v:+.2f}")
    acc = de.mean_ablation(out.text_embeds, labels)
    print("  zero-shot accuracy left with one group mean-ablated:",
          {k: round(v, 2) for k, v in acc.items()})
    return {"gap": gap, "names": names, "share": share, "accuracy": acc}


if __name__ == "__main__":
    main()
