"""Saving and loading estimators (probes, tuned lenses, ...): `cfg.json` (the estimator's kind, its config dataclass,
extra fields) next to `weights.safetensors`, each written atomically; loading refuses another kind and unknown keys."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from ..io import CONFIG_FILE, WEIGHTS_FILE, atomic_path, atomic_write_text
from .result import check_pair, file_sha256


def save_estimator(folder: str | os.PathLike, kind: str, config, tensors: dict[str, torch.Tensor], **extra) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
    doc = {"estimator": kind, "config": dataclasses.asdict(config), "sha256": file_sha256(folder / WEIGHTS_FILE),
           **extra}
    atomic_write_text(folder / CONFIG_FILE, json.dumps(doc, indent=1))
    return folder


def load_estimator(folder: str | os.PathLike, kind: str, config_cls) -> tuple[object, dict[str, torch.Tensor], dict]:
    """(config, tensors, the whole cfg.json) of an estimator saved by `save_estimator`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.exists():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE}: not a folder written by {kind}.save")
    doc = json.loads(path.read_text())
    if doc.get("estimator") != kind:
        raise ValueError(f"{path} holds a {doc.get('estimator')!r}, not a {kind}")
    unknown = set(doc["config"]) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise ValueError(f"{path}: unknown config keys {sorted(unknown)} (saved by another version?)")
    check_pair(path, folder / WEIGHTS_FILE, doc.get("sha256"))
    return config_cls(**doc["config"]), load_file(str(folder / WEIGHTS_FILE)), doc
