"""Pre-rendered pools of world scenes as tensors (rendering per step would cost as much as the model)."""

from __future__ import annotations

import numpy as np
import torch

from ..world import make_scene, single_object_scene

EVAL_SEED_OFFSET = 10_000_000  # evaluation scenes come from seeds no training pool uses


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]: what the organisms' processors produce."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def single_object_pool(n: int, seed: int, size: int = 48, background: str | None = None):
    """(scenes, images uint8) of single-object scenes with random textures."""
    rng = np.random.RandomState(seed)
    scenes = []
    for k in range(n):
        bg = background or ["plain", "stripes", "checker", "dots"][rng.randint(4)]
        scenes.append(single_object_scene(seed * 1_000_000 + k, size=size, background=bg))
    return scenes, np.stack([s.image for s in scenes])


def scene_pool(n: int, seed: int, size: int = 48, n_objects: int | None = None, background: str | None = None):
    """(scenes, images uint8) of 1-3 object scenes (`n_objects` fixes the count) on random textures (or `background`)."""
    scenes = [make_scene(seed * 1_000_000 + k, size=size, background=background, n_objects=n_objects)
              for k in range(n)]
    return scenes, np.stack([s.image for s in scenes])
