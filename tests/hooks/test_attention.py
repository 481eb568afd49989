"""attn.pattern under SDPA (recomputed at the kernel) equals the eager implementation's attentions."""

from __future__ import annotations

import pytest
import torch

from mmlens.testing.tiny_models import sample_image, sample_inputs

HF = ["clip", "siglip", "llava", "llava_full", "qwen2_vl", "paligemma", "blip2"]


def _patterns(lens, inputs, names="*pattern", **kw):
    _, cache = lens.run_with_cache(inputs, names=names, **kw)
    return cache


@pytest.mark.parametrize("name", HF)
def test_sdpa_patterns_equal_eager(tiny_lens, name):
    sdpa, eager = tiny_lens(name), tiny_lens(name, attn_implementation="eager")
    assert sdpa.model.config._attn_implementation != "eager"
    inputs = sample_inputs(name, sdpa, batch=2)
    a, b = _patterns(sdpa, inputs), _patterns(eager, inputs)
    assert set(a) == set(b) and len(a) >= 4
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
        torch.testing.assert_close(a[k].sum(-1), torch.ones_like(a[k].sum(-1)), atol=1e-5, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "paligemma"])
def test_lm_patterns_equal_hf_output_attentions(tiny_lens, name):
    """Against transformers' own eager `output_attentions`, with a padded batch (the mask matters)."""
    lens = tiny_lens(name)
    eager = tiny_lens(name, attn_implementation="eager")
    inputs = sample_inputs(name, lens, batch=2)
    if name != "paligemma":
        assert (inputs["attention_mask"] == 0).any(), "the batch should be padded"
    cache = _patterns(lens, inputs)
    ref = eager.model(**eager.prepare(inputs), output_attentions=True).attentions
    for i, r in enumerate(ref):
        torch.testing.assert_close(cache[f"lm.blocks.{i}.attn.pattern"], r, atol=1e-5, rtol=0)


def test_clip_patterns_equal_hf_output_attentions(tiny_lens):
    lens, eager = tiny_lens("clip"), tiny_lens("clip", attn_implementation="eager")
    inputs = sample_inputs("clip", lens, batch=2)
    cache = _patterns(lens, inputs)
    ref = eager.model(**inputs, output_attentions=True)
    for tower, out in (("vision", ref.vision_model_output), ("text", ref.text_model_output)):
        for i, r in enumerate(out.attentions):
            torch.testing.assert_close(cache[f"{tower}.blocks.{i}.attn.pattern"], r, atol=1e-5, rtol=0)


def test_qwen2_vl_vision_pattern_per_image_dynamic_resolution(tiny_lens):
    """Two images of different sizes: one block-diagonal attention each, padded and stacked on dim 0."""
    from mmlens.testing.tiny_models import qwen2_vl_inputs

    lens = tiny_lens("qwen2_vl")
    eager = tiny_lens("qwen2_vl", attn_implementation="eager")
    imgs = [sample_image(0, 32), sample_image(1, 48)]
    inputs = qwen2_vl_inputs(lens, imgs, ["a", "b"])
    a = _patterns(lens, inputs)["vision.blocks.0.attn.pattern"]
    b = _patterns(eager, inputs)["vision.blocks.0.attn.pattern"]
    n0, n1 = (inputs["image_grid_thw"].prod(-1)).tolist()
    assert a.shape == (2, 4, max(n0, n1), max(n0, n1))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(a[0, :, :n0, :n0].sum(-1), torch.ones(4, n0), atol=1e-5, rtol=0)
    assert a[0, :, n0:].abs().max() == 0  # padding of the smaller image


def test_rows_and_heads_subset(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    tm = lens.token_map(inputs)
    text = tm.positions("text", batch=0)
    full = _patterns(lens, inputs, "lm.*pattern")
    part = _patterns(lens, inputs, "lm.*pattern", attn_rows=text, attn_heads=[1, 3])
    vis = _patterns(lens, inputs, "vision.*pattern", attn_rows={"vision.*": [0]})
    assert vis["vision.blocks.1.attn.pattern"].shape == (2, 4, 1, 17)
    for k in full:
        torch.testing.assert_close(part[k], full[k][:, [1, 3]][:, :, text], atol=1e-6, rtol=0)
    assert part["lm.blocks.0.attn.pattern"].shape == (2, 2, len(text), inputs["input_ids"].shape[1])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_identity_pattern_edit_keeps_output(tiny_lens, impl):
    """Returning the probabilities unchanged replaces the kernel by probs @ v: output must not move."""
    lens = tiny_lens("llava", attn_implementation=impl)
    inputs = sample_inputs("llava", lens, batch=2)
    ref = lens(inputs).logits
    with lens.hooks({"lm.blocks.*.attn.pattern": lambda p, ctx: p.clone(), "vision.blocks.*.attn.pattern": lambda p, ctx: p.clone()}):
        out = lens(inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_pattern_head_ablation_equals_z_head_ablation(tiny_lens):
    """Zeroing head h's probabilities zeroes its z (= probs @ v): both edits give the same logits."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)

    def zero_pattern(p, ctx):
        p = p.clone()
        p[:, 2] = 0
        return p

    def zero_z(z, ctx):
        z = z.clone()
        z[..., 2, :] = 0
        return z

    with lens.hooks({"lm.blocks.1.attn.pattern": zero_pattern}):
        a = lens(inputs).logits
    with lens.hooks({"lm.blocks.1.attn.z": zero_z}):
        b = lens(inputs).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - lens(inputs).logits).abs().max() > 1e-4  # the edit did something


def test_edit_on_subset_rows_is_refused(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    with pytest.raises(ValueError, match="subset of rows or heads"):
        with lens.hooks({"lm.blocks.0.attn.pattern": lambda p, ctx: p * 0}, attn_heads=[0]):
            lens(inputs)


def test_attention_table_restored(tiny_lens):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    before = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    lens = tiny_lens("llava")
    _patterns(lens, sample_inputs("llava", lens))
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == before


def test_attention_probs_helper_matches_softmax():
    """The public recomputation: GQA heads repeated, rows and heads picked first (negatives from the end)."""
    from mmlens.hooks.attention import attention_probs

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8)
    full = torch.softmax(q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8 ** -0.5, dim=-1)
    torch.testing.assert_close(attention_probs(q, k), full)
    torch.testing.assert_close(attention_probs(q, k, rows=[-1], heads=[1, -1]), full[:, [1, 3]][:, :, [4]])
    causal = attention_probs(q, k, is_causal=True, rows=[-2])
    assert causal[..., 4].abs().max() == 0 and torch.allclose(causal.sum(-1), torch.ones(2, 4, 1))
