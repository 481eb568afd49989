"""`visualize` (feature visualisation) scored on the clip organism with the world's pixel judge."""

from __future__ import annotations

import numpy as np
import torch

from ._common import SEED, line

STEPS = 128
SEEDS = 5  # (a): independent random starts, one batch
SHAPE_SEEDS = 8  # (b): per shape unit (4 shapes: 32 runs), as many starts as (c)
GEN_SEEDS = 8  # (c): per shape unit with the generator prior (32 runs)


def _text_embeds(clip, texts):
    tok = {k: v.to(clip.device) for k, v in clip.processor(text=texts, return_tensors="pt", padding=True).items()}
    with torch.no_grad():
        return torch.nn.functional.normalize(clip.model.get_text_features(**tok).pooler_output.float(), dim=-1).cpu()


def _shape_units(clip, per: int = 8):
    """Rule: on held-out single-object scenes (every colour x shape, `per` each), for each shape the unit of
    `vision.blocks.*.mlp.pre` at the class token with the largest d' = (mean on that shape - mean on the others) /
    pooled std. mlp.pre (before the GELU) rather than mlp.post: a GELU neuron that is off at the start has almost no
    gradient, and ranking by either gives the same top units here."""
    from mmlens.methods.feature_viz import preprocessing
    from mmlens.world import single_object_scene
    from mmlens.world.scene import COLOURS, SHAPES

    scenes = [single_object_scene(SEED + 500 + k, colour=c, shape=s)
              for k in range(per) for c in COLOURS for s in SHAPES]
    img = torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2).float() / 255
    pv, _ = preprocessing(clip).pixel_values(img)
    names = clip.hook_points("vision.blocks.*.mlp.pre")
    got = {}
    with torch.no_grad(), clip.hooks(captures={n: [lambda v, ctx: got.__setitem__(ctx.name, v[:, 0].float().cpu())]
                                               for n in names}):
        clip.model.get_image_features(pixel_values=pv.to(clip.device, clip.dtype))
    lab = torch.tensor([SHAPES.index(s.objects[0].shape) for s in scenes])
    best = {}
    for name in names:
        a = got[name]
        for k, shape in enumerate(SHAPES):
            on, off = a[lab == k], a[lab != k]
            d = (on.mean(0) - off.mean(0)) / ((on.var(0) + off.var(0)) / 2).sqrt().clamp_min(1e-6)
            u = int(d.argmax())
            if shape not in best or d[u] > best[shape][0]:
                best[shape] = (float(d[u]), name, u)
    return best, len(scenes)


def score() -> list[dict]:
    """(a) The 'red' direction of the joint space (mean text embedding of 'a red {shape}') maximised through the
    image projection paints red: the judge's colour call on each visualisation. (b) Shape units (chosen from ground
    truth, `_shape_units`) visualised from the world's blank background: the judge's shape call matches the unit's
    shape more often than chance."""
    import mmlens.organisms as organisms
    from mmlens.methods.feature_viz import direction, unit, visualize
    from mmlens.world.judge import classify
    from mmlens.world.scene import BG_GREY, SHAPES

    clip = organisms.load("clip")
    src = ("Olah et al. 2017 (Feature Visualization, Distill): optimising the input for a unit / direction with a "
           "1/f Fourier parametrisation, colour decorrelation and transformation robustness shows what it responds to")

    red = _text_embeds(clip, [f"a red {s}" for s in SHAPES]).mean(0)
    res = visualize(clip, direction("vision.proj", red), steps=STEPS, n=SEEDS, seed=0)
    colours = [classify(im.numpy())[0] for im in res.images]
    red_frac = float(np.mean([c == "red" for c in colours]))
    rise = (res.trace[-8:].mean(0) - res.trace[:8].mean(0)).mean().item()
    out = [line("feature_viz", "clip", "red_direction_judged_red", red_frac, 0.8, n=SEEDS, steps=STEPS,
                colours=colours, objective_rise=round(rise, 3),
                source=src + "; objective: image embedding (vision.proj) . mean normalised text embedding of "
                "'a red {shape}'; judged by mmlens.world.judge.classify (largest saturated object's palette colour); "
                "bar: at least 0.8 of the independent random starts")]

    best, n_pool = _shape_units(clip)
    blank = np.full((SHAPE_SEEDS, 48, 48, 3), BG_GREY, np.uint8)
    calls, rates, rises = {}, {}, {}
    for shape in SHAPES:
        d, name, u = best[shape]
        r = visualize(clip, unit(name, u, position=0), steps=STEPS, n=SHAPE_SEEDS, seed=1, init=blank,
                      fill=BG_GREY / 255, decay_power=1.5)
        calls[shape] = [classify(im.numpy())[1] for im in r.images]
        rates[shape] = float(np.mean([c == shape for c in calls[shape]]))
        rises[shape] = round((r.trace[-8:].mean(0) - r.trace[:8].mean(0)).mean().item(), 3)
    chance = 1 / len(SHAPES)
    runs = SHAPE_SEEDS * len(SHAPES)
    balanced = float(np.mean(list(rates.values())))
    top = max(best, key=lambda s: best[s][0])
    units = {s: f"{best[s][1]}[{best[s][2]}] d'={best[s][0]:.2f}" for s in SHAPES}
    setting = (f"unit at the class token, {STEPS} steps from the blank world background (grey {BG_GREY}), Fourier "
               "decay 1.5, default jitter/scale/rotate with the background grey beyond the border; the judge's "
               "shape call (mmlens.world.judge.classify on the largest saturated object; none found = a miss)")
    out += [
        line("feature_viz", "clip", "shape_units_judged_shape_balanced", balanced, round(chance + 1 / runs, 4),
             n=runs, per_shape=rates, calls=calls, units=units, objective_rise=rises, pool=n_pool,
             source=src + "; the most selective unit per shape (d' on held-out world images, mlp.pre at CLS over "
             f"all blocks), {setting}; mean over the 4 shapes of the share of {SHAPE_SEEDS} starts judged as the "
             f"unit's shape (a judge biased to one shape scores chance); bar: chance 1/{len(SHAPES)} + one run"),
        line("feature_viz", "clip", "most_selective_unit_judged_shape", rates[top],
             round(chance + 1 / SHAPE_SEEDS, 4), n=SHAPE_SEEDS, shape=top, unit=units[top], calls=calls[top],
             source=src + f"; the single most selective shape unit over all shapes ({units[top]}), {setting}; "
             f"bar: chance 1/{len(SHAPES)} + one run"),
    ]
    out += _generator_prior(clip, best, units, top)
    return out


def _generator_prior(clip, best, units: dict[str, str], top: str) -> list[dict]:
    """(c) The same shape units with a generator prior (Nguyen et al. 2016, DGN-AM): the latent of the diffusion
    organism's VAE (trained on world images, never on the clip organism's units) is optimised from the blank
    background's latent plus noise, so the image stays a world-like picture; judged as in (b)."""
    import mmlens.organisms as organisms
    from mmlens.methods.feature_viz import unit, vae_decoder, vae_latents, visualize
    from mmlens.world.judge import classify
    from mmlens.world.scene import BG_GREY, SHAPES

    if "diffusion" not in organisms.available():
        return []
    vae = organisms.load("diffusion").model.vae
    z0 = vae_latents(vae, np.full((1, 32, 32, 3), BG_GREY, np.uint8))
    gen = torch.Generator().manual_seed(1)
    calls, rates = {}, {}
    for shape in SHAPES:
        _, name, u = best[shape]
        latent = z0.repeat(GEN_SEEDS, 1, 1, 1) + 0.5 * torch.randn(GEN_SEEDS, *z0.shape[1:], generator=gen)
        r = visualize(clip, unit(name, u, position=0), steps=STEPS, n=GEN_SEEDS, seed=1, param="generator",
                      generator=vae_decoder(vae), latent=latent, fill=BG_GREY / 255)
        calls[shape] = [classify(im.numpy())[1] for im in r.images]
        rates[shape] = float(np.mean([c == shape for c in calls[shape]]))
    chance, runs = 1 / len(SHAPES), GEN_SEEDS * len(SHAPES)
    setting = (f"generator prior: the diffusion organism's VAE decoder, latent from the blank background's + "
               f"N(0, 0.5^2), {STEPS} steps, default transforms, judged as above")
    return [
        line("feature_viz", "clip", "shape_units_judged_shape_balanced_generator_prior",
             float(np.mean(list(rates.values()))), round(chance + 1 / runs, 4), n=runs, per_shape=rates, calls=calls,
             units=units, source="Nguyen et al. 2016 (DGN-AM): optimising a generator's latent for a unit keeps the "
                                 "image on the data's manifold; the most selective unit per shape as in (b); "
                                 f"{setting}; bar as above: chance 1/4 + one run"),
        line("feature_viz", "clip", "most_selective_unit_judged_shape_generator_prior", rates[top],
             round(chance + 1 / GEN_SEEDS, 4), n=GEN_SEEDS, shape=top, unit=units[top], calls=calls[top],
             source=f"the single most selective shape unit ({units[top]}), {setting}; bar as above"),
    ]
