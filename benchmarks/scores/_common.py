"""What every technique's scoring shares: the JSON line, the held-out seed, the vlm binding scenes."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the organisms ship in the repo: never reach for a hub

import torch  # noqa: E402

SEED = 10_000_000 + 7_000  # held-out: EVAL_SEED_OFFSET + 7000, apart from the organisms' evaluation seeds


def line(technique, organism, metric, value, threshold, higher_is_better=True, **extra) -> dict:
    """One score; `threshold=None` marks a value reported without a bar (`passed` is then None, never True)."""
    ok = None if threshold is None else value >= threshold if higher_is_better else value <= threshold
    return {"technique": technique, "organism": organism, "metric": metric, "value": round(float(value), 4),
            "threshold": threshold, "higher_is_better": higher_is_better, "passed": None if ok is None else bool(ok), **extra}


def vlm_binding_scenes(n: int, tok):
    """Scenes with 2-3 objects of distinct shapes, the question "what colour is the {shape} ?" about object 0, and
    the answer's token id."""
    from mmlens.organisms.prompts import binding_scenes

    scenes, questions = binding_scenes(n, SEED)
    return scenes, questions, torch.tensor([tok.convert_tokens_to_ids(s.objects[0].colour) for s in scenes])
