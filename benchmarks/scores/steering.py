"""Steering vectors and rank-one erasure scored on the organisms (see benchmarks/groundtruth.py).

vlm: a "red -> blue" vector, the mean activation at the answer position (the ':' of 'answer :') of one LM layer over
"what colour is the {shape} ?" about blue objects minus the same about red objects, built on held-out scenes. Added
(mode "add") at the answer position of new scenes whose asked object is red, it should turn their colour answers into
"blue", while "what shape is the red object ?" about the same objects keeps its answer under the same edit. alpha
is chosen on the vector-building scenes, never on the test scenes.

clip: projecting a red direction (red minus non-red images' mean class token) out of every position of one
vision block should erase "red" from zero-shot classification and leave shape alone.
"""

from __future__ import annotations

import warnings

import torch

from ._common import SEED, line

LAYER = "lm.blocks.1.resid_post"  # = lm.blocks.2.resid_pre: from block 2 on only the answer position carries colour
ALPHAS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
CLIP_LAYER = "vision.blocks.2.resid_post"


def _scenes_asking(colour: str, n: int, seed: int):
    """(scene, index) for n scenes of 2-3 distinct objects, one of them `colour` (the asked object)."""
    from mmlens.world import make_scene

    out = []
    while len(out) < n:
        s = make_scene(seed, background=None)
        seed += 1
        hit = [i for i, o in enumerate(s.objects) if o.colour == colour]
        if hit and len(s.objects) >= 2:
            out.append((s, hit[0]))
    return out


def _choose_alpha(flip: torch.Tensor, kept: torch.Tensor) -> int:
    """Index of the smallest alpha maximising min(colour answers flipped, shape answers kept)."""
    worse = torch.minimum(flip, kept)
    return int((worse >= worse.max() - 1e-9).nonzero()[0])


def score_vlm(n_build: int = 32, n_test: int = 64) -> list[dict]:
    import mmlens.organisms as organisms
    from mmlens.methods.steering import SteeringVector, steering_sweep
    from mmlens.organisms.prompts import vlm_inputs

    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    blue_id = tok.convert_tokens_to_ids("blue")

    def colour_q(items):
        return vlm_inputs(vlm, [s for s, _ in items], [f"what colour is the {s.objects[i].shape} ?" for s, i in items])

    def shape_q(items):
        return vlm_inputs(vlm, [s for s, _ in items], [f"what shape is the {s.objects[i].colour} object ?"
                                                        for s, i in items])

    def answers(out):
        return out.logits[:, -1].argmax(-1)

    def is_blue(out):
        return (answers(out) == blue_id).float()

    def unchanged(reference):
        return lambda out: (answers(out) == reference).float()

    build_red = _scenes_asking("red", n_build, SEED + 90_000)
    build_blue = _scenes_asking("blue", n_build, SEED + 91_000)
    test = _scenes_asking("red", n_test, SEED + 92_000)
    vec = SteeringVector.mean_difference(vlm, colour_q(build_blue), colour_q(build_red), names=LAYER,
                                         positions="last")
    # alpha: on the building scenes (their red-object colour and shape questions), never on the test scenes
    with torch.no_grad():
        build_shape_in = shape_q(build_red)
        build_shape = answers(vlm(build_shape_in))
    kw = dict(alphas=ALPHAS, positions=-1, mode="add")
    flip_b = steering_sweep(vlm, colour_q(build_red), vec, metric=is_blue, **kw).mean[0]
    kept_b = steering_sweep(vlm, build_shape_in, vec, metric=unchanged(build_shape), **kw).mean[0]
    k = _choose_alpha(flip_b, kept_b)
    alpha = ALPHAS[k]

    test_colour_in, test_shape_in = colour_q(test), shape_q(test)
    red_id = tok.convert_tokens_to_ids("red")
    shape_truth = torch.tensor(tok.convert_tokens_to_ids([s.objects[i].shape for s, i in test]))
    with torch.no_grad():
        base_colour = answers(vlm(test_colour_in))
        base_shape = answers(vlm(test_shape_in))
    one = dict(alphas=[alpha], positions=-1, mode="add")
    flip = steering_sweep(vlm, test_colour_in, vec, metric=is_blue, **one).mean[0, 0]
    kept = steering_sweep(vlm, test_shape_in, vec, metric=unchanged(base_shape), **one).mean[0, 0]
    g = torch.Generator().manual_seed(0)
    rand = SteeringVector({LAYER: torch.randn(vec[LAYER].shape, generator=g)})
    rand = rand.unit() * float(vec[LAYER].norm())
    flip_rand = steering_sweep(vlm, test_colour_in, rand, metric=is_blue, **one).mean[0, 0]

    where = dict(layer=LAYER, alpha=alpha, n_build=n_build, n=n_test)
    src = ("issue 11: a 'red -> blue' steering vector flips >= 80% of colour answers without changing shape answers "
           "(activation addition, Turner et al. 2023; in VLMs at the answer position, Li et al. 2024)")
    chosen = (f"alpha {alpha}: the smallest of {list(ALPHAS)} maximising min(colour answers flipped, shape answers "
              f"kept) on the {n_build} vector-building scenes (flipped {[round(x, 2) for x in flip_b.tolist()]}, "
              f"kept {[round(x, 2) for x in kept_b.tolist()]}), not on the test scenes")
    return [
        line("steering", "vlm", "unsteered_colour_answers_red", (base_colour == red_id).float().mean(), 0.9, **where,
             source="the test scenes' asked object is red: the unsteered answer is 'red' (bar: the vlm organism's "
                    "binding bar, organisms/build.py THRESHOLDS)"),
        line("steering", "vlm", "unsteered_shape_accuracy", (base_shape == shape_truth).float().mean(), 0.9, **where,
             source="'what shape is the red object ?' on the test scenes, unsteered (bar: the organism's binding "
                    "bar)"),
        line("steering", "vlm", f"colour_answers_flipped_to_blue@{LAYER}", flip, 0.8, **where,
             source=src + "; " + chosen),
        line("steering", "vlm", f"shape_answers_unchanged@{LAYER}", kept, 0.9, **where,
             source=src + "; 'what shape is the red object ?' about the same objects, the same vector and alpha at "
                          "its answer position; bar 0.9 = the vlm organism's own answer bar (binding 0.90 in "
                          "organisms/build.py): at most one shape answer in ten may change"),
        line("steering", "vlm", f"colour_answers_flipped_random_direction@{LAYER}", flip_rand, None, **where,
             source="reported, no bar: control, a random direction of the same norm and alpha"),
    ]


def score_clip(n_build: int = 96, n_test: int = 96) -> list[dict]:
    import numpy as np

    import mmlens.organisms as organisms
    from mmlens.methods.steering import SteeringVector, steer
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world import single_object_scene
    from mmlens.world.scene import SHAPES

    clip = organisms.load("clip")
    size = clip.model.config.vision_config.image_size

    def scenes(colour, seeds):
        return [single_object_scene(int(s), colour=colour, shape=None if colour is None else SHAPES[int(s) % 4],
                                    size=size) for s in seeds]

    def inputs(items):
        with warnings.catch_warnings():  # the organism's tokenizer names a max_length that padding=True ignores
            warnings.filterwarnings("ignore", message="`max_length` is ignored")
            return dict(clip.processor(text=PROMPTS, images=[s.pil() for s in items], return_tensors="pt",
                                       padding=True))

    def non_red(start, n):
        return [s for s in scenes(None, range(start, start + 3 * n)) if s.objects[0].colour != "red"][:n]

    red = scenes("red", range(SEED + 93_000, SEED + 93_000 + n_build))
    other = non_red(SEED + 94_000, n_build)
    vec = SteeringVector.mean_difference(clip, inputs(red), inputs(other), names=CLIP_LAYER, positions=0)  # CLS
    test = scenes("red", range(SEED + 95_000, SEED + 95_000 + n_test // 2)) + non_red(SEED + 96_000, n_test // 2)
    test_in = inputs(test)
    is_red = np.array([s.objects[0].colour == "red" for s in test])

    def accuracies(out) -> dict:
        said = [PROMPTS[p].split()[1:] for p in out.logits_per_image.argmax(-1).tolist()]
        col = np.array([c == s.objects[0].colour for (c, _), s in zip(said, test)])
        shp = np.array([h == s.objects[0].shape for (_, h), s in zip(said, test)])
        return {"red": col[is_red].mean(), "other": col[~is_red].mean(), "shape": shp.mean()}

    with torch.no_grad():
        base = accuracies(clip(test_in))
        erased = accuracies(steer(clip, test_in, vec, mode="project_out"))  # every position of CLIP_LAYER
    where = dict(layer=CLIP_LAYER, n_build=2 * n_build, n=n_test)
    src = ("projecting a colour direction out erases it (rank-one erasure, Ravfogel et al. 2020; LEACE, "
           "Belrose et al. 2023); built from the red vs non-red images' class tokens, projected out of every "
           "position (the steering helper's finding: the class token alone at the last block leaves more of red)")
    return [
        line("steering", "clip", "red_colour_accuracy_unedited", base["red"], 0.95, **where,
             source="the clip organism's colour bar (organisms/build.py THRESHOLDS)"),
        line("steering", "clip", f"red_colour_accuracy_red_projected_out@{CLIP_LAYER}", erased["red"], 0.2, False,
             **where, source=src + "; bar 0.2 ~ chance over the world's 6 colours (1/6): red no longer read"),
        line("steering", "clip", f"shape_accuracy_red_projected_out@{CLIP_LAYER}", erased["shape"], 0.95, **where,
             source=src + "; bar 0.95: shape stays (at most 1 in 20 lost from the unedited "
                          f"{float(base['shape']):.2f}; the organism's own shape bar is 0.90)"),
        line("steering", "clip", f"other_colour_accuracy_red_projected_out@{CLIP_LAYER}", erased["other"], None,
             **where, source="reported, no bar: a rank-one projection is not a clean erasure of one colour alone "
                             f"(unedited {float(base['other']):.2f})"),
    ]


def score() -> list[dict]:
    return score_vlm() + score_clip()
