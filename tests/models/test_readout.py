"""Read-out maps equal the models' own outputs: unembed of the last residual = logits, project = embeddings."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens.testing.tiny_models import sample_inputs


def _last(lens, prefix: str) -> str:
    return lens.hook_points(f"{prefix}.blocks.*.resid_post")[-1]


# ------------------------------------------------------------------------------------------------- unembed
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "paligemma", "blip2"])
def test_unembed_of_last_residual_is_the_logits(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    names = lens.hook_points("lm.blocks.*.resid_post")
    out, cache = lens.run_with_cache(inputs, names=names)
    logits = lens.unembed(cache[names[-1]])
    assert logits.shape == out.logits.shape
    torch.testing.assert_close(logits, out.logits, atol=1e-5, rtol=0)
    early = lens.unembed(cache[names[0]][:, -1])  # the logit lens: any (..., d_model) vector
    assert early.shape == (2, lens.model.config.get_text_config().vocab_size)


def test_unembed_applies_final_logit_softcapping(tiny_folder):
    """PaliGemma 2 (Gemma 2) caps its logits after lm_head: tanh(z / cap) * cap, read from the text config."""
    lens = mmlens.load(tiny_folder("paligemma"))  # own copy: the config is edited
    lens.model.config.text_config.final_logit_softcapping = 0.05
    inputs = sample_inputs("paligemma", lens)
    name = _last(lens, "lm")
    out, cache = lens.run_with_cache(inputs, names=[name])
    with torch.no_grad():
        raw = lens.model.lm_head(lens.model.model.language_model.norm(cache[name]))
    assert raw.abs().max() > 0.1 and out.logits.abs().max() <= 0.05  # the cap is active
    torch.testing.assert_close(lens.unembed(cache[name]), out.logits, atol=1e-6, rtol=0)


def test_unembed_checks_width_and_family(tiny_lens):
    lens = tiny_lens("llava")
    with pytest.raises(ValueError, match=r"64.*63"):
        lens.unembed(torch.zeros(2, 63))
    with pytest.raises(TypeError, match="clip is a contrastive model.*(?s:.*)project"):
        tiny_lens("clip").unembed(torch.zeros(2, 64))
    with pytest.raises(TypeError, match="contrastive models; llava is a generative model"):
        lens.project(torch.zeros(2, 64))


def test_unembed_blip2_t5_says_why_not():
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    from mmlens.models.blip2 import Blip2Adapter

    cfg = Blip2Config(
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        qformer_config=dict(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, encoder_hidden_size=16),
        text_config=dict(model_type="t5", vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
        num_query_tokens=2,
    )
    adapter = Blip2Adapter(Blip2ForConditionalGeneration(cfg))
    with pytest.raises(NotImplementedError, match="T5.*encoder-decoder"):
        adapter.unembed(torch.zeros(1, 16))


# ------------------------------------------------------------------------------------------------- project
def test_clip_project_equals_image_and_text_features(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    v, t = _last(lens, "vision"), _last(lens, "text")
    out, cache = lens.run_with_cache(inputs, names=[v, t])
    model = lens.model
    with torch.no_grad():
        image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=inputs["input_ids"],
                                       attention_mask=inputs["attention_mask"]).pooler_output
    ids = inputs["input_ids"]
    eos = (ids == lens.processor.tokenizer.eos_token_id).int().argmax(-1)  # first </s> of each row
    assert eos.tolist() == [7, 4]  # "<s> a photo of a red square </s>", "<s> a blue circle </s> <pad>..."
    torch.testing.assert_close(lens.project(cache[v][:, 0]), image, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.project(cache[t][torch.arange(2), eos], "text"), text, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.project(cache[v][:, 0], normalize=True), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.project(cache[t][torch.arange(2), eos], "text", normalize=True),
                               out.text_embeds, atol=1e-5, rtol=0)
    every = lens.project(cache[v])  # any residual vector: every patch token too
    assert every.shape == (2, 17, 32)
    torch.testing.assert_close(every[:, 0], image, atol=1e-5, rtol=0)


def test_clip_project_on_towers_alone(tiny_folder, tiny_lens):
    from transformers import CLIPTextModelWithProjection, CLIPVisionModel, CLIPVisionModelWithProjection

    folder = tiny_folder("clip")
    inputs = sample_inputs("clip", tiny_lens("clip"), batch=2)
    vision = mmlens.load(CLIPVisionModelWithProjection.from_pretrained(folder, projection_dim=32))
    name = _last(vision, "vision")
    out, cache = vision.run_with_cache({"pixel_values": inputs["pixel_values"]}, names=[name])
    torch.testing.assert_close(vision.project(cache[name][:, 0]), out.image_embeds, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="CLIPVisionModelWithProjection has no `text_model.final_layer_norm`.*"
                                         "vision tower alone"):
        vision.project(cache[name][:, 0], "text")

    text = mmlens.load(CLIPTextModelWithProjection.from_pretrained(folder, projection_dim=32))
    name = _last(text, "text")
    out, cache = text.run_with_cache({k: inputs[k] for k in ("input_ids", "attention_mask")}, names=[name])
    eos = (inputs["input_ids"] == 3).int().argmax(-1)
    torch.testing.assert_close(text.project(cache[name][torch.arange(2), eos], "text"), out.text_embeds,
                               atol=1e-5, rtol=0)

    bare = mmlens.load(CLIPVisionModel.from_pretrained(folder))
    with pytest.raises(ValueError, match="CLIPVisionModel has no `visual_projection`.*without its projection"):
        bare.project(torch.zeros(2, 64))


def test_siglip_project_equals_image_and_text_features(tiny_lens, tiny_folder):
    from transformers import SiglipVisionModel

    lens = tiny_lens("siglip")
    inputs = sample_inputs("siglip", lens, batch=2)
    v, t = _last(lens, "vision"), _last(lens, "text")
    out, cache = lens.run_with_cache(inputs, names=[v, t])
    with torch.no_grad():
        image = lens.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
        text = lens.model.get_text_features(input_ids=inputs["input_ids"],
                                            attention_mask=inputs["attention_mask"]).pooler_output
    torch.testing.assert_close(lens.project(cache[v]), image, atol=1e-5, rtol=0)  # the whole token sequence
    torch.testing.assert_close(lens.project(cache[t][:, -1], "text"), text, atol=1e-5, rtol=0)  # last token
    torch.testing.assert_close(lens.project(cache[v], normalize=True), out.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(lens.project(cache[t][:, -1], "text", normalize=True), out.text_embeds,
                               atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="attention head.*\\(batch, seq, d_model\\)"):
        lens.project(cache[v][:, 0])

    tower = mmlens.load(SiglipVisionModel.from_pretrained(tiny_folder("siglip")))
    _, tcache = tower.run_with_cache({"pixel_values": inputs["pixel_values"]}, names=[v])
    torch.testing.assert_close(tower.project(tcache[v]), image, atol=1e-5, rtol=0)


def test_project_checks_tower_width_and_family(tiny_lens):
    lens = tiny_lens("clip")
    with pytest.raises(ValueError, match="unknown tower 'audio'.*vision.*text"):
        lens.project(torch.zeros(2, 64), "audio")
    with pytest.raises(ValueError, match=r"64.*48"):
        lens.project(torch.zeros(2, 48))
    with pytest.raises(ValueError, match=r"64.*48"):
        tiny_lens("siglip").project(torch.zeros(2, 48), "text")
    with pytest.raises(TypeError, match="contrastive models; blip2 is a generative model.*unembed"):
        tiny_lens("blip2").project(torch.zeros(2, 64))
