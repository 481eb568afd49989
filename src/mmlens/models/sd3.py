"""Stable Diffusion 3: an MMDiT whose joint attention runs over [image tokens, text tokens] together."""

from __future__ import annotations

from ..hooks.sites import Row
from .diffusion import PipelineAdapter
from .registry import register


def joint_block_rows(prefix: str, block: str) -> list[Row]:
    a = f"{block}.attn"
    hd = "(batch, tokens, heads, d_head)"
    return [
        Row(prefix + "resid_post", block, pick=1, layout="(batch, image_tokens, d_model): image stream"),
        Row(prefix + "context_resid_post", block, pick=0, layout="(batch, text_tokens, d_model): text stream"),
        Row(prefix + "joint.q", f"{a}.to_q", heads=True, layout=hd + ", image stream"),
        Row(prefix + "joint.k", f"{a}.to_k", heads=True, layout=hd + ", image stream"),
        Row(prefix + "joint.v", f"{a}.to_v", heads=True, layout=hd + ", image stream"),
        Row(prefix + "joint.context_q", f"{a}.add_q_proj", heads=True, layout=hd + ", text stream"),
        Row(prefix + "joint.context_k", f"{a}.add_k_proj", heads=True, layout=hd + ", text stream"),
        Row(prefix + "joint.context_v", f"{a}.add_v_proj", heads=True, layout=hd + ", text stream"),
        Row(prefix + "joint.pattern", a, "pattern",
            layout="(batch, heads, image_tokens + text_tokens, image_tokens + text_tokens); image tokens first"),
        Row(prefix + "joint.z", f"{a}.to_out.0", "in", heads=True, layout=hd + ", image stream"),
        Row(prefix + "joint.context_z", f"{a}.to_add_out", "in", heads=True, layout=hd + ", text stream"),
        Row(prefix + "joint.out", f"{a}.to_out.0", layout="(batch, image_tokens, d_model)"),
        Row(prefix + "joint.context_out", f"{a}.to_add_out", layout="(batch, text_tokens, d_model)"),
        Row(prefix + "mlp.out", f"{block}.ff", layout="(batch, image_tokens, d_model)"),
        Row(prefix + "context_mlp.out", f"{block}.ff_context", layout="(batch, text_tokens, d_model)"),
    ]


@register
class SD3Adapter(PipelineAdapter):
    name = "sd3"
    architectures = ("StableDiffusion3Pipeline",)
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")

    def rows(self) -> list[Row]:
        return [
            *self.text_rows(),
            Row("dit.patch_embed", "transformer.pos_embed", layout="(batch, patches, d_model)"),
            Row("dit.context_embed", "transformer.context_embedder", layout="(batch, text_tokens, d_model)"),
            *joint_block_rows("dit.blocks.{i}.", "transformer.transformer_blocks.{i}"),
            Row("dit.out", "transformer", pick=0, layout="(batch, channels, h, w)"),
        ]
