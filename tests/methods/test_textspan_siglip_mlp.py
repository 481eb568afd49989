"""SigLIP's pooling-head MLP split per token (and per component) against autograd, finite differences and the
model's own image features."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mmlens
from mmlens.methods import direct_effects
from mmlens.methods.direct_effects import split_pooling_mlp
from mmlens.methods.textspan import _siglip_tokens, text_segmentation
from mmlens.testing.tiny_models import sample_image, sample_inputs

TEXTS = ["a red square", "a blue circle", "green"]


def _pv(lens, n: int = 2):
    images = [sample_image(300 + i) for i in range(n)]
    return images, lens.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def _features(model, pv):
    out = model.get_image_features(pixel_values=pv)
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _by_hand(model, pv):
    """The pooling head re-run in float64 by hand: token terms of p (out_proj's bias apart), abar, p, the head."""
    head = model.vision_model.head
    mha = head.attention
    with torch.no_grad():
        x = model.vision_model(pixel_values=pv).last_hidden_state.double()
        b, seq, d = x.shape
        h = mha.num_heads
        wq, wk, wv = mha.in_proj_weight.double().chunk(3)
        bq, bk, bv = mha.in_proj_bias.double().chunk(3)
        q = (head.probe.double() @ wq.T + bq).reshape(1, h, d // h)
        k = (x @ wk.T + bk).reshape(b, seq, h, d // h)
        a = torch.einsum("qhk,bshk->bhs", q, k).div((d // h) ** 0.5).softmax(-1)  # (batch, heads, seq)
        v = (x @ wv.T + bv).reshape(b, seq, h, d // h)
        tok = torch.einsum("bhs,bshk->bshk", a, v).reshape(b, seq, d) @ mha.out_proj.weight.double().T
    p = tok.sum(1) + mha.out_proj.bias.double()
    return tok, a.mean(1), p, head


def _frozen_f(head, p):
    """q -> mlp(layernorm(q)) with the layernorm's std held at p's, in float64."""
    ln, mlp = head.layernorm, head.mlp
    w, b = ln.weight.double(), ln.bias.double()
    std = (p.var(-1, unbiased=False, keepdim=True) + ln.eps).sqrt()

    def f(q):
        z = w * (q - q.mean(-1, keepdim=True)) / std + b
        return nn.functional.linear(mlp.activation_fn(nn.functional.linear(z, mlp.fc1.weight.double(),
                                                                            mlp.fc1.bias.double())),
                                    mlp.fc2.weight.double(), mlp.fc2.bias.double())
    return f


@pytest.mark.parametrize("head_mlp", ["integrated", "linearised"])
def test_token_terms_sum_to_image_features(tiny_lens, head_mlp):
    lens = tiny_lens("siglip")
    images, pv = _pv(lens)
    per, feats = _siglip_tokens(lens, pv, head_mlp)
    assert per.shape == (2, 16, 64) and per.dtype == torch.float32
    with torch.no_grad():
        ref = _features(lens.model, pv)
    torch.testing.assert_close(per.sum(1), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(feats, ref, atol=1e-6, rtol=0)
    # the maps: over the patches they add up to the image-text cosine the model's logits use (less scale, bias)
    seg = text_segmentation(lens, images, TEXTS, head_mlp=head_mlp)
    m = lens.model
    ids = lens.processor.tokenizer(TEXTS, padding="max_length", max_length=m.config.text_config.max_position_embeddings,
                                   return_tensors="pt")["input_ids"]
    with torch.no_grad():
        text = m.get_text_features(input_ids=ids)
    text = text if isinstance(text, torch.Tensor) else text.pooler_output
    cos = nn.functional.normalize(ref, dim=-1) @ nn.functional.normalize(text, dim=-1).T
    torch.testing.assert_close(seg.maps.sum((-1, -2)), cos, atol=1e-5, rtol=0)
    assert seg.meta["split"].endswith(f"head mlp: {head_mlp}")


def test_linearised_share_is_the_jacobian_on_each_token(tiny_lens):
    """J u_t against central finite differences and an autograd jvp of the frozen-std head MLP, per token."""
    lens = tiny_lens("siglip")
    _, pv = _pv(lens)
    tok, abar, p, head = _by_hand(lens.model, pv)
    terms = tok + abar[..., None] * head.attention.out_proj.bias.double()  # sum to p
    share = split_pooling_mlp(head, terms.float(), mlp="linearised").double()
    f = _frozen_f(head, p)
    eps = 1e-4
    with torch.no_grad():
        fd = torch.stack([(f(p + eps * terms[:, t]) - f(p - eps * terms[:, t])) / (2 * eps)
                          for t in range(terms.shape[1])], 1)
    torch.testing.assert_close(share, fd, atol=2e-5, rtol=1e-4)
    _, jv = torch.autograd.functional.jvp(f, p, terms[:, 3])
    torch.testing.assert_close(share[:, 3], jv, atol=2e-5, rtol=1e-4)
    assert fd.abs().max() > 1e-2  # the MLP does depend on the tokens


def test_integrated_share_is_the_path_integral(tiny_lens):
    """Integrated shares: a 2000-step midpoint rule of J(s p) p_t over s in [0, 1] (frozen std) by autograd, and
    completeness: they add up to mlp(layernorm(p)) - mlp(layernorm.bias)."""
    lens = tiny_lens("siglip")
    _, pv = _pv(lens)
    tok, abar, p, head = _by_hand(lens.model, pv)
    terms = tok + abar[..., None] * head.attention.out_proj.bias.double()
    share = split_pooling_mlp(head, terms.float(), mlp="integrated").double()
    f = _frozen_f(head, p)
    n = 2000
    s = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    _, ref = torch.autograd.functional.jvp(f, s[:, None, None] * p, terms[:, 5].expand(n, -1, -1))
    ref = ref.mean(0)
    torch.testing.assert_close(share[:, 5], ref, atol=2e-5, rtol=1e-4)
    with torch.no_grad():
        mlp = head.mlp.double()
        try:
            complete = mlp(head.layernorm.double()(p)) - mlp(head.layernorm.bias.double().expand_as(p))
        finally:
            head.float()
    torch.testing.assert_close(share.sum(1), complete, atol=2e-5, rtol=0)
    lin = split_pooling_mlp(head, terms.float(), mlp="linearised").double()
    assert (lin.sum(1) - complete).norm() > 100 * (share.sum(1) - complete).norm()  # the curvature the line misses
    few = split_pooling_mlp(head, terms.float(), mlp="integrated", steps=2).double()
    assert (few.sum(1) - complete).norm() > (share.sum(1) - complete).norm()  # fewer nodes: worse


def test_zeroed_mlp_gives_the_old_split(tiny_folder):
    """With the head's MLP zeroed every option is the old per-token split plus out_proj's bias by abar; with
    out_proj's bias zeroed too, exactly the old split (the pooled attention's own token terms)."""
    lens = mmlens.load(tiny_folder("siglip"))  # its own copy: the weights are changed
    head = lens.model.vision_model.head
    with torch.no_grad():
        for prm in head.mlp.parameters():
            prm.zero_()
    images, pv = _pv(lens)
    tok, abar, _, _ = _by_hand(lens.model, pv)
    old, _ = _siglip_tokens(lens, pv, "none")
    torch.testing.assert_close(old.double(), tok, atol=1e-5, rtol=1e-5)
    bias = abar[..., None] * head.attention.out_proj.bias.double()
    for opt in ("integrated", "linearised"):
        new, _ = _siglip_tokens(lens, pv, opt)
        torch.testing.assert_close(new.double(), tok + bias, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        head.attention.out_proj.bias.zero_()
    new, _ = _siglip_tokens(lens, pv, "integrated")
    torch.testing.assert_close(new, old, atol=1e-6, rtol=1e-6)
    maps = [text_segmentation(lens, images, TEXTS, head_mlp=o).maps for o in ("integrated", "none")]
    torch.testing.assert_close(maps[0], maps[1], atol=1e-6, rtol=1e-6)


def test_direct_effects_split_head_mlp(tiny_lens):
    """head_mlp='integrated': the components still sum to the features; each carries its MLP share (checked on one
    head by a jvp); 'head.mlp' keeps only about mlp(layernorm.bias), the same for every image."""
    lens = tiny_lens("siglip")
    inputs = sample_inputs("siglip", lens, batch=2)
    block = direct_effects(lens, inputs)
    split = direct_effects(lens, inputs, head_mlp="integrated")
    assert split.labels == block.labels and split.meta["head_mlp"] == "integrated"
    with torch.no_grad():
        ref = _features(lens.model, inputs["pixel_values"])
    torch.testing.assert_close(split.total(), ref, atol=1e-5, rtol=0)
    head = lens.model.vision_model.head
    with torch.no_grad():
        base = head.mlp(head.layernorm.bias)
    torch.testing.assert_close(split.terms[:, -1], base.expand(2, -1), atol=1e-4, rtol=0)
    parts = block.terms[:, :-1]
    torch.testing.assert_close(split.terms[:, :-1] - parts, split_pooling_mlp(head, parts), atol=1e-6, rtol=0)
    assert (split.terms[:, :-1] - parts).abs().max() > 1e-3


def test_bad_options(tiny_lens):
    lens = tiny_lens("siglip")
    images, pv = _pv(lens, 1)
    with pytest.raises(ValueError, match=r"head_mlp must be one of \('integrated', 'linearised', 'none'\)"):
        text_segmentation(lens, images, TEXTS, head_mlp="exact")
    with pytest.raises(ValueError, match="head_mlp must be one of"):
        text_segmentation(tiny_lens("clip"), images, TEXTS, head_mlp=None)
    head = lens.model.vision_model.head
    with pytest.raises(ValueError, match=r"mlp must be one of \('integrated', 'linearised'\)"):
        split_pooling_mlp(head, torch.zeros(1, 2, 64), mlp="none")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        split_pooling_mlp(head, torch.zeros(1, 2, 64), steps=0)
    with pytest.raises(ValueError, match="head_mlp must be one of"):
        direct_effects(lens, {"pixel_values": pv}, head_mlp="none")
    with pytest.raises(ValueError, match="has none"):
        direct_effects(tiny_lens("clip"), sample_inputs("clip", tiny_lens("clip")), head_mlp="integrated")


def test_fc_act_fc_shortcut_equals_the_generic_jvp(tiny_lens, monkeypatch):
    """SigLIP's fc2(act(fc1 z)) takes the shortcut (node derivatives averaged first); any other MLP the batched jvp
    per node. Both give the same shares, and an MLP that only looks like fc-act-fc is not taken for one."""
    import sys

    de = sys.modules["mmlens.methods.direct_effects"]  # the module (mmlens.methods.direct_effects is the function)
    lens = tiny_lens("siglip")
    _, pv = _pv(lens)
    tok, _, _, head = _by_hand(lens.model, pv)
    terms = tok.float()
    assert de._is_fc_act_fc(head.mlp, torch.randn(2, terms.shape[-1]))
    fast = {m: split_pooling_mlp(head, terms, mlp=m) for m in ("linearised", "integrated")}
    monkeypatch.setattr(de, "_is_fc_act_fc", lambda f, z: False)
    for m, v in fast.items():
        torch.testing.assert_close(v, split_pooling_mlp(head, terms, mlp=m), rtol=1e-4, atol=1e-6)
    monkeypatch.undo()

    class Scaled(type(head.mlp)):
        def forward(self, x):
            return 2 * super().forward(x)

    odd = Scaled(head.mlp.config)
    odd.load_state_dict(head.mlp.state_dict())
    assert not de._is_fc_act_fc(odd, torch.randn(2, terms.shape[-1]))
