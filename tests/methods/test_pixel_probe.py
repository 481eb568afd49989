"""Per-pixel probes of diffusion feature maps: the features are the recorded maps (upsampled bilinearly), a planted
mask channel is found exactly and noise is not, results round-trip, and the benchmark's object-mask label matches the
world's own masks."""

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
    assert res.dice.shape == (3, 2) and res.n_train == 8 and res.n_test == 4
    assert (res.dice[0] == 1.0).all(), res.dice
    assert (res.dice[1:] < 0.8).all(), res.dice
    assert (res.control[0] < 0.8).all(), res.control  # shuffled masks: the planted channel no longer matches
    assert res.best[:2] == (NAMES[0], feats.steps[0]) and res.best[2] == 1.0
    back = Result.load(res.save(tmp_path / "pixel"))
    assert type(back) is PixelProbeResult and torch.equal(back.dice, res.dice) and back.steps == res.steps
    assert back.timesteps == res.timesteps and torch.equal(back.control, res.control)
    fig = back.plot()
    assert len(fig.axes) == 2  # the heat map and its colour bar
    with pytest.raises(ValueError, match="expected \\(images=12, 32, 32\\)"):
        pixel_probe(fake, masks[:, :16])
    with pytest.raises(ValueError, match="leaves no training"):
        pixel_probe(fake, masks, train=12)


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
