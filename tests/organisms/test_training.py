"""The organisms' training harness: an interrupted run resumes to the same weights; schedules; patch labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmlens.train import combine, cosine_lr, run_training


def _run(work, steps=10, stop_at=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    xs = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    ys = xs @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def step_fn(step):
        if step == stop_at:
            raise KeyboardInterrupt  # the machine going away mid-run
        idx = torch.from_numpy(np.random.RandomState(step).randint(0, 64, 8))
        return torch.nn.functional.mse_loss(model(xs[idx]).squeeze(-1), ys[idx])

    stats = run_training(name="t", model=model, params=model.parameters(), steps=steps, lr=0.05, warmup=2, seed=0,
                         work=work, step_fn=step_fn, every=4)
    return model, stats


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight, _ = _run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", stop_at=7)
    resumed, stats = _run(tmp_path / "b")
    assert stats["resumed_from"] == 4  # the last checkpoint before the interruption
    assert torch.equal(straight.weight, resumed.weight) and torch.equal(straight.bias, resumed.bias)


def test_cosine_lr():
    assert cosine_lr(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert cosine_lr(100, 100, 1.0, 10) == pytest.approx(0.05)
    assert cosine_lr(55, 100, 1.0, 10) == pytest.approx(0.05 + 0.95 * 0.5)
    assert cosine_lr(99, 100, 1.0, 10, hold=1.0) == 1.0
    # hold half of the 90 post-warmup steps at peak, then the same cosine over the other 45
    assert cosine_lr(54, 100, 1.0, 10, hold=0.5) == 1.0
    assert cosine_lr(55, 100, 1.0, 10, hold=0.5) == pytest.approx(1.0)
    assert cosine_lr(55 + 22.5, 100, 1.0, 10, hold=0.5) == pytest.approx(0.05 + 0.95 * 0.5)
    assert cosine_lr(100, 100, 1.0, 10, hold=0.5) == pytest.approx(0.05)


def test_combine_nests_earlier_stages_and_sums_time():
    vae = {"steps": 5, "seconds": 1.25, "loss_curve": [2.0]}
    unet = {"steps": 7, "seconds": 3.5, "loss_curve": [1.0]}
    got = combine(unet, vae=vae)
    assert got == {"steps": 7, "seconds": 4.8, "loss_curve": [1.0], "vae": vae}  # round(4.75, 1) == 4.8
    assert unet["seconds"] == 3.5  # the stage's own dict is left alone


def test_patch_labels_follow_the_mask():
    from mmlens.organisms.vlm import patch_labels
    from mmlens.world import single_object_scene
    from mmlens.world.scene import SHAPES

    inside = outside = 0
    for seed in range(6):
        scene = single_object_scene(seed, size=48)
        obj = scene.objects[0]
        labels = patch_labels(scene, 8).reshape(8, 8)
        assert set(np.unique(labels)) <= {SHAPES.index(obj.shape), len(SHAPES)}
        assert labels[min(int(obj.y * 8), 7), min(int(obj.x * 8), 7)] == SHAPES.index(obj.shape)
        mask = scene.masks[0]
        for r in range(8):
            for c in range(8):
                cell = mask[6 * r : 6 * r + 6, 6 * c : 6 * c + 6]
                if cell.all():  # fully inside the object
                    assert labels[r, c] == SHAPES.index(obj.shape)
                    inside += 1
                elif not cell.any():  # untouched by it
                    assert labels[r, c] == len(SHAPES)
                    outside += 1
    assert inside > 0 and outside > 0
