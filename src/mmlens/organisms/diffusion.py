"""The `diffusion` organism: a `StableDiffusionPipeline` (UNet2DConditionModel with cross-attention, a tiny
AutoencoderKL, the clip organism's text tower) that draws "a red square" and "a red square and a blue circle"
prompts. x0-prediction.

Why two-object scenes (issue 12): trained on single objects only, the UNet had no reason to route a word to a
place (every text token from the colour word on carries the whole prompt), and its cross-attention maps did not
localise (shape-word mIoU 0.15). With two objects a region must read *its* object's words, the other object's
words being wrong for it. Object order in the caption is random, so position in the prompt does not give the
layout away. The text tower starts from the clip organism's and trains with the UNet (at 0.3x the learning rate):
the clip organism saw captions of at most 8 tokens, so the positions a second object's words sit at were never
trained there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import scene_pool, single_object_pool, to_pixels
from .prompts import PROMPTS  # the 24 prompts 'a {colour} {shape}' (also importable from here)
from ..train import combine, run_training

IMAGE = 32
LATENT_CHANNELS = 4
DEFAULTS = dict(vae_steps=500, vae_batch=32, steps=2000, batch=64, lr=1e-3, vae_lr=2e-3, warmup=60, pool=8_000,
                seed=0, uncond_p=0.1, heads=4, pairs=4_000, pair_p=0.4, text_lr_scale=0.3)


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
                         latent_channels=LATENT_CHANNELS,
                         norm_num_groups=16, sample_size=IMAGE, layers_per_block=1, scaling_factor=1.0)


def make_unet(cross_dim: int, heads: int = 4):
    """Convolutions at 16x16, self- and cross-attention at 8x8 (down, mid, up): attention at 16x16 costs 3x the
    step time on 2 CPU cores (2.3 s vs 0.44 s at batch 64).

    `heads`: attention heads per block (64 channels / heads wide). UNet2DConditionModel's `attention_head_dim`
    is, for historical reasons, the number of heads (diffusers keeps the name for old checkpoints), so it gets
    `heads`. The first organism passed 16 there meaning a head width and got 16 heads 4 wide; retrained with 4
    heads 16 wide (issue 12), its bars rose slightly and its word maps barely changed (shape word mIoU 0.13 ->
    0.15): head width was not why they do not localise."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=IMAGE // 2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_dim, attention_head_dim=heads, norm_num_groups=16,
    )


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="sample")


def train(out: str | os.PathLike, work: str | os.PathLike, clip_folder: str | os.PathLike, **overrides) -> dict:
    from diffusers import StableDiffusionPipeline
    from transformers import AutoTokenizer, CLIPTextModel

    hp = {**DEFAULTS, **overrides}
    torch.manual_seed(hp["seed"])
    tok = AutoTokenizer.from_pretrained(clip_folder)
    tok.model_max_length = 16
    text_encoder = CLIPTextModel.from_pretrained(clip_folder).eval()
    scenes, images = single_object_pool(hp["pool"], hp["seed"] + 2, IMAGE, background="plain")
    pixels = to_pixels(images)
    pair_scenes, pair_images = scene_pool(hp["pairs"], hp["seed"] + 3, IMAGE, n_objects=2, background="plain")
    captions = list(PROMPTS) + [""]  # 24 prompts, the empty prompt (guidance), then the two-object captions
    for s in pair_scenes:
        for order in (s.objects, s.objects[::-1]):
            c = " and ".join(f"a {o.colour} {o.shape}" for o in order)
            if c not in captions:
                captions.append(c)
    labels = torch.tensor([captions.index(s.short_caption) for s in scenes])
    pair_labels = torch.tensor([[captions.index(" and ".join(f"a {o.colour} {o.shape}" for o in order))
                                 for order in (s.objects, s.objects[::-1])] for s in pair_scenes], dtype=torch.long)

    vae = make_vae()

    def vae_step(step: int) -> torch.Tensor:
        idx = torch.from_numpy(np.random.RandomState(step).randint(0, len(pixels), hp["vae_batch"]))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    vae_stats = run_training(name="diffusion-vae", model=vae, params=vae.parameters(), steps=hp["vae_steps"],
                             lr=hp["vae_lr"], warmup=20, seed=hp["seed"], work=Path(work) / "vae", step_fn=vae_step)
    vae.eval()
    with torch.no_grad():
        both = torch.cat([pixels, to_pixels(pair_images)]) if len(pair_scenes) else pixels  # singles, then pairs
        latents = torch.cat([vae.encode(both[i : i + 256]).latent_dist.mean for i in range(0, len(both), 256)])
    text = tok(captions, padding="max_length", max_length=16, return_tensors="pt")
    n_single, empty = len(scenes), len(PROMPTS)
    unet = make_unet(text_encoder.config.hidden_size, hp["heads"])
    sched = make_scheduler()
    alphas = sched.alphas_cumprod

    def step_fn(step: int) -> torch.Tensor:
        rng = np.random.RandomState(hp["seed"] * 7919 + step)
        n_pairs = len(pair_scenes)
        pair = torch.from_numpy(rng.rand(hp["batch"]) < (hp["pair_p"] if n_pairs else 0.0))
        single = torch.from_numpy(rng.randint(0, n_single, hp["batch"]))
        two = torch.from_numpy(rng.randint(0, max(1, n_pairs), hp["batch"]))
        order = torch.from_numpy(rng.randint(0, 2, hp["batch"]))
        x0 = latents[torch.where(pair, n_single + two, single)]
        cond = labels[single]
        if n_pairs:
            cond = torch.where(pair, pair_labels[two, order], cond)
        cond[torch.from_numpy(rng.rand(hp["batch"]) < hp["uncond_p"])] = empty
        t = torch.from_numpy(rng.randint(0, sched.config.num_train_timesteps, hp["batch"]))
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn_like(x0)
        embeds = text_encoder(input_ids=text["input_ids"][cond])  # no mask: the pipeline passes none either
        pred = unet(noisy, t, encoder_hidden_states=embeds.last_hidden_state).sample
        return F.mse_loss(pred, x0)

    trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    groups = [{"params": list(unet.parameters())},
              {"params": list(text_encoder.parameters()), "lr_scale": hp["text_lr_scale"]}]
    stats = run_training(name="diffusion", model=trained, params=groups, steps=hp["steps"], lr=hp["lr"],
                         warmup=hp["warmup"], seed=hp["seed"], work=Path(work) / "unet", step_fn=step_fn)
    text_encoder.eval()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    stats = combine(stats, vae=vae_stats)
    return {"hyperparameters": hp, **stats}
