"""A tour of the world and the shipped organisms: a scene with known facts, the vlm's answers checked against
them, the clip organism's zero-shot guess, and a cache of the vlm's residual stream split by modality.

    .venv/bin/python examples/organisms_tour.py
"""

from __future__ import annotations

import mmlens.organisms as organisms
from mmlens.organisms.prompts import PROMPTS, answer_first_tokens, vlm_inputs
from mmlens.world import make_scene


def main(seed: int = 3) -> dict:
    scene = make_scene(seed, size=48)  # deterministic: the same seed is the same scene, masks and answers
    print("scene:", scene.caption)

    # 1. the vlm answers the world's questions; the world knows the right answers
    vlm = organisms.load("vlm")
    qa = scene.questions()
    answers = answer_first_tokens(vlm, [scene] * len(qa), [q for q, _, _ in qa])
    for (q, truth, kind), got in zip(qa, answers):
        print(f"  {kind:16s} {q:50s} truth={truth:8s} vlm={got}")

    # 2. the clip organism's zero-shot label for the first object, cropped by its ground-truth box
    clip = organisms.load("clip")
    prompts = PROMPTS  # "a {colour} {shape}", every pair the world draws
    x0, y0, x1, y1 = scene.boxes[0]
    crop = scene.pil().crop((x0, y0, x1, y1)).resize((48, 48))
    inputs = clip.processor(text=prompts, images=[crop], return_tensors="pt", padding=True)
    guess = prompts[int(clip(inputs).logits_per_image.argmax())]
    print(f"clip on object 0 ({scene.objects[0].name}): {guess}")

    # 3. a cache of the vlm's residual stream, split into image and text positions by the token map
    #    (the prompt "<image> {question} answer :", ending at the ':' where the answer is predicted)
    inputs = vlm_inputs(vlm, [scene], [qa[0][0]])
    _, cache = vlm.run_with_cache(inputs, names="lm.blocks.*.resid_post")
    tm = vlm.token_map(inputs)
    image, text = tm.positions("image"), tm.positions("text")
    resid = cache["lm.blocks.3.resid_post"]
    print(f"lm.blocks.3.resid_post {tuple(resid.shape)}: {len(image)} image positions, {len(text)} text positions")
    return {"answers": answers, "truth": [a for _, a, _ in qa], "clip": guess, "n_image": len(image)}


if __name__ == "__main__":
    main()
