"""Tiny models of every architecture, built from configs once per session and loaded back from disk."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # any hub lookup fails fast instead of hanging
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

GENERATIVE = ["llava", "llava_full", "qwen2_vl", "paligemma", "blip2"]
CONTRASTIVE = ["clip", "siglip"]
DIFFUSION = ["sd", "pixart", "sd3"]
ALL = CONTRASTIVE + GENERATIVE + DIFFUSION


def _quiet():
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


_quiet()


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """tiny_folder(name) -> a folder holding the saved tiny model (built on first use)."""
    from mmlens.testing.tiny_models import build

    _quiet()
    root = tmp_path_factory.mktemp("tiny")
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = build(name, root / name)
        return made[name]

    return get


@pytest.fixture(scope="session")
def tiny_lens(tiny_folder):
    """tiny_lens(name, **from_pretrained_kwargs) -> Lens loaded through mmlens.load (cached per kwargs)."""
    import mmlens

    cache = {}

    def get(name: str, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = mmlens.load(tiny_folder(name), **kw)
        return cache[key]

    return get


def hook_counts(module: torch.nn.Module) -> dict[str, int]:
    """Number of forward (pre-)hooks per module path. transformers installs its own output-capturing hooks on
    the first forward and keeps them, so tests compare against a snapshot rather than against zero."""
    counts = {}
    for name, m in module.named_modules():
        n = len(m._forward_hooks) + len(m._forward_pre_hooks)
        if n:
            counts[name] = n
    return counts
