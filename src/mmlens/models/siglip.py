"""SigLIP: `SiglipModel` and its towers; same tables as CLIP plus the attention-pooling heads."""

from __future__ import annotations

from ..hooks.sites import Row
from .base import Adapter
from .clip import dual_encoder_rows
from .registry import register


@register
class SiglipAdapter(Adapter):
    name = "siglip"
    family = "contrastive"
    architectures = ("SiglipModel", "SiglipVisionModel", "SiglipTextModel")

    def rows(self) -> list[Row]:
        return dual_encoder_rows(self.model, "SiglipVision", "SiglipText")
