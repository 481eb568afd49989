"""PixArt-alpha: a DiT whose blocks self-attend over latent patches and cross-attend to T5 text tokens."""

from __future__ import annotations

from ..hooks.sites import Row
from .diffusion import PipelineAdapter, transformer_block_rows
from .registry import register


@register
class PixArtAdapter(PipelineAdapter):
    name = "pixart"
    architectures = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser = "transformer"

    def rows(self) -> list[Row]:
        return [
            *self.text_rows(),
            Row("dit.patch_embed", "transformer.pos_embed", layout="(batch, patches, d_model)"),
            Row("dit.caption_proj", "transformer.caption_projection", layout="(batch, text_tokens, d_model)"),
            *transformer_block_rows("dit.blocks.{i}.", "transformer.transformer_blocks.{i}"),
            Row("dit.out", "transformer", pick=0, layout="(batch, channels, h, w)"),
        ]
