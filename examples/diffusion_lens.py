"""The Diffusion Lens on the diffusion organism: prompts generated from each layer of its text encoder, judged by the
world's pixel judge. The embeddings alone give chance; the first block already carries the colour.

    .venv/bin/python examples/diffusion_lens.py
"""

from __future__ import annotations

import numpy as np
import torch

import mmlens.organisms as organisms
from mmlens.methods import diffusion_lens
from mmlens.world.judge import classify


def main(prompts=("a red square", "a blue circle", "a green triangle", "a yellow cross"), steps: int = 15) -> dict:
    sd = organisms.load("diffusion")
    size = sd.model.unet.config.sample_size * sd.model.vae_scale_factor
    res = diffusion_lens(sd, list(prompts), num_inference_steps=steps, guidance_scale=1.5, height=size, width=size,
                         generator=torch.Generator().manual_seed(0))
    colour_ok = {}
    for name, images in zip(res.names, res.images):
        said = [classify((im.numpy() * 255).round().astype(np.uint8)) for im in images]
        colour_ok[name] = float(np.mean([c == p.split()[1] for (c, _), p in zip(said, prompts)]))
        print(f"  {name:34s} judged: {said}")
    return {"colour_ok": colour_ok, "result": res}


if __name__ == "__main__":
    main()
