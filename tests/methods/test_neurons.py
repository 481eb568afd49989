"""Neuron descriptions against hand-written PyTorch: plain pre-hooks on the down projection / fc2."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.methods import (NeuronAttributionResult, NeuronWeightsResult, Result, TopActivations, ablate_neurons,
                            neuron_attribution, neuron_logit_weights, top_activating)
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")


def _down(lens, name):
    return lens.model.get_submodule(lens.sites[name].path)


def _plain_acts(lens, name, inputs):
    """mlp.post by a plain forward pre-hook on the down projection / fc2."""
    store = {}
    h = _down(lens, name).register_forward_pre_hook(lambda m, args: store.__setitem__("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            lens.model(**inputs)
    finally:
        h.remove()
    return store["x"].float()


def _batches(name, lens):
    return [sample_inputs(name, lens, batch=2, seed=s) for s in (0, 2, 4)]


@pytest.mark.parametrize("name,site", [("clip", "vision.blocks.1.mlp.post"), ("llava", "lm.blocks.1.mlp.post"),
                                       ("llava", "vision.blocks.0.mlp.post")])
def test_running_topk_equals_topk_of_everything(tiny_lens, name, site):
    lens = tiny_lens(name)
    batches = _batches(name, lens)
    acts = [_plain_acts(lens, site, b) for b in batches]
    everything = torch.cat(acts)  # (samples, seq, neurons)
    if site.startswith("lm."):  # padding is no example
        mask = torch.cat([b["attention_mask"] for b in batches]).bool()
        everything = everything.masked_fill(~mask[..., None], float("-inf"))
    s, seq, n = everything.shape
    ref_v, ref_i = everything.reshape(s * seq, n).topk(5, dim=0)
    for stream in (batches, iter(batches), (b for b in batches)):  # any iterable, one batch at a time
        res = top_activating(lens, stream, names=site, k=5, progress=False)
        assert res.values.shape == (1, n, 5)
        torch.testing.assert_close(res.values[0], ref_v.T)
        # indices point at those values (identical prefixes tie across samples: compare what they point at)
        picked = everything[res.samples[0], res.positions[0], torch.arange(n)[:, None]]
        torch.testing.assert_close(picked, res.values[0])
        assert torch.equal(res.batches[0], res.samples[0] // 2)
        if name == "clip":  # no ties: the very same indices
            assert torch.equal(res.samples[0], (ref_i // seq).T) and torch.equal(res.positions[0], (ref_i % seq).T)
    # a subset of neurons, in one batch: the same as its columns of the full run
    some = [3, 0, 7]
    sub = top_activating(lens, batches[:1], names=site, neurons=some, k=3, progress=False)
    v, i = acts[0][..., some].reshape(-1, 3).masked_fill(
        ~batches[0]["attention_mask"].bool().reshape(-1, 1) if site.startswith("lm.") else
        torch.zeros(1, 1, dtype=torch.bool), float("-inf")).topk(3, dim=0)
    torch.testing.assert_close(sub.values[0], v.T)
    assert sub.neurons.tolist() == some


def test_clip_patch_cells_and_patches_only(tiny_lens):
    lens = tiny_lens("clip")
    batches = _batches("clip", lens)
    res = top_activating(lens, batches, names="vision.blocks.*.mlp.post", k=4, progress=False)
    seq = _plain_acts(lens, "vision.blocks.0.mlp.post", batches[0]).shape[1]
    side = int((seq - 1) ** 0.5)
    assert res.grid == [side, side] and res.names == ["vision.blocks.0.mlp.post", "vision.blocks.1.mlp.post"]
    cls = res.positions == 0
    assert (res.rows[cls] == -1).all() and (res.cols[~cls] >= 0).all()
    torch.testing.assert_close(res.rows[~cls] * side + res.cols[~cls], res.positions[~cls] - 1)
    patches = top_activating(lens, batches, names="vision.blocks.1.mlp.post", k=4, positions="patches",
                             progress=False)
    assert (patches.positions > 0).all() and (patches.rows >= 0).all()
    acts = torch.cat([_plain_acts(lens, "vision.blocks.1.mlp.post", b) for b in batches])[:, 1:]
    ref = acts.reshape(-1, acts.shape[-1]).topk(4, dim=0).values.T
    torch.testing.assert_close(patches.values[0], ref)
    pm = patches.patch_map(0, 5)
    assert pm.shape == (side, side)
    torch.testing.assert_close(pm.sum(), patches.values[0, 5].sum())


def test_fewer_positions_than_k(tiny_lens):
    lens = tiny_lens("clip")
    res = top_activating(lens, [sample_inputs("clip", lens, batch=1)], names="vision.blocks.0.mlp.post",
                         positions=[0, 1], k=4, progress=False)
    assert torch.isinf(res.values[0, :, 2:]).all() and (res.positions[0, :, 2:] == -1).all()
    assert torch.isfinite(res.values[0, :, :2]).all()


def test_logit_weights_by_hand(tiny_lens):
    lens = tiny_lens("llava")
    res = neuron_logit_weights(lens, k=4)
    m = lens.model
    down = m.model.language_model.layers[1].mlp.down_proj.weight.float()
    logits = (down.T * m.model.language_model.norm.weight.float()) @ m.lm_head.weight.float().T  # (neurons, vocab)
    v, i = logits.topk(4, dim=-1)
    li = res.names.index("lm.blocks.1.mlp.post")
    torch.testing.assert_close(res.scores[li], v)
    assert torch.equal(res.ids[li], i)
    assert len(res.labels) == len(lens.processor.tokenizer)
    assert res.top_labels(li, 0) == lens.processor.tokenizer.convert_ids_to_tokens(i[0].tolist())


def test_contrastive_weights_by_hand(tiny_lens):
    lens = tiny_lens("clip")
    m = lens.model
    text = torch.randn(5, m.config.projection_dim)
    res = neuron_logit_weights(lens, "vision.blocks.0.mlp.post", text_embeds=text, texts=list("abcde"), k=5)
    fc2 = m.vision_model.encoder.layers[0].mlp.fc2.weight.float()
    img = m.visual_projection((fc2.T * m.vision_model.post_layernorm.weight).float())
    ref = torch.nn.functional.normalize(img, dim=-1) @ torch.nn.functional.normalize(text, dim=-1).T
    v, i = ref.topk(5, dim=-1)
    torch.testing.assert_close(res.scores[0], v.detach())
    assert torch.equal(res.ids[0], i) and res.top_labels(0, 0) == [list("abcde")[j] for j in i[0].tolist()]
    with pytest.raises(ValueError, match="pass text_embeds"):
        neuron_logit_weights(lens)
    with pytest.raises(ValueError, match="SigLIP pools"):
        neuron_logit_weights(tiny_lens("siglip"), text_embeds=text)


@pytest.mark.parametrize("name", ["clip", "llava"])
def test_attribution_is_grad_times_activation(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    site = "vision.blocks.1.mlp.post" if name == "clip" else "lm.blocks.0.mlp.post"
    metric = (lambda out: out.logits_per_image[:, 0]) if name == "clip" else (lambda out: out.logits[:, -1, 5])
    res = neuron_attribution(lens, inputs, metric, names=site)
    store = {}

    def keep(mod, args):
        args[0].retain_grad()
        store["x"] = args[0]

    h = _down(lens, site).register_forward_pre_hook(keep)
    try:
        metric(lens.model(**inputs)).sum().backward()
    finally:
        h.remove()
        lens.model.zero_grad(set_to_none=True)
    ref = (store["x"].grad * store["x"]).sum(1).detach()
    assert res.scores.shape == (1, 2, ref.shape[-1])
    torch.testing.assert_close(res.scores[0], ref, atol=1e-5, rtol=1e-4)
    mean = neuron_attribution(lens, inputs, metric, names=site, baseline="mean")
    x = store["x"].detach()
    torch.testing.assert_close(mean.scores[0], (store["x"].grad * (x - x.mean(0, keepdim=True))).sum(1),
                               atol=1e-5, rtol=1e-4)
    top = res.top(3)
    assert len(top) == 3 and top[0][0] == site and top[0][2] >= top[1][2]


def test_ablate_neurons_matches_plain_hook(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    site, idx = "vision.blocks.0.mlp.post", [1, 4]
    for mode in ("zero", "mean"):
        def pre(mod, args):
            x = args[0].clone()
            x[..., idx] = 0 if mode == "zero" else x[..., idx].mean(0, keepdim=True)
            return (x,)

        h = _down(lens, site).register_forward_pre_hook(pre)
        try:
            with torch.no_grad():
                ref = lens.model(**inputs).logits_per_image
        finally:
            h.remove()
        got = ablate_neurons(lens, inputs, {site: idx}, mode=mode).logits_per_image
        torch.testing.assert_close(got, ref)
    with torch.no_grad():
        plain = lens.model(**inputs).logits_per_image
    assert not torch.allclose(got, plain)
    with pytest.raises(ValueError, match="mode must be"):
        ablate_neurons(lens, inputs, {site: idx}, mode="resample")


def test_round_trip_plot_and_errors(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    batches = _batches("clip", lens)
    top = top_activating(lens, batches, k=3, progress=False)
    back = Result.load(top.save(tmp_path / "top"))
    assert type(back) is TopActivations and back.names == top.names and back.grid == top.grid
    assert torch.equal(back.values, top.values) and torch.equal(back.rows, top.rows)
    assert isinstance(top.plot(1, 2), Figure) and isinstance(top.plot("vision.blocks.0.mlp.post", 0), Figure)
    assert "TopActivations(clip: 2 layers" in top.summary()
    att = neuron_attribution(lens, batches[0], lambda o: o.logits_per_image[:, 0])
    back = Result.load(att.save(tmp_path / "att"))
    assert type(back) is NeuronAttributionResult and torch.equal(back.scores, att.scores)
    assert isinstance(att.plot(), Figure)
    vlm = tiny_lens("llava")
    w = neuron_logit_weights(vlm, k=3)
    back = Result.load(w.save(tmp_path / "w"))
    assert type(back) is NeuronWeightsResult and torch.equal(back.ids, w.ids) and back.labels == w.labels
    assert isinstance(w.plot(0, 1), Figure)
    lm_top = top_activating(vlm, [sample_inputs("llava", vlm, batch=2)], k=3, positions="patches", progress=False)
    assert (lm_top.rows >= 0).all() and lm_top.grid  # LM image tokens, cells from the TokenMap
    assert isinstance(lm_top.plot(0, 0), Figure)
    with pytest.raises(ValueError, match="mlp.post"):
        top_activating(lens, batches, names="vision.blocks.0.resid_post", progress=False)
    with pytest.raises(ValueError, match="not tracked"):
        top.patch_map(0, 10_000)
    with pytest.raises(TypeError, match="neuron_attribution applies to generative and contrastive models"):
        neuron_attribution(tiny_lens("sd"), {}, lambda o: o)
    with pytest.raises(ValueError, match="text_embeds apply to contrastive"):
        neuron_logit_weights(vlm, text_embeds=torch.zeros(2, 4))
