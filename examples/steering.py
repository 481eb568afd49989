"""Steering vectors on the organisms.

vlm: a "red minus blue" direction in the LM's residual stream, built two ways (at the answer position of questions
about red vs blue objects, and from the red vs blue objects' own image tokens), added at the answer position of
questions about blue and green objects: P("red") at the answer climbs with alpha (a dose-response sweep).

clip: projecting a colour direction (the mean class token of red images minus that of other colours, at the last
vision block) out of the class token erases much of "red" from zero-shot classification and leaves shape intact; a
random direction of the same width, projected out the same way, changes nothing; the same erasure one block
earlier, at every position, erases more of "red" (a rank-one projection is not full erasure: the colour is also
carried off the mean-difference axis, and other colours lose some accuracy too).

    .venv/bin/python examples/steering.py
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

import mmlens.organisms as organisms
from mmlens.methods.steering import SteeringVector, steer, steering, steering_sweep
from mmlens.organisms.prompts import PROMPTS, answer_first_tokens, vlm_inputs
from mmlens.world import single_object_scene
from mmlens.world.scene import SHAPES

ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0)


def _scenes(colour: str | None, seeds, size: int):
    return [single_object_scene(int(s), colour=colour, shape=None if colour is None else SHAPES[int(s) % 4],
                                size=size) for s in seeds]


def vlm_part(n: int = 16) -> dict:
    vlm = organisms.load("vlm")
    size = vlm.model.config.vision_config.image_size
    red_id = vlm.processor.tokenizer.convert_tokens_to_ids("red")

    def ask(scenes):
        return vlm_inputs(vlm, scenes, [f"what colour is the {s.objects[0].shape} ?" for s in scenes])

    def object_tokens(inputs, scenes):  # (batch, seq) bool: the image tokens the object covers
        tm, mask = vlm.token_map(inputs), torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
        for k, s in enumerate(scenes):
            mask[k, tm.positions_in_mask(s.masks[0], batch=k)] = True
        return mask

    def p_red(out):
        return out.logits[:, -1].float().softmax(-1)[:, red_id]

    red, blue = _scenes("red", range(100, 100 + n), size), _scenes("blue", range(200, 200 + n), size)
    test = _scenes("blue", range(300, 300 + n // 2), size) + _scenes("green", range(400, 400 + n // 2), size)
    red_in, blue_in, test_in = ask(red), ask(blue), ask(test)
    layers = ["lm.blocks.1.resid_post", "lm.blocks.2.resid_post"]

    # 1. at the answer position (':' of 'answer :', the last position of vlm_inputs)
    answer_vec = SteeringVector.mean_difference(vlm, red_in, blue_in, names=layers, positions="last")
    sweep = steering_sweep(vlm, test_in, answer_vec, alphas=ALPHAS, metric=p_red, positions=-1)
    # 2. from the objects' image tokens (the mean over each object's tokens, red objects minus blue ones)
    image_vec = SteeringVector.mean_difference(vlm, red_in, blue_in, names=layers[0],
                                               positions=object_tokens(red_in, red),
                                               negative_positions=object_tokens(blue_in, blue))
    image_sweep = steering_sweep(vlm, test_in, image_vec, alphas=ALPHAS, metric=p_red, positions=-1)

    print(f"vlm: P('red') at the answer, {len(test)} questions about blue and green objects")
    print(f"  {'vector':40s} " + " ".join(f"a={a:<5}" for a in ALPHAS))
    rows = {f"answer position @ {n_}": sweep.mean[i].tolist() for i, n_ in enumerate(sweep.names)}
    rows[f"image tokens    @ {layers[0]}"] = image_sweep.mean[0].tolist()
    for label, ps in rows.items():
        print(f"  {label:40s} " + " ".join(f"{p:<7.3f}" for p in ps))
    with steering(vlm, answer_vec, names=layers[0], alpha=2.0, positions=-1):
        steered = answer_first_tokens(vlm, test, [f"what colour is the {s.objects[0].shape} ?" for s in test])
    plain = answer_first_tokens(vlm, test, [f"what colour is the {s.objects[0].shape} ?" for s in test])
    print(f"  greedy answers, plain: {plain}\n  with the answer-position vector (alpha 2) at {layers[0]}: {steered}")
    return {"alphas": list(ALPHAS), "p_red": rows, "sweep": sweep, "plain": plain, "steered": steered,
            "norms": {**answer_vec.norm(), "image": float(image_vec.direction.norm())}}


def clip_part(n_build: int = 96, n_test: int = 96) -> dict:
    clip = organisms.load("clip")
    size = clip.model.config.vision_config.image_size
    last = clip.hook_points("vision.blocks.*.resid_post")[-1]

    def inputs(scenes):
        with warnings.catch_warnings():  # the organism's tokenizer names a max_length that padding=True ignores
            warnings.filterwarnings("ignore", message="`max_length` is ignored")
            return dict(clip.processor(text=PROMPTS, images=[s.pil() for s in scenes], return_tensors="pt",
                                       padding=True))

    red = _scenes("red", range(1000, 1000 + n_build), size)
    other = [s for s in _scenes(None, range(2000, 2000 + 3 * n_build), size) if s.objects[0].colour != "red"][:n_build]
    earlier = clip.hook_points("vision.blocks.*.resid_post")[-2]
    red_in, other_in = inputs(red), inputs(other)
    colour = SteeringVector.mean_difference(clip, red_in, other_in, names=[earlier, last], positions=0)  # class token
    rand = SteeringVector({last: torch.randn(colour[last].shape, generator=torch.Generator().manual_seed(0))})
    test = _scenes("red", range(6000, 6000 + n_test // 2), size) + \
        [s for s in _scenes(None, range(5000, 5000 + 2 * n_test), size) if s.objects[0].colour != "red"][: n_test // 2]
    test_in = inputs(test)
    is_red = np.array([s.objects[0].colour == "red" for s in test])

    def scores(out) -> dict:
        said = [PROMPTS[p].split()[1:] for p in out.logits_per_image.argmax(-1).tolist()]
        col = np.array([c == s.objects[0].colour for (c, _), s in zip(said, test)])
        shp = np.array([h == s.objects[0].shape for (_, h), s in zip(said, test)])
        return {"red_colour_acc": float(col[is_red].mean()), "other_colour_acc": float(col[~is_red].mean()),
                "red_shape_acc": float(shp[is_red].mean()), "shape_acc": float(shp.mean())}

    with torch.no_grad():
        res = {"none": scores(clip(test_in)),
               "colour direction": scores(steer(clip, test_in, colour, names=last, mode="project_out", positions=0)),
               "random direction": scores(steer(clip, test_in, rand, mode="project_out", positions=0)),
               # one block earlier, at every position: the last block's class token then reads patches that carry
               # no red along the direction either
               "colour, block -2": scores(steer(clip, test_in, colour, names=earlier, mode="project_out"))}
    print(f"clip: zero-shot accuracy on {int(is_red.sum())} red and {int((~is_red).sum())} other-colour objects, "
          f"projecting a direction out of the class token at {last}")
    print(f"  {'projected out':18s} " + " ".join(f"{k:>16s}" for k in res["none"]))
    for label, r in res.items():
        print(f"  {label:18s} " + " ".join(f"{v:16.3f}" for v in r.values()))
    return res


def main(n_vlm: int = 16, n_build: int = 96, n_test: int = 96) -> dict:
    return {"vlm": vlm_part(n_vlm), "clip": clip_part(n_build, n_test)}


if __name__ == "__main__":
    main()
