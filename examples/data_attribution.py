"""Training-data attribution on the clip organism (TRAK, Park et al. 2023): which of its training images support an
answer? Fit the projected-gradient features once (resumable, stored as safetensors shards), then score any target.

    .venv/bin/python examples/data_attribution.py

Checks shown: a rerun on the same store skips every finished shard and gives identical features; a training image
used as the target ranks itself first (the features of the target are those of its own training example). For new
images the top examples and the representation-similarity baseline are printed side by side; the planted-fact
benchmark (benchmarks/scores/data_attribution.py) is where TRAK is scored against ground truth.
"""

from __future__ import annotations

import tempfile
import time

import torch

import mmlens.organisms as organisms
from mmlens.methods.data_attribution import TRAK, TRAKConfig, contrastive_margin, representation_similarity
from mmlens.organisms.data import single_object_pool, to_pixels
from mmlens.organisms.prompts import PROMPTS
from mmlens.world import single_object_scene


def main(n_train: int = 96, n_targets: int = 6, k: int = 5, seed: int = 10_000_700) -> dict:
    clip = organisms.load("clip")
    text = clip.processor.tokenizer(PROMPTS, padding="max_length", max_length=8, return_tensors="pt")
    scenes, images = single_object_pool(n_train, 0, 48)  # the first n_train images the organism trained on
    labels = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    pix = to_pixels(images)
    # a batch: processor-style inputs (the 24 captions shared) plus `labels`, each image's caption index
    batches = [{**text, "pixel_values": pix[i:i + 32], "labels": labels[i:i + 32]} for i in range(0, n_train, 32)]
    # weighting=False: the organism fits its training images almost perfectly (p ~ 1), and TRAK's (1 - p) weight
    # would leave only the few it fits worst with visible scores
    config = TRAKConfig(proj_dim=256, damping=0.1, weighting=False,
                        params=["vision_model.encoder.layers.3.mlp.fc2.weight", "visual_projection.weight"])
    with tempfile.TemporaryDirectory() as store:
        trak = TRAK(config).fit(clip, batches, contrastive_margin, store=store, progress=False)
        t0 = time.perf_counter()
        again = TRAK(config).fit(clip, batches, contrastive_margin, store=store, progress=False)  # all shards done
        rerun_seconds = time.perf_counter() - t0
    identical = torch.equal(again.features_, trak.features_)
    print(f"{trak.n_params_} parameters -> {config.proj_dim} projected features per example; rerun on the store: "
          f"{rerun_seconds:.2f} s, identical features: {identical}")

    own = {**batches[0], "pixel_values": batches[0]["pixel_values"][:n_targets],
           "labels": batches[0]["labels"][:n_targets]}
    self_top1 = (trak.attribute(clip, own, contrastive_margin).top(1)[1][:, 0] == torch.arange(n_targets)).float()
    print(f"training images as targets: {self_top1.mean():.2f} rank themselves first")

    targets = [single_object_scene(seed + j) for j in range(n_targets)]
    target_labels = torch.tensor([PROMPTS.index(s.short_caption) for s in targets])
    target = {**text, "pixel_values": to_pixels(torch.stack([torch.from_numpy(s.image) for s in targets]).numpy()),
              "labels": target_labels}
    res = trak.attribute(clip, target, contrastive_margin)
    base = representation_similarity(clip, target, batches, name="image_embeds")
    same = {}
    for name, r in (("trak", res), ("baseline", base)):
        same[name] = (labels[r.top(k)[1]] == target_labels[:, None]).float().mean().item()
        print(f"{name:9s}: {same[name]:.2f} of each new image's top {k} share its class (chance {1 / 24:.2f})")
    for j, s in enumerate(targets[:3]):
        print(f"  '{s.short_caption}': TRAK's top 3 = {[scenes[i].short_caption for i in res.top(3)[1][j].tolist()]}")
    return {"identical": identical, "rerun_seconds": rerun_seconds, "self_top1": self_top1.mean().item(),
            "same_class": same, "result": res, "baseline": base}


if __name__ == "__main__":
    main()
