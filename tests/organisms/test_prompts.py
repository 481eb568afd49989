"""The organisms' run-time prompts: defined once, the vlm's inference prompt is its first training turn, and
`vlm_inputs` leaves the caller's processor as it was (also on error)."""

from __future__ import annotations

import pytest

from mmlens.organisms import prompts
from mmlens.world import make_scene


@pytest.fixture(scope="module")
def vlm_processor():
    from mmlens.organisms import vlm
    from mmlens.organisms.vocab import world_tokenizer

    return vlm.processor(world_tokenizer(model_max_length=128))


def test_prompts_are_defined_once():
    from mmlens.organisms import clip, diffusion
    from mmlens.world.scene import COLOURS, SHAPES

    assert clip.PROMPTS is prompts.PROMPTS and diffusion.PROMPTS is prompts.PROMPTS
    assert prompts.PROMPTS == [f"a {c} {s}" for c in COLOURS for s in SHAPES] and len(prompts.PROMPTS) == 24
    assert prompts.PROMPT == "<image> {question} answer :"


def test_inference_prompt_is_the_first_training_turn(vlm_processor):
    """What `vlm_inputs` feeds the organism is, token for token, the recipe's first turn up to its answer."""
    from mmlens.organisms.vlm import _encode_turns

    tok = vlm_processor.tokenizer
    scene = make_scene(5, size=48)
    for q, a, _ in scene.questions()[:4]:
        ids, targets = _encode_turns(tok, [(q, a)], {})
        got = prompts.vlm_inputs(vlm_processor, [scene], [q])["input_ids"][0].tolist()
        assert got == ids[: targets[0] + 1]  # ends at the ':' whose next token is the answer
        assert tok.convert_ids_to_tokens(got[-2:]) == ["answer", ":"]


def test_vlm_inputs_left_pads_drops_eos_and_restores_padding_side(vlm_processor):
    tok = vlm_processor.tokenizer
    tok.padding_side = "right"
    scenes = [make_scene(1, size=48), make_scene(2, size=48)]
    questions = ["how many objects are there ?", "is there a cross ?"]  # different lengths: row 1 is padded
    inputs = prompts.vlm_inputs(vlm_processor, scenes, questions)
    assert tok.padding_side == "right"
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape and "pixel_values" in inputs
    assert (ids[:, -1] == tok.convert_tokens_to_ids(":")).all()  # every row ends at the answer position
    assert ids[1, 0] == tok.pad_token_id and mask[1, 0] == 0 and mask[:, -1].all()  # left padding
    kept = prompts.vlm_inputs(vlm_processor, scenes, questions, drop_eos=False)["input_ids"]
    assert (kept[:, -1] == tok.eos_token_id).all() and kept.shape[1] == ids.shape[1] + 1
    assert tok.padding_side == "right"


def test_vlm_inputs_restores_padding_side_on_error(vlm_processor):
    class Broken:
        def pil(self):
            raise RuntimeError("no image")

    tok = vlm_processor.tokenizer
    tok.padding_side = "right"
    with pytest.raises(RuntimeError, match="no image"):
        prompts.vlm_inputs(vlm_processor, [Broken()], ["what colour is the square ?"])
    assert tok.padding_side == "right"
    with pytest.raises(ValueError, match="2 scenes but 1 questions"):
        prompts.vlm_inputs(vlm_processor, [make_scene(1), make_scene(2)], ["how many objects are there ?"])
