"""Cached values equal what transformers itself returns (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch

from mmlens.testing.tiny_models import sample_inputs

ATOL = 1e-5


def _hf_hidden(name, out):
    if name in ("clip", "siglip"):
        return {"vision": out.vision_model_output.hidden_states, "text": out.text_model_output.hidden_states}
    if name == "blip2":
        return {"lm": out.language_model_outputs.hidden_states}
    return {"lm": out.hidden_states}


@pytest.mark.parametrize("name", ["clip", "siglip", "llava", "qwen2_vl", "paligemma", "blip2"])
def test_resid_post_equals_hf_hidden_states(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    _, cache = lens.run_with_cache(inputs, names=["*.blocks.*.resid_post", "*.ln_final"])
    ref = lens.model(**lens.prepare(inputs), output_hidden_states=True)
    for tower, hidden in _hf_hidden(name, ref).items():
        n_blocks = len(lens.hook_points(f"{tower}.blocks.*.resid_post"))
        assert n_blocks == len(hidden) - 1
        final_norm = tower == "lm"  # decoder LMs return the last hidden state after the final norm
        for i in range(n_blocks - int(final_norm)):
            torch.testing.assert_close(cache[f"{tower}.blocks.{i}.resid_post"], hidden[i + 1], atol=ATOL, rtol=0)
        if final_norm:
            torch.testing.assert_close(cache[f"{tower}.ln_final"], hidden[-1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name,tower", [("llava", "model.vision_tower"), ("paligemma", "model.vision_tower"),
                                        ("blip2", "vision_model")])
def test_vision_tower_inside_vlm_matches_hf(tiny_lens, name, tower):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    _, cache = lens.run_with_cache(inputs, names=["vision.blocks.*.resid_post", "vision.blocks.*.resid_pre"])
    ref = lens.model.get_submodule(tower)(inputs["pixel_values"], output_hidden_states=True).hidden_states
    for i in range(2):
        torch.testing.assert_close(cache[f"vision.blocks.{i}.resid_pre"], ref[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache[f"vision.blocks.{i}.resid_post"], ref[i + 1], atol=ATOL, rtol=0)


def test_outputs_and_projections(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    out, cache = lens.run_with_cache(inputs, names=["logits", "image_embeds", "text_embeds", "vision.proj"])
    torch.testing.assert_close(cache["logits"], out.logits_per_image)
    torch.testing.assert_close(cache["image_embeds"], out.image_embeds)
    torch.testing.assert_close(cache["text_embeds"], out.text_embeds)
    torch.testing.assert_close(torch.nn.functional.normalize(cache["vision.proj"], dim=-1), out.image_embeds)


def test_heads_and_mlp_views_recompose(tiny_lens):
    """attn.z is o_proj's input split in heads; mlp.post is down_proj's input; attn.out + ... is the block."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    _, c = lens.run_with_cache(inputs, names="lm.blocks.0.*")
    layer = lens.model.model.language_model.layers[0]
    z = c["lm.blocks.0.attn.z"]
    assert z.shape[-2:] == (4, 16)
    torch.testing.assert_close(layer.self_attn.o_proj(z.flatten(-2)), c["lm.blocks.0.attn.out"])
    torch.testing.assert_close(layer.mlp.down_proj(c["lm.blocks.0.mlp.post"]), c["lm.blocks.0.mlp.out"])
    torch.testing.assert_close(c["lm.blocks.0.resid_pre"] + c["lm.blocks.0.attn.out"], c["lm.blocks.0.resid_mid"])
    torch.testing.assert_close(c["lm.blocks.0.resid_mid"] + c["lm.blocks.0.mlp.out"], c["lm.blocks.0.resid_post"])
    assert c["lm.blocks.0.attn.k"].shape[-2] == 2  # grouped-query: 2 kv heads


def test_fused_qkv_parts(tiny_lens):
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens)
    _, c = lens.run_with_cache(inputs, names=["vision.blocks.0.attn.q", "vision.blocks.0.attn.k", "vision.blocks.0.attn.v",
                                              "vision.blocks.0.resid_pre"])
    attn = lens.model.vision_model.encoder.layers[0].self_attn
    x = lens.model.vision_model.encoder.layers[0].layer_norm1(c["vision.blocks.0.resid_pre"])
    qkv = attn.qkv(x).unflatten(-1, (3, 4, 16))
    for j, part in enumerate("qkv"):
        torch.testing.assert_close(c[f"vision.blocks.0.attn.{part}"], qkv[..., j, :, :])
