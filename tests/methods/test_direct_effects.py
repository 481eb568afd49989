"""Direct effects and direct logit attribution against the models' own outputs and hand-written PyTorch."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.methods import (DirectEffectsResult, DirectLogitResult, Result, direct_effects,
                            direct_logit_attribution)
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")


def _features(model, inputs):
    out = model.get_image_features(pixel_values=inputs["pixel_values"])
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_terms_sum_to_image_features_and_logits(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    res = direct_effects(lens, inputs)
    m = lens.model
    assert res.terms.dtype == torch.float32 and res.terms.shape[:2] == (2, len(res.labels))
    torch.testing.assert_close(res.total(), _features(m, inputs), atol=1e-4, rtol=1e-4)
    n_heads, n_layers = m.config.vision_config.num_attention_heads, m.config.vision_config.num_hidden_layers
    assert sum(".head" in lb for lb in res.labels) == n_heads * n_layers
    names, groups = res.by_layer()
    assert names[0] == "embed" and f"blocks.{n_layers - 1}.attn" in names and "blocks.0.mlp" in names
    torch.testing.assert_close(groups.sum(1), res.total())
    out = m(**inputs)  # scores: the model's logits, less SigLIP's bias
    torch.testing.assert_close(res.scores(out.text_embeds).sum(1) + res.logit_bias, out.logits_per_image,
                               atol=1e-4, rtol=1e-4)
    acc = res.mean_ablation(out.text_embeds, out.logits_per_image.argmax(-1))
    assert acc["none"] == 1.0 and {"attn", "mlp", "blocks.0.attn", "embed"} <= set(acc)
    if name == "siglip":  # the non-linear remainder is exactly the head's residual MLP
        head = m.vision_model.head
        x = m.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        pooled = head.attention(head.probe.repeat(2, 1, 1), x, x)[0][:, 0]
        torch.testing.assert_close(res.terms[:, res.labels.index("head.mlp")], head.mlp(head.layernorm(pooled)),
                                   atol=1e-5, rtol=1e-5)
        assert res.labels[-3:] == ["ln_post.bias", "head.bias", "head.mlp"]
    else:
        assert res.labels[-1] == "ln_post.bias"


def test_clip_heads_by_hand(tiny_lens):
    """Block 1's head terms: attn.z at CLS times out_proj's columns, through the linearised LN and the projection."""
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    res = direct_effects(lens, inputs)
    m = lens.model
    hs = m.vision_model(pixel_values=inputs["pixel_values"], output_hidden_states=True).hidden_states
    with lens.hooks(captures={"vision.blocks.1.attn.z": [lambda v, ctx: store.__setitem__("z", v)]}):
        store = {}
        m.get_image_features(pixel_values=inputs["pixel_values"])
    z = store["z"][:, 0]  # (batch, heads, d_head) at the CLS query
    o = m.vision_model.encoder.layers[1].self_attn.out_proj
    ln = m.vision_model.post_layernorm
    resid = hs[-1][:, 0]
    std = (resid.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()
    heads, dh = z.shape[1], z.shape[2]
    for h in range(heads):
        t = z[:, h] @ o.weight[:, h * dh:(h + 1) * dh].T
        ref = m.visual_projection(ln.weight * (t - t.mean(-1, keepdim=True)) / std)
        torch.testing.assert_close(res.terms[:, res.labels.index(f"blocks.1.attn.head{h}")], ref, atol=1e-5, rtol=1e-5)
    bias = m.visual_projection(ln.weight * (o.bias - o.bias.mean()) / std)
    torch.testing.assert_close(res.terms[:, res.labels.index("blocks.1.attn.bias")], bias, atol=1e-5, rtol=1e-5)


def test_clip_per_position_sums_to_heads(tiny_lens):
    lens = tiny_lens("clip")
    res = direct_effects(lens, sample_inputs("clip", lens, batch=2), per_position=True)
    heads = [i for i, lb in enumerate(res.labels) if ".head" in lb]
    assert res.by_position.shape[:2] == res.terms.shape[:2] and res.by_position.shape[-1] == res.terms.shape[-1]
    torch.testing.assert_close(res.by_position.sum(2)[:, heads], res.terms[:, heads], atol=1e-5, rtol=1e-5)
    assert not res.by_position[:, [res.labels.index("embed")]].any()
    with pytest.raises(ValueError, match="CLIP's class token only"):
        direct_effects(tiny_lens("siglip"), sample_inputs("siglip", tiny_lens("siglip")), per_position=True)


def test_mean_ablation_from_terms(tiny_lens):
    lens = tiny_lens("clip")
    res = direct_effects(lens, sample_inputs("clip", lens, batch=2))
    text = torch.nn.functional.normalize(torch.randn(3, res.terms.shape[-1]), dim=-1)
    ab = res.ablated_total("blocks.1.attn")
    mask = torch.tensor([lb.startswith("blocks.1.attn") for lb in res.labels])
    ref = res.terms[:, ~mask].sum(1) + res.terms[:, mask].mean(0).sum(0)
    torch.testing.assert_close(ab, ref)
    everything = res.ablated_total(lambda lb: True)  # all mean-ablated: every image the same
    torch.testing.assert_close(everything[0], everything[1])
    with pytest.raises(ValueError, match="one text index per image"):
        res.zero_shot_accuracy(text, [0])


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "blip2"])
def test_direct_logit_attribution_sums_to_logit(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    out = lens.model(**inputs)
    res = direct_logit_attribution(lens, inputs, 7, position=-1)
    torch.testing.assert_close(res.total(), out.logits[:, -1, 7].float(), atol=1e-4, rtol=1e-4)
    assert res.labels[0] == "embed" and any(lb.endswith(".attn.head0") for lb in res.labels)
    names, g = res.by_layer()
    torch.testing.assert_close(g.sum(1), res.total())


def test_dla_answer_position_and_token_string(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)  # right-padded: answer positions differ per row
    out = lens.model(**inputs)
    pos = lens.token_map(inputs).answer_positions()
    res = direct_logit_attribution(lens, inputs, "red")
    tid = lens.processor.tokenizer.convert_tokens_to_ids("red")
    torch.testing.assert_close(res.total(), out.logits[torch.arange(2), pos, tid], atol=1e-4, rtol=1e-4)
    assert res.positions.tolist() == pos.tolist() and res.token == tid
    with pytest.raises(ValueError, match="position must be"):
        direct_logit_attribution(lens, inputs, 7, position="last")


def test_round_trip_plot_and_wrong_family(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    res = direct_effects(lens, inputs, per_position=True)
    back = Result.load(res.save(tmp_path / "de"))
    assert type(back) is DirectEffectsResult and back.labels == res.labels and back.meta == res.meta
    assert torch.equal(back.terms, res.terms) and torch.equal(back.by_position, res.by_position)
    assert isinstance(res.plot(), Figure)
    out = lens.model(**inputs)
    assert isinstance(res.plot(out.text_embeds, [0, 1]), Figure)
    assert "DirectEffectsResult(clip: 2 images" in res.summary()
    vlm = tiny_lens("llava")
    dla = direct_logit_attribution(vlm, sample_inputs("llava", vlm), 3, position=-1)
    back = Result.load(dla.save(tmp_path / "dla"))
    assert type(back) is DirectLogitResult and torch.equal(back.terms, dla.terms) and back.token == 3
    assert isinstance(dla.plot(), Figure)
    with pytest.raises(TypeError, match="direct_effects applies to contrastive models; llava is a generative"):
        direct_effects(vlm, sample_inputs("llava", vlm))
    with pytest.raises(TypeError, match="direct_logit_attribution applies to generative models; clip is a"):
        direct_logit_attribution(lens, inputs, 3)
