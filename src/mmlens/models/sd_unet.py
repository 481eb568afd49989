"""Stable Diffusion: a `UNet2DConditionModel` with self- and cross-attention blocks, and a CLIP text encoder."""

from __future__ import annotations

from ..hooks.sites import Row
from .diffusion import PipelineAdapter, transformer_block_rows
from .registry import register


def unet_rows(u: str = "unet") -> list[Row]:
    """`unet.{down,up}.{b}.attn.{a}.*` for `{down,up}_blocks.{b}.attentions.{a}.transformer_blocks.0`, `unet.mid.*`."""
    rows = [
        Row(u + ".conv_in", f"{u}.conv_in", layout="(batch, channels, h, w)"),
        Row(u + ".time_emb", f"{u}.time_embedding", layout="(batch, d_time)"),
        Row(u + ".mid.out", f"{u}.mid_block", layout="(batch, channels, h, w)"),
        *transformer_block_rows(f"{u}.mid.attn.{{a}}.", f"{u}.mid_block.attentions.{{a}}.transformer_blocks.0"),
        Row(u + ".mid.attn.{a}.out", f"{u}.mid_block.attentions.{{a}}", pick=0, layout="(batch, channels, h, w)"),
        Row(u + ".out", u, pick=0, layout="(batch, channels, h, w): the model prediction (noise, x0 or v)"),
    ]
    for side in ("down", "up"):
        blocks = f"{u}.{side}_blocks.{{b}}"
        name = f"{u}.{side}.{{b}}"
        rows += [
            Row(name + ".out", blocks, pick=0, layout="(batch, channels, h, w)"),
            Row(name + ".resnet.{r}.out", f"{blocks}.resnets.{{r}}", layout="(batch, channels, h, w)"),
            Row(name + ".attn.{a}.out", f"{blocks}.attentions.{{a}}", pick=0, layout="(batch, channels, h, w)"),
            *transformer_block_rows(name + ".attn.{a}.", f"{blocks}.attentions.{{a}}.transformer_blocks.0"),
        ]
    return rows


@register
class StableDiffusionAdapter(PipelineAdapter):
    name = "sd_unet"
    architectures = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
    denoiser = "unet"

    def rows(self) -> list[Row]:
        return [*self.text_rows(), *unet_rows("unet")]
