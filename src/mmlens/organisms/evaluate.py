"""Every number the organisms promise, measured on scenes from seeds no training pool uses.

Each function takes a Lens (or a folder) and returns a flat dict of metrics; `benchmarks/organisms.py` runs
them in full, the tests on small samples (and on random models, to show the metrics can fail).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch

from ..world import make_scene, single_object_scene
from ..world.scene import BACKGROUNDS, COLOURS, SHAPES
from .data import EVAL_SEED_OFFSET
from .prompts import PROMPTS, answer_first_tokens


def _lens(model_or_path):
    from ..lens import Lens
    from ..loading import load

    return model_or_path if isinstance(model_or_path, Lens) else load(model_or_path)


@torch.no_grad()
def evaluate_clip(model_or_path, n: int = 480, seed: int = 0, batch: int = 96) -> dict:
    """Zero-shot colour and shape of single-object scenes on random textures, via the organism's processor."""
    lens = _lens(model_or_path)
    prompts = PROMPTS
    rng = np.random.RandomState(EVAL_SEED_OFFSET + seed)
    scenes = [single_object_scene(EVAL_SEED_OFFSET + seed * 100_000 + k, background=BACKGROUNDS[rng.randint(4)],
                                  size=lens.model.config.vision_config.image_size) for k in range(n)]
    preds = []
    for i in range(0, n, batch):
        chunk = scenes[i : i + batch]
        inputs = lens.processor(text=prompts, images=[s.pil() for s in chunk], return_tensors="pt", padding=True)
        preds += lens(inputs).logits_per_image.argmax(-1).tolist()
    col = [prompts[p].split()[1] == s.objects[0].colour for p, s in zip(preds, scenes)]
    shp = [prompts[p].split()[2] == s.objects[0].shape for p, s in zip(preds, scenes)]
    return {"colour_acc": float(np.mean(col)), "shape_acc": float(np.mean(shp)),
            "class_acc": float(np.mean(np.array(col) & np.array(shp))), "n": n,
            "chance_colour": 1 / len(COLOURS), "chance_shape": 1 / len(SHAPES)}


@torch.no_grad()
def evaluate_vlm(model_or_path, n_scenes: int = 200, seed: int = 0, batch: int = 64) -> dict:
    """Accuracy of the first answer token per question kind; `binding` is colour-of-shape and shape-of-colour
    on scenes with two or more objects; `absent_no` is 'no' to objects that are not there."""
    lens = _lens(model_or_path)
    size = lens.model.config.vision_config.image_size
    items = []
    for k in range(n_scenes):
        s = make_scene(EVAL_SEED_OFFSET + seed * 100_000 + k, size=size, background=None)
        for q, a, kind in s.questions():
            items.append((s, q, a, kind))
    preds = []
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        preds += answer_first_tokens(lens, [s for s, *_ in chunk], [q for _, q, *_ in chunk])
    by = defaultdict(list)
    for (s, q, a, kind), p in zip(items, preds):
        ok = p == a
        by[kind].append(ok)
        if kind in ("colour_of_shape", "shape_of_colour") and len(s.objects) >= 2:
            by["binding"].append(ok)
        if kind == "exists":
            by["absent_no" if a == "no" else "present_yes"].append(ok)
    plain = ("binding", "absent", "present")
    out = {(k if k.startswith(plain) else f"{k}_acc"): float(np.mean(v)) for k, v in by.items()}
    out["overall"] = float(np.mean([p == a for (_, _, a, _), p in zip(items, preds)]))
    out["n_questions"] = len(items)
    return out


@torch.no_grad()
def evaluate_diffusion(model_or_path, per_prompt: int = 4, steps: int = 25, guidance: float = 1.5,
                       seed: int = 0) -> dict:
    """Sample every 'a {colour} {shape}' prompt and judge each image with the world's pixel judge; as many
    two-object prompts, judged right when both objects are found with their colour and shape (`pair_both_acc`,
    reported, no threshold)."""
    from ..world.judge import classify, detect

    lens = _lens(model_or_path)
    prompts = PROMPTS
    gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed)
    size = lens.model.unet.config.sample_size * lens.model.vae_scale_factor
    images = lens.model(prompts * per_prompt, num_inference_steps=steps, guidance_scale=guidance, generator=gen,
                        height=size, width=size, output_type="np").images
    col, shp = [], []
    for p, img in zip(prompts * per_prompt, images):
        c, s = classify((img * 255).round().astype(np.uint8))
        col.append(c == p.split()[1])
        shp.append(s == p.split()[2])
    pairs = _pair_prompts(len(prompts), EVAL_SEED_OFFSET + seed, size)
    gen = torch.Generator().manual_seed(EVAL_SEED_OFFSET + seed + 1)
    pair_images = lens.model(pairs, num_inference_steps=steps, guidance_scale=guidance, generator=gen, height=size,
                             width=size, output_type="np").images
    both = []
    for p, img in zip(pairs, pair_images):
        found = {(d.colour, d.shape) for d in detect((img * 255).round().astype(np.uint8))}
        w = p.split()
        both.append((w[1], w[2]) in found and (w[5], w[6]) in found)
    return {"colour_acc": float(np.mean(col)), "shape_acc": float(np.mean(shp)), "n": len(images),
            "pair_both_acc": float(np.mean(both)), "n_pairs": len(pairs), "steps": steps, "guidance": guidance}


def _pair_prompts(n: int, seed: int, size: int) -> list[str]:
    """'a {colour} {shape} and a {colour} {shape}' captions of seeded two-object scenes, objects left to right."""
    return [make_scene(seed + k, n_objects=2, size=size).short_caption for k in range(n)]
