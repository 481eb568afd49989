"""`knockout` scored on the vlm organism (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import line, vlm_binding_scenes


def score(n: int = 96) -> list[dict]:
    """Knocking out image -> answer attention hurts the colour answer in the blocks where patching shows it forms
    (0-1: until block 2 the image tokens still carry it) and barely anywhere after."""
    import mmlens.organisms as organisms
    from mmlens.methods import knockout
    from mmlens.organisms.prompts import vlm_inputs

    vlm = organisms.load("vlm")
    scenes, questions, truth = vlm_binding_scenes(n, vlm.processor.tokenizer)
    acc, base = [], []
    for i in range(0, n, 32):
        inputs = vlm_inputs(vlm, scenes[i:i + 32], questions[i:i + 32])
        t = truth[i:i + 32]
        res = knockout(vlm, inputs, edges={"image->last": ("image", "last")},
                       metric=lambda out, t=t: (out.logits[:, -1].argmax(-1) == t).float())
        acc.append(res.values[:, 0])
        base.append(res.baseline)
    acc = torch.cat(acc, dim=1).mean(1)  # (blocks,)
    src = ("issue 11: knocking out image -> last in the layers where the answer forms hurts accuracy and elsewhere "
           "barely does (Geva et al. 2023; in VLMs Neo et al. 2024, Basu et al. 2024); the answer forms in blocks 0-1 "
           "(patching: from block 2 on only the answer position carries it)")
    out = [line("knockout", "vlm", "accuracy_unedited", torch.cat(base).mean(), 0.9, n=n,
                source="the organism's binding bar")]
    for k, name in enumerate(res.windows):
        early = k < 2
        out.append(line("knockout", "vlm", f"accuracy_image_to_last_knocked_out@{name}", acc[k],
                        0.9 if early else 0.95, not early, n=n, layer=name,
                        source=src + ("; bar: below 0.9 (the organism's own bar) = hurts" if early else
                                      "; bar: >= 0.95 = barely hurts")))
    return out
