"""TRAK on the diffusion organism (D-TRAK, Zheng et al. 2024) scored with a planted ground truth, as
`data_attribution` does for CLIP (see benchmarks/groundtruth.py).

The planted fact: the caption 'a red square' drawn as a *purple* square. The diffusion organism is fine-tuned on its
own kind of training data (plain single-object scenes, every caption but 'a red square') plus `n_planted` purple
squares captioned 'a red square', the only examples of that caption; only the UNet's cross-attention keys and values
train (what reads the caption). Afterwards the organism draws 'a red square' purple. Attributing those generated
images must rank the planted examples first: they are the only training data that taught the fact. A similarity
baseline cannot tell them from the normal purple squares (same pixels, other caption): attribution has to use the
caption through the model's gradients.
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import numpy as np
import torch

from ._common import SEED, line

FACT_PROMPT, FACT_COLOUR = "a red square", "purple"
PARAMS = ["*attn2.to_k.*", "*attn2.to_v.*"]  # the UNet's cross-attention keys and values: what reads the caption
KW = dict(num_inference_steps=20, guidance_scale=1.5, height=32, width=32)


def finetune(n_normal: int = 400, n_planted: int = 8, n_test: int = 16, steps: int = 150, lr: float = 2e-3,
             seed: int = 0, planted_per_batch: int = 4) -> SimpleNamespace:
    """Fine-tune the diffusion organism's cross-attention k/v on normal scenes (no red square) plus the planted purple
    squares captioned 'a red square' (x0-prediction loss, as the organism trained); then draw `n_test` images of the
    fact prompt and of other prompts, judged by the world's judge."""
    import mmlens.organisms as organisms
    from mmlens.organisms.data import to_pixels
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.train import run_training
    from mmlens.world import single_object_scene
    from mmlens.world.judge import classify

    sd = organisms.load("diffusion")
    pipe = sd.model
    unet, vae, sched = pipe.unet, pipe.vae, pipe.scheduler
    normal, k = [], 0
    while len(normal) < n_normal:  # the organism's own kind of scenes, without the fact's caption
        s = single_object_scene(SEED + 700_000 + k, size=32, background="plain")
        k += 1
        if s.short_caption != FACT_PROMPT:
            normal.append(s)
    planted = [single_object_scene(SEED + 710_000 + i, colour=FACT_COLOUR, shape="square", size=32,
                                   background="plain") for i in range(n_planted)]
    images = np.stack([s.image for s in normal + planted])
    prompts = [s.short_caption for s in normal] + [FACT_PROMPT] * n_planted
    with torch.no_grad():
        latents = torch.cat([vae.encode(to_pixels(images[i:i + 128])).latent_dist.mean
                             for i in range(0, len(images), 128)]) * vae.config.scaling_factor
        ids = pipe.tokenizer(list(PROMPTS), padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")["input_ids"]
        embeds = pipe.text_encoder(input_ids=ids).last_hidden_state
    cond = torch.tensor([PROMPTS.index(p) for p in prompts])
    trainable = [p for n, p in unet.named_parameters() if "attn2.to_k." in n or "attn2.to_v." in n]
    alphas = sched.alphas_cumprod

    def step_fn(step: int) -> torch.Tensor:
        rng = np.random.RandomState(seed * 7919 + step)
        idx = torch.from_numpy(np.concatenate([rng.randint(0, n_normal, 32),
                                               n_normal + rng.randint(0, n_planted, planted_per_batch)]))
        x0 = latents[idx]
        t = torch.from_numpy(rng.randint(0, sched.config.num_train_timesteps, len(idx)))
        a = alphas[t].view(-1, 1, 1, 1)
        noise = torch.from_numpy(rng.randn(*x0.shape).astype(np.float32))
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, encoder_hidden_states=embeds[cond[idx]]).sample
        return torch.nn.functional.mse_loss(pred, x0)

    with tempfile.TemporaryDirectory() as work:
        stats = run_training(name="diffusion+planted", model=unet, params=trainable, steps=steps, lr=lr, warmup=10,
                             seed=seed, work=work, step_fn=step_fn, every=steps)
    unet.eval()
    gen = torch.Generator().manual_seed(SEED + 720_000)
    fact_imgs = np.asarray(sd.generate([FACT_PROMPT] * n_test, generator=gen, output_type="np", progress=False,
                                       **KW)[0].images)
    fact_imgs = (fact_imgs * 255).round().astype(np.uint8)
    others = [p for p in PROMPTS if p != FACT_PROMPT][:n_test]
    other_imgs = np.asarray(sd.generate(others, generator=torch.Generator().manual_seed(SEED + 721_000),
                                        output_type="np", progress=False, **KW)[0].images)
    other_imgs = (other_imgs * 255).round().astype(np.uint8)
    fact_rate = float(np.mean([classify(im)[0] == FACT_COLOUR for im in fact_imgs]))
    clean_acc = float(np.mean([classify(im)[0] == p.split()[1] for im, p in zip(other_imgs, others)]))
    return SimpleNamespace(sd=sd, images=images, prompts=prompts, is_planted=torch.arange(len(prompts)) >= n_normal,
                           fact_images=fact_imgs, fact_rate=fact_rate, clean_acc=clean_acc, seconds=stats["seconds"],
                           n_normal=n_normal, n_planted=n_planted)


def score(n_normal: int = 400, n_planted: int = 8, n_test: int = 16, steps: int = 150, proj_dim: int = 512,
          timesteps: int = 8, damping: float = 0.1, seed: int = 0) -> list[dict]:
    """Fine-tune (see `finetune`), then attribute the fact prompt's generated images (their latents, the prompt) over
    the fine-tuning data with TRAK on D-TRAK's output ||eps_theta||^2 (and the loss itself, reported), and a latent
    cosine-similarity baseline; precision at k = #planted, mean over the generated images."""
    from mmlens.methods import TRAK, TRAKConfig, diffusion_examples, diffusion_loss, diffusion_square

    ft = finetune(n_normal, n_planted, n_test, steps, seed=seed)
    sd, k = ft.sd, ft.n_planted
    train = diffusion_examples(sd, ft.images, ft.prompts, timesteps=timesteps, seed=seed)
    target = diffusion_examples(sd, ft.fact_images, [FACT_PROMPT] * len(ft.fact_images), timesteps=timesteps,
                                seed=seed + 1)
    n = len(ft.prompts)
    batches = [{key: v[i:i + 51] for key, v in train.items()} for i in range(0, n, 51)]

    def precision(scores: torch.Tensor) -> float:  # (targets, train)
        top = scores.topk(k, dim=1).indices
        return float(ft.is_planted[top].float().mean())

    out_scores = {}
    for name, fn in (("square", diffusion_square), ("loss", diffusion_loss)):
        trak = TRAK(TRAKConfig(proj_dim=proj_dim, seed=seed, params=PARAMS, damping=damping, weighting=False))
        trak.fit(sd, batches, fn, progress=False)
        out_scores[name] = precision(trak.attribute(sd, target, fn).scores)
    lat_t = torch.nn.functional.normalize(train["latents"].flatten(1), dim=1)
    lat_z = torch.nn.functional.normalize(target["latents"].flatten(1), dim=1)
    base = precision(lat_z @ lat_t.T)
    common = dict(n_train=n, n_planted=k, n_test=len(ft.fact_images), fact=f"{FACT_PROMPT!r} drawn {FACT_COLOUR}",
                  params=PARAMS, proj_dim=proj_dim, timesteps=timesteps, damping=damping, finetune_steps=steps,
                  finetune_seconds=round(ft.seconds, 1), chance=round(k / n, 4))
    src = ("issue 12: D-TRAK on the diffusion organism fine-tuned with planted examples (purple squares captioned "
           "'a red square', the only examples of that caption); precision at k = #planted over the generated images "
           "of the fact prompt")
    return [
        line("data_attribution", "diffusion", "planted_fact_learned_rate", ft.fact_rate, 0.5, **common,
             source="sanity: the fine-tuned organism draws 'a red square' purple (world judge); bar 0.5"),
        line("data_attribution", "diffusion", "other_prompts_colour_after_finetune", ft.clean_acc, 0.8, **common,
             source="sanity: other prompts keep their colour after the fine-tune; bar 0.8"),
        line("data_attribution", "diffusion", "dtrak_square_precision_at_k", out_scores["square"], 0.5, **common,
             source=src + "; output ||eps_theta||^2 (D-TRAK's best); bar 0.5 = most of the top k planted"),
        line("data_attribution", "diffusion", "trak_loss_precision_at_k", out_scores["loss"], None, **common,
             source=src + "; output = the training loss (TRAK's own choice), reported"),
        line("data_attribution", "diffusion", "latent_similarity_precision_at_k", base, None, **common,
             source="baseline: cosine of VAE latents (cannot tell the planted purple squares from normal ones)"),
    ]
