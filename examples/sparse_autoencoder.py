"""A sparse autoencoder on the clip organism's image tower, end to end: record a site's activations with their
per-token metadata, fit a TopK SAE from the store, measure it (explained variance, L0, zero-shot accuracy with the
SAE spliced in), find the feature that marks red objects against the world's masks, look at its dashboard, and
round-trip it through SAELens's file format.

    .venv/bin/python examples/sparse_autoencoder.py
"""

from __future__ import annotations

import tempfile

import numpy as np
import torch

import mmlens.organisms as organisms
from mmlens.hooks.tokens import area_pool
from mmlens.methods import SAE, SAEConfig, feature_dashboard, sae_metrics
from mmlens.organisms.prompts import PROMPTS
from mmlens.store import write_activations
from mmlens.world import single_object_scene
from mmlens.world.scene import COLOURS as PALETTE

COLOURS = list(PALETTE)

SITE = "vision.blocks.2.resid_post"


def main(n: int = 400, seed: int = 10_000_900, d_sae: int = 256, k: int = 8, epochs: int = 8) -> dict:
    clip = organisms.load("clip")
    scenes = [single_object_scene(seed + i, background=("plain", "stripes", "checker", "dots")[i % 4])
              for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        # 1. the store: every token of the site (CLS + 8x8 patches) with its example, modality and patch cell
        store = write_activations(clip, [s.image for s in scenes], SITE, f"{tmp}/acts", dtype="float32",
                                  progress=False)
        print(f"store: {len(store)} tokens of {SITE}, width {store.d[SITE]}")
        # 2. fit from the store (shuffled reads, seeded); a TopK SAE keeps k features per token
        sae = SAE(SAEConfig(d_in=store.d[SITE], d_sae=d_sae, k=k, batch_size=256, lr=1e-3, warmup_steps=20))
        sae.fit(store, name=SITE, tokens=epochs * len(store), progress=False)
        # 3. how good a replacement is it, on held-out scenes?
        held = [single_object_scene(seed + 50_000 + i) for i in range(48)]
        batch = dict(clip.processor(images=[s.pil() for s in held], return_tensors="pt"))
        m = sae_metrics(clip, sae, [batch], classes=PROMPTS, labels=[PROMPTS.index(s.short_caption) for s in held],
                        progress=False)
        print(m.summary())
        # 4. which feature marks red objects? per patch the colour of the object covering it (world masks), then
        #    the feature whose mean on red patches most exceeds its mean on the patches of every other colour
        x = store.tensor(SITE)
        meta = store.meta
        with torch.no_grad():
            codes = sae.encode(x)
        colour = torch.full((len(store),), -1)
        for i, s in enumerate(scenes):
            cover = area_pool(torch.from_numpy(s.masks[0]), 8, 8).reshape(-1) >= 0.5
            mine = ((meta["example"] == i) & (meta["row"] >= 0)).nonzero().squeeze(1)
            cells = (meta["row"][mine] * 8 + meta["col"][mine]).long()
            colour[mine[cover[cells]]] = COLOURS.index(s.objects[0].colour)
        means = torch.stack([codes[colour == c].mean(0) for c in range(len(COLOURS))])  # (colours, features)
        r = COLOURS.index("red")
        feature = int((means[r] - torch.cat([means[:r], means[r + 1:]]).max(0).values).argmax())
        red = colour == r
        print(f"red feature: {feature} (mean {float(codes[red, feature].mean()):.2f} on red patches, at most "
              f"{float(torch.cat([means[:r], means[r + 1:]])[:, feature].max()):.2f} on another colour's)")
        # 5. its dashboard: top patches with overlays, histogram (renders as HTML in Jupyter)
        dash = feature_dashboard(clip, sae, store, [feature], k=8, images=[s.image for s in scenes], progress=False)
        top = dash.top(feature)
        in_red = float(np.mean([scenes[int(t["example"])].objects[0].colour == "red" for t in top]))
        on_red = float(np.mean([bool(red[int(t["index"])]) for t in top]))
        print(f"dashboard: {dash.summary()}; {in_red:.0%} of its top patches are in images of a red object, "
              f"{on_red:.0%} on the object itself (by block 2 attention has spread the colour over the patches)")
        # 6. SAELens's format, both ways
        sae.save_saelens(f"{tmp}/saelens")
        back = SAE.from_saelens(f"{tmp}/saelens")
        with torch.no_grad():
            same = float((back.encode(x[:256]) - codes[:256]).abs().max())
        print(f"SAELens round trip: max |code difference| {same:.1e}")
    return {"metrics": m, "feature": feature, "top_in_red_images": in_red, "top_on_red": on_red, "roundtrip_diff": same, "sae": sae}


if __name__ == "__main__":
    main()
