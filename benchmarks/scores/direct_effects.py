"""`direct_effects` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import SEED, line


def score(n: int = 240) -> list[dict]:
    """clip: TextSpan's finding (Gandelsman et al. 2024) that the last layers' attention carries the direct effect.

    The image embedding is split into per-head / per-MLP direct terms (`direct_effects`); mean-ablating terms over
    the held-out scenes (the direct path only, as TextSpan does) shows which ones the zero-shot answer needs.
    """
    import mmlens.organisms as organisms
    from mmlens.methods import DirectEffectsResult, direct_effects
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world import single_object_scene
    from mmlens.world.scene import BACKGROUNDS

    clip = organisms.load("clip")
    scenes = [single_object_scene(SEED + k, background=BACKGROUNDS[k % len(BACKGROUNDS)]) for k in range(n)]
    parts = []
    for i in range(0, n, 80):
        inputs = clip.processor(text=PROMPTS, images=[s.pil() for s in scenes[i:i + 80]], return_tensors="pt",
                                padding=True)
        parts.append(direct_effects(clip, inputs))
    with torch.no_grad():
        text = clip.model(**clip.prepare(inputs)).text_embeds.float().cpu()
    res = DirectEffectsResult(meta=parts[0].meta, labels=parts[0].labels, terms=torch.cat([p.terms for p in parts]),
                              by_position=torch.zeros(0), logit_scale=parts[0].logit_scale, logit_bias=0.0)
    labels = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    blocks = 1 + max(int(lb.split(".")[1]) for lb in res.labels if lb.startswith("blocks."))
    last2 = [f"blocks.{b}.attn" for b in (blocks - 2, blocks - 1)]
    is_last2 = lambda lb: any(lb.startswith(g + ".") for g in last2)  # noqa: E731
    acc = res.zero_shot_accuracy(text, labels)
    acc_keep_last2 = res.zero_shot_accuracy(text, labels, ablate=lambda lb: not is_last2(lb))
    acc_drop_last2 = res.zero_shot_accuracy(text, labels, ablate=is_last2)
    acc_all = res.zero_shot_accuracy(text, labels, ablate=lambda lb: True)
    # the correct class's margin over the mean text, split by component (the logit's direct attribution)
    sc = res.scores(text)  # (images, components, texts)
    margin = sc[torch.arange(n), :, labels] - sc.mean(-1)  # (images, components)
    share = (margin[:, [is_last2(lb) for lb in res.labels]].sum(1) / margin.sum(1)).mean().item()
    drop_share = (acc - acc_drop_last2) / max(acc - acc_all, 1e-9)
    src = ("Gandelsman et al. 2024 (TextSpan): mean-ablating everything but the last 4 layers' attention (of 24-32) "
           "costs little zero-shot accuracy, i.e. the late attention carries nearly all of the direct effect; here "
           f"the last 2 of {blocks} blocks")
    per = res.mean_ablation(text, labels)
    return [
        line("direct_effects", "clip", "margin_share_last2_attn", share, 0.5, n=n, last=last2,
             source=src + "; 0.5 = the majority of the correct class's direct margin (over the mean text)"),
        line("direct_effects", "clip", "ablation_drop_share_last2_attn", drop_share, 0.5, n=n, last=last2,
             accuracy=round(acc, 4), accuracy_all_ablated=round(acc_all, 4),
             accuracy_last2_attn_ablated=round(acc_drop_last2, 4),
             source=src + "; share of the full mean-ablation accuracy drop that ablating the last 2 attention "
             "blocks alone causes; 0.5 = the majority"),
        line("direct_effects", "clip", "zero_shot_acc_only_last2_attn_kept", acc_keep_last2, round(0.9 * acc, 4),
             n=n, accuracy=round(acc, 4), source=src + "; 0.9 x the model's own accuracy = 'small drop'"),
        line("direct_effects", "clip", "zero_shot_acc_all_mlp_ablated", per["mlp"], round(0.9 * acc, 4), n=n,
             accuracy=round(acc, 4), source="Gandelsman et al. 2024: mean-ablating all MLPs' direct terms costs "
             "little accuracy (the MLPs act through attention, not directly); 0.9 x the model's own accuracy"),
        line("direct_effects", "clip", "zero_shot_acc_per_group_ablated", per["none"], None, n=n,
             per_group={k: round(v, 4) for k, v in per.items()},
             source="reported, no bar: accuracy left with each layer group (and all attn / all mlp) mean-ablated"),
    ]
