"""The demo's sparse-autoencoder section: the clip organism's image tower recorded into an activation store, a TopK
SAE fit from it, its metrics, and the dashboards of the features that mark each colour. Called by `demo.run_demo`."""

from __future__ import annotations

import tempfile

import torch

from . import organisms
from .organisms.prompts import PROMPTS
from .viz.report import Report
from .world import single_object_scene
from .world.scene import BACKGROUNDS, COLOURS as PALETTE

COLOURS = list(PALETTE)

SITE = "vision.blocks.2.resid_post"


def sae_section(report: Report, quick: bool = False, **load_kw) -> None:
    from .methods import SAE, SAEConfig, feature_dashboard, sae_metrics
    from .store import write_activations

    clip = organisms.load("clip", **load_kw)
    scenes = [single_object_scene(10_000_800 + i, background=BACKGROUNDS[i % 4]) for i in range(160 if quick else 400)]
    with tempfile.TemporaryDirectory() as tmp:
        store = write_activations(clip, [s.image for s in scenes], SITE, tmp, dtype="float32", progress=False)
        sae = SAE(SAEConfig(d_in=store.d[SITE], d_sae=256, k=8, batch_size=256, lr=1e-3, warmup_steps=20))
        sae.fit(store, name=SITE, tokens=8 * len(store), progress=False)
        held = [single_object_scene(10_000_870 + i) for i in range(48)]
        batch = dict(clip.processor(images=[s.pil() for s in held], return_tensors="pt"))
        m = sae_metrics(clip, sae, [batch], classes=PROMPTS, labels=[PROMPTS.index(s.short_caption) for s in held],
                        progress=False)
        report.text(f"A TopK SAE (256 features, 8 active per token) fit on {len(store)} tokens of {SITE} (CLS and "
                    f"8x8 patches of {len(scenes)} scenes, from an activation store that records each token's image "
                    f"and patch cell). On held-out scenes: explained variance {m.explained_variance:.2f}, zero-shot "
                    f"accuracy {m.downstream['clean']:.2f} clean and {m.downstream['spliced']:.2f} with the SAE's "
                    f"reconstruction in place of the block's output.")
        with torch.no_grad():
            codes = sae.encode(store.tensor(SITE))
        colour = torch.tensor([COLOURS.index(s.objects[0].colour) for s in scenes])[store.meta["example"]]
        means = torch.stack([codes[colour == i].mean(0) for i in range(len(COLOURS))])  # (colours, features)
        # per colour, the feature whose mean on its images' tokens most exceeds its mean on any other colour's
        feats = {c: int((means[i] - torch.cat([means[:i], means[i + 1:]]).max(0).values).argmax())
                 for i, c in enumerate(COLOURS)}
        shown = list(dict.fromkeys(feats[c] for c in (COLOURS[:2] if quick else COLOURS[:3])))
        dash = feature_dashboard(clip, sae, store, shown, k=8, images=[s.image for s in scenes], progress=False)
        report.text("The features that most mark images of " + ", ".join(f"{c} ({f})" for c, f in feats.items()) +
                    "; below, the first ones' top patches over the store, with their activation over the image.")
        dash.to_report(report, "SAE feature dashboards")
