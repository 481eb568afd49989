"""`relevancy` and `gradient_map` scored on the organisms' ground truth (see benchmarks/groundtruth.py): does the map
of the answer's logit point at the object the answer is about?"""

from __future__ import annotations

import numpy as np
import torch

from ._common import SEED, line, vlm_binding_scenes

METHODS = ("chefer", "rollout", "saliency", "smoothgrad", "integrated_gradients", "grad_cam", "occlusion")


def _run(lens, inputs, target, method):
    from mmlens.methods.gradient_maps import gradient_map
    from mmlens.methods.relevancy import relevancy

    if method in ("chefer", "rollout"):
        return relevancy(lens, inputs, target, method=method)
    kw = {"internal_batch_size": 256} if method in ("integrated_gradients", "occlusion", "smoothgrad") else {}
    if method == "integrated_gradients":
        kw["steps"] = 16  # the map's shape, not its completeness, is scored here
    return gradient_map(lens, inputs, target, method=method, **kw)


def _chance_iou(res, masks: np.ndarray, draws: int = 10, threshold: float | str = 0.4) -> float:
    """mIoU of random maps at the method's own resolution, segmented by the same rule (`threshold`), and of the
    whole image marked: the better of the two is what a map that knows nothing scores."""
    from mmlens.methods.maps import MapResult

    g = torch.Generator().manual_seed(0)
    rand = [MapResult(meta={}, maps=torch.rand(res.maps[:, :1].shape, generator=g), images=res.images, labels=["r"],
                      method="random").iou(masks, 0, threshold).mean().item() for _ in range(draws)]
    return max(float(np.mean(rand)), float(masks.mean()))


def _lines(organism: str, results: dict, masks: np.ndarray, n: int, what: str) -> list[dict]:
    area = float(masks.mean())
    out = []
    src = ("Chefer et al. 2021, Abnar & Zuidema 2020, Simonyan et al. 2014, Smilkov et al. 2017, Sundararajan et al. "
           "2017, Selvaraju et al. 2017, Zeiler & Fergus 2014: a map of the answer's logit should point at the "
           "evidence; here " + what)
    for method, res in results.items():
        tech = "relevancy" if method in ("chefer", "rollout") else "gradient_map"
        hit = res.pointing_game(masks, 0).float().mean().item()
        miou = res.iou(masks, 0).mean().item()
        chance = _chance_iou(res, masks)
        out.append(line(tech, organism, f"pointing_game_{method}", hit, round(area, 4), n=n, method=method,
                        map_size=list(res.maps.shape[-2:]),
                        source=src + f"; bar: chance = mean mask area / image area = {area:.3f} (a peak placed at "
                        "random hits the mask that often)"))
        out.append(line(tech, organism, f"miou_{method}", miou, None, n=n, method=method, chance=round(chance, 4),
                        source="reported, no bar: " + src + "; mIoU of the map thresholded at 0.4 of its range "
                        "(DAAM's rule for attention maps, scored in word_maps; a heavy-tailed pixel-gradient map keeps "
                        f"only its few peak pixels by it); chance = {chance:.3f}, the better of random maps at the "
                        "same resolution and the whole image marked"))
        chance_mean = _chance_iou(res, masks, threshold="mean")
        out.append(line(tech, organism, f"miou_mean_threshold_{method}", res.iou(masks, 0, "mean").mean().item(),
                        round(chance_mean, 4), n=n, method=method,
                        source=src + "; mIoU of the map thresholded at its own mean: the segmentation test of Chefer "
                        "et al. 2021, which binarises every method it compares (relevancy, rollout, Grad-CAM, "
                        f"gradients) this way; bar: chance by the same rule = {chance_mean:.3f}"))
    return out


def score(n: int = 48, methods: tuple[str, ...] = ("chefer", "rollout")) -> list[dict]:
    """clip: single-object scenes, the map of the true class text's logit against the object's mask. vlm: 2-3
    objects, "what colour is the {shape} ?" about object 0, the map of the true colour's logit against object 0's mask
    (the other objects are distractors the map should avoid)."""
    import mmlens.organisms as organisms
    from mmlens.organisms.prompts import PROMPTS, vlm_inputs
    from mmlens.world import single_object_scene
    from mmlens.world.scene import BACKGROUNDS

    out = []
    clip = organisms.load("clip")
    scenes = [single_object_scene(SEED + k, background=BACKGROUNDS[k % len(BACKGROUNDS)]) for k in range(n)]
    truth = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    masks = np.stack([s.masks[0] for s in scenes])
    results: dict[str, list] = {m: [] for m in methods}
    for i in range(0, n, 32):
        inputs = clip.processor(text=PROMPTS, images=[s.pil() for s in scenes[i:i + 32]], return_tensors="pt",
                                padding=True)
        for m in methods:
            results[m].append(_run(clip, inputs, truth[i:i + 32], m))
    out += _lines("clip", {m: _cat(r) for m, r in results.items()}, masks, n,
                  "clip organism, one object per image (textured backgrounds), target: the true 'a {colour} {shape}' "
                  "text's image-text logit")

    vlm = organisms.load("vlm")
    scenes, questions, truth = vlm_binding_scenes(n, vlm.processor.tokenizer)
    masks = np.stack([s.masks[0] for s in scenes])
    results = {m: [] for m in methods}
    for i in range(0, n, 32):
        inputs = vlm_inputs(vlm, scenes[i:i + 32], questions[i:i + 32])
        for m in methods:
            results[m].append(_run(vlm, inputs, truth[i:i + 32], m))
    out += _lines("vlm", {m: _cat(r) for m, r in results.items()}, masks, n,
                  "vlm organism, 2-3 objects, 'what colour is the {shape} ?' about object 0, target: the true colour's "
                  "logit at the answer position; mask: object 0")
    return out



def score_gradient_maps(n: int = 48) -> list[dict]:
    """The same scenes and bars for Captum's gradient methods (`gradient_map`)."""
    return score(n, methods=("saliency", "smoothgrad", "integrated_gradients", "grad_cam", "occlusion"))


def _cat(parts):
    """One result from batches: maps and images concatenated (the evaluation needs only those)."""
    first = parts[0]
    if len(parts) == 1:
        return first
    from mmlens.methods.maps import MapResult

    return MapResult(meta=first.meta, maps=torch.cat([p.maps for p in parts]),
                     images=torch.cat([p.images for p in parts]), labels=first.labels, method=first.method)
