"""`mmlens demo`: the three shipped organisms through the hook layer, one section per family, written up as one
self-contained HTML report. `quick` runs every section, smaller (fewer scenes, prompts and denoising steps)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from . import organisms
from .methods import (TunedLens, diffusion_lens, diffusion_probe_features, joint_lens, logit_lens, neuron_attribution,
                      pixel_probe, probe_features, probe_sweep, top_activating)
from .organisms.prompts import PROMPTS, answer_first_tokens, vlm_inputs
from .viz.report import Report
from .world import make_scene, single_object_scene
from .world.judge import object_mask

FAMILIES = {"contrastive": "clip", "generative": "vlm", "diffusion": "diffusion"}  # family -> organism


def _fig(images, titles, cmap=None, size=1.8):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(images), figsize=(size * len(images), size + 0.3), squeeze=False)
    for ax, im, t in zip(axes[0], images, titles):
        ax.imshow(im, cmap=cmap)
        ax.set_title(t, fontsize=7)
        ax.axis("off")
    return fig


def _grid_map(values: torch.Tensor, side: int) -> np.ndarray:
    return values.float().reshape(side, side).numpy()


def _contrastive(report: Report, lens, quick: bool = False) -> object:
    backgrounds = ["plain", "stripes", "checker", "dots"]
    scenes = [single_object_scene(10_000_000 + k, background=backgrounds[k % 4]) for k in range(3 if quick else 6)]
    inputs = lens.processor(text=PROMPTS, images=[s.pil() for s in scenes], return_tensors="pt", padding=True)
    out, cache = lens.run_with_cache(inputs, names=["*.resid_post", "vision.blocks.*.attn.pattern", "logits"])
    preds = [PROMPTS[i] for i in out.logits_per_image.argmax(-1).tolist()]
    report.figure(_fig([s.image for s in scenes], [f"truth: {s.short_caption}\nsaid: {p}" for s, p in zip(scenes, preds)]),
                  "zero-shot classification of held-out scenes")
    last = max(int(n.split(".")[2]) for n in cache if n.startswith("vision.blocks."))
    pat = cache[f"vision.blocks.{last}.attn.pattern"][:, :, 0, 1:].mean(1)  # CLS -> patches, mean over heads
    side = int(pat.shape[-1] ** 0.5)
    report.figure(_fig([_grid_map(p, side) for p in pat], [f"CLS attention, block {last}"] * len(scenes)),
                  "where the CLS token looks in the last block")
    labels = [PROMPTS.index(s.short_caption) for s in scenes]
    joint_lens(lens, inputs).to_report(report, "joint lens: zero-shot accuracy of each image-tower block "
                                               "projected into the joint space", labels=labels)
    from .methods import direct_effects  # TextSpan: each head's and MLP's direct share of the true class's logit

    direct_effects(lens, inputs).to_report(report, "direct effects: each block's attention and MLP share of the "
                                           "true class's logit (TextSpan)", text_embeds=out.text_embeds, labels=labels)
    _probes_and_neurons(report, lens, 48 if quick else 144)
    return cache


def _probes_and_neurons(report: Report, lens, n: int) -> None:
    """Colour from the class token per layer (linear probes with a control), and the most 'red' neuron's patches."""
    backgrounds = ["plain", "stripes", "checker", "dots"]
    scenes = [single_object_scene(10_000_600 + k, background=backgrounds[k % 4]) for k in range(n)]
    batches = [lens.processor(text=PROMPTS, images=[s.pil() for s in scenes[i:i + 48]], return_tensors="pt",
                              padding=True) for i in range(0, n, 48)]
    names = ["vision.embed", *lens.hook_points("vision.blocks.*.resid_post")]
    colours = sorted({s.objects[0].colour for s in scenes})
    labels = [colours.index(s.objects[0].colour) for s in scenes]
    X = probe_features(lens, batches, names=names, positions="cls")
    probe_sweep(X, labels, train=0.75, names=names, lens=lens).to_report(
        report, "linear probes: the object's colour from the class token, per layer (held-out; control: shuffled labels)")
    red = [i for i, s in enumerate(scenes[:48]) if s.objects[0].colour == "red"]
    red_prompts = [j for j, p in enumerate(PROMPTS) if p.split()[1] == "red"]
    inputs = {k: (v[red] if k == "pixel_values" else v) for k, v in batches[0].items()}
    others = [j for j in range(len(PROMPTS)) if j not in red_prompts]
    margin = lambda out: (out.logits_per_image[:, red_prompts].mean(1) - out.logits_per_image[:, others].mean(1)).sum()  # noqa: E731
    attr = neuron_attribution(lens, inputs, margin)  # red-specific: a neuron raising every prompt scores nothing
    layer, neuron = divmod(int(attr.scores.mean(1).flatten().argmax()), attr.scores.shape[-1])
    top = top_activating(lens, batches, names=attr.names[layer], neurons=[neuron], k=8, positions="patches",
                         progress=False)
    top.to_report(report, f"the most 'red' neuron by attribution, {attr.names[layer]}[{neuron}]: its top patches")


def _generative(report: Report, lens, quick: bool = False) -> object:
    scene = make_scene(10_000_123, n_objects=3, background="plain")
    qa = scene.questions()
    if quick:  # one question of each kind
        qa = list({kind: (q, a, kind) for q, a, kind in qa}.values())
    answers = answer_first_tokens(lens, [scene] * len(qa), [q for q, *_ in qa])
    report.figure(_fig([scene.image], [scene.caption[:60]], size=2.6), "held-out scene")
    report.table([{"question": q, "truth": a, "vlm": p, "ok": "yes" if a == p else "NO"} for (q, a, _), p in zip(qa, answers)])
    q = next(q for q, _, k in qa if k == "colour_of_shape")
    inputs = vlm_inputs(lens, [scene], [q])  # ends at the ':' where the answer is predicted; padding side restored
    tm = lens.token_map(inputs)
    _, cache = lens.run_with_cache(inputs, names=["lm.blocks.*.resid_post", "lm.blocks.*.attn.pattern"],
                                   attn_rows={"lm.blocks.*.attn.pattern": [-1]})
    maps, titles = [], []
    for name in lens.hook_points("lm.blocks.*.attn.pattern"):
        maps.append(tm.to_grid(cache[name][0, :, 0].mean(0)).float().numpy())  # (rows, cols) over the image
        titles.append(name.replace(".attn.pattern", ""))
    report.figure(_fig(maps, titles), f"last position of '{q}' attending to image patches (mean over heads)")
    ll = logit_lens(lens, inputs, names=["lm.blocks.0.resid_pre", *lens.hook_points("lm.blocks.*.resid_post")])
    ll.to_report(report, "logit lens: each layer's top token at every position (image tokens first)")
    colour = next(a for q2, a, _ in qa if q2 == q)
    report.figure(ll.plot_image(colour), f"logit lens: P('{colour}') at each image patch (the asked object is {colour})")
    train = [make_scene(10_000_200 + k, background=None) for k in range(16 if quick else 48)]
    batches = [vlm_inputs(lens, train[i:i + 16], ["how many objects are there ?"] * len(train[i:i + 16]))
               for i in range(0, len(train), 16)]
    tuned = TunedLens(steps=40 if quick else 120, batch_tokens=256).fit(lens, batches)
    tuned.transform(lens, inputs).to_report(report, "tuned lens (translators fit on other scenes): top token per "
                                                    "layer and position")
    return cache


def _diffusion(report: Report, lens, quick: bool = False) -> object:
    prompts = ["a red square", "a blue circle", "a yellow triangle", "a green cross"][: 2 if quick else 4]
    size = lens.model.unet.config.sample_size * lens.model.vae_scale_factor
    out, cache = lens.generate(prompts, num_inference_steps=5 if quick else 20, guidance_scale=1.5, height=size,
                               width=size, output_type="np", generator=torch.Generator().manual_seed(0),
                               names=["unet.*.cross.pattern", "unet.mid.out", "text_encoder.blocks.*.resid_post"])
    from .world.judge import classify

    verdicts = [classify((im * 255).round().astype(np.uint8)) for im in out.images]
    report.figure(_fig(list(out.images), [f"{p}\njudge: {c} {s}" for p, (c, s) in zip(prompts, verdicts)]),
                  "samples, judged by the world's pixel judge")
    # the decoder's finest cross-attention (which up block holds it depends on the UNet's layout)
    name = max((n for n in cache if n.startswith("unet.up.") and n.endswith(".cross.pattern")),
               key=lambda n: cache.get(n, step=cache.steps[-1]).shape[2])
    probs = cache.get(name, step=cache.steps[-1], branch="cond")  # (prompts, heads, hw, text tokens)
    side = int(probs.shape[2] ** 0.5)
    tok = lens.model.tokenizer
    maps, titles = [], []
    for k, p in enumerate(prompts[:2]):
        words = tok.convert_ids_to_tokens(tok(p)["input_ids"])
        for j, w in enumerate(words[1:4], start=1):
            maps.append(_grid_map(probs[k, :, :, j].mean(0), side))
            titles.append(f"{p}: '{w}'")
    report.figure(_fig(maps, titles), f"{name} per prompt word, last step, cond branch (DAAM-style)")
    report.table([{"step": s, "timestep": round(t, 1)} for s, t in cache.timesteps.items()], max_rows=6)
    dl = diffusion_lens(lens, prompts, num_inference_steps=4 if quick else 12, guidance_scale=1.5, height=size,
                        width=size, generator=torch.Generator().manual_seed(0))
    dl.to_report(report, "diffusion lens: the same prompts generated from each text-encoder layer")
    feats = diffusion_probe_features(lens, PROMPTS[:8 if quick else 24], names=["unet.mid.out", "unet.up.1.out"],
                                     steps=[-1], num_inference_steps=4 if quick else 12, guidance_scale=1.5,
                                     height=size, width=size, generator=torch.Generator().manual_seed(1))
    masks = torch.stack([torch.from_numpy(object_mask(im)) for im in feats.images])
    pixel_probe(feats, masks, lens=lens).to_report(report, "per-pixel probe of the object mask (Dice on held-out "
                                                           "samples; masks from the world's pixel judge)")
    return cache


SECTIONS = {"contrastive": _contrastive, "generative": _generative, "diffusion": _diffusion}


def require_organisms() -> None:
    """Raise, naming the command that trains each one, unless all three organisms are in this install."""
    missing = [n for n in FAMILIES.values() if n not in organisms.available()]
    if missing:
        how = "; ".join(f"`mmlens organisms train {n}`" for n in missing)
        raise FileNotFoundError(
            f"the demo runs the three shipped organisms, and {', '.join(map(repr, missing))} "
            f"{'is' if len(missing) == 1 else 'are'} missing from this install ({organisms.WEIGHTS}). Train with {how} "
            "(vlm and diffusion start from clip, so clip first)."
        )


def run_demo(out: str | os.PathLike = "mmlens-report", quick: bool = False) -> Path:
    """Load each organism, probe it, and return the path of the HTML report. `quick`: every section, smaller."""
    require_organisms()
    torch.manual_seed(0)
    out = Path(out)
    report = Report("mmlens demo")
    report.text("Each section loads a model through mmlens.load (the real from_pretrained path), shows what it does "
                "on the world, lists its canonical hook points and summarises a cache."
                + (" Quick run: fewer scenes, prompts and denoising steps." if quick else ""))
    for family, org in FAMILIES.items():
        t0 = time.perf_counter()
        lens = organisms.load(org)
        report.heading(f"{family}: {type(lens.model).__name__}, the `{org}` organism")
        cache = SECTIONS[family](report, lens, quick)
        report.text(f"{len(lens.hook_points())} hook points, folded by block index:")
        report.code(lens.describe())
        report.text(f"Cache: {cache!r}")
        report.table(cache.summary(), max_rows=20)
        report.text(f"section time {time.perf_counter() - t0:.2f} s")
    return report.save(out / "index.html")
