"""The `clip` organism: a transformers `CLIPModel` trained on the world to name colour and shape zero-shot."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .data import single_object_pool, to_pixels
from .prompts import PROMPTS  # the 24 classes 'a {colour} {shape}' (also importable from here)
from ..train import run_training
from .vocab import world_tokenizer

IMAGE, PATCH = 48, 6
DEFAULTS = dict(steps=1200, batch=128, lr=2e-3, warmup=60, pool=16_000, seed=0)


def config(tok):
    from transformers import CLIPConfig

    text = dict(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=16, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  image_size=IMAGE, patch_size=PATCH)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(do_resize=False, do_center_crop=False, size={"shortest_edge": IMAGE},
                                 crop_size={"height": IMAGE, "width": IMAGE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def processor(tok):
    from transformers import CLIPProcessor

    return CLIPProcessor(image_processor=image_processor(), tokenizer=tok)


def train(out: str | os.PathLike, work: str | os.PathLike, **overrides) -> dict:
    """Train from scratch (or resume from `work`) and save the organism folder `out`."""
    from transformers import CLIPModel

    hp = {**DEFAULTS, **overrides}
    torch.manual_seed(hp["seed"])
    tok = world_tokenizer(model_max_length=16)
    model = CLIPModel(config(tok))
    scenes, images = single_object_pool(hp["pool"], hp["seed"], IMAGE)
    pixels = to_pixels(images)
    labels = torch.tensor([PROMPTS.index(s.short_caption) for s in scenes])
    text = tok(PROMPTS, padding="max_length", max_length=8, return_tensors="pt")

    def step_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(np.random.RandomState(hp["seed"] * 7919 + step).randint(0, len(scenes), hp["batch"]))
        out = model(input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixels[idx])
        return torch.nn.functional.cross_entropy(out.logits_per_image, labels[idx])

    stats = run_training(name="clip", model=model, params=model.parameters(), steps=hp["steps"], lr=hp["lr"],
                         warmup=hp["warmup"], seed=hp["seed"], work=work, step_fn=step_fn)
    out = Path(out)
    model.save_pretrained(out)
    processor(tok).save_pretrained(out)
    return {"hyperparameters": hp, **stats}
