"""Attention knockout against hand-written PyTorch: the same (query, key) pairs masked with -inf in the attention
logits of an eager-attention copy of each tiny model (plain forward pre-hooks, no mmlens), one forward per knockout."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from mmlens.methods import Result
from mmlens.methods.knockout import KnockoutResult, knock_out, knockout
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")

ATTN = {  # the attention modules of the default knockout sites, in plain PyTorch
    "llava": lambda m: [layer.self_attn for layer in m.model.language_model.layers],
    "qwen2_vl": lambda m: [layer.self_attn for layer in m.model.language_model.layers],
    "clip": lambda m: [layer.self_attn for layer in m.vision_model.encoder.layers],
}


def reference(lens, eager, inputs, layers, tgt, src, metric):
    """metric(output) of the eager model with attention_mask[b, :, q, k] += -inf where tgt[b, q] & src[b, k], in the
    attention modules `layers` (indices); tgt (batch, queries), src (batch, keys) bool."""
    knock = (tgt[:, :, None] & src[:, None, :])[:, None]
    extra = torch.zeros(knock.shape).masked_fill(knock, float("-inf"))

    def pre(mod, args, kwargs):
        am = kwargs.get("attention_mask")
        kwargs["attention_mask"] = extra if am is None else am + extra
        return args, kwargs

    mods = ATTN[lens.architecture](eager.model)
    handles = [mods[i].register_forward_pre_hook(pre, with_kwargs=True) for i in layers]
    try:
        with torch.no_grad():
            return metric(eager.model(**inputs))
    finally:
        for h in handles:
            h.remove()


def groups(lens, inputs):
    """'image', 'text', 'last' by hand: image-token ids, non-special attended tokens, the last attended position."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = lens.model.config.image_token_id
    special = torch.tensor(sorted(set(lens.processor.tokenizer.all_special_ids) - {image_id}) if hasattr(
        lens.processor, "tokenizer") else sorted(set(lens.processor.all_special_ids) - {image_id}))
    image = ids == image_id
    text = mask & ~image & ~torch.isin(ids, special)
    last = torch.zeros_like(mask)
    last[torch.arange(ids.shape[0]), ids.shape[1] - 1 - mask.long().flip(1).argmax(1)] = True
    return {"image": image, "text": text, "last": last}


def logit_metric_for(inputs):
    """Logit 5 minus logit 7, averaged over the attended positions (padding rows differ between kernels)."""
    mask = inputs["attention_mask"].float()

    def metric(out):
        m = mask
        return ((out.logits[:, :, 5] - out.logits[:, :, 7]) * m).sum(1) / m.sum(1)

    return metric


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_generative_equals_eager_minus_inf_mask(tiny_lens, name):
    lens, eager = tiny_lens(name), tiny_lens(name, attn_implementation="eager")
    inputs = sample_inputs(name, lens, batch=2)
    g = groups(lens, inputs)
    seq = inputs["input_ids"].shape[1]
    logit_metric = logit_metric_for(inputs)
    first = inputs["attention_mask"].long().argmax(1).tolist()  # each row's first attended position
    custom = torch.zeros(2, seq, dtype=torch.bool)
    custom[0, first[0] + 1:first[0] + 4], custom[1, [first[1] + 2, first[1] + 9]] = True, True  # per-row keys
    edges = {"image->last": ("image", "last"), "text->last": ("text", "last"), "image->text": ("image", "text"),
             "custom->all": (custom, None)}
    hand = {"image->last": (g["image"], g["last"]), "text->last": (g["text"], g["last"]),
            "image->text": (g["image"], g["text"]), "custom->all": (custom, torch.ones(2, seq, dtype=torch.bool))}
    for window in (1, 2):
        res = knockout(lens, inputs, edges=edges, window=window, metric=logit_metric)
        n_win = 3 - window
        assert res.values.shape == (n_win, 4, 2) and res.edges == list(edges)
        assert res.windows == (["lm.blocks.0", "lm.blocks.1"] if window == 1 else ["lm.blocks.0-1"])
        with torch.no_grad():
            torch.testing.assert_close(res.baseline, logit_metric(eager.model(**inputs)), atol=1e-5, rtol=1e-5)
        for w in range(n_win):
            for e, label in enumerate(edges):
                src, tgt = hand[label]
                want = reference(lens, eager, inputs, range(w, w + window), tgt, src, logit_metric)
                torch.testing.assert_close(res.values[w, e], want, atol=1e-5, rtol=1e-5)
        assert (res.values - res.baseline).abs().amax() > 1e-3  # the knockouts do something


def test_clip_vision_tower_equals_eager(tiny_lens):
    lens, eager = tiny_lens("clip"), tiny_lens("clip", attn_implementation="eager")
    inputs = sample_inputs("clip", lens, batch=2)

    def metric(out):
        return out.logits_per_image[:, 0]

    edges = {"patches->cls": (range(1, 17), [0]), "cls->patches": ([0], torch.arange(1, 17)),
             "left->all": ([1, 5, 9, 13], None)}
    res = knockout(lens, inputs, edges=edges, metric=metric, batch_size=4)  # 2 rows per copy: 2 copies per forward
    assert res.windows == ["vision.blocks.0", "vision.blocks.1"] and res.values.shape == (2, 3, 2)
    n = 17

    def mask(pos):
        m = torch.zeros(2, n, dtype=torch.bool)
        m[:, pos] = True
        return m

    patches = list(range(1, 17))
    hand = {"patches->cls": (mask(patches), mask([0])), "cls->patches": (mask([0]), mask(patches)),
            "left->all": (mask([1, 5, 9, 13]), mask(list(range(n))))}
    for w in range(2):
        for e, label in enumerate(edges):
            src, tgt = hand[label]
            torch.testing.assert_close(res.values[w, e], reference(lens, eager, inputs, [w], tgt, src, metric),
                                       atol=1e-5, rtol=1e-5)
    # text-tower layers: only the texts are repeated, the batch is the texts
    txt = knockout(lens, inputs, edges={"first->last": ([1], [-1])}, layers="text.blocks.*.attn.pattern",
                   metric=lambda out: out.logits_per_text[:, 0])
    assert txt.values.shape == (2, 1, 2) and txt.windows == ["text.blocks.0", "text.blocks.1"]


def test_batched_equals_one_forward_per_knockout(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    logit_metric = logit_metric_for(inputs)
    edges = {"image->last": ("image", "last"), "text->last": ("text", "last"), "image->answer": ("image", "answer")}
    full = knockout(lens, inputs, edges=edges, layers=[0, 1], metric=logit_metric)
    one = knockout(lens, inputs, edges=edges, layers=[0, 1], metric=logit_metric, batch_size=1)
    torch.testing.assert_close(full.values, one.values, atol=1e-6, rtol=1e-6)
    for e, label in enumerate(edges):
        single = knockout(lens, inputs, edges={label: edges[label]}, layers=[1], metric=logit_metric)
        torch.testing.assert_close(single.values[0, 0], full.values[1, e], atol=1e-6, rtol=1e-6)


def test_knocking_out_nothing_leaves_the_metric(tiny_lens):
    """Keys the target queries never see (the future, under the causal mask) carry no probability to remove."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    logit_metric = logit_metric_for(inputs)
    res = knockout(lens, inputs, edges={"image->bos": ("image", [0]), "last->text": ("last", "text")}, window=2,
                   metric=logit_metric)
    torch.testing.assert_close(res.values, res.baseline.expand_as(res.values), atol=1e-6, rtol=0)
    assert res.effect().abs().max() < 1e-5


def test_rows_with_nothing_left_are_kept_and_counted(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    logit_metric = logit_metric_for(inputs)
    with pytest.warns(UserWarning, match=r"16 attention rows .* left unchanged"):  # 2 rows x 4 heads x 2 layers
        res = knockout(lens, inputs, edges={"all->last": (None, "last")}, window=2, metric=logit_metric)
    assert res.meta["rows_left_unchanged"] == 16
    torch.testing.assert_close(res.values[0, 0], res.baseline, atol=1e-6, rtol=0)


def test_knock_out_is_a_minus_inf_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    tgt = torch.tensor([[1, 0, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    src = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    out = knock_out(logits.softmax(-1), tgt, src)
    want = logits.masked_fill((tgt[:, :, None] & src[:, None, :])[:, None], float("-inf")).softmax(-1)
    torch.testing.assert_close(out, want)
    assert knock_out(logits.softmax(-1), tgt, torch.zeros_like(src)) is None


def test_save_load_effect_and_plot(tiny_lens, tmp_path):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    logit_metric = logit_metric_for(inputs)
    res = knockout(lens, inputs, edges={"image->last": ("image", "last"), "text->last": ("text", "last")},
                   metric=logit_metric)
    torch.testing.assert_close(res.effect(), (res.values - res.baseline) / res.baseline.abs())
    back = Result.load(res.save(tmp_path / "ko"))
    assert type(back) is KnockoutResult and torch.equal(back.values, res.values)
    assert torch.equal(back.baseline, res.baseline) and back.sites == res.sites and back.edges == res.edges
    assert back.meta["window"] == 1 and "KnockoutResult(llava: 2 windows" in repr(back)
    from matplotlib.figure import Figure

    assert isinstance(res.plot(), Figure) and isinstance(res.plot("values", batch=1), Figure)
    assert "<img" in res._repr_html_()


def test_diffusion_cross_attention_equals_masked_processor(tiny_lens):
    """SD: the prompt's word tokens knocked out of every latent pixel's cross-attention (cond half) at some steps ==
    the UNet's own processors given an additive -inf mask on those keys."""
    lens = tiny_lens("sd")
    kw = dict(prompt=["a red square", "a blue circle"], num_inference_steps=2, guidance_scale=7.0, height=32,
              width=32, output_type="latent")
    proj = torch.randn(4 * 16 * 16, generator=torch.Generator().manual_seed(0))

    def metric(out):  # a random projection of the final latents
        return out.images.float().flatten(1) @ proj

    res = knockout(lens, {**kw, "generator": torch.Generator().manual_seed(1)},
                   edges={"word 2": [2], "words": [1, 2, 3]}, steps=[0], metric=metric)
    sites = lens.hook_points("unet.*.cross.pattern")
    assert res.sites == [[s] for s in sites] and res.values.shape == (len(sites), 2, 2)
    assert ((res.values - res.baseline).abs() > 0.05).all()

    unet = lens.model.unet
    attn2 = [unet.get_submodule(lens.sites[s].path.removeprefix("unet.")) for s in sites]
    state = {"step": -1}
    watch = unet.register_forward_pre_hook(lambda *a: state.__setitem__("step", state["step"] + 1))

    class Masked:
        def __init__(self, orig, keys):
            self.orig, self.keys = orig, keys

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
            if state["step"] == 0:
                b, k = encoder_hidden_states.shape[:2]
                attention_mask = torch.zeros(b, 1, k)
                attention_mask[b // 2:, :, self.keys] = float("-inf")  # the cond half
            return self.orig(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    try:
        for w, mod in enumerate(attn2):
            for e, keys in enumerate(([2], [1, 2, 3])):
                orig = mod.processor
                mod.set_processor(Masked(orig, keys))
                state["step"] = -1
                try:
                    with torch.no_grad():
                        out = lens.model(**kw, generator=torch.Generator().manual_seed(1))
                finally:
                    mod.set_processor(orig)
                torch.testing.assert_close(res.values[w, e], metric(out), atol=1e-4, rtol=1e-5)
    finally:
        watch.remove()


def test_errors(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    logit_metric = logit_metric_for(inputs)
    ok = {"e": ("image", "last")}

    def run(**kw):
        args = dict(edges=ok, metric=logit_metric)
        return knockout(lens, inputs, **{**args, **kw})

    with pytest.raises(ValueError, match=r"edges\['e'\] source keys is empty"):
        run(edges={"e": ([], "last")})
    with pytest.raises(ValueError, match=r"edges\['e'\] target queries is 'imag'; allowed: None"):
        run(edges={"e": ("image", "imag")})
    with pytest.raises(ValueError, match=r"edges\['e'\] source keys at lm.blocks.0.attn.pattern: position 99 is out of "
                                         r"range \(27 positions; allowed -27 to 26\)"):
        run(edges={"e": ([99], "last")})
    with pytest.raises(ValueError, match="empty in batch rows \\[1\\]"):
        run(edges={"e": (torch.tensor([[True] * 27, [False] * 27]), "last")})
    with pytest.raises(TypeError, match=r"edges\['e'\] must be a \(source_keys, target_queries\) pair"):
        run(edges={"e": "image"})
    with pytest.raises(ValueError, match="edges is empty"):
        run(edges={})
    with pytest.raises(ValueError, match="layers: block 5 does not exist; .* blocks 0 to 1"):
        run(layers=[5])
    with pytest.raises(ValueError, match="not an attention-pattern site"):
        run(layers="lm.blocks.0.resid_post")
    with pytest.raises(ValueError, match="lm.blocks.9.attn.pattern"):
        run(layers="lm.blocks.9.attn.pattern")
    with pytest.raises(ValueError, match="window must be between 1 and the number of layers \\(2\\); got 0"):
        run(window=0)
    with pytest.raises(ValueError, match="got 3"):
        run(window=3)
    with pytest.raises(ValueError, match=r"metric\(output\) returned shape \(2, 27\) on the unedited inputs; it must "
                                         r"return one value per batch row, shape \(2,\)"):
        run(metric=lambda out: out.logits[..., 0])
    with pytest.raises(TypeError, match="must return a torch.Tensor"):
        run(metric=lambda out: 1.0)
    with pytest.raises(ValueError, match="batch_size must be None or an int >= 1"):
        run(batch_size=0)
    with pytest.raises(ValueError, match="steps: denoising steps exist only in diffusion"):
        run(steps=[0])
    with pytest.raises(ValueError, match="names positions of the LM's 27-token sequence"):
        run(layers="vision.blocks.0.attn.pattern")
    clip = tiny_lens("clip")
    clip_in = sample_inputs("clip", clip, batch=2)
    with pytest.raises(ValueError, match="group names resolve through the token map of a generative VLM"):
        knockout(clip, clip_in, edges=ok, metric=lambda out: out.logits_per_image[:, 0])
    with pytest.raises(ValueError, match="knock out one tower at a time"):
        knockout(clip, clip_in, edges={"e": ([0], [1])}, layers=["vision.blocks.0.attn.pattern",
                                                                    "text.blocks.0.attn.pattern"],
                 metric=lambda out: out.logits_per_image[:, 0])
    qwen = tiny_lens("qwen2_vl")
    with pytest.raises(ValueError, match="attends per image"):
        knockout(qwen, sample_inputs("qwen2_vl", qwen, batch=2), edges={"e": ([0], [1])},
                 layers="vision.blocks.0.attn.pattern", metric=lambda out: out.logits[:, -1, 0])
    sd = tiny_lens("sd")
    kw = dict(prompt="a red square", num_inference_steps=1, height=32, width=32, output_type="latent")

    def per_image(out):
        return out.images.flatten(1).sum(1)

    with pytest.raises(ValueError, match="'text_encoder.blocks.0.attn.pattern' is not in the denoiser"):
        knockout(sd, kw, edges={"w": [2]}, layers="text_encoder.blocks.0.attn.pattern", metric=per_image)
    with pytest.raises(ValueError, match="group names resolve through the token map"):
        knockout(sd, kw, edges={"w": "last"}, metric=per_image)
    with pytest.raises(ValueError, match=r"returned shape \(\) on the unedited inputs \(one value per generated image"):
        knockout(sd, kw, edges={"w": [2]}, metric=lambda out: out.images.sum())
    with pytest.raises(ValueError, match=r"edges\['w'\] source keys at unet.down.0.attn.0.cross.pattern: position 16"):
        knockout(sd, kw, edges={"w": [16]}, metric=per_image)
