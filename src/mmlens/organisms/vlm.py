"""The `vlm` organism: `LlavaForConditionalGeneration` (the clip organism's ViT + MLP projector + Llama) that
answers the world's questions with one word."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .clip import IMAGE, PATCH, image_processor
from .data import scene_pool, to_pixels
from .train import run_training
from .vocab import world_tokenizer

N_IMAGE_TOKENS = (IMAGE // PATCH) ** 2 + 1  # "full" strategy keeps CLS
DEFAULTS = dict(steps=1500, batch=96, lr=1e-3, vision_lr_scale=0.3, warmup=80, pool=12_000, seed=0)
PROMPT = "<image> {question}"


def config(tok, vision_config):
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                       pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="full", projector_hidden_act="gelu")


def processor(tok):
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=image_processor(), tokenizer=tok, patch_size=PATCH,
                          vision_feature_select_strategy="full", image_token="<image>", num_additional_image_tokens=1)


def _encode(tok, question: str) -> list[int]:
    """Token ids of `<s> <image>*N question` (no </s>: the next token is the answer)."""
    ids = tok(PROMPT.format(question=question), add_special_tokens=True)["input_ids"][:-1]
    image = tok.convert_tokens_to_ids("<image>")
    k = ids.index(image)
    return ids[:k] + [image] * N_IMAGE_TOKENS + ids[k + 1 :]


@torch.no_grad()
def answer_first_tokens(lens, scenes, questions) -> list[str]:
    """Greedy first answer word for each (scene, question), through the organism's own processor."""
    tok = lens.processor.tokenizer
    tok.padding_side = "left"
    inputs = lens.processor(text=[PROMPT.format(question=q) for q in questions], images=[s.pil() for s in scenes],
                            return_tensors="pt", padding=True)
    ids = inputs["input_ids"]
    if (ids[:, -1] == tok.eos_token_id).all():  # the word template appends </s>; the answer comes before it
        inputs = {k: (v[:, :-1] if k in ("input_ids", "attention_mask") else v) for k, v in inputs.items()}
    logits = lens(inputs).logits[:, -1]
    return tok.convert_ids_to_tokens(logits.argmax(-1).tolist())


def train(out: str | os.PathLike, work: str | os.PathLike, clip_folder: str | os.PathLike, **overrides) -> dict:
    """Train (or resume) with the vision tower initialised from the clip organism; save the folder `out`."""
    from transformers import CLIPModel, LlavaForConditionalGeneration

    hp = {**DEFAULTS, **overrides}
    torch.manual_seed(hp["seed"])
    tok = world_tokenizer(model_max_length=128)
    clip = CLIPModel.from_pretrained(clip_folder)
    model = LlavaForConditionalGeneration(config(tok, clip.config.vision_config))
    model.model.vision_tower.load_state_dict(clip.vision_model.state_dict())
    scenes, images = scene_pool(hp["pool"], hp["seed"] + 1, IMAGE)
    pixels = to_pixels(images)
    qa = [s.questions(np.random.RandomState(k)) for k, s in enumerate(scenes)]
    kinds = sorted({kind for qs in qa for *_, kind in qs})
    by_kind = {kd: [(i, q, a) for i, qs in enumerate(qa) for q, a, kk in qs if kk == kd] for kd in kinds}
    enc_cache: dict[str, list[int]] = {}

    def batch(step: int):
        rng = np.random.RandomState(hp["seed"] * 7919 + step)
        rows, idx, answers = [], [], []
        for _ in range(hp["batch"]):
            pool = by_kind[kinds[rng.randint(len(kinds))]]  # balanced over question kinds
            i, q, a = pool[rng.randint(len(pool))]
            rows.append(enc_cache.setdefault(q, _encode(tok, q)))
            idx.append(i)
            answers.append(tok.convert_tokens_to_ids(a))
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for r, row in enumerate(rows):  # left padding: the answer is predicted at the last position
            ids[r, width - len(row):] = torch.tensor(row)
            mask[r, width - len(row):] = 1
        return ids, mask, pixels[idx], torch.tensor(answers)

    def step_fn(step: int) -> torch.Tensor:
        ids, mask, px, ans = batch(step)
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=px, logits_to_keep=1).logits[:, -1]
        return torch.nn.functional.cross_entropy(logits, ans)

    vision = list(model.model.vision_tower.parameters())
    vision_ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in vision_ids]
    groups = [{"params": rest}, {"params": vision, "lr_scale": hp["vision_lr_scale"]}]
    stats = run_training(name="vlm", model=model, params=groups, steps=hp["steps"], lr=hp["lr"], warmup=hp["warmup"],
                         seed=hp["seed"], work=work, step_fn=step_fn)
    out = Path(out)
    model.save_pretrained(out)
    processor(tok).save_pretrained(out)
    return {"hyperparameters": hp, **stats}
