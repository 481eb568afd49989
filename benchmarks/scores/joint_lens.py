"""`joint_lens` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import SEED, line


def score(n: int = 240) -> list[dict]:
    """clip: zero-shot colour and shape accuracy of each image-tower layer projected into the joint space."""
    import mmlens.organisms as organisms
    from mmlens.methods import joint_lens
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world import single_object_scene
    from mmlens.world.scene import BACKGROUNDS

    clip = organisms.load("clip")
    scenes = [single_object_scene(SEED + k, background=BACKGROUNDS[k % len(BACKGROUNDS)]) for k in range(n)]
    correct_c, correct_s = [], []
    for i in range(0, n, 80):
        chunk = scenes[i:i + 80]
        inputs = clip.processor(text=PROMPTS, images=[s.pil() for s in chunk], return_tensors="pt", padding=True)
        res = joint_lens(clip, inputs)
        pred = res.logits.argmax(-1)  # (layers, images)
        said = [[PROMPTS[p].split() for p in layer] for layer in pred.tolist()]
        correct_c.append(torch.tensor([[w[1] == s.objects[0].colour for w, s in zip(layer, chunk)] for layer in said]))
        correct_s.append(torch.tensor([[w[2] == s.objects[0].shape for w, s in zip(layer, chunk)] for layer in said]))
    out = []
    for what, corr, bar in (("colour", correct_c, 0.95), ("shape", correct_s, 0.90)):
        acc = torch.cat(corr, dim=1).float().mean(1)
        last = len(res.names) - 1
        for k, (name, a) in enumerate(zip(res.names, acc.tolist())):
            out.append(line("joint_lens", "clip", f"zero_shot_{what}@{name}", a, bar if k == last else None,
                            layer=name, n=n, source="the organism's own bar at the last layer (it must equal the "
                            "model's zero-shot accuracy); earlier layers reported, no bar"))
    return out
