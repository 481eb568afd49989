"""What an adapter is: a name table for one model family, plus that family's token geometry."""

from __future__ import annotations

from typing import Any, ClassVar

from jaxtyping import Float
from torch import Tensor, nn

from ..hooks.sites import Row

FAMILIES = ("contrastive", "generative", "diffusion")


class Adapter:
    """Subclass per family, decorate with `@register`. `rows` may inspect the live model (towers present)."""

    name: ClassVar[str]
    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    # read-out maps (`models/readout.py`): generative adapters name their final norm and unembedding, contrastive
    # ones each tower's final norm and projection (and the class prefix of that tower loaded alone)
    unembed_paths: ClassVar[tuple[str, ...]] = ()
    projections: ClassVar[dict[str, tuple[str, ...]]] = {}
    tower_classes: ClassVar[dict[str, str]] = {}

    def __init__(self, model: Any):
        self.model = model

    def root(self) -> nn.Module:
        """The module whose `named_modules()` paths the table uses (a pipeline's components for diffusion)."""
        return self.model

    def rows(self) -> list[Row]:
        raise NotImplementedError

    def tokens_per_image(self) -> int | None:
        """Image tokens one image occupies in the LM sequence (fixed-resolution VLMs), None where it varies."""
        return None

    def token_map(self, inputs: dict, processor: Any = None):
        raise NotImplementedError(f"{self.name}: token_map is defined for generative VLMs only")

    def unembed(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
        """The LM's final norm and unembedding, from `unembed_paths` (see `readout.unembed`)."""
        if self.unembed_paths:
            from . import readout

            return readout.unembed(self.model, resid, self.unembed_paths)
        raise TypeError(f"unembed maps an LM's residual stream to logits and is defined for generative models; "
                        f"{self.name} is a {self.family} model"
                        + (" (use project)" if self.family == "contrastive" else ""))

    def unembed_modules(self) -> list[nn.Module]:
        """The modules `unembed` applies, in order (final norm, ..., unembedding); empty for non-generative models."""
        from . import readout

        return readout.unembed_modules(self.model, self.unembed_paths)

    def project(self, x: Float[Tensor, "*batch d_model"], tower: str = "vision", *,
                normalize: bool = False) -> Float[Tensor, "*batch d_proj"]:
        """A tower's residual into the joint embedding space, from `projections` (see `readout.project`)."""
        if self.projections:
            from . import readout

            return readout.project(self.model, x, tower, self.projections, self.tower_classes, normalize=normalize)
        raise TypeError(f"project maps a tower's residual stream into the joint image-text space and is defined "
                        f"for contrastive models; {self.name} is a {self.family} model"
                        + (" (use unembed)" if self.family == "generative" else ""))


def has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False
