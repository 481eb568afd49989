"""The organisms' prompts, at run time: the 24 captions the clip and diffusion organisms know, and the vlm
organism's question template with the helpers that build its inputs and read its answers.

    from mmlens.organisms.prompts import PROMPTS, answer_first_tokens, vlm_inputs

    lens = mmlens.organisms.load("vlm")
    inputs = vlm_inputs(lens, [scene], ["what colour is the square ?"])   # left-padded, ends at 'answer :'
    answer_first_tokens(lens, [scene], ["what colour is the square ?"])   # ['red']

Where the vlm's answer is read. The organism's word-level tokenizer (`tokenizer.py`) frames every text as
`<s> ... </s>`, so the processor's prompt ends in `</s>`, which training never put after `answer :`. The answer is
the prediction at the last position *before* `</s>`: the ':' of 'answer :'. The LM is causal, so the logits at that
position do not depend on the trailing `</s>`; `vlm_inputs` drops it (by default), so that in every row the last
position is the ':' (left padding lines the rows up at the end) and `logits[:, -1]` is the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..world.scene import COLOURS, SHAPES

PROMPTS = [f"a {c} {s}" for c in COLOURS for s in SHAPES]
"""'a {colour} {shape}' for every pair the world draws (24, colour-major): the clip organism's zero-shot classes
and the diffusion organism's training prompts."""

TURN = "{question} answer :"
"""One question turn of the vlm organism; training packs `<s> <image>*N q1 answer : a1 q2 answer : a2 ...`."""

PROMPT = "<image> " + TURN
"""The vlm organism's inference prompt, `<image> {question} answer :`: exactly the first training turn."""


def _processor(lens_or_processor: Any):
    from ..lens import Lens

    return lens_or_processor.processor if isinstance(lens_or_processor, Lens) else lens_or_processor


def vlm_inputs(lens_or_processor: Any, scenes: Sequence, questions: Sequence[str], *, drop_eos: bool = True) -> dict:
    """Processor inputs for `PROMPT` over (scene, question) pairs, left-padded so every row ends at the same place.

    The tokenizer's `padding_side` is set to "left" for the call and restored afterwards, also on error, so the
    caller's processor is left as it was. With `drop_eos` (default) a trailing `</s>` that the tokenizer appended to
    every row is removed, so the last position of each row is the ':' where the answer is predicted (see the
    module docstring); a tokenizer that appends nothing is left alone.
    """
    if len(scenes) != len(questions):
        raise ValueError(f"vlm_inputs: {len(scenes)} scenes but {len(questions)} questions")
    proc = _processor(lens_or_processor)
    tok = proc.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        inputs = proc(text=[PROMPT.format(question=q) for q in questions], images=[s.pil() for s in scenes],
                      return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    inputs = dict(inputs)
    ids = inputs["input_ids"]
    if drop_eos and tok.eos_token_id is not None and bool((ids[:, -1] == tok.eos_token_id).all()):
        inputs = {k: (v[:, :-1] if torch.is_tensor(v) and v.shape == ids.shape else v) for k, v in inputs.items()}
    return inputs


@torch.no_grad()
def answer_first_tokens(lens, scenes: Sequence, questions: Sequence[str]) -> list[str]:
    """Greedy first answer word for each (scene, question), through the organism's own processor: the argmax of
    the logits at the ':' of 'answer :' (the last position of `vlm_inputs`)."""
    logits = lens(vlm_inputs(lens, scenes, questions)).logits[:, -1]
    return lens.processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())


def binding_scenes(n: int, seed: int) -> tuple[list, list[str]]:
    """`n` scenes of 2-3 objects (random textures) in which object 0's shape is unique, and the binding question
    about it, 'what colour is the {shape} ?': its colour must be found through its shape. Seeds from `seed` on."""
    from ..world import make_scene

    scenes = []
    while len(scenes) < n:
        s = make_scene(seed, background=None)
        seed += 1
        if len(s.objects) >= 2 and [o.shape for o in s.objects].count(s.objects[0].shape) == 1:
            scenes.append(s)
    return scenes, [f"what colour is the {s.objects[0].shape} ?" for s in scenes]


def colour_counterfactuals(lens, n: int, seed: int):
    """n colour counterfactuals for the vlm organism (the world's `counterfactual_pair`: one object's colour changed,
    every other pixel equal), asked "what colour is the {shape} ?" about that object (its shape unique in the scene).

    Returns (clean inputs, corrupt inputs, regions, metric): regions per example from the ground-truth masks through
    the token map ("object", "other objects", "rest of image", "question", "answer"), and the metric
    logit(clean colour) - logit(corrupt colour) at the answer, ready for `methods.patch`."""
    from .. import metrics
    from ..world.pairs import counterfactual_pair

    pairs = []
    while len(pairs) < n:
        clean, corrupt = counterfactual_pair(seed, "colour", background=None)
        seed += 1
        i = corrupt.meta["changed_object"]
        if [o.shape for o in clean.objects].count(clean.objects[i].shape) == 1:
            pairs.append((clean, corrupt, i))
    questions = [f"what colour is the {c.objects[i].shape} ?" for c, _, i in pairs]
    clean_in = vlm_inputs(lens, [p[0] for p in pairs], questions)
    corrupt_in = vlm_inputs(lens, [p[1] for p in pairs], questions)
    tm = lens.token_map(clean_in)
    last = clean_in["input_ids"].shape[1] - 1
    regions: dict[str, list] = {"object": [], "other objects": [], "rest of image": [], "question": [], "answer": []}
    for b, (c, _, i) in enumerate(pairs):
        obj = set(tm.positions_in_mask(c.masks[i], batch=b).tolist())
        others = set()
        for j in range(len(c.objects)):
            if j != i:
                others |= set(tm.positions_in_mask(c.masks[j], batch=b).tolist())
        image = set(tm.positions("image", batch=b).tolist())
        regions["object"].append(sorted(obj))
        regions["other objects"].append(sorted(others - obj))
        regions["rest of image"].append(sorted(image - obj - others))
        regions["question"].append([p for p in tm.positions("text", batch=b).tolist() if p != last])
        regions["answer"].append([last])
    tok = _processor(lens).tokenizer
    ids = lambda scenes: torch.tensor(tok.convert_tokens_to_ids([s.objects[i].colour for s, i in scenes]))  # noqa: E731
    metric = metrics.logit_diff(ids([(c, i) for c, _, i in pairs]), ids([(k, i) for _, k, i in pairs]))
    return clean_in, corrupt_in, regions, metric
