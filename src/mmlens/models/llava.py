"""LLaVA: a CLIP or SigLIP ViT, an MLP projector and a decoder LM (`LlavaForConditionalGeneration`)."""

from __future__ import annotations

from ..hooks.sites import Row
from ..hooks.tokens import TokenMap, grid_positions
from .base import Adapter
from .registry import register
from .towers import clip_like_vision, decoder_lm


@register
class LlavaAdapter(Adapter):
    name = "llava"
    family = "generative"
    architectures = ("LlavaForConditionalGeneration",)
    unembed_paths = ("model.language_model.norm", "lm_head")

    def rows(self) -> list[Row]:
        return [
            *clip_like_vision("vision.", "model.vision_tower",
                              pooled_ln_post=self.model.config.vision_config.model_type == "clip_vision_model"),
            Row("projector.out", "model.multi_modal_projector", layout="(images, image_tokens, d_lm)"),
            *decoder_lm("lm.", "model.language_model"),
            Row("logits", "", pick="logits", layout="(batch, seq, vocab)"),
        ]

    def token_map(self, inputs: dict, processor=None) -> TokenMap:
        cfg = self.model.config
        vc = cfg.vision_config
        side = vc.image_size // vc.patch_size
        full = cfg.vision_feature_select_strategy == "full"  # keeps CLS as the first image token
        per_image = side * side + int(full)
        k = grid_positions(per_image, side, side, cls_first=full)
        return TokenMap.from_runs(inputs["input_ids"], cfg.image_token_id, [k], processor, per_image=per_image,
                                  grid_shapes=[(side, side)])
