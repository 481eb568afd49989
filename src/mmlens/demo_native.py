"""The demo's multimodal-native section: techniques that exist only for models that see images (TextSpan, SpLiCE,
network dissection, cross-attention word maps, relevancy and gradient maps, feature visualisation), each on the
organism it fits, on held-out world scenes. Called by `demo.run_demo`; kept apart so each file has one job."""

from __future__ import annotations

import numpy as np
import torch

from . import organisms
from .organisms.prompts import PROMPTS
from .viz.report import Report
from .world import single_object_scene
from .world.judge import object_mask
from .world.scene import COLOURS, SHAPES

# every colour / shape word as the mean of the captions holding it: the organisms' text towers saw only captions
WORDS = {**{c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS}, **{s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES}}


def _contrastive(report: Report, clip, quick: bool) -> None:
    from .methods import clip_dissect, splice, text_segmentation, textspan

    pool = [single_object_scene(10_000_700 + k).pil() for k in range(48 if quick else 96)]
    ts = textspan(clip, pool, WORDS, heads="all", k=3)
    labels = ts.head_labels({"colour": list(COLOURS), "shape": list(SHAPES)})
    named = {kind: [h for h, lb in labels.items() if lb == kind] for kind in ("colour", "shape")}
    report.text(f"TextSpan (Gandelsman et al. 2024) names each image-tower head by the few words that span what it "
                f"writes into the image embedding: {len(named['colour'])} heads read as colour heads "
                f"({', '.join(named['colour'][:3])}), {len(named['shape'])} as shape heads.")
    ts.to_report(report, "TextSpan: each head's text basis and the variance it explains")
    scenes = [single_object_scene(10_000_750 + k) for k in range(4)]
    seg = text_segmentation(clip, [s.pil() for s in scenes], {c: WORDS[c] for c in COLOURS})
    miou = float(seg.iou(np.stack([s.masks[0] for s in scenes]), [s.objects[0].colour for s in scenes]).mean())
    seg.to_report(report, f"TextSpan's patch decomposition as a zero-shot segmenter: each colour word's map "
                          f"(IoU of the object's own colour with its mask: {miou:.2f})")
    sp = splice(clip, pool, WORDS)
    report.text("SpLiCE (Bhalla et al. 2024) writes each image embedding as a sparse non-negative sum of concept "
                f"embeddings: {float(sp.l0().mean()):.1f} concepts per image on average, reconstruction cosine "
                f"{float(sp.cosine.mean()):.2f}; first image: {sp.top(0, 3)}.")
    sp.to_report(report, "SpLiCE: sparse concept codes of held-out single-object scenes")
    from .methods import direction, encode_texts, visualize  # Olah et al. 2017: the image that most excites 'red'

    red = encode_texts(clip, {"red": WORDS["red"]})[1][0]
    fv = visualize(clip, direction("vision.proj", red), steps=48 if quick else 128, n=2 if quick else 4,
                   dataset=[s.image for s in scenes + [single_object_scene(10_000_760 + k) for k in range(12)]], k=4)
    fv.to_report(report, "feature visualisation: the image that most excites the 'red' direction of the joint "
                         "space, beside the held-out scenes that do")
    from .methods import TRAK, contrastive_margin  # which training images support each answer (Park et al. 2023)
    from .organisms.data import single_object_pool

    train, imgs = single_object_pool(32 if quick else 64, 0, 48)
    batch = dict(clip.processor(text=PROMPTS, images=list(imgs), return_tensors="pt", padding=True))
    batch["labels"] = torch.tensor([PROMPTS.index(s.short_caption) for s in train])
    trak = TRAK(proj_dim=128, damping=0.1, weighting=False, params=["visual_projection.weight"])
    trak.fit(clip, [batch], contrastive_margin, progress=False)
    query = dict(clip.processor(text=PROMPTS, images=[s.pil() for s in scenes], return_tensors="pt", padding=True))
    query["labels"] = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    att = trak.attribute(clip, query, contrastive_margin)
    report.heading("training-data attribution (TRAK): the training images that most support each answer", level=3)
    report.fragment(att.html(k=4, train_images=imgs, train_labels=[s.short_caption for s in train],
                              target_images=[s.image for s in scenes]))
    ds = [single_object_scene(10_000_800 + k) for k in range(48 if quick else 160)]
    clip_dissect(clip, np.stack([s.image for s in ds]), WORDS, labeller=clip, similarity_kwargs={"top_k": 10},
                 progress=False).to_report(report, "network dissection (CLIP-Dissect): the concept each image-tower "
                                                   "MLP neuron is labelled with, per block")


def _generative(report: Report, vlm, quick: bool) -> None:
    from .methods import gradient_map, relevancy
    from .organisms.prompts import binding_scenes, vlm_inputs

    scenes, questions = binding_scenes(2 if quick else 4, 10_000_950)
    inputs = vlm_inputs(vlm, scenes, questions)
    truth = torch.tensor(vlm.processor.tokenizer.convert_tokens_to_ids([sc.objects[0].colour for sc in scenes]))
    masks = np.stack([sc.masks[0] for sc in scenes])
    rel = relevancy(vlm, inputs, truth)
    ig = gradient_map(vlm, inputs, truth, steps=8 if quick else 16)
    report.text("Relevancy (Chefer et al. 2021) and integrated gradients (through Captum) of the true colour's logit "
                "at the answer, for 'what colour is the <shape> ?': the map should sit on the asked object. Pointing "
                f"game (the map's peak inside the object): relevancy {float(rel.pointing_game(masks, 0).float().mean()):.2f}, "
                f"integrated gradients {float(ig.pointing_game(masks, 0).float().mean()):.2f} "
                f"(chance {float(masks.mean()):.2f}).")
    rel.to_report(report, "relevancy of the answer over the image, through the vision tower")
    ig.to_report(report, "integrated gradients of the answer over the pixels (black baseline)")


def _diffusion(report: Report, sd, quick: bool) -> None:
    from .methods import word_maps

    prompts = list(PROMPTS[:: 5 if quick else 3])  # a stride prime to the 4 shapes: every colour and shape
    res = word_maps(sd, prompts, num_inference_steps=8 if quick else 20, guidance_scale=1.5,
                    generator=torch.Generator().manual_seed(5))
    masks = torch.from_numpy(np.stack([object_mask(im.numpy()) for im in res.images]))
    ious = res.iou(masks, [p.split()[2] for p in prompts])[masks.flatten(1).any(1)]
    report.text(f"Cross-attention word maps (DAAM, Tang et al. 2023): the attention each prompt word receives, summed "
                f"over heads, layers and steps. The shape word's map against the object the judge finds: mIoU "
                f"{float(ious.mean()):.2f} over {len(ious)} samples (the object covers {float(masks.float().mean()):.2f} "
                "of the image).")
    shown = [w for w in res.labels if w in COLOURS][:2] + [w for w in res.labels if w in SHAPES][:2]
    res.to_report(report, "word maps: where each prompt word acts", labels=shown)


def native_section(report: Report, quick: bool = False, **load_kw) -> None:
    """TextSpan, SpLiCE and dissection on the clip organism; relevancy and gradient maps on the vlm organism; word
    maps on the diffusion organism. `load_kw`: `organisms.load` keywords (device, dtype)."""
    _contrastive(report, organisms.load("clip", **load_kw), quick)
    _generative(report, organisms.load("vlm", **load_kw), quick)
    _diffusion(report, organisms.load("diffusion", **load_kw), quick)
