"""Relevancy (Chefer et al. 2021) and attention rollout against hand-written loops over the full relevancy matrix,
on eager-attention copies of the tiny models (attentions from `output_attentions` or plain forward hooks, gradients
from torch.autograd), while mmlens runs the default SDPA kernel through its hooks."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.methods import Result
from mmlens.methods.relevancy import RelevancyResult, relevancy
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_image, sample_inputs

matplotlib.use("Agg")


# ----------------------------------------------------------------------------------------- the reference
def chefer_rows(atts, grads, read):
    """R = I; R += mean_h(relu(g * A)) @ R per layer, in order; the rows `read` (b,) of R: (b, n)."""
    b, n = atts[0].shape[0], atts[0].shape[-1]
    r = torch.eye(n).repeat(b, 1, 1)
    for a, g in zip(atts, grads):
        cam = (g * a).clamp(min=0).mean(1)
        r = r + cam @ r
    return r[torch.arange(b), read]


def rollout_rows(atts, read):
    """R = prod_l rownorm(0.5 mean_h(A_l) + 0.5 I), last layer leftmost; the rows `read`."""
    b, n = atts[0].shape[0], atts[0].shape[-1]
    r = torch.eye(n).repeat(b, 1, 1)
    for a in atts:
        m = 0.5 * a.mean(1) + 0.5 * torch.eye(n)
        r = (m / m.sum(-1, keepdim=True)) @ r
    return r[torch.arange(b), read]


def clip_reference(eager, inputs, targets):
    """Attentions of both towers, the logits per (image, target text), and the text towers' pooled (EOS) rows."""
    out = eager.model(**inputs, output_attentions=True)
    va, ta = out.vision_model_output.attentions, out.text_model_output.attentions
    logit = out.logits_per_image[torch.arange(len(targets)), targets]
    return va, ta, logit


def llava_answer_positions(lens, inputs):
    """The last attended, non-special, non-image position of each row, by hand."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = lens.model.config.image_token_id
    special = torch.tensor(sorted(set(lens.processor.tokenizer.all_special_ids) - {image_id}))
    text = mask & (ids != image_id) & ~torch.isin(ids, special)
    idx = torch.arange(ids.shape[1]).expand_as(ids)
    return torch.where(text, idx, -1).max(1).values


def llava_reference(lens, eager, inputs, token):
    """LM attentions (output_attentions), vision attentions (forward hooks on the eager vision self-attention,
    which returns its weights), and the logit of `token` at the answer position."""
    vision = []
    hooks = [layer.self_attn.register_forward_hook(lambda m, a, o: vision.append(o[1]))
             for layer in eager.model.model.vision_tower.encoder.layers]
    try:
        out = eager.model(**inputs, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    pos = llava_answer_positions(lens, inputs)
    logit = out.logits[torch.arange(pos.shape[0]), pos, token]
    return out.attentions, vision, logit, pos


# ---------------------------------------------------------------------------------------------- CLIP
@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_clip_image_and_text_relevancy_match_hand_loops(tiny_lens, method):
    lens, eager = tiny_lens("clip"), tiny_lens("clip", attn_implementation="eager")
    inputs = sample_inputs("clip", lens, batch=2)
    targets = torch.tensor([1, 0])  # one text index per image
    res = relevancy(lens, inputs, targets, method=method)
    va, ta, logit = clip_reference(eager, inputs, targets)
    read = torch.zeros(2, dtype=torch.long)
    if method == "chefer":
        vg = torch.autograd.grad(logit.sum(), va, retain_graph=True)
        ref = chefer_rows([a.detach() for a in va], vg, read)
    else:
        ref = rollout_rows([a.detach() for a in va], read)
    assert isinstance(res, RelevancyResult) and res.maps.shape == (2, 1, 4, 4) and res.labels == ["target"]
    torch.testing.assert_close(res.maps[:, 0], ref[:, 1:].reshape(2, 4, 4), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.scores[:, 0], logit.detach(), atol=1e-5, rtol=1e-5)
    assert res.targets == [[1, 0]] and res.token_rows[:, 0].tolist() == [1, 0]

    # the text side: the target text's EOS row through the text tower, with the gradient of that one logit
    ids = inputs["input_ids"]
    eos = (ids == lens.model.config.text_config.eos_token_id).int().argmax(-1)
    for b, t in enumerate(targets.tolist()):
        one = [a[t:t + 1].detach() for a in ta]
        if method == "chefer":
            g = torch.autograd.grad(logit[b], ta, retain_graph=True)
            want = chefer_rows(one, [x[t:t + 1] for x in g], eos[t:t + 1])[0]
        else:
            want = rollout_rows(one, eos[t:t + 1])[0]
        torch.testing.assert_close(res.token_relevancy[b, 0], want, atol=1e-5, rtol=1e-4)
        toks = res.token_scores(b, "target")
        assert [t for t, _ in toks] == lens.processor.tokenizer.convert_ids_to_tokens(ids[t].tolist())


def test_clip_targets_text_index_embedding_and_predicted(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    out = lens.model(**inputs)
    by_index = relevancy(lens, inputs, [0, 1])
    assert by_index.labels == ["a photo of a red square", "a blue circle"]
    torch.testing.assert_close(by_index.scores, out.logits_per_image, atol=1e-5, rtol=1e-5)
    # the same text given as an embedding: the same logit, so the same image map; no text side
    emb = relevancy(lens, {"pixel_values": inputs["pixel_values"]}, out.text_embeds[1])
    torch.testing.assert_close(emb.maps[:, 0], by_index.maps[:, 1], atol=1e-5, rtol=1e-4)
    assert emb.token_rows.tolist() == [[-1], [-1]] and emb.token_scores(0, 0) == [] and emb.targets == [[-1, -1]]
    two = relevancy(lens, {"pixel_values": inputs["pixel_values"]}, [out.text_embeds[0], out.text_embeds[1]])
    assert two.labels == ["embedding 0", "embedding 1"]
    torch.testing.assert_close(two.maps, by_index.maps, atol=1e-5, rtol=1e-4)
    by_string = relevancy(lens, {"pixel_values": inputs["pixel_values"]}, "a blue circle")  # encoded by the text tower
    assert by_string.labels == ["a blue circle"]
    torch.testing.assert_close(by_string.scores[:, 0], out.logits_per_image[:, 1], atol=1e-5, rtol=1e-5)
    pred = relevancy(lens, inputs)  # each image's best text
    best = out.logits_per_image.argmax(-1)
    assert pred.labels == ["predicted"] and pred.targets == [best.tolist()]
    torch.testing.assert_close(pred.maps[:, 0], torch.stack([by_index.maps[b, int(best[b])] for b in range(2)]))


def test_rollout_ignores_the_target(tiny_lens):
    lens = tiny_lens("clip")
    res = relevancy(lens, sample_inputs("clip", lens, batch=2), [0, 1], method="rollout")
    torch.testing.assert_close(res.maps[:, 0], res.maps[:, 1])
    assert res.method == "relevancy (rollout)"


def test_siglip_logit_and_rollout_through_the_pooling_probe(tiny_lens):
    """SigLIP pools by attention: the vision rollout is read through the probe's head-averaged attention (taken here
    from the model's own nn.MultiheadAttention), and the explained logit is the model's."""
    lens, eager = tiny_lens("siglip"), tiny_lens("siglip", attn_implementation="eager")
    inputs = sample_inputs("siglip", lens, batch=2)
    m = eager.model
    res = relevancy(lens, inputs, 1, method="rollout")
    with torch.no_grad():
        out = m(**inputs, output_attentions=True)
        x = out.vision_model_output.last_hidden_state
        head = m.vision_model.head
        _, w = head.attention(head.probe.repeat(2, 1, 1), x, x, need_weights=True, average_attn_weights=True)
    torch.testing.assert_close(res.scores[:, 0], out.logits_per_image[:, 1], atol=1e-5, rtol=1e-5)
    n = x.shape[1]
    r = torch.eye(n).repeat(2, 1, 1)
    for a in out.vision_model_output.attentions:
        mm = 0.5 * a.mean(1) + 0.5 * torch.eye(n)
        r = (mm / mm.sum(-1, keepdim=True)) @ r
    want = (w[:, 0, None] @ r)[:, 0]  # (b, n): no CLS in SigLIP
    torch.testing.assert_close(res.maps[:, 0], want.reshape(2, 4, 4), atol=1e-5, rtol=1e-4)
    chef = relevancy(lens, inputs, 1)
    torch.testing.assert_close(chef.scores, res.scores)
    assert chef.maps.shape == (2, 1, 4, 4) and torch.isfinite(chef.maps).all() and chef.maps.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- LLaVA
@pytest.mark.parametrize("method", ["chefer", "rollout"])
def test_llava_lm_and_vision_relevancy_match_hand_loops(tiny_lens, method):
    lens, eager = tiny_lens("llava"), tiny_lens("llava", attn_implementation="eager")
    inputs = sample_inputs("llava", lens, batch=2)
    tok = lens.processor.tokenizer.convert_tokens_to_ids("red")
    lm_only = relevancy(lens, inputs, "red", method=method, through_vision=False)
    full = relevancy(lens, inputs, "red", method=method)
    la, vis, logit, pos = llava_reference(lens, eager, inputs, tok)
    if method == "chefer":
        grads = torch.autograd.grad(logit.sum(), [*la, *vis], allow_unused=True)
        lg = grads[:len(la)]
        vg = [torch.zeros_like(a) if g is None else g for a, g in zip(vis, grads[len(la):])]
        row = chefer_rows([a.detach() for a in la], lg, pos)
    else:
        row = rollout_rows([a.detach() for a in la], pos)
    image = inputs["input_ids"] == lens.model.config.image_token_id  # 16 tokens per row, raster order, no CLS
    lm_map = torch.stack([row[b][image[b]] for b in range(2)]).reshape(2, 4, 4)
    assert lm_only.maps.shape == (2, 1, 4, 4) and lm_only.labels == ["red"] and lm_only.targets == [[tok, tok]]
    torch.testing.assert_close(lm_only.maps[:, 0], lm_map, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lm_only.token_relevancy[:, 0], row, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lm_only.scores[:, 0], logit.detach(), atol=1e-5, rtol=1e-5)

    # through the vision tower: the image tokens' relevancy enters at the tower's patch outputs (CLS gets none:
    # the default strategy drops it); the tiny llava reads hidden_states[-2], so only vision block 0 counts
    u = torch.zeros(2, 17)
    u[:, 1:] = lm_map.reshape(2, 16)
    v0 = vis[0].detach()
    if method == "chefer":
        assert vg[1].abs().max() == 0  # block 1 does not feed the LM
        r = torch.eye(17) + (vg[0] * v0).clamp(min=0).mean(1)
    else:
        m = 0.5 * v0.mean(1) + 0.5 * torch.eye(17)
        r = m / m.sum(-1, keepdim=True)
    want = (u[:, None] @ r)[:, 0, 1:].reshape(2, 4, 4)
    torch.testing.assert_close(full.maps[:, 0], want, atol=1e-5, rtol=1e-4)
    assert full.meta["through_vision"] is True and lm_only.meta["through_vision"] is False


def test_llava_several_targets_predicted_and_position(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    res = relevancy(lens, inputs, ["red", "blue"])
    one = relevancy(lens, inputs, "blue")
    torch.testing.assert_close(res.maps[:, 1], one.maps[:, 0])
    pos = llava_answer_positions(lens, inputs)
    with torch.no_grad():
        logits = lens.model(**inputs).logits[torch.arange(2), pos]
    pred = relevancy(lens, inputs, None)
    assert pred.targets == [logits.argmax(-1).tolist()]
    torch.testing.assert_close(pred.scores[:, 0], logits.max(-1).values, atol=1e-5, rtol=1e-5)
    last = relevancy(lens, inputs, "red", position=-1)  # the row of the last position (</s> or padding-free end)
    assert last.meta["position"] == -1 and last.token_relevancy[:, 0, -1].min() >= 1.0  # R = I + ...: itself


def test_qwen2_vl_lm_level_map_is_the_token_row_on_the_grid(tiny_lens):
    lens = tiny_lens("qwen2_vl")
    inputs = sample_inputs("qwen2_vl", lens, batch=1)
    res = relevancy(lens, inputs, "red", images=[sample_image(0)])
    tm = lens.token_map(inputs)
    torch.testing.assert_close(res.maps[0, 0], tm.to_grid(res.token_relevancy[0, 0], batch=0))
    assert res.images.shape == (1, 32, 32, 3) and res.meta["through_vision"] is False
    with pytest.raises(ValueError, match="images="):
        relevancy(lens, inputs, "red")


# ---------------------------------------------------------------------------------------- result & errors
def test_result_saves_loads_plots_and_scores_against_masks(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    res = relevancy(lens, sample_inputs("clip", lens, batch=2), [0, 1])
    back = Result.load(res.save(tmp_path / "rel"))
    assert isinstance(back, RelevancyResult) and back.labels == res.labels and back.tokens == res.tokens
    torch.testing.assert_close(back.maps, res.maps)
    torch.testing.assert_close(back.token_relevancy, res.token_relevancy)
    assert isinstance(res.plot(), Figure) and "Relevancy" in res.summary()
    # the images are the inputs un-normalised: equal to the sample images up to the processor's rounding
    want = torch.stack([torch.from_numpy(np.asarray(sample_image(k))) for k in range(2)])
    assert (res.images.int() - want.int()).abs().max() <= 1
    peak = res.upsampled(0)[:, 0].flatten(1).argmax(1)
    masks = torch.zeros(2, 32 * 32, dtype=torch.bool)
    masks[torch.arange(2), peak] = True
    assert res.pointing_game(masks.reshape(2, 32, 32), 0).all()


def test_errors(tiny_lens):
    clip, llava = tiny_lens("clip"), tiny_lens("llava")
    ci, li = sample_inputs("clip", clip, batch=2), sample_inputs("llava", llava, batch=2)
    with pytest.raises(ValueError, match="method='grad'"):
        relevancy(clip, ci, 0, method="grad")
    with pytest.raises(ValueError, match="text index 5 is out of range"):
        relevancy(clip, ci, 5)
    with pytest.raises(ValueError, match="one text index per image"):
        relevancy(clip, ci, torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="needs texts"):
        relevancy(clip, {"pixel_values": ci["pixel_values"]}, 0)
    with pytest.raises(ValueError, match="embeddings of width 7"):
        relevancy(clip, ci, torch.zeros(7))
    with pytest.raises(ValueError, match="through_vision applies"):
        relevancy(clip, ci, 0, through_vision=True)
    with pytest.raises(ValueError, match="not in the vocabulary"):
        relevancy(llava, li, "zebra")
    with pytest.raises(TypeError, match="text embedding"):
        relevancy(llava, li, torch.zeros(8))
    with pytest.raises(ValueError, match="position must be"):
        relevancy(llava, li, "red", position=999)
    with pytest.raises(ValueError, match="no pixel_values"):
        relevancy(llava, {"input_ids": li["input_ids"]}, "red")
    with pytest.raises(ValueError, match="labels .* repeat"):
        relevancy(llava, li, ["red", "red"])


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_clip_organism_maps_point_at_the_object():
    """On single-object scenes the true class text's relevancy peaks on the object far above chance (its area)."""
    import mmlens.organisms as organisms
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world import single_object_scene

    clip = organisms.load("clip")
    scenes = [single_object_scene(20_000 + k) for k in range(8)]
    inputs = clip.processor(text=PROMPTS, images=[s.pil() for s in scenes], return_tensors="pt", padding=True)
    truth = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    masks = np.stack([s.masks[0] for s in scenes])
    for method in ("chefer", "rollout"):
        res = relevancy(clip, inputs, truth, method=method)
        assert res.pointing_game(masks, 0).float().mean() >= 0.6 > 3 * masks.mean()
        assert res.iou(masks, 0).mean() > 2 * masks.mean()
