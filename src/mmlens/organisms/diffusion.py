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

Why a grounding loss (issue 12): two-object training alone made the maps route (a word's map lies more on its own
object than on the other in 0.59 of two-object samples) but not localise (shape-word mIoU 0.26 against the judged
object; a few heads reached 0.49, the head average not). So the organism is trained to carry the layout in its
cross-attention, with TokenCompose's token loss (Wang et al. 2024) and a term spreading each word's attention over
its whole object (`grounding_loss`). This plants a known mechanism: each colour and shape word attends to its
object's cells at every cross-attention site, which is the ground truth `word_maps` is scored on.
"""

from __future__ import annotations

import contextlib
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
                seed=0, uncond_p=0.1, heads=4, pairs=4_000, pair_p=0.4, text_lr_scale=0.3, ground=0.1, init=None)
GRID = 8  # the cross-attention resolution (latent 16x16, attention after one downsample)


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


def object_cells(scenes) -> torch.Tensor:
    """(scenes, objects, GRID*GRID) float: the share of each cross-attention cell that each object covers (raster
    order, objects in scene order; a missing second object is all zeros)."""
    from ..hooks.tokens import area_pool

    out = torch.zeros(len(scenes), 2, GRID * GRID)
    for i, s in enumerate(scenes):
        for j, m in enumerate(s.masks[:2]):
            out[i, j] = area_pool(torch.from_numpy(m), GRID, GRID).flatten().float()
    return out


@contextlib.contextmanager
def cross_attention_probs(lens):
    """Within the block, each forward appends every cross-attention's probabilities (batch, heads, queries, tokens),
    with their graph, to the yielded list: mmlens's own `unet.*.cross.pattern` hooks (diffusers' SDPA processor
    never forms them; the hook layer recomputes them from the kernel's q and k and routes gradients through them)."""
    kept = []
    keep = [lambda value, ctx: kept.append(value)]
    with lens.hooks(captures={name: keep for name in lens.hook_points("unet.*.cross.pattern")}):
        yield kept


def grounding_loss(probs: list[torch.Tensor], cells: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Per grounded word, averaged over the words and the cross-attention sites, of its attention map `a` (the
    probabilities of the word, averaged over heads, over the queries):
    - TokenCompose's token loss (Wang et al. 2024), (1 - the share of `a` on its object's cells)^2, which puts the
      word's attention on its object, and
    - KL(object || a), both as distributions over the cells: it spreads the attention over the whole object (the
      token loss alone is met by one cell inside it). TokenCompose's per-pixel BCE plays this part there.
    `probs`: per site (batch, heads, queries, tokens); `cells` (batch, tokens, queries) the word's object cover;
    `words` (batch, tokens) 1 where a word is grounded."""
    total = []
    n = words.sum().clamp_min(1.0)
    target = cells / cells.sum(-1, keepdim=True).clamp_min(1e-8)
    for p in probs:
        if p.shape[2] != cells.shape[2]:
            raise ValueError(f"cross-attention over {p.shape[2]} queries, the object cells are {cells.shape[2]}")
        a = p.mean(1).transpose(1, 2)  # (batch, tokens, queries)
        mass = a.sum(-1).clamp_min(1e-8)
        share = (a * cells).sum(-1) / mass
        kl = (target * (target.clamp_min(1e-8).log() - (a / mass[..., None]).clamp_min(1e-8).log())).sum(-1)
        total.append((((1 - share) ** 2 + kl) * words).sum() / n)
    return torch.stack(total).mean()


def train(out: str | os.PathLike, work: str | os.PathLike, clip_folder: str | os.PathLike, **overrides) -> dict:
    """`ground` > 0 adds TokenCompose's grounding loss at that weight (see `grounding_loss`); `init`: a saved
    pipeline whose VAE, UNet and text tower the run starts from (the VAE is then not trained)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    hp = {**DEFAULTS, **overrides}
    torch.manual_seed(hp["seed"])
    tok = AutoTokenizer.from_pretrained(clip_folder)
    tok.model_max_length = 16
    for how_loaded in ("local_files_only", "is_local"):  # load-time flags transformers would save (HF_HUB_OFFLINE
        tok.init_kwargs.pop(how_loaded, None)           # sets the first): not part of the tokenizer
    init = None if hp["init"] is None else Path(hp["init"])
    text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder" if init else clip_folder).eval()
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

    vae = AutoencoderKL.from_pretrained(init / "vae") if init else make_vae()

    def vae_step(step: int) -> torch.Tensor:
        idx = torch.from_numpy(np.random.RandomState(step).randint(0, len(pixels), hp["vae_batch"]))
        x = pixels[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        return F.mse_loss(rec, x) + 1e-6 * post.kl().mean()

    vae_stats = run_training(name="diffusion-vae", model=vae, params=vae.parameters(),
                             steps=0 if init else hp["vae_steps"], lr=hp["vae_lr"], warmup=20, seed=hp["seed"],
                             work=Path(work) / "vae", step_fn=vae_step)
    vae.eval()
    with torch.no_grad():
        both = torch.cat([pixels, to_pixels(pair_images)]) if len(pair_scenes) else pixels  # singles, then pairs
        latents = torch.cat([vae.encode(both[i : i + 256]).latent_dist.mean for i in range(0, len(both), 256)])
    text = tok(captions, padding="max_length", max_length=16, return_tensors="pt")
    n_single, empty = len(scenes), len(PROMPTS)
    unet = (UNet2DConditionModel.from_pretrained(init / "unet") if init
            else make_unet(text_encoder.config.hidden_size, hp["heads"]))
    sched = make_scheduler()
    alphas = sched.alphas_cumprod
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    # grounding targets: per caption slot, the object each word names (tokens 2, 3: the first object's colour and
    # shape; 6, 7: the second's), as its cells
    first, second = torch.zeros(16, dtype=torch.bool), torch.zeros(16, dtype=torch.bool)
    first[[2, 3]], second[[6, 7]] = True, True
    if hp["ground"]:
        from .. import load

        lens = load(pipe)  # the grounding loss reads the cross-attention through mmlens's hooks
        single_cells, pair_cells = object_cells(scenes)[:, 0], object_cells(pair_scenes)
        if len(captions) > empty + 1:  # the word-level tokenizer: <s> a red square and a blue circle
            named = captions[empty + 1].split()
            want = tok.convert_tokens_to_ids([named[i] for i in (1, 2, 5, 6)])
            if text["input_ids"][empty + 1, [2, 3, 6, 7]].tolist() != want:
                raise ValueError("the grounding loss needs one token per word after <s>; this tokenizer splits them")

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
        if not hp["ground"]:
            return F.mse_loss(unet(noisy, t, encoder_hidden_states=embeds.last_hidden_state).sample, x0)
        with cross_attention_probs(lens) as probs:
            pred = unet(noisy, t, encoder_hidden_states=embeds.last_hidden_state).sample
        # the caption's first object is the scene's object `order` for pairs (object 0 for singles)
        one, other = single_cells[single], torch.zeros(hp["batch"], GRID * GRID)
        if n_pairs:
            one = torch.where(pair[:, None], pair_cells[two, order], one)
            other = torch.where(pair[:, None], pair_cells[two, 1 - order], other)
        cells = first[None, :, None] * one[:, None] + second[None, :, None] * other[:, None]
        words = (first[None] | (second[None] & pair[:, None])) & (cond != empty)[:, None]
        return F.mse_loss(pred, x0) + hp["ground"] * grounding_loss(probs, cells, words.float())

    trained = torch.nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
    groups = [{"params": list(unet.parameters())},
              {"params": list(text_encoder.parameters()), "lr_scale": hp["text_lr_scale"]}]
    stats = run_training(name="diffusion", model=trained, params=groups, steps=hp["steps"], lr=hp["lr"],
                         warmup=hp["warmup"], seed=hp["seed"], work=Path(work) / "unet", step_fn=step_fn)
    text_encoder.eval()
    pipe.save_pretrained(out)
    stats = combine(stats, vae=vae_stats)
    return {"hyperparameters": hp, **stats}
