"""`mmlens demo`: one model per family through the hook layer, written up as an HTML report.

Until the trained organisms ship, the models are tiny random ones built from configs (the same classes a
full checkpoint uses), so the figures show the machinery, not learned mechanisms.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from .loading import load
from .testing.tiny_models import build, sample_inputs
from .viz.report import Report

FAMILIES = {"contrastive": "clip", "generative": "llava", "diffusion": "sd"}


def _heatmap(values, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3))
    ax.imshow(values, cmap="viridis")
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return fig


def _section(report: Report, family: str, name: str, folder: Path) -> None:
    t0 = time.perf_counter()
    lens = load(folder)
    report.heading(f"{family}: {type(lens.model).__name__} ({name})")
    report.text(f"{len(lens.hook_points())} hook points, folded by block index:")
    report.code(lens.describe())
    if family == "diffusion":
        out, cache = lens.generate("a red square", num_inference_steps=4, guidance_scale=3.0, height=32, width=32,
                                   output_type="np", names=["unet.*.cross.probs", "unet.*.resid_post",
                                                            "text_encoder.blocks.*.resid_post"])
        report.figure(_heatmap(out.images[0], "sample"), "generated image (random weights)")
        probs = cache.get("unet.up.1.attn.0.cross.probs", step=3, branch="cond")  # (1, heads, hw, tokens)
        side = int(probs.shape[2] ** 0.5)
        for tok in (1, 2, 3):
            report.figure(_heatmap(probs[0, :, :, tok].mean(0).reshape(side, side), f"token {tok}"),
                          "cross-attention, last step, cond branch")
        rows = [{"step": s, "timestep": round(t, 1)} for s, t in cache.timesteps.items()]
        report.table(rows)
    else:
        inputs = sample_inputs(name, lens)
        out, cache = lens.run_with_cache(inputs, names=None)
        _, attn = lens.run_with_cache(inputs, names="*.blocks.0.attn.pattern")
        if family == "generative":
            tm = lens.token_map(inputs)
            report.text("Token map (modality per position):")
            report.table([{k: r[k] for k in ("pos", "modality", "image", "row", "col", "token")}
                          for r in tm.to_records()], max_rows=30)
            last = attn["lm.blocks.0.attn.pattern"][0, :, -1]  # last position over every key
            img = tm.positions("image")
            grid = torch.zeros(int(tm.row.max()) + 1, int(tm.col.max()) + 1)
            keep = tm.row[0, img] >= 0
            grid[tm.row[0, img][keep], tm.col[0, img][keep]] = last.mean(0)[img][keep].float()
            report.figure(_heatmap(grid, "last token -> image patches"), "LM block 0 attention, mean over heads")
        else:
            p = attn["vision.blocks.0.attn.pattern"][0, :, 0, 1:].mean(0)
            side = int(p.numel() ** 0.5)
            report.figure(_heatmap(p.reshape(side, side), "CLS -> patches"), "vision block 0 attention")
    report.text(f"Cache: {cache!r}")
    report.table(cache.summary(), max_rows=25)
    report.text(f"section time {time.perf_counter() - t0:.2f} s")


def run_demo(out: str | os.PathLike = "mmlens-report", quick: bool = False) -> Path:
    """Build, load and probe one model per family; return the report path."""
    torch.manual_seed(0)
    out = Path(out)
    report = Report("mmlens demo")
    report.text("Each section loads a model through mmlens.load (the real from_pretrained path), lists its canonical "
                "hook points, runs it with a cache and draws one attention map.")
    families = dict(list(FAMILIES.items())[:1]) if quick else FAMILIES
    with tempfile.TemporaryDirectory() as tmp:
        for family, name in families.items():
            folder = build(name, Path(tmp) / name)
            _section(report, family, name, folder)
    return report.save(out / "index.html")
