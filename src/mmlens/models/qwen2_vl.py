"""Qwen2-VL: a ViT with 2D rotary positions and fused qkv, a 2x2 patch merger, and a Qwen2 LM with M-RoPE."""

from __future__ import annotations

import torch
from ..hooks.sites import Row
from ..hooks.tokens import TokenMap, grid_positions
from .base import Adapter
from .registry import register
from .towers import LLAMA_BLOCK, QWEN_VIT_BLOCK, block_rows, decoder_lm


@register
class Qwen2VLAdapter(Adapter):
    name = "qwen2_vl"
    family = "generative"
    architectures = ("Qwen2VLForConditionalGeneration",)
    unembed_paths = ("model.language_model.norm", "lm_head")

    def rows(self) -> list[Row]:
        return [
            Row("vision.embed", "model.visual.patch_embed", layout="(patches, d_vit): all images' patches, no batch dim"),
            *block_rows("vision.", "model.visual.blocks", QWEN_VIT_BLOCK),
            Row("projector.out", "model.visual.merger", layout="(merged_patches, d_lm): 2x2 patches merged"),
            *decoder_lm("lm.", "model.language_model", LLAMA_BLOCK),
            Row("logits", "", pick="logits", layout="(batch, seq, vocab)"),
        ]

    def token_map(self, inputs: dict, processor=None) -> TokenMap:
        """Image j's tokens tile its merged grid (h / m, w / m) in raster order (t frames for video)."""
        m = self.model.config.vision_config.spatial_merge_size
        thw = [] if inputs.get("image_grid_thw") is None else torch.as_tensor(inputs["image_grid_thw"]).tolist()
        grids, counts, shapes = [], [], []
        for t, h, w in thw:
            gh, gw = h // m, w // m
            grids.append(grid_positions(gh * gw, gh, gw).repeat(t, 1))
            counts.append(t * gh * gw)
            shapes.append((gh, gw))
        return TokenMap.from_runs(inputs["input_ids"], self.model.config.image_token_id, grids, processor,
                                  per_image=counts, grid_shapes=shapes)
