"""`pixel_probe` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import SEED, line


def score(per_prompt: int = 2, n_steps: int = 20, record=(2, 10, 18)) -> list[dict]:
    """diffusion: a per-pixel logistic probe of the object mask (from `object_mask` of each generated image) on UNet
    blocks at an early, a middle and a late DDIM step; fit on 2/3 of the images (every other pixel row and column),
    Dice on all pixels of the rest, split in half: the best block x step cell is chosen on the validation half and
    its Dice reported on the test half (not chosen on the images it is measured on)."""
    import mmlens.organisms as organisms
    from mmlens.methods.probes import diffusion_probe_features, pixel_probe
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.world.judge import object_mask

    lens = organisms.load("diffusion")
    names = ["unet.down.0.out", "unet.down.1.out", "unet.mid.out", "unet.up.0.out", "unet.up.1.out"]
    feats = diffusion_probe_features(lens, PROMPTS * per_prompt, names=names, steps=list(record),
                                     num_inference_steps=n_steps, guidance_scale=1.5, height=32, width=32,
                                     generator=torch.Generator().manual_seed(SEED + 70_000))
    masks = torch.stack([torch.from_numpy(object_mask(img)) for img in feats.images])
    # fit on 1/4 of the training pixels; the held-out third split into validation and test images
    res = pixel_probe(feats, masks, train=2 / 3, val=0.5, train_stride=2, lens=lens)
    best_name, best_step, best = res.best
    b, s = res.names.index(best_name), res.steps.index(best_step)
    out = [line("pixel_probe", "diffusion", "best_dice", best, 0.7, block=best_name, step=best_step,
                dice_val=round(float(res.dice_val[b, s]), 4), control=round(float(res.control[b, s]), 4),
                best_test_cell_dice=round(float(res.dice.max()), 4), images=len(masks), train_images=res.n_train,
                val_images=res.n_val, test_images=res.n_test, fg_frac=round(float(masks.float().mean()), 4),
                source="Chen et al. 2023 find high-IoU linear foreground probes in intermediate UNet layers; 0.7 is "
                       "our bar; the cell is chosen by validation Dice, the value is its test Dice "
                       "(best_test_cell_dice: the optimistic pick on the test images, for comparison)")]
    for b, name in enumerate(res.names):
        for s, step in enumerate(res.steps):
            out.append(line("pixel_probe", "diffusion", f"dice@{name}@step{step}", res.dice[b, s], None,
                            dice_val=round(float(res.dice_val[b, s]), 4), control=round(float(res.control[b, s]), 4),
                            block=name, step=step, timestep=res.timesteps[s],
                            source="reported, no bar: the block x step grid, test Dice (dice_val: validation; "
                                   "control: masks shuffled across training images, scored on test)"))
    return out
