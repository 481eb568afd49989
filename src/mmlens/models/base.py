"""What an adapter is: a name table for one model family, plus that family's token geometry."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from ..hooks.sites import Row

FAMILIES = ("contrastive", "generative", "diffusion")


class Adapter:
    """Subclass per family, decorate with `@register`. `rows` may inspect the live model (towers present)."""

    name: ClassVar[str]
    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]

    def __init__(self, model: Any):
        self.model = model

    def root(self) -> nn.Module:
        """The module whose `named_modules()` paths the table uses (a pipeline's components for diffusion)."""
        return self.model

    def rows(self) -> list[Row]:
        raise NotImplementedError

    def token_map(self, inputs: dict, processor: Any = None):
        raise NotImplementedError(f"{self.name}: token_map is defined for generative VLMs only")


def has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
