"""PaliGemma: a SigLIP ViT, a linear projector and Gemma; image tokens come first, attended bidirectionally."""

from __future__ import annotations

from ..hooks.sites import Row
from ..hooks.tokens import TokenMap, grid_positions
from .base import Adapter
from .registry import register
from .towers import clip_like_vision, decoder_lm


@register
class PaliGemmaAdapter(Adapter):
    name = "paligemma"
    family = "generative"
    architectures = ("PaliGemmaForConditionalGeneration",)
    unembed_paths = ("model.language_model.norm", "lm_head")  # then Gemma 2's final_logit_softcapping

    def rows(self) -> list[Row]:
        return [
            *clip_like_vision("vision.", "model.vision_tower", pooled_ln_post=False),
            Row("projector.out", "model.multi_modal_projector", layout="(images, image_tokens, d_lm)"),
            *decoder_lm("lm.", "model.language_model"),
            Row("logits", "", pick="logits", layout="(batch, seq, vocab)"),
        ]

    def tokens_per_image(self) -> int:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size) ** 2

    def token_map(self, inputs: dict, processor=None) -> TokenMap:
        vc = self.model.config.vision_config
        side = vc.image_size // vc.patch_size
        k = grid_positions(side * side, side, side)
        return TokenMap.from_runs(inputs["input_ids"], self.model.config.image_token_id, [k], processor,
                                  per_image=self.tokens_per_image(), grid_shapes=[(side, side)])
