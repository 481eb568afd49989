"""Model organisms: real HF/diffusers models trained on the world, shipped in the package.

    lens = mmlens.organisms.load("clip")      # also "vlm", "diffusion"
    folder = mmlens.organisms.path("clip")    # a plain from_pretrained folder
"""

from __future__ import annotations

from pathlib import Path

NAMES = ("clip", "vlm", "diffusion")
WEIGHTS = Path(__file__).resolve().parent / "weights"


def path(name: str) -> Path:
    """The folder of a shipped organism (loadable by plain `from_pretrained`)."""
    if name not in NAMES:
        raise ValueError(f"unknown organism {name!r}; choose one of {NAMES}")
    folder = WEIGHTS / name
    if not (folder / "config.json").exists() and not (folder / "model_index.json").exists():
        raise FileNotFoundError(
            f"organism {name!r} is not in this install ({folder}); train it with `mmlens organisms train {name}`"
        )
    return folder


def available() -> list[str]:
    return [n for n in NAMES if (WEIGHTS / n / "config.json").exists() or (WEIGHTS / n / "model_index.json").exists()]


def load(name: str, **kwargs):
    """A Lens over the shipped organism; keywords as `mmlens.load` (`device="cuda"`, `dtype=torch.bfloat16`, ...)."""
    from ..loading import load as load_lens

    return load_lens(path(name), **kwargs)
