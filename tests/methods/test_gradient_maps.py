"""Gradient maps against plain torch.autograd and hand-written loops: saliency = |d logit / d pixels| summed over
channels, integrated gradients' completeness, Grad-CAM from a forward hook, occlusion window by window."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch

from mmlens.methods import Result
from mmlens.methods.gradient_maps import GradientMapResult, gradient_map, make_baseline
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")


def clip_logit(model, inputs, targets):
    """(images,) logit of each image with its target text, from the model's own forward."""
    def f(pix):
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pix)
        return out.logits_per_image[torch.arange(pix.shape[0]), targets]
    return f


def answer_pos(lens, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_id = lens.model.config.image_token_id
    special = torch.tensor(sorted(set(lens.processor.tokenizer.all_special_ids) - {image_id}))
    text = mask & (ids != image_id) & ~torch.isin(ids, special)
    return torch.where(text, torch.arange(ids.shape[1]).expand_as(ids), -1).max(1).values


def test_saliency_is_abs_gradient_summed_over_channels(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    targets = torch.tensor([1, 0])
    res = gradient_map(lens, inputs, targets, method="saliency")
    pix = inputs["pixel_values"].clone().requires_grad_()
    logit = clip_logit(lens.model, inputs, targets)(pix)
    (g,) = torch.autograd.grad(logit.sum(), pix)
    assert isinstance(res, GradientMapResult) and res.maps.shape == (2, 1, 32, 32)
    torch.testing.assert_close(res.maps[:, 0], g.abs().sum(1), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(res.scores[:, 0], logit.detach(), atol=1e-5, rtol=1e-5)
    assert res.delta.numel() == 0 and res.baseline_scores.numel() == 0


@pytest.mark.parametrize("chunk", [None, 6])
def test_smoothgrad_is_saliency_averaged_over_seeded_noisy_copies(tiny_lens, chunk):
    """SmoothGrad = mean over the noisy copies of |d logit / d pixels|, summed over channels; the copies are the
    pixels plus N(0, (noise x pixel range)^2) drawn from `seed` (here drawn again by hand), in one pass or in chunks."""
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    targets = torch.tensor([1, 0])
    res = gradient_map(lens, inputs, targets, method="smoothgrad", samples=6, noise=0.2, seed=3,
                       internal_batch_size=chunk)
    pix = inputs["pixel_values"]
    sd = 0.2 * float(pix.max() - pix.min())
    torch.manual_seed(3)
    draws = []
    for _ in range(1 if chunk is None else 2):  # captum draws per partition of samples (6 // 2 images = 3 each)
        n = 6 if chunk is None else 3
        draws.append(pix.repeat_interleave(n, 0) + torch.normal(0, torch.full((2 * n, *pix.shape[1:]), sd)))
    noisy = torch.cat([d.view(2, -1, *pix.shape[1:]) for d in draws], 1).reshape(12, *pix.shape[1:])
    noisy = noisy.clone().requires_grad_()
    logit = clip_logit(lens.model, inputs, targets.repeat_interleave(6))(noisy)
    (g,) = torch.autograd.grad(logit.sum(), noisy)
    want = g.abs().sum(1).view(2, 6, 32, 32).mean(1)
    torch.testing.assert_close(res.maps[:, 0], want, atol=1e-6, rtol=1e-4)
    again = gradient_map(lens, inputs, targets, method="smoothgrad", samples=6, noise=0.2, seed=3,
                         internal_batch_size=chunk)
    torch.testing.assert_close(again.maps, res.maps, rtol=0, atol=0)
    assert res.meta["samples"] == 6 and res.meta["noise"] == 0.2
    with pytest.raises(ValueError, match="samples must be an int >= 1"):
        gradient_map(lens, inputs, targets, method="smoothgrad", samples=0)
    with pytest.raises(ValueError, match="noise applies to method smoothgrad"):
        gradient_map(lens, inputs, targets, method="saliency", noise=0.1)


def test_smoothgrad_with_vanishing_noise_is_saliency_on_llava(tiny_lens):
    """Each noisy copy is read at its own example's answer position (rows mapped back from NoiseTunnel's order)."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    sal = gradient_map(lens, inputs, "red", method="saliency")
    smooth = gradient_map(lens, inputs, "red", method="smoothgrad", samples=3, noise=1e-7)
    torch.testing.assert_close(smooth.maps, sal.maps, atol=1e-5, rtol=1e-3)


def test_saliency_on_llava_answer_logit(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    token = lens.processor.tokenizer.convert_tokens_to_ids("red")
    res = gradient_map(lens, inputs, "red", method="saliency")
    pos = answer_pos(lens, inputs)
    pix = inputs["pixel_values"].clone().requires_grad_()
    logit = lens.model(**{**inputs, "pixel_values": pix}).logits[torch.arange(2), pos, token]
    (g,) = torch.autograd.grad(logit.sum(), pix)
    torch.testing.assert_close(res.maps[:, 0], g.abs().sum(1), atol=1e-6, rtol=1e-4)
    assert res.targets == [[token, token]] and res.labels == ["red"]


@pytest.mark.parametrize("name,baseline", [("clip", "black"), ("clip", "blur"), ("llava", "zeros")])
def test_integrated_gradients_completeness(tiny_lens, name, baseline):
    """Sum of attributions = f(x) - f(baseline), up to the reported delta, which is small at 64 steps. On llava
    internal_batch_size=16 splits the 2 x 64 rows into chunks, so the repeated input_ids must follow the pixels."""
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    target = torch.tensor([1, 0]) if name == "clip" else "red"
    res = gradient_map(lens, inputs, target, baseline=baseline, steps=64,
                       internal_batch_size=16 if name == "llava" else None)
    total = res.maps[:, 0].sum((-1, -2))
    gap = res.scores[:, 0] - res.baseline_scores[:, 0]
    torch.testing.assert_close(total - gap, res.delta[:, 0], atol=1e-4, rtol=1e-3)
    assert (res.delta.abs() <= 0.02 * gap.abs().clamp_min(0.1)).all()
    assert res.maps.shape == (2, 1, 32, 32) and res.meta["baseline"] == baseline and res.meta["steps"] == 64
    # the baseline score is the model's logit on the baseline image itself
    base = make_baseline(lens, inputs["pixel_values"], baseline)
    if name == "clip":
        want = clip_logit(lens.model, inputs, torch.tensor([1, 0]))(base)
    else:
        tok = lens.processor.tokenizer.convert_tokens_to_ids("red")
        want = lens.model(**{**inputs, "pixel_values": base}).logits[torch.arange(2), answer_pos(lens, inputs), tok]
    torch.testing.assert_close(res.baseline_scores[:, 0], want.detach(), atol=1e-5, rtol=1e-5)


def test_baselines(tiny_lens):
    lens = tiny_lens("clip")
    pv = sample_inputs("clip", lens, batch=2)["pixel_values"]
    ip = lens.processor.image_processor
    black = make_baseline(lens, pv, "black")
    want = -torch.tensor(ip.image_mean) / torch.tensor(ip.image_std)
    torch.testing.assert_close(black[1, :, 5, 7], want)
    flat = torch.full_like(pv, 0.3)
    torch.testing.assert_close(make_baseline(lens, flat, "blur"), flat)  # blurring a constant changes nothing
    blurred = make_baseline(lens, pv, "blur", blur_sigma=2.0)
    assert blurred.shape == pv.shape and blurred.std() < pv.std()
    with pytest.raises(ValueError, match="baseline='grey'"):
        make_baseline(lens, pv, "grey")


@pytest.mark.parametrize("site", ["vision.blocks.0.resid_post", None])
def test_grad_cam_from_a_plain_forward_hook(tiny_lens, site):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    targets = torch.tensor([0, 1])
    res = gradient_map(lens, inputs, targets, method="grad_cam", name=site)
    layers = lens.model.vision_model.encoder.layers
    # default: the input of the last block = the output of block 0 (two blocks)
    assert res.meta["name"] == (site or "vision.blocks.1.resid_pre")
    acts = []

    def keep(mod, args, out):
        o = out[0] if isinstance(out, tuple) else out
        o.retain_grad()
        acts.append(o)

    h = layers[0].register_forward_hook(keep)
    try:
        logit = clip_logit(lens.model, inputs, targets)(inputs["pixel_values"])
    finally:
        h.remove()
    logit.sum().backward()
    a, g = acts[0][:, 1:].detach(), acts[0].grad[:, 1:]  # patch tokens (CLS first)
    cam = torch.relu((a * g.mean(1, keepdim=True)).sum(-1)).reshape(2, 4, 4)
    lens.model.zero_grad(set_to_none=True)
    assert res.maps.shape == (2, 1, 4, 4)
    torch.testing.assert_close(res.maps[:, 0], cam, atol=1e-5, rtol=1e-4)


def test_grad_cam_at_llava_lm_image_tokens(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=1)
    res = gradient_map(lens, inputs, "red", method="grad_cam", name="lm.blocks.0.resid_post")
    tok = lens.processor.tokenizer.convert_tokens_to_ids("red")
    acts = []
    layer = lens.model.model.language_model.layers[0]
    h = layer.register_forward_hook(lambda m, a, o: (o[0] if isinstance(o, tuple) else o).retain_grad()
                                    or acts.append(o[0] if isinstance(o, tuple) else o))
    try:
        out = lens.model(**inputs)
    finally:
        h.remove()
    out.logits[0, answer_pos(lens, inputs)[0], tok].backward()
    image = inputs["input_ids"][0] == lens.model.config.image_token_id
    a, g = acts[0][0, image].detach(), acts[0].grad[0, image]
    cam = torch.relu(a @ g.mean(0)).reshape(4, 4)
    lens.model.zero_grad(set_to_none=True)
    torch.testing.assert_close(res.maps[0, 0], cam, atol=1e-5, rtol=1e-4)


def test_occlusion_window_by_window(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    targets = torch.tensor([1, 1])
    res = gradient_map(lens, inputs, 1, method="occlusion", internal_batch_size=8)
    assert res.maps.shape == (2, 1, 4, 4) and res.meta["window"] == 8  # the model's patch size
    pv = inputs["pixel_values"]
    base = make_baseline(lens, pv, "black")
    f = clip_logit(lens.model, inputs, targets)
    with torch.no_grad():
        full = f(pv)
        want = torch.zeros(2, 4, 4)
        for i in range(4):
            for j in range(4):
                x = pv.clone()
                x[:, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8] = base[:, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8]
                want[:, i, j] = full - f(x)
    torch.testing.assert_close(res.maps[:, 0], want, atol=1e-5, rtol=1e-4)
    small = gradient_map(lens, inputs, 1, method="occlusion", window=16, baseline="zeros")
    assert small.maps.shape == (2, 1, 2, 2)


def test_result_roundtrip_and_errors(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens, batch=2)
    res = gradient_map(lens, inputs, [0, 1], method="saliency")
    back = Result.load(res.save(tmp_path / "g"))
    assert isinstance(back, GradientMapResult) and back.labels == res.labels
    torch.testing.assert_close(back.maps, res.maps)
    assert res.labels == ["a photo of a red square", "a blue circle"]
    with pytest.raises(ValueError, match="method='lime'"):
        gradient_map(lens, inputs, 0, method="lime")
    with pytest.raises(ValueError, match="steps applies"):
        gradient_map(lens, inputs, 0, method="saliency", steps=8)
    with pytest.raises(ValueError, match="window=5 does not tile"):
        gradient_map(lens, inputs, 0, method="occlusion", window=5)
    with pytest.raises(ValueError, match="Grad-CAM reads"):
        gradient_map(lens, inputs, 0, method="grad_cam", name="vision.blocks.0.attn.pattern")
    with pytest.raises(ValueError, match="does not broadcast"):
        gradient_map(lens, inputs, 0, baseline=torch.zeros(2, 3, 5, 5))
    qwen = tiny_lens("qwen2_vl")
    with pytest.raises(ValueError, match="flattened patches"):
        gradient_map(qwen, sample_inputs("qwen2_vl", qwen), "red")


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_vlm_organism_integrated_gradients_point_at_the_asked_object():
    """'what colour is the {shape} ?' about one of 2-3 objects: IG of the true colour's logit peaks on that object."""
    import mmlens.organisms as organisms
    from mmlens.organisms.prompts import vlm_inputs
    from mmlens.world import make_scene

    vlm = organisms.load("vlm")
    scenes, seed = [], 20_000
    while len(scenes) < 8:
        s = make_scene(seed, background=None)
        seed += 1
        if len(s.objects) >= 2:
            scenes.append(s)
    questions = [f"what colour is the {s.objects[0].shape} ?" for s in scenes]
    truth = torch.tensor(vlm.processor.tokenizer.convert_tokens_to_ids([s.objects[0].colour for s in scenes]))
    res = gradient_map(vlm, vlm_inputs(vlm, scenes, questions), truth, steps=8)
    masks = np.stack([s.masks[0] for s in scenes])
    assert res.pointing_game(masks, 0).float().mean() >= 0.6 > 3 * masks.mean()
