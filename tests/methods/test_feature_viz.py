"""Feature visualisation: the Fourier parametrisation against hand-computed spectra, transforms, objectives against
plain PyTorch hooks and the HF processor, optimisation on tiny models, results, errors; the organism check last."""

from __future__ import annotations

import math

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.errors import UnknownNameError
from mmlens.methods.feature_viz import (COLOUR_MATRIX, DatasetExamples, FeatureVizResult, FourierImage, Jitter,
                                        PixelImage, Rotate, Scale, apply_transforms, correlate_colours, custom,
                                        dataset_examples, decorrelate_colours, default_transforms, direction,
                                        diversity_term, image_to_spectrum, preprocessing, spectrum_scale,
                                        spectrum_to_image, unit, vae_decoder, vae_latents, visualize)
from mmlens.methods.result import Result
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_image, sample_inputs

matplotlib.use("Agg")


# ------------------------------------------------------------------------------------ parametrisation, by hand
def test_spectrum_scale_by_hand():
    # 2x2: |f| = [[0, 1/2], [1/2, sqrt(1/2)]], the DC capped at 1/max(h, w) = 1/2
    expected = torch.tensor([[2.0, 2.0], [2.0, 1 / math.sqrt(0.5)]])
    torch.testing.assert_close(spectrum_scale(2, 2), expected)
    # 3x4: rfft keeps 4 // 2 + 1 = 3 columns; fy = [0, 1/3, -1/3], fx = [0, 1/4, 1/2]
    s = spectrum_scale(3, 4)
    assert s.shape == (3, 3)
    assert s[0, 0].item() == pytest.approx(4.0)  # capped at 1/4
    assert s[0, 1].item() == pytest.approx(4.0)
    assert s[1, 0].item() == pytest.approx(3.0)
    assert s[1, 2].item() == pytest.approx(1 / math.sqrt(1 / 9 + 1 / 4))
    torch.testing.assert_close(spectrum_scale(3, 4, decay_power=0.0), torch.ones(3, 3))
    torch.testing.assert_close(spectrum_scale(3, 4, decay_power=2.0), s ** 2)


def test_spectrum_to_image_by_hand():
    spec = torch.zeros(2, 4, 3)
    spec[0, 0, 0] = 4.0  # DC: 4 * scale 4 / sqrt(16) (ortho) / 4 = 1 everywhere
    torch.testing.assert_close(spectrum_to_image(spec, 4, 4), torch.ones(4, 4))
    spec = torch.zeros(2, 4, 3)
    spec[0, 0, 1] = 2.0  # kx = 1, real a: scale 1 / (1/4) = 4; (4a e^{i pi x/2} + conj) / 4 / 4 = a cos(pi x / 2) / 2
    row = torch.tensor([1.0, 0.0, -1.0, 0.0])
    torch.testing.assert_close(spectrum_to_image(spec, 4, 4), row.expand(4, 4), atol=1e-6, rtol=0)
    spec = torch.zeros(2, 4, 3)
    spec[1, 0, 1] = 2.0  # the imaginary part gives -sin
    torch.testing.assert_close(spectrum_to_image(spec, 4, 4), torch.tensor([0.0, -1.0, 0.0, 1.0]).expand(4, 4),
                               atol=1e-6, rtol=0)
    spec = torch.zeros(2, 4, 3)
    spec[0, 1, 0] = 2.0  # ky = 1 in the kx = 0 column, without its -ky partner: the real part only, half as large
    torch.testing.assert_close(spectrum_to_image(spec, 4, 4), 0.5 * row[:, None].expand(4, 4), atol=1e-6, rtol=0)


@pytest.mark.parametrize("h,w", [(4, 4), (5, 6), (6, 7), (1, 3)])
def test_spectrum_inverse(h, w):
    x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    spec = image_to_spectrum(x)
    assert spec.shape == (2, 3, 2, h, w // 2 + 1)
    torch.testing.assert_close(spectrum_to_image(spec, h, w), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(spectrum_to_image(image_to_spectrum(x, 1.7), h, w, 1.7), x, atol=1e-5, rtol=0)


def test_colour_matrix_and_inverse():
    assert COLOUR_MATRIX.norm(dim=0).max().item() == pytest.approx(1.0)
    x = torch.randn(2, 3, 5, 4)
    y = correlate_colours(x)
    torch.testing.assert_close(y[:, :, 1, 2], x[:, :, 1, 2] @ COLOUR_MATRIX.T)
    torch.testing.assert_close(decorrelate_colours(y), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", [FourierImage, PixelImage])
@pytest.mark.parametrize("decorrelate", [True, False])
def test_param_set_images_roundtrip(cls, decorrelate):
    target = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)) * 0.9 + 0.05
    p = cls(2, 6, 5, decorrelate=decorrelate)
    start = p()
    assert ((start - 0.5).abs() < 0.1).all()  # sigmoid of small noise: grey
    p.set_images(target)
    torch.testing.assert_close(p(), target, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 6, 5\)"):
        p.set_images(target[:1])


# ------------------------------------------------------------------------------------------------ transforms
def test_transforms_keep_shape_and_identity():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 24, generator=g)
    for t in [default_transforms(32), [Jitter(3)], [Scale()], [Rotate()], [Rotate(), lambda y: y * 0.5]]:
        assert apply_transforms(x, t, g).shape == x.shape
    ident = [Jitter(0), Scale((1.0,)), Rotate((0,))]
    torch.testing.assert_close(apply_transforms(x, ident, g), x, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must keep the shape"):
        apply_transforms(x, [lambda y: y[:, :, :-1]], g)


def test_jitter_is_a_whole_pixel_shift():
    x = torch.rand(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    y = apply_transforms(x, [Jitter(2)], torch.Generator().manual_seed(3))
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    for i in range(4):  # each image matches one integer shift in [-2, 2]^2 exactly, away from the border
        hits = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                if torch.allclose(y[i][inner[1:]], torch.roll(x[i], (-dy, -dx), (1, 2))[inner[1:]], atol=1e-5)]
        assert len(hits) == 1


def test_rotate_90_is_rot90_and_fill():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = apply_transforms(x, [Rotate((90,))], torch.Generator())
    torch.testing.assert_close(y, torch.rot90(x, 1, (2, 3)), atol=1e-5, rtol=0)
    z = apply_transforms(x, [Scale((0.5,))], torch.Generator(), fill=0.25)
    assert torch.allclose(z[..., 0, 0], torch.tensor(0.25))  # zoomed out: the corner is the constant fill


# ------------------------------------------------------------------------------------------------ objectives
def _fc2_input(lens, layer, pv):
    """vision blocks.{layer}.mlp.post by a plain pre-hook on fc2, running the plain HF vision model."""
    store = {}
    fc2 = lens.model.vision_model.encoder.layers[layer].mlp.fc2
    h = fc2.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach().clone()))
    try:
        with torch.no_grad():
            feats = lens.model.get_image_features(pixel_values=pv).pooler_output
    finally:
        h.remove()
    return store["x"].float(), feats.float()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_normalisation_matches_the_processor(tiny_lens, name):
    lens = tiny_lens(name)
    imgs = [sample_image(s) for s in range(3)]
    ref = lens.processor(images=imgs, return_tensors="pt")["pixel_values"]
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255
    pv, thw = preprocessing(lens).pixel_values(x)
    assert thw is None
    torch.testing.assert_close(pv, ref, atol=1e-5, rtol=0)


def test_qwen_patches_match_the_processor(tiny_lens):
    from transformers import AutoImageProcessor

    lens = tiny_lens("qwen2_vl")
    ip = AutoImageProcessor.from_pretrained(lens.model.name_or_path)
    imgs = [sample_image(s) for s in range(2)]  # 32x32: within min/max pixels, a multiple of 8, so not resized
    ref = ip(images=imgs, return_tensors="pt")
    x = torch.from_numpy(np.stack([np.asarray(i) for i in imgs])).permute(0, 3, 1, 2).float() / 255
    pre = preprocessing(lens)
    pre.size = (32, 32)
    pv, thw = pre.pixel_values(x)
    torch.testing.assert_close(thw, ref["image_grid_thw"])
    torch.testing.assert_close(pv, ref["pixel_values"].float(), atol=1e-5, rtol=0)


def test_unit_and_direction_equal_plain_hooks(tiny_lens):
    lens = tiny_lens("clip")
    imgs = [sample_image(s) for s in range(5)]
    pv = lens.processor(images=imgs, return_tensors="pt")["pixel_values"]
    acts, feats = _fc2_input(lens, 1, pv)  # (5, 17, 128), (5, 64)
    mean_ex = dataset_examples(lens, unit("vision.blocks.1.mlp.post", 7), imgs, k=3)
    torch.testing.assert_close(mean_ex.all_values, acts[:, :, 7].mean(1), atol=1e-5, rtol=0)
    cls_ex = dataset_examples(lens, unit("vision.blocks.1.mlp.post", 7, position=0), imgs, k=5)
    torch.testing.assert_close(cls_ex.all_values, acts[:, 0, 7], atol=1e-5, rtol=0)
    order = acts[:, 0, 7].argsort(descending=True)
    assert cls_ex.indices.tolist() == order.tolist()
    assert torch.equal(cls_ex.images[0], torch.from_numpy(np.asarray(imgs[int(order[0])])))
    v = torch.randn(feats.shape[1], generator=torch.Generator().manual_seed(0))
    d = dataset_examples(lens, direction("vision.proj", v), imgs, k=2)
    torch.testing.assert_close(d.all_values, feats @ v, atol=1e-4, rtol=0)
    c = dataset_examples(lens, direction("vision.proj", v, cosine=True), imgs, k=2)
    torch.testing.assert_close(c.all_values, torch.nn.functional.cosine_similarity(feats, v[None]), atol=1e-5, rtol=0)
    both = dataset_examples(lens, 2 * unit("vision.blocks.1.mlp.post", 7) - direction("vision.proj", v), imgs, k=2)
    torch.testing.assert_close(both.all_values, 2 * acts[:, :, 7].mean(1) - feats @ v, atol=1e-4, rtol=0)
    sq = dataset_examples(lens, custom("vision.blocks.1.mlp.post", lambda a: a[..., 7] ** 2), imgs, k=2)
    torch.testing.assert_close(sq.all_values, (acts[:, :, 7] ** 2).mean(1), atol=1e-4, rtol=0)


def test_diversity_term_by_hand():
    a = torch.randn(1, 5, 4)
    assert diversity_term(torch.cat([a, a])).item() == pytest.approx(1.0, abs=1e-5)  # identical grams: cos 1, x2 / 2
    e = torch.zeros(2, 1, 2)
    e[0, 0, 0], e[1, 0, 1] = 1.0, 1.0  # grams diag(1, 0) and diag(0, 1): orthogonal
    assert diversity_term(e).item() == pytest.approx(0.0)
    assert diversity_term(a).item() == 0.0


# ------------------------------------------------------------------------------------------------ optimisation
def test_objective_rises_and_is_deterministic(tiny_lens):
    lens = tiny_lens("clip")
    obj = unit("vision.blocks.1.mlp.post", 5)
    res = visualize(lens, obj, steps=30, seed=3, lr=0.1)
    assert isinstance(res, FeatureVizResult)
    assert res.images.shape == (1, 32, 32, 3) and res.images.dtype == torch.uint8
    assert res.trace.shape == (30, 1)
    assert res.trace[-5:].mean() > res.trace[:5].mean() + 0.1
    noise = dataset_examples(lens, obj, [sample_image(s) for s in range(8)], k=1)
    assert res.values.item() > noise.all_values.max().item()  # beats random images
    again = visualize(lens, obj, steps=30, seed=3, lr=0.1)
    assert torch.equal(res.images, again.images) and torch.equal(res.trace, again.trace)
    other = visualize(lens, obj, steps=1, seed=4, lr=0.1)
    assert other.trace[0].item() != res.trace[0].item()  # another seed, another start


def test_pixel_param_batch_diversity_and_init(tiny_lens):
    lens = tiny_lens("clip")
    obj = unit("vision.blocks.1.resid_post", 2, position=0)
    res = visualize(lens, obj, steps=20, n=2, param="pixel", diversity=1.0, transforms=None, size=24)
    assert res.images.shape == (2, 24, 24, 3) and res.trace.shape == (20, 2)
    assert res.trace[-3:].mean() > res.trace[:3].mean()
    assert res.settings["diversity_site"] == "vision.blocks.1.resid_post"
    start = np.stack([np.asarray(sample_image(s)) for s in range(2)])
    res0 = visualize(lens, obj, steps=1, n=2, init=start, lr=1e-6, transforms=None)
    assert (res0.images.int() - torch.from_numpy(start).int()).abs().max() <= 1  # the inverse reproduces init


def _tiny_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, sample_size=16, layers_per_block=1, scaling_factor=0.5).eval()


def test_vae_generator_equals_plain_diffusers():
    vae = _tiny_vae()
    imgs = np.stack([np.asarray(sample_image(s).resize((16, 16))) for s in range(2)])
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        ref = ((vae.decode(z).sample + 1) / 2).clamp(0, 1)
        lat = vae_latents(vae, imgs)
        torch.testing.assert_close(lat, z * 0.5)  # scaled, as a pipeline's latents
        torch.testing.assert_close(vae_decoder(vae)(lat), ref)


def test_generator_param_optimises_the_latent_only(tiny_lens):
    lens = tiny_lens("clip")
    vae = _tiny_vae()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    start = vae_latents(vae, np.stack([np.asarray(sample_image(s).resize((16, 16))) for s in range(2)]))
    obj = unit("vision.blocks.1.mlp.post", 5)
    res = visualize(lens, obj, steps=25, n=2, param="generator", generator=vae_decoder(vae), latent=start, lr=0.1,
                    transforms=None)
    assert res.images.shape == (2, 16, 16, 3) and res.settings["param"] == "generator"
    assert res.trace[-3:].mean() > res.trace[:3].mean()
    assert all(torch.equal(before[k], v) for k, v in vae.state_dict().items())  # the decoder is left as it was
    assert all(p.grad is None for p in vae.parameters())
    # the images are the decoder's output (at 16x16, resized to the model's 32 only inside the graph): at step 0
    # with a vanishing lr, the start latents' decoding
    res0 = visualize(lens, obj, steps=1, n=2, param="generator", generator=vae_decoder(vae), latent=start, lr=1e-9,
                     transforms=None)
    with torch.no_grad():
        want = (vae_decoder(vae)(start) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert (res0.images.int() - want.int()).abs().max() <= 1


def test_generator_param_errors(tiny_lens):
    lens = tiny_lens("clip")
    obj = unit("vision.blocks.1.mlp.post", 5)
    gen = vae_decoder(_tiny_vae())
    z = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="needs generator= .* and latent="):
        visualize(lens, obj, steps=1, n=2, param="generator", latent=z)
    with pytest.raises(ValueError, match="latent holds 2 rows; n=3"):
        visualize(lens, obj, steps=1, n=3, param="generator", generator=gen, latent=z)
    with pytest.raises(ValueError, match="expected \\(n=2, 3, h, w\\)"):
        visualize(lens, obj, steps=1, n=2, param="generator", generator=lambda z: z[:, :1], latent=z)
    with pytest.raises(ValueError, match="pass the starting latent="):
        visualize(lens, obj, steps=1, n=2, param="generator", generator=gen, latent=z,
                  init=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="go with param='generator'"):
        visualize(lens, obj, steps=1, n=2, generator=gen, latent=z)


def test_stops_after_the_last_site_needed(tiny_lens):
    lens = tiny_lens("clip")
    entered, after = [], []
    hooks = [lens.model.vision_model.encoder.layers[1].register_forward_pre_hook(lambda *a: entered.append(1)),
             lens.model.vision_model.post_layernorm.register_forward_hook(lambda *a: after.append(1))]
    try:
        visualize(lens, unit("vision.blocks.0.mlp.post", 1), steps=3)
        assert entered == [] and after == []  # block 1 never ran
        visualize(lens, unit("vision.blocks.1.mlp.post", 1), steps=3)
        assert len(entered) == 4 and after == []  # 3 steps + the final evaluation; nothing after block 1
        visualize(lens, unit("vision.proj", 1), steps=2)
        assert len(after) == 3
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["siglip", "llava", "paligemma", "blip2", "qwen2_vl"])
def test_every_image_tower(tiny_lens, name):
    lens = tiny_lens(name)
    res = visualize(lens, unit("vision.blocks.1.resid_post", 3), steps=12, lr=0.1)
    side = preprocessing(lens).size
    assert res.images.shape == (1, *side, 3)
    assert torch.isfinite(res.trace).all() and res.trace[-3:].mean() > res.trace[:3].mean()


@pytest.mark.parametrize("name", ["llava", "qwen2_vl"])
def test_sites_beyond_the_tower_need_inputs(tiny_lens, name):
    lens = tiny_lens(name)
    obj = unit("lm.blocks.0.resid_post", 4, position=-1)
    with pytest.raises(ValueError, match="inputs="):
        visualize(lens, obj, steps=1)
    inputs = sample_inputs(name, lens, batch=1)
    res = visualize(lens, obj, steps=6, n=2, inputs=inputs, lr=0.1)
    assert res.trace.shape == (6, 2) and torch.isfinite(res.values).all()
    # the stored value is the LM's activation at the last position with each image in place of the prompt's image
    img = res.images.permute(0, 3, 1, 2).float() / 255
    pre = preprocessing(lens)
    pre.size = tuple(res.settings["model_input_size"])
    pv, thw = pre.pixel_values(img)
    batch = {k: v.expand(2, *v.shape[1:]) for k, v in inputs.items() if k not in ("pixel_values", "image_grid_thw")}
    batch["pixel_values"] = pv
    if thw is not None:
        assert torch.equal(thw, inputs["image_grid_thw"].expand(2, 3))  # the size the prompt's image tokens need
        batch["image_grid_thw"] = thw
    _, cache = lens.run_with_cache(batch, names="lm.blocks.0.resid_post")
    ref = cache["lm.blocks.0.resid_post"][:, -1, 4].float()
    torch.testing.assert_close(res.values, ref, atol=1e-4, rtol=2e-2)  # values: before rounding to uint8


# ------------------------------------------------------------------------------------------------ results
def test_result_save_load_plot_html(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    pool = [sample_image(s) for s in range(6)]
    res = visualize(lens, unit("vision.blocks.1.mlp.post", 5), steps=4, n=2, dataset=pool, k=3)
    assert res.examples.shape == (3, 32, 32, 3) and res.example_indices.shape == (3,)
    assert (res.example_values[:-1] >= res.example_values[1:]).all()
    back = Result.load(res.save(tmp_path / "fv"))
    assert isinstance(back, FeatureVizResult) and back.settings == res.settings
    for f in ("images", "values", "trace", "examples", "example_values", "example_indices"):
        assert torch.equal(getattr(back, f), getattr(res, f))
    assert isinstance(res.plot(), Figure)
    page = res.html()
    assert page.count("data:image/png;base64,") == 5 and "dataset examples" in page
    ex = dataset_examples(lens, unit("vision.blocks.1.mlp.post", 5), pool, k=2)
    assert isinstance(Result.load(ex.save(tmp_path / "ex")), DatasetExamples) and isinstance(ex.plot(), Figure)
    assert "top 2 of 6" in ex.summary()


# ------------------------------------------------------------------------------------------------ errors
def test_errors(tiny_lens):
    lens = tiny_lens("clip")
    with pytest.raises(UnknownNameError, match="vision.blocks.1.mlp.post"):
        visualize(lens, unit("vision.blocks.1.mlp.pots", 0), steps=1)
    with pytest.raises(ValueError, match="out of range"):
        visualize(lens, unit("vision.blocks.1.mlp.post", 128), steps=1)
    with pytest.raises(ValueError, match="out of range"):
        visualize(lens, unit("vision.blocks.1.mlp.post", 0, position=17), steps=1)
    with pytest.raises(ValueError, match="no positions"):
        visualize(lens, unit("vision.proj", 0, position=0), steps=1)
    with pytest.raises(ValueError, match="last axis"):
        visualize(lens, direction("vision.proj", torch.ones(5)), steps=1)
    with pytest.raises(ValueError, match="not a glob"):
        unit("vision.blocks.*.mlp.post", 0)
    with pytest.raises(TypeError, match="custom"):
        visualize(lens, lambda a: a.sum(), steps=1)
    with pytest.raises(ValueError, match="param="):
        visualize(lens, unit("vision.blocks.1.mlp.post", 0), param="wavelet")
    with pytest.raises(ValueError, match="fill="):
        visualize(lens, unit("vision.blocks.1.mlp.post", 0), fill="wrap")
    with pytest.raises(ValueError, match="steps"):
        visualize(lens, unit("vision.blocks.1.mlp.post", 0), steps=0)
    with pytest.raises(ValueError, match="init holds 1"):
        visualize(lens, unit("vision.blocks.1.mlp.post", 0), n=2, init=[sample_image(0)])
    with pytest.raises(ValueError, match="one row per image"):
        visualize(lens, custom("vision.blocks.1.mlp.post", lambda a: a.sum()), steps=1)
    with pytest.raises(TypeError, match="float tensors"):
        dataset_examples(lens, unit("vision.blocks.1.mlp.post", 0), torch.rand(2, 32, 32, 3))


# ------------------------------------------------------------------------------------------------ organism
@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_clip_organism_red_direction_paints_red():
    import mmlens.organisms as organisms
    from mmlens.world.judge import classify

    clip = organisms.load("clip")
    texts = [f"a red {s}" for s in ("square", "circle", "triangle", "cross")]
    tok = clip.processor(text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        red = torch.nn.functional.normalize(clip.model.get_text_features(**tok).pooler_output.float(), dim=-1).mean(0)
    res = visualize(clip, direction("vision.proj", red), steps=96, seed=0)
    assert classify(res.images[0].numpy())[0] == "red"
