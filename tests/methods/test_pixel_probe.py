"""Per-pixel probes of diffusion feature maps: the features are the recorded maps (upsampled bilinearly), a planted
mask channel is found exactly and noise is not, the best cell is chosen on validation images and reported on test
images, results round-trip, and the benchmark's object-mask label matches the world's own masks."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from mmlens.methods import Result
from mmlens.methods.probes import PixelFeatures, PixelProbeResult, diffusion_probe_features, dice, pixel_probe

NAMES = ["unet.down.0.out", "unet.mid.out", "unet.up.1.out"]
GEN = dict(num_inference_steps=4, guidance_scale=3.0, height=32, width=32)
PROMPTS = ["a red square", "a blue circle", "a green cross"]


@pytest.fixture(scope="module")
def feats(tiny_lens):
    return diffusion_probe_features(tiny_lens("sd"), PROMPTS, names=NAMES, steps=[0, 3],
                                    generator=torch.Generator().manual_seed(0), **GEN)


def test_features_are_the_recorded_maps_upsampled(tiny_lens, feats):
    lens = tiny_lens("sd")
    out, cache = lens.generate(PROMPTS, names=NAMES, record_steps=[0, 3], output_type="np", progress=False,
                               generator=torch.Generator().manual_seed(0), **GEN)
    assert feats.names == NAMES and feats.steps == [0, 3] and feats.size == (32, 32)
    assert feats.timesteps == [float(cache.timesteps[0]), float(cache.timesteps[3])]
    np.testing.assert_array_equal(feats.images, out.images)
    for name in NAMES:
        for t in (0, 3):
            fmap = cache.get(name, step=t, branch="cond")  # (3, C, h, w), the conditional half of the CFG batch
            assert fmap.shape[0] == 3 and fmap.shape[-1] < 32
            up = torch.nn.functional.interpolate(fmap, size=(32, 32), mode="bilinear", align_corners=False)
            want = up.permute(0, 2, 3, 1).reshape(3 * 32 * 32, fmap.shape[1])
            torch.testing.assert_close(feats.features[(name, t)], want, atol=0, rtol=0)
        assert feats.block(name).shape == (2, 3 * 32 * 32, cache.get(name, step=0).shape[1])
    # pixel row order: image, then row, then column; one cell of the upsampled map per pixel
    fmap = cache.get("unet.up.1.out", step=3, branch="cond")
    up = torch.nn.functional.interpolate(fmap, size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(feats.features[("unet.up.1.out", 3)][2 * 1024 + 5 * 32 + 7], up[2, :, 5, 7])


def test_size_and_errors(tiny_lens):
    lens = tiny_lens("sd")
    small = diffusion_probe_features(lens, "a red square", names="unet.mid.out", steps=[-1], size=8,
                                     num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    assert small.steps == [1] and small.size == (8, 8) and small.features[("unet.mid.out", 1)].shape == (64, 64)
    with pytest.raises(ValueError, match="needs output_type='np'"):
        diffusion_probe_features(lens, "a red square", names="unet.mid.out", steps=[0], output_type="pil")
    with pytest.raises(TypeError, match="feature maps"):
        diffusion_probe_features(tiny_lens("llava"), "x", names="lm.blocks.0.resid_post", steps=[0])


def _boxes(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        x, y = torch.randint(0, size - 10, (2,), generator=g).tolist()
        w, h = torch.randint(5, 10, (2,), generator=g).tolist()
        masks[i, y:y + h, x:x + w] = True
    return masks


def test_planted_mask_channel_gives_dice_one_and_noise_does_not(feats, tmp_path):
    """Block 0 carries the mask in one channel among its real ones; the others carry only the tiny random model's
    maps, which know nothing about these boxes."""
    n = 12
    base = {k: v.reshape(3, 1024, -1).repeat(4, 1, 1).reshape(n * 1024, -1) for k, v in feats.features.items()}
    masks = _boxes(n)
    g = torch.Generator().manual_seed(1)
    for t in feats.steps:  # each image's maps perturbed, so repeated images do not share features
        for k in [k for k in base if k[1] == t]:
            base[k] = base[k] + 0.05 * torch.randn(base[k].shape, generator=g)
        planted = base[(NAMES[0], t)].clone()
        planted[:, 0] = masks.reshape(-1).float() * 2 - 1 + 0.1 * torch.randn(n * 1024, generator=g)
        base[(NAMES[0], t)] = planted
    fake = PixelFeatures(names=NAMES, steps=feats.steps, timesteps=feats.timesteps, size=(32, 32), features=base,
                         images=np.zeros((n, 32, 32, 3), np.float32))
    res = pixel_probe(fake, masks, train=8, train_stride=2)
    assert res.dice.shape == res.dice_val.shape == (3, 2), (res.dice.shape, res.dice_val.shape)
    assert (res.n_train, res.n_val, res.n_test) == (8, 2, 2)  # val=0.5 of the 4 held-out images
    assert (res.dice[0] == 1.0).all() and (res.dice_val[0] == 1.0).all(), (res.dice, res.dice_val)
    assert (res.dice[1:] < 0.8).all() and (res.dice_val[1:] < 0.8).all(), (res.dice, res.dice_val)
    assert (res.control[0] < 0.8).all(), res.control  # shuffled masks: the planted channel no longer matches
    assert res.best[:2] == (NAMES[0], feats.steps[0]) and res.best[2] == 1.0
    # validation and test are the held-out images in order: 8-9 and 10-11
    one = pixel_probe(fake, masks, train=8, val=3, train_stride=2)
    assert (one.n_val, one.n_test) == (3, 1) and torch.equal(one.dice_val[0], torch.ones(2))
    back = Result.load(res.save(tmp_path / "pixel"))
    assert type(back) is PixelProbeResult and torch.equal(back.dice, res.dice) and back.steps == res.steps
    assert back.timesteps == res.timesteps and torch.equal(back.control, res.control)
    assert torch.equal(back.dice_val, res.dice_val) and (back.n_val, back.n_test) == (2, 2)
    fig = back.plot()
    assert len(fig.axes) == 2  # the heat map and its colour bar
    with pytest.raises(ValueError, match="expected \\(images=12, 32, 32\\)"):
        pixel_probe(fake, masks[:, :16])
    with pytest.raises(ValueError, match="leaves no training"):
        pixel_probe(fake, masks, train=12)
    with pytest.raises(ValueError, match="leaves no validation or no test images of the 1 held-out images"):
        pixel_probe(fake, masks, train=11)  # one held-out image cannot be split
    for val in (0, 4, 5):
        with pytest.raises(ValueError, match=f"val={val} leaves no validation or no test images of the 4 held-out"):
            pixel_probe(fake, masks, train=8, val=val)
    for val in (0.0, 1.0):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            pixel_probe(fake, masks, train=8, val=val)


def test_best_is_chosen_on_validation_and_reported_on_test():
    """Validation and test disagree: the best cell is the one best on validation, and its Dice is the test Dice of
    that cell, not the best test Dice (that would be choosing on the test images)."""
    dice_val = torch.tensor([[0.2, 0.9], [0.5, 0.4]])
    dice_test = torch.tensor([[0.3, 0.6], [0.95, 0.4]])
    res = PixelProbeResult(meta={}, names=["a", "b"], steps=[2, 10], timesteps=[900.0, 500.0], n_train=8, n_val=2,
                           n_test=2, dice=dice_test, dice_val=dice_val, control=torch.zeros(2, 2))
    assert res.best == ("a", 10, pytest.approx(0.6))
    assert float(res.dice.max()) > res.best[2]  # the test-set pick would have been ("b", 2, 0.95)
    res.dice_val = torch.tensor([[0.2, 0.1], [0.5, 0.4]])
    assert res.best == ("b", 2, pytest.approx(0.95))


def test_dice():
    m = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert dice(m, m) == 1.0
    assert dice(torch.tensor([1, 0, 1, 0]).bool(), m) == 0.5
    assert dice(torch.zeros(4, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)) == 1.0
    assert dice(torch.stack([m, ~m]), m).tolist() == [1.0, 0.0]


def test_object_mask_matches_world_masks():
    """The label the benchmark derives from generated images equals the world's mask on real scenes: every shape,
    colour, size and background; float images as the pipeline returns them; empty when there is no object."""
    from mmlens.world import single_object_scene
    from mmlens.world.scene import BACKGROUNDS

    from mmlens.world.judge import object_mask

    ious = []
    for k in range(48):
        s = single_object_scene(1234 + k, background=BACKGROUNDS[k % len(BACKGROUNDS)])
        for img in (s.image, s.image.astype(np.float32) / 255):
            m = object_mask(img)
            ious.append((m & s.masks[0]).sum() / (m | s.masks[0]).sum())
    assert min(ious) > 0.9, min(ious)
    assert not object_mask(np.full((32, 32, 3), 40, np.uint8)).any()
