"""CLIP: `CLIPModel` and its towers alone (`CLIPVisionModel`, `CLIPTextModel`, `...WithProjection`)."""

from __future__ import annotations

from ..hooks.sites import Row
from .base import Adapter, has
from .registry import register
from .towers import clip_like_text, clip_like_vision


def dual_encoder_rows(model, vision_cls: str, text_cls: str) -> list[Row]:
    """Rows of a CLIP-shaped dual encoder or of one of its towers, found by the sub-modules present."""
    rows: list[Row] = []
    cls = type(model).__name__
    pooled = vision_cls.startswith("CLIP")
    if has(model, "vision_model"):
        rows += clip_like_vision("vision.", "vision_model", pooled_ln_post=pooled)
    elif cls.startswith(vision_cls):
        rows += clip_like_vision("vision.", "", pooled_ln_post=pooled)
    if has(model, "text_model"):
        rows += clip_like_text("text.", "text_model")
    elif cls.startswith(text_cls):
        rows += clip_like_text("text.", "")
    if has(model, "visual_projection"):
        rows.append(Row("vision.proj", "visual_projection", layout="(batch, d_proj): unnormalised image embedding"))
    if has(model, "text_projection"):
        rows.append(Row("text.proj", "text_projection", layout="(batch, d_proj): unnormalised text embedding"))
    if has(model, "vision_model") and has(model, "text_model"):
        rows += [
            Row("image_embeds", "", pick="image_embeds", layout="(batch_images, d_proj), L2-normalised"),
            Row("text_embeds", "", pick="text_embeds", layout="(batch_texts, d_proj), L2-normalised"),
            Row("logits", "", pick="logits_per_image", layout="(batch_images, batch_texts)"),
        ]
    elif cls.endswith("WithProjection"):
        field = "image_embeds" if has(model, "vision_model") else "text_embeds"
        rows.append(Row(field, "", pick=field, layout="(batch, d_proj), not normalised"))
    return rows


@register
class ClipAdapter(Adapter):
    name = "clip"
    family = "contrastive"
    architectures = ("CLIPModel", "CLIPVisionModel", "CLIPTextModel", "CLIPVisionModelWithProjection",
                     "CLIPTextModelWithProjection")
    # CLIP normalises only the pooled token (CLS / EOS) and projects it linearly: any residual vector can be read
    projections = {"vision": ("vision_model.post_layernorm", "visual_projection"),
                   "text": ("text_model.final_layer_norm", "text_projection")}
    tower_classes = {"vision": "CLIPVision", "text": "CLIPText"}

    def rows(self) -> list[Row]:
        return dual_encoder_rows(self.model, "CLIPVision", "CLIPText")

