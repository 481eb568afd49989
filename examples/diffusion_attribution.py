"""Training-data attribution on the diffusion organism (D-TRAK, Zheng et al. 2024): which training images support
a generated image? TRAK's projected gradients of the UNet's cross-attention keys and values, with D-TRAK's output
||eps_theta||^2 over a few fixed (timestep, noise) draws per example.

    .venv/bin/python examples/diffusion_attribution.py

Checks shown: a training image used as the target ranks itself first; for generated images, the top training
examples carry the prompt's caption far above chance (the gradients go through the text, which pixel similarity
cannot see). The planted-fact benchmark (benchmarks/scores/diffusion_attribution.py) scores it against ground truth.
"""

from __future__ import annotations

import numpy as np
import torch

import mmlens.organisms as organisms
from mmlens.methods import TRAK, TRAKConfig, diffusion_examples, diffusion_square
from mmlens.organisms.prompts import PROMPTS
from mmlens.world import single_object_scene


def main(n_train: int = 96, n_targets: int = 6, k: int = 5, timesteps: int = 4, seed: int = 0) -> dict:
    sd = organisms.load("diffusion")
    scenes = [single_object_scene(20_000 + i, size=32, background="plain") for i in range(n_train)]
    captions = [s.short_caption for s in scenes]
    train = diffusion_examples(sd, np.stack([s.image for s in scenes]), captions, timesteps=timesteps, seed=seed)
    batches = [{key: v[i:i + 32] for key, v in train.items()} for i in range(0, n_train, 32)]
    # the parameters that read the caption; D-TRAK's output is no logit margin, so no (1 - p) weighting
    config = TRAKConfig(proj_dim=256, damping=0.1, weighting=False, params=["*attn2.to_k.*", "*attn2.to_v.*"])
    trak = TRAK(config).fit(sd, batches, diffusion_square, progress=False)
    print(f"{trak.n_params_} parameters -> {config.proj_dim} projected features per training image")

    own = {key: v[:n_targets] for key, v in train.items()}
    self_top1 = (trak.attribute(sd, own, diffusion_square).top(1)[1][:, 0] == torch.arange(n_targets)).float()
    print(f"training images as targets: {self_top1.mean():.2f} rank themselves first")

    prompts = [PROMPTS[(7 * j) % len(PROMPTS)] for j in range(n_targets)]
    out = sd.generate(prompts, generator=torch.Generator().manual_seed(seed), num_inference_steps=20,
                      guidance_scale=1.5, height=32, width=32, output_type="np", progress=False)[0]
    images = (np.asarray(out.images) * 255).round().astype(np.uint8)
    res = trak.attribute(sd, diffusion_examples(sd, images, prompts, timesteps=timesteps, seed=seed + 1),
                         diffusion_square)
    top = res.top(k)[1]
    same = float(np.mean([[captions[i] == p for i in row.tolist()] for row, p in zip(top, prompts)]))
    chance = float(np.mean([captions.count(p) / n_train for p in prompts]))
    print(f"generated images: {same:.2f} of each one's top {k} training images carry its prompt (chance {chance:.2f})")
    for p, row in list(zip(prompts, top))[:3]:
        print(f"  '{p}': top 3 = {[captions[i] for i in row[:3].tolist()]}")
    return {"self_top1": self_top1.mean().item(), "same_caption": same, "chance": chance, "result": res}


if __name__ == "__main__":
    main()
