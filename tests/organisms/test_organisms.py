"""Organisms: the evaluation can fail (random models score near chance); shipped organisms meet their bar."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens import organisms
from mmlens.organisms.build import THRESHOLDS, evaluate
from mmlens.organisms.data import EVAL_SEED_OFFSET


@pytest.fixture(scope="module")
def random_clip(tmp_path_factory):
    from transformers import CLIPModel

    from mmlens.organisms import clip
    from mmlens.organisms.vocab import world_tokenizer

    folder = tmp_path_factory.mktemp("random_clip")
    tok = world_tokenizer(16)
    torch.manual_seed(0)
    CLIPModel(clip.config(tok)).save_pretrained(folder)
    clip.processor(tok).save_pretrained(folder)
    return folder


def test_random_clip_scores_near_chance(random_clip):
    m = evaluate("clip", random_clip, full=False)
    assert m["n"] == 96
    assert m["colour_acc"] < 0.45 and m["shape_acc"] < 0.5  # chance: 1/6 and 1/4


def test_random_vlm_scores_near_chance(random_clip, tmp_path):
    from transformers import CLIPModel, LlavaForConditionalGeneration

    from mmlens.organisms import vlm
    from mmlens.organisms.vocab import world_tokenizer

    tok = world_tokenizer(128)
    clip = CLIPModel.from_pretrained(random_clip)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(vlm.config(tok, clip.config.vision_config)).save_pretrained(tmp_path)
    vlm.processor(tok).save_pretrained(tmp_path)
    m = evaluate("vlm", tmp_path, full=False)
    assert m["overall"] < 0.3 and m["binding"] < 0.5
    assert m["n_questions"] > 100


def test_random_diffusion_scores_near_chance(random_clip, tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel

    from mmlens.organisms import diffusion

    torch.manual_seed(0)
    text = CLIPTextModel.from_pretrained(random_clip)
    tok = AutoTokenizer.from_pretrained(random_clip)
    pipe = StableDiffusionPipeline(vae=diffusion.make_vae(), text_encoder=text, tokenizer=tok,
                                   unet=diffusion.make_unet(text.config.hidden_size), scheduler=diffusion.make_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(tmp_path)
    m = evaluate("diffusion", tmp_path, full=False)
    assert m["n"] == 48
    assert m["colour_acc"] < 0.45 and m["shape_acc"] < 0.5  # chance: 1/6 and 1/4


def test_unknown_organism():
    with pytest.raises(ValueError, match="choose one of"):
        organisms.path("gpt")


@pytest.mark.parametrize("name", organisms.available())
def test_shipped_organism_loads_plainly_and_meets_its_bar(name):
    import json

    folder = organisms.path(name)
    card = json.loads((folder / "card.json").read_text())
    assert all(card["passed"].values()), card["metrics"]
    lens = organisms.load(name)
    assert isinstance(lens, mmlens.Lens)
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel, LlavaForConditionalGeneration

    plain = {"clip": CLIPModel, "vlm": LlavaForConditionalGeneration, "diffusion": StableDiffusionPipeline}[name]
    model = plain.from_pretrained(folder)  # no mmlens involved
    assert type(lens.model) is type(model)
    ours, ref = (lens.model.unet, model.unet) if name == "diffusion" else (lens.model, model)
    ref_sd = ref.state_dict()
    assert ref_sd.keys() == ours.state_dict().keys()
    assert all(torch.equal(ref_sd[k], v) for k, v in ours.state_dict().items())
    m = evaluate(name, folder, full=False)  # a fresh small sample: within sampling noise of the bar
    for k, thr in THRESHOLDS[name].items():
        assert m[k] >= thr - 0.08, (k, m[k])


@pytest.mark.skipif("vlm" not in organisms.available(), reason="needs the shipped vlm organism")
def test_vlm_answers_leave_the_callers_tokenizer_as_it_was():
    from mmlens.organisms.prompts import answer_first_tokens
    from mmlens.world import make_scene

    lens = organisms.load("vlm")
    tok = lens.processor.tokenizer
    tok.padding_side = "right"
    scenes = [make_scene(EVAL_SEED_OFFSET + 7, size=48), make_scene(EVAL_SEED_OFFSET + 8, size=48)]
    # questions of different lengths, so the batch needs padding
    got = answer_first_tokens(lens, scenes, ["how many objects are there ?", "is there a cross ?"])
    assert got[0] == {1: "one", 2: "two", 3: "three"}[len(scenes[0].objects)]
    assert tok.padding_side == "right"
