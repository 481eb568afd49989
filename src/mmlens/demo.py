"""`mmlens demo`: the three shipped organisms through the hook layer, one section per family, then the causal
techniques (patching, attribution patching, attention knockout, steering) on the vlm organism, written up as one
self-contained HTML report. `quick` runs every section, smaller (fewer scenes, prompts and denoising steps)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from . import organisms
from .demo_native import native_section
from .demo_sae import sae_section
from .hooks.tokens import MODALITIES
from .methods import (SteeringVector, TunedLens, attribution_patching, diffusion_lens, diffusion_probe_features,
                      joint_lens, knockout, logit_lens, neuron_attribution, patch, pixel_probe, probe_features,
                      probe_sweep, steering_sweep, top_activating)
from .organisms.prompts import PROMPTS, answer_first_tokens, binding_scenes, colour_counterfactuals, vlm_inputs
from .viz.report import Report
from .world import make_scene, single_object_scene
from .world.judge import object_mask
from .world.scene import SHAPES

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
    return values.float().cpu().reshape(side, side).numpy()


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
        maps.append(tm.to_grid(cache[name][0, :, 0].mean(0)).float().cpu().numpy())  # (rows, cols) over the image
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


def _causal(report: Report, lens, quick: bool = False) -> None:
    """Interventions on the vlm organism: activation patching, its attribution estimate, attention knockout and a
    steering vector, each on held-out world scenes."""
    n = 8 if quick else 16
    clean, corrupt, regions, metric = colour_counterfactuals(lens, n, seed=10_000_800)
    res = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=regions, metric=metric)
    rec = res.recovery()
    col = {c: k for k, c in enumerate(res.columns)}
    report.text(f"Activation patching on {n} colour counterfactuals: the same scene with one object's colour changed "
                "(every other pixel equal), asked 'what colour is the <shape> ?' about it. Each cell restores one "
                "region of the clean run's residual stream (at the input of an LM block) into the corrupted run; the "
                "colour is the share of the logit difference logit(clean colour) - logit(corrupt colour) it brings "
                f"back. The object's own image tokens carry it at block 0 ({rec[0, col['object']]:.2f}, other "
                f"objects {rec[0, col['other objects']]:.2f}); by the last block the answer position does "
                f"({rec[-1, col['answer']]:.2f}) and the image tokens no longer "
                f"({max(float(rec[-1, col[c]]) for c in ('object', 'other objects', 'rest of image')):.2f}).")
    res.to_report(report, "activation patching: recovery per LM block input and region (colour counterfactuals)")

    kw = dict(positions=list(range(clean["input_ids"].shape[1])), metric=metric)  # every (block, position) site
    exact = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", **kw)
    est = attribution_patching(lens, clean, corrupt, "lm.blocks.*.resid_pre", **kw)
    r = float(torch.corrcoef(torch.stack([exact.values.flatten(), est.values.flatten()]))[0, 1])
    report.text(f"Attribution patching (Syed et al. 2023) estimates every patch from a forward pass of each run and "
                "one backward pass (first order: the activation difference times the metric's gradient). Over every "
                f"LM block input x single position of the same pairs, its estimates correlate with exact patching at "
                f"r = {r:.2f}.")
    est.to_report(report, f"attribution patching: estimated recovery per LM block input and position (r = {r:.2f} "
                          "with exact patching)")

    scenes, questions = binding_scenes(8 if quick else 16, 10_000_900)
    inputs = vlm_inputs(lens, scenes, questions)
    tok = lens.processor.tokenizer
    truth = torch.tensor(tok.convert_tokens_to_ids([s.objects[0].colour for s in scenes]), device=lens.device)
    seq = inputs["input_ids"].shape[1]
    question = (lens.token_map(inputs).modality == MODALITIES.index("text")) & (torch.arange(seq) < seq - 1)
    ko = knockout(lens, inputs, edges={"image->last": ("image", "last"), "question->last": (question, "last")},
                  metric=lambda out: (out.logits[:, -1].argmax(-1) == truth).float())
    acc = ko.values.mean(-1)
    report.text(f"Attention knockout (Geva et al. 2023) on {len(scenes)} scenes: the answer position's attention to "
                "the image, or to the question, is cut in one LM block at a time, and the colour answer's accuracy "
                f"is read (unedited {float(ko.baseline.mean()):.2f}; cutting image->last in block 0: "
                f"{float(acc[0, 0]):.2f}, in the last block: {float(acc[-1, 0]):.2f}; question->last in block 0: "
                f"{float(acc[0, 1]):.2f}).")
    ko.to_report(report, "attention knockout: colour-answer accuracy per LM block and cut edge", what="values")

    size = lens.model.config.vision_config.image_size
    k = 8 if quick else 16

    def one(colour: str, start: int, m: int) -> list:  # single objects of one colour, shapes in turn
        return [single_object_scene(s, colour=colour, shape=SHAPES[s % 4], size=size)
                for s in range(start, start + m)]

    def ask(scenes) -> dict:
        return vlm_inputs(lens, scenes, [f"what colour is the {s.objects[0].shape} ?" for s in scenes])

    vec = SteeringVector.mean_difference(lens, ask(one("red", 10_001_000, k)), ask(one("blue", 10_001_100, k)),
                                         names=["lm.blocks.1.resid_post", "lm.blocks.2.resid_post"],
                                         positions="last")
    test = one("blue", 10_001_200, k // 2) + one("green", 10_001_300, k // 2)
    red_id = tok.convert_tokens_to_ids("red")

    def p_red(out):
        return out.logits[:, -1].float().softmax(-1)[:, red_id]

    sweep = steering_sweep(lens, ask(test), vec, alphas=[0.0, 0.5, 1.0, 2.0], metric=p_red, positions=-1)
    report.text(f"Steering (activation addition, Turner et al. 2023): a red-minus-blue vector, the mean residual "
                f"stream at the answer position of questions about {k} red objects minus {k} blue ones, added with "
                f"strength alpha at the answer position of questions about {len(test)} other blue and green "
                f"objects. P('red') at the answer climbs from {float(sweep.baseline.mean()):.2f} to "
                f"{float(sweep.mean[0, -1]):.2f} at alpha {sweep.alphas[-1]:g} ({sweep.names[0]}).")
    sweep.to_report(report, "steering: P('red') per alpha, the red-minus-blue vector at the answer position")


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


DTYPES = ("float32", "bfloat16", "float16")


def load_options(device: str | None = None, dtype: str | torch.dtype | None = None) -> dict:
    """`organisms.load` keywords for a device and a dtype (a name from DTYPES or a torch dtype), checked."""
    kw: dict = {}
    if device is not None:
        kw["device"] = torch.device(device)  # raises on a malformed name
        if kw["device"].type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: CUDA is not available here (torch {torch.__version__})")
    if dtype is not None:
        name = str(dtype).replace("torch.", "")
        if name not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {DTYPES}")
        kw["dtype"] = getattr(torch, name)
    return kw


def run_demo(out: str | os.PathLike = "mmlens-report", quick: bool = False, device: str | None = None,
             dtype: str | torch.dtype | None = None) -> Path:
    """Load each organism, probe it, and return the path of the HTML report. `quick`: every section, smaller.
    `device` / `dtype` load the organisms there and so (e.g. "cuda", "bfloat16"); the default is float32 on CPU."""
    kw = load_options(device, dtype)
    require_organisms()
    torch.manual_seed(0)
    out = Path(out)
    report = Report("mmlens demo")
    report.text("Each section loads a model through mmlens.load (the real from_pretrained path), shows what it does "
                "on the world, lists its canonical hook points and summarises a cache."
                + (" Quick run: fewer scenes, prompts and denoising steps." if quick else "")
                + (f" Organisms loaded with {', '.join(f'{k}={v}' for k, v in kw.items())}." if kw else ""))
    for family, org in FAMILIES.items():
        t0 = time.perf_counter()
        lens = organisms.load(org, **kw)
        report.heading(f"{family}: {type(lens.model).__name__}, the `{org}` organism")
        cache = SECTIONS[family](report, lens, quick)
        report.text(f"{len(lens.hook_points())} hook points, folded by block index:")
        report.code(lens.describe())
        report.text(f"Cache: {cache!r}")
        report.table(cache.summary(), max_rows=20)
        report.text(f"section time {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    report.heading("causal: interventions on the `vlm` organism")
    report.text("Where the read-outs above say what is encoded, these edit the forward pass and watch the answer: "
                "restore activations from another run (patching), cut attention edges (knockout), add a direction "
                "(steering).")
    _causal(report, organisms.load("vlm", **kw), quick)
    report.text(f"section time {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    report.heading("multimodal-native: techniques for models that see images")
    report.text("Text explanations of image-tower heads and embeddings, unit labels, and where each prompt word acts "
                "in a generated image.")
    native_section(report, quick, **kw)
    report.text(f"section time {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    report.heading("sparse autoencoders: features of the `clip` organism's image tower")
    sae_section(report, quick, **kw)
    report.text(f"section time {time.perf_counter() - t0:.2f} s")
    return report.save(out / "index.html")
