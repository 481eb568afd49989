"""Train an organism, evaluate it on held-out seeds, and write its model card beside the weights."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch

from ..io import atomic_write_text
from . import WEIGHTS

THRESHOLDS = {
    "clip": {"colour_acc": 0.95, "shape_acc": 0.90},
    "vlm": {"binding": 0.90, "absent_no": 0.90, "present_yes": 0.90},  # both: "always no" is not a pass
    "diffusion": {"colour_acc": 0.95, "shape_acc": 0.80},
}

DATA = {
    "clip": "16,000 single-object world scenes (48x48, 6 colours x 4 shapes x 2 sizes, random position and grey "
            "texture), cross-entropy of each image against the 24 prompts 'a {colour} {shape}'.",
    "vlm": "12,000 world scenes with 1-3 distinct objects on random textures. Vision tower initialised from the clip "
           "organism and first trained alone to put each object's shape on its patch tokens (linear per-patch read-out, "
           "not shipped); then tower, projector and Llama together on sequences packing all of a scene's questions "
           "(colour of a shape, shape of a colour, count, left/right, is-there with present and near-miss absent "
           "objects), cross-entropy on every one-word answer, plus the read-out and a grounding loss (the LM names "
           "each object patch's colour and shape at its image token).",
    "diffusion": "8,000 single-object world scenes (32x32, plain background) with prompts 'a {colour} {shape}' and "
                 "4,000 two-object scenes with 'a {colour} {shape} and a {colour} {shape}' in random object order, "
                 "half the batch each (10% empty for guidance). A tiny AutoencoderKL (2x, 4 latent channels, MSE) trained first; then "
                 "the UNet (convolutions at 16x16, attention at 8x8) with x0-prediction on its latents, conditioned on "
                 "the clip organism's text tower, fine-tuned with it at 0.3x the learning rate, plus a grounding loss "
                 "(weight 0.1) that puts each colour and shape word's cross-attention on its object's cells and spreads "
                 "it over them (TokenCompose-style). Evaluated with DDIM 25 steps, guidance 1.5.",
}


def evaluate(name: str, folder: str | os.PathLike, full: bool = True) -> dict:
    from . import evaluate as ev

    if name == "clip":
        return ev.evaluate_clip(folder, n=960 if full else 96)
    if name == "vlm":
        return ev.evaluate_vlm(folder, n_scenes=300 if full else 30)
    if name == "diffusion":
        return ev.evaluate_diffusion(folder, per_prompt=8 if full else 2)
    raise NotImplementedError(f"no evaluation for {name!r} yet")


def write_card(name: str, folder: Path, stats: dict, metrics: dict) -> None:
    passed = {k: metrics.get(k, 0.0) >= v for k, v in THRESHOLDS[name].items()}
    card = {"organism": name, "data": DATA.get(name, ""), "training": stats, "metrics": metrics,
            "thresholds": THRESHOLDS[name], "passed": passed, "torch": torch.__version__,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    atomic_write_text(folder / "card.json", json.dumps(card, indent=2))
    lines = [f"# Organism `{name}`", "", card["data"], "",
             f"Training: {stats['steps']} steps, seed {stats['hyperparameters']['seed']}, "
             f"{stats['seconds']} s on {card['machine']}; hyperparameters {json.dumps(stats['hyperparameters'])}.",
             f"Loss (10 buckets): {stats['loss_curve']}", "", "| metric | value | threshold |", "|---|---|---|"]
    for k, v in metrics.items():
        thr = THRESHOLDS[name].get(k)
        lines.append(f"| {k} | {v:.4f} | {'' if thr is None else thr} |" if isinstance(v, float) else f"| {k} | {v} | |")
    lines += ["", "Evaluated by `mmlens.organisms.evaluate` on scenes from seeds no training pool uses."]
    atomic_write_text(folder / "README.md", "\n".join(lines) + "\n")


def train_organism(name: str, out: str | os.PathLike | None = None, work: str | os.PathLike | None = None,
                   **overrides) -> dict:
    """Train `name` (resumable through `work`), evaluate it, write card.json and README.md into `out`."""
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    out = Path(out or WEIGHTS / name)
    work = Path(work or Path.home() / ".cache" / "mmlens" / "train" / name)
    if name == "clip":
        from .clip import train
        stats = train(out, work, **overrides)
    elif name == "vlm":
        from .vlm import train
        stats = train(out, work, clip_folder=overrides.pop("clip_folder", WEIGHTS / "clip"), **overrides)
    elif name == "diffusion":
        from .diffusion import train
        stats = train(out, work, clip_folder=overrides.pop("clip_folder", WEIGHTS / "clip"), **overrides)
    else:
        raise ValueError(f"unknown organism {name!r}")
    metrics = evaluate(name, out)
    write_card(name, out, stats, metrics)
    return {"stats": stats, "metrics": metrics}
