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

    def _full(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "full"  # keeps CLS as the first image token

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2 + int(self._full())

    def token_map(self, inputs: dict, processor=None) -> TokenMap:
        cfg = self.model.config
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        per_image = self.tokens_per_image()
        k = grid_positions(per_image, side, side, cls_first=self._full())
        return TokenMap.from_runs(inputs["input_ids"], cfg.image_token_id, [k], processor, per_image=per_image,
                                  grid_shapes=[(side, side)])
