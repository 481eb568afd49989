"""SigLIP: `SiglipModel` and its towers; same tables as CLIP plus the attention-pooling heads."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from ..hooks.sites import Row
from .base import Adapter
from .clip import dual_encoder_rows
from .registry import register


@register
class SiglipAdapter(Adapter):
    name = "siglip"
    family = "contrastive"
    architectures = ("SiglipModel", "SiglipVisionModel", "SiglipTextModel")

    # SigLIP has no separate projections: each tower's `head` makes its embedding (text: a Linear on the last
    # token; vision: attention pooling over all tokens)
    projections = {"vision": ("vision_model.post_layernorm", "vision_model.head"),
                   "text": ("text_model.final_layer_norm", "text_model.head")}
    tower_classes = {"vision": "SiglipVision", "text": "SiglipText"}

    def rows(self) -> list[Row]:
        return dual_encoder_rows(self.model, "SiglipVision", "SiglipText")

    def project(self, x: Float[Tensor, "*batch d_model"], tower: str = "vision", *,
                normalize: bool = False) -> Float[Tensor, "*batch d_proj"]:
        """Text: `(..., d_model) -> (..., d)` (the last token of the text tower's last block gives
        `get_text_features`). Vision: `(batch, seq, d_model) -> (batch, d)`, the whole token sequence, because
        the head pools by attention (a learned probe attends over every token); there is no per-token map."""
        if tower == "vision" and x.dim() != 3:
            raise ValueError(f"SigLIP's vision embedding pools all tokens with an attention head, so project(x, "
                             f"'vision') takes a (batch, seq, d_model) token sequence, not shape {tuple(x.shape)}")
        return super().project(x, tower, normalize=normalize)
