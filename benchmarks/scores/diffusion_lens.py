"""`diffusion_lens` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import SEED, line


def score(per_prompt: int = 2, steps: int = 25) -> list[dict]:
    """diffusion: the share of samples the world's pixel judge reads as the prompted colour / shape, generating from
    each layer of the organism's text encoder (embeddings, block 0, block 1 = the pipeline's own)."""
    import numpy as np

    import mmlens.organisms as organisms
    from mmlens.methods import diffusion_lens
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world.judge import classify

    sd = organisms.load("diffusion")
    size = sd.model.unet.config.sample_size * sd.model.vae_scale_factor
    prompts = PROMPTS * per_prompt
    res = diffusion_lens(sd, prompts, num_inference_steps=steps, guidance_scale=1.5, height=size, width=size,
                         generator=torch.Generator().manual_seed(SEED))
    out = []
    for k, name in enumerate(res.names):
        said = [classify((img.numpy() * 255).round().astype(np.uint8)) for img in res.images[k]]
        last = k == len(res.names) - 1
        for what, i, bar in (("colour", 0, 0.90), ("shape", 1, 0.75)):
            acc = float(np.mean([s[i] == p.split()[1 + i] for s, p in zip(said, prompts)]))
            out.append(line("diffusion_lens", "diffusion", f"prompted_{what}@{name}", acc, bar if last else None,
                            layer=name, n=len(prompts), steps=steps,
                            source="last layer = the pipeline's own generation: the organism's card (colour 0.953, "
                                   "shape 0.828 at 8 per prompt) less a margin for 2 per prompt; earlier layers "
                                   "reported (Toker et al.: simple attributes emerge at early layers)"))
    return out
