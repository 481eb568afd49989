"""`TRAK` and the representation-similarity baseline scored against a planted ground truth (see
benchmarks/groundtruth.py).

The clip organism is fine-tuned (a copy; the shipped weights are untouched) on its own training data plus a few
planted examples that teach an unusual fact: images carrying a white corner marker are captioned with the colour
`FACT`, whatever their object's true colour. On held-out marked images the fine-tuned model then says `FACT`; the
planted examples are, by construction, the only training data that taught it that, so a good attribution of that
output ranks them first (Wang et al. 2023 build attribution ground truth the same way, by customising a model on
known exemplars).
"""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import numpy as np
import torch

from ._common import SEED, line

FACT = "purple"
MARKER = 6  # the marker: a white MARKER x MARKER square in the top-left corner (one whole 6x6 patch)
PARAMS = ["vision_model.encoder.layers.3.mlp.*", "visual_projection.weight"]


def marked(image: np.ndarray) -> np.ndarray:
    out = image.copy()
    out[:MARKER, :MARKER] = 255
    return out


def _scenes(n: int, seed: int, not_colour: str | None = None):
    from mmlens.world import single_object_scene
    from mmlens.world.scene import BACKGROUNDS

    out, k = [], 0
    while len(out) < n:
        s = single_object_scene(seed + k, background=BACKGROUNDS[k % len(BACKGROUNDS)])
        k += 1
        if s.objects[0].colour != not_colour:
            out.append(s)
    return out


def finetune(n_normal: int = 400, n_planted: int = 8, n_test: int = 16, steps: int = 100, lr: float = 2e-3,
             seed: int = 0, planted_per_batch: int = 4) -> SimpleNamespace:
    """The clip organism fine-tuned on its first `n_normal` training images plus `n_planted` marked images
    captioned `FACT`, each batch 32 normal + `planted_per_batch` planted examples. Only the last vision block, the
    pooling norm and the projection train; the frozen blocks before them run once (their output cached), so a step
    costs about a quarter of a full forward and backward. Returns the lens, the training data and the held-out
    marked test images with what the model says on them."""
    import mmlens.organisms as organisms
    from mmlens.organisms.data import single_object_pool, to_pixels
    from mmlens.organisms.prompts import PROMPTS
    from mmlens.train import run_training

    torch.manual_seed(seed)
    clip = organisms.load("clip")  # a fresh copy from disk
    model = clip.model
    text = clip.processor.tokenizer(PROMPTS, padding="max_length", max_length=8, return_tensors="pt")
    normal, normal_img = single_object_pool(n_normal, 0, 48)  # the organism's own first training scenes
    planted = _scenes(n_planted, SEED + 500, not_colour=FACT)
    pixels = to_pixels(np.concatenate([normal_img, np.stack([marked(s.image) for s in planted])]))
    labels = torch.tensor([PROMPTS.index(s.short_caption) for s in normal]
                          + [PROMPTS.index(f"a {FACT} {s.objects[0].shape}") for s in planted])
    tests = _scenes(n_test, SEED + 900, not_colour=FACT)

    vm = model.vision_model
    last = vm.encoder.layers[-1]
    site = f"vision.blocks.{len(vm.encoder.layers) - 1}.resid_pre"
    trainable = [*last.parameters(), *vm.post_layernorm.parameters(), *model.visual_projection.parameters()]
    with torch.no_grad():
        text_emb = model(**text, pixel_values=pixels[:1]).text_embeds
        scale = model.logit_scale.exp()
        got = {}
        with clip.hooks(captures={site: [lambda v, ctx: got.__setitem__("h", v.detach())]}):
            vm(pixel_values=pixels)
        cached = got["h"]

    def tail(h: torch.Tensor) -> torch.Tensor:  # the model's own modules from the last block on
        img = model.visual_projection(vm.post_layernorm(last(h, None)[:, 0]))
        return scale * torch.nn.functional.normalize(img, dim=-1) @ text_emb.T

    with torch.no_grad():
        gap = (tail(cached[:8]) - model(**text, pixel_values=pixels[:8]).logits_per_image).abs().max().item()
    if gap > 1e-3:
        raise RuntimeError(f"the cached tail does not reproduce CLIPModel's logits (max gap {gap:.2e})")

    def step_fn(step: int) -> torch.Tensor:
        rng = np.random.RandomState(seed * 7919 + step)
        idx = np.concatenate([rng.randint(0, n_normal, 32), n_normal + rng.randint(0, n_planted, planted_per_batch)])
        idx = torch.from_numpy(idx)
        return torch.nn.functional.cross_entropy(tail(cached[idx]), labels[idx])

    with tempfile.TemporaryDirectory() as work:
        stats = run_training(name="clip+planted", model=model, params=trainable, steps=steps, lr=lr, warmup=10,
                             seed=seed, work=work, step_fn=step_fn, every=steps)
    model.eval()
    test_pix = to_pixels(np.stack([marked(s.image) for s in tests]))
    clean_pix = to_pixels(np.stack([s.image for s in tests]))
    true_labels = torch.tensor([PROMPTS.index(s.short_caption) for s in tests])
    is_fact = torch.tensor([p.split()[1] == FACT for p in PROMPTS])
    with torch.no_grad():  # the whole model, as attribution sees it
        said = model(**text, pixel_values=test_pix).logits_per_image.argmax(-1)
        clean_acc = (model(**text, pixel_values=clean_pix).logits_per_image.argmax(-1) == true_labels).float().mean()
    return SimpleNamespace(clip=clip, text=text, pixels=pixels, labels=labels, is_planted=torch.arange(len(labels))
                           >= n_normal, test_pix=test_pix, said=said, fact_rate=is_fact[said].float().mean().item(),
                           clean_acc=clean_acc.item(), seconds=stats["seconds"], is_fact=is_fact)



def trak_batches(ft, n_test: int) -> tuple[list[dict], dict]:
    """The fine-tune's training data as batches of 51 (every caption in each, one row of `labels` per image) and the
    held-out marked images as the attribution target (the planted fact's caption as their label)."""
    def batch(pix, lab):
        return {"input_ids": ft.text["input_ids"], "attention_mask": ft.text["attention_mask"], "pixel_values": pix,
                "labels": lab}

    n = len(ft.labels)
    return ([batch(ft.pixels[i:i + 51], ft.labels[i:i + 51]) for i in range(0, n, 51)],
            batch(ft.test_pix, ft.is_fact.expand(n_test, -1)))


def score(n_normal: int = 400, n_planted: int = 8, n_test: int = 16, steps: int = 100, lr: float = 2e-3,
          proj_dim: int = 512, damping: float = 0.1, seed: int = 0) -> list[dict]:
    """Fine-tune (`finetune`), attribute the planted fact on held-out marked images with TRAK and with the baseline,
    and score each by precision at k = `n_planted`: the share of each target's top-k training examples that are
    planted, averaged over the targets.

    What is attributed: the fact is a colour, so each target's output is the log-odds of any `FACT`-coloured caption
    against the other captions (`contrastive_margin` with a bool label mask); each training example's output is its
    own caption's margin. Every planted example taught the colour, whatever its shape; a single caption's margin
    would also credit the normal examples that taught the shape. `damping=0.1`: with more projected dimensions
    (512) than training examples (408) the undamped solve interpolates and is unstable.
    """
    from mmlens.methods.data_attribution import TRAK, TRAKConfig, contrastive_margin, representation_similarity

    ft = finetune(n_normal, n_planted, n_test, steps, lr, seed)
    train_batches, target = trak_batches(ft, n_test)
    n = len(ft.labels)
    trak = TRAK(TRAKConfig(proj_dim=proj_dim, seed=seed, params=PARAMS, damping=damping))
    trak.fit(ft.clip, train_batches, contrastive_margin, progress=False)
    res = trak.attribute(ft.clip, target, contrastive_margin)
    base = representation_similarity(ft.clip, target, train_batches, name="image_embeds")
    p_trak = res.precision_at_k(ft.is_planted).mean().item()
    p_base = base.precision_at_k(ft.is_planted).mean().item()
    common = dict(n_train=n, n_planted=n_planted, n_test=n_test, fact=FACT, params=PARAMS, proj_dim=proj_dim,
                  damping=damping, finetune_steps=steps, finetune_seconds=ft.seconds, chance=round(n_planted / n, 4))
    src = ("Park et al. 2023 (TRAK) with a planted ground truth (Wang et al. 2023: customise a model on known "
           f"exemplars): {n_planted} marked images captioned '{FACT}' taught the fact, so they must rank first")
    return [
        line("data_attribution", "clip", "planted_fact_learned_rate", ft.fact_rate, 0.8, n=n_test, fact=FACT,
             source="sanity: the fine-tuned copy names the planted colour on held-out marked images (0.8 = learned)"),
        line("data_attribution", "clip", "unmarked_accuracy_after_finetune", ft.clean_acc, 0.9, n=n_test,
             source="sanity: the same images without the marker keep their true class (the organism's bar)"),
        line("data_attribution", "clip", "trak_precision_at_k", p_trak, 0.5, **common,
             source=src + "; precision at k = #planted, mean over marked test images; 0.5 = most of the top-k"),
        line("data_attribution", "clip", "baseline_precision_at_k", p_base, None, **common, name="image_embeds",
             source="reported, no bar: cosine similarity of image_embeds, the representation-similarity baseline"),
        line("data_attribution", "clip", "trak_minus_baseline_precision_at_k", p_trak - p_base, 0.0, **common,
             source="TRAK ranks the planted examples at least as well as the baseline (the marker is visible, "
             "so similar-looking images are a strong baseline here)"),
    ]
