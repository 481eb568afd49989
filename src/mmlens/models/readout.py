"""Read-out maps: a residual vector through the modules the model itself applies after its last block.

Generative VLMs: the LM's final norm and unembedding (`unembed`), so the last block's residual gives the
model's logits and earlier blocks give the logit lens. Contrastive models: a tower's final norm and
projection (`project`) into the joint image-text space. Each adapter names its modules in class attributes;
the functions here only look them up and apply them in order, so the map is the model's own code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .base import has

TOWERS = ("vision", "text")


def _width(module: nn.Module) -> int:
    """The input width a norm / linear / pooling head expects."""
    if hasattr(module, "normalized_shape"):
        return int(module.normalized_shape[-1])
    if hasattr(module, "in_features"):
        return int(module.in_features)
    return int(module.weight.shape[-1])


def _apply(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)` with x moved to the module's device and dtype (a cache may live on CPU or in float32)."""
    p = next(module.parameters(), None)
    if p is not None:
        x = x.to(p.device, p.dtype)
    return module(x)


def _chain(x: Tensor, modules: Sequence[nn.Module], what: str) -> Tensor:
    d = _width(modules[0])
    if x.shape[-1] != d:
        raise ValueError(f"{what} takes (..., {d}) vectors of width d_model = {d}; got last dim {x.shape[-1]}")
    for m in modules:
        x = _apply(m, x)
    return x


def unembed_modules(model: nn.Module, paths: Sequence[str]) -> list[nn.Module]:
    """The modules at `paths` that the model has (a path ending in `?` is optional), in order."""
    return [model.get_submodule(p.rstrip("?")) for p in paths if not p.endswith("?") or has(model, p[:-1])]


def unembed(model: nn.Module, resid: Float[Tensor, "*batch d_model"], paths: Sequence[str]
            ) -> Float[Tensor, "*batch vocab"]:
    """The modules at `paths` (final norm, ..., lm_head) applied in order, then the text config's
    `final_logit_softcapping` (Gemma 2) as the model's forward applies it. A path ending in `?` is skipped
    where the model lacks it (OPT has no final norm when it normalises before each block's residual add,
    and no `project_out` when its embedding width equals d_model)."""
    logits = _chain(resid, unembed_modules(model, paths), f"unembed of {type(model).__name__}")
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _tower_path(model: nn.Module, path: str, tower: str, tower_cls: str) -> str | None:
    """`path` as written for the dual encoder, or stripped of its tower prefix when `model` is that tower
    loaded alone (`CLIPVisionModel` is the `vision_model` of `CLIPModel`)."""
    if has(model, path):
        return path
    head, _, rest = path.partition(".")
    if rest and head == f"{tower}_model" and type(model).__name__.startswith(tower_cls) and has(model, rest):
        return rest
    return None


def project(model: nn.Module, x: Float[Tensor, "*batch d_model"], tower: str, paths: dict[str, Sequence[str]],
            tower_classes: dict[str, str], *, normalize: bool = False) -> Float[Tensor, "*batch d_proj"]:
    """Tower `tower`'s modules `paths[tower]` (final norm, projection) applied in order; `normalize`
    L2-normalises as the model does before comparing images with texts."""
    if tower not in TOWERS:
        raise ValueError(f"unknown tower {tower!r}; allowed: {TOWERS}")
    cls = type(model).__name__
    modules = []
    for p in paths[tower]:
        found = _tower_path(model, p, tower, tower_classes[tower])
        if found is None:
            other = next(t for t in TOWERS if t != tower)
            if cls.startswith(tower_classes[other]):
                why = f": it is the {other} tower alone"
            elif not p.startswith(f"{tower}_model."):
                why = (": this tower was loaded without its projection; load the dual encoder or the tower with "
                       "its projection (e.g. CLIPVisionModelWithProjection)")
            else:
                why = ""
            raise ValueError(f"{cls} has no `{p}`, needed to project the {tower} tower into the joint space{why}")
        modules.append(model.get_submodule(found))
    out = _chain(x, modules, f"project({tower!r}) of {cls}")
    return out / out.norm(dim=-1, keepdim=True) if normalize else out
