"""Shared pieces of the diffusion adapters: the pipeline's modules as one root, text-encoder tables."""

from __future__ import annotations

from torch import nn

from ..hooks.sites import Row
from .base import Adapter
from .towers import clip_like_text


def attention_rows(prefix: str, attn: str, kind: str) -> list[Row]:
    """q/k/v/z/out/pattern of one diffusers `Attention` module at path `attn`, named `{prefix}{kind}.*`."""
    n = f"{prefix}{kind}."
    return [
        Row(n + "q", f"{attn}.to_q", heads=True, layout="(batch, query_tokens, heads, d_head)"),
        Row(n + "k", f"{attn}.to_k", heads=True, layout="(batch, key_tokens, heads, d_head)"),
        Row(n + "v", f"{attn}.to_v", heads=True, layout="(batch, key_tokens, heads, d_head)"),
        Row(n + "z", f"{attn}.to_out.0", "in", heads=True, layout="(batch, query_tokens, heads, d_head)"),
        Row(n + "out", f"{attn}.to_out.0", layout="(batch, query_tokens, d_model)"),
        Row(n + "pattern", attn, "pattern", layout="(batch, heads, query_tokens, key_tokens)"),
    ]


def transformer_block_rows(prefix: str, block: str) -> list[Row]:
    """A diffusers `BasicTransformerBlock`: self-attention (attn1), cross-attention (attn2), feed-forward."""
    return [
        Row(prefix + "resid_pre", block, "in", layout="(batch, tokens, d_model)"),
        Row(prefix + "resid_post", block, layout="(batch, tokens, d_model)"),
        *attention_rows(prefix, f"{block}.attn1", "self"),
        *attention_rows(prefix, f"{block}.attn2", "cross"),
        Row(prefix + "mlp.out", f"{block}.ff", layout="(batch, tokens, d_model)"),
    ]


def text_encoder_rows(prefix: str, root: str, module: nn.Module) -> list[Row]:
    """Rows for a pipeline text encoder: CLIP text towers by their tables, T5 encoders by theirs."""
    cls = type(module).__name__
    if cls.startswith("CLIPText"):
        inner = f"{root}.text_model" if hasattr(module, "text_model") else root
        rows = clip_like_text(prefix, inner)
        if hasattr(module, "text_projection"):
            rows.append(Row(prefix + "text_embeds", root, pick="text_embeds", layout="(batch, d_proj): pooled"))
        return rows
    if cls.startswith("T5"):
        blk, n = f"{root}.encoder.block.{{i}}", f"{prefix}blocks.{{i}}."
        att = f"{blk}.layer.0.SelfAttention"
        return [
            Row(prefix + "embed", f"{root}.encoder.embed_tokens", layout="(batch, seq, d_model)"),
            Row(n + "resid_pre", blk, "in", layout="(batch, seq, d_model)"),
            Row(n + "resid_post", blk, pick=0, layout="(batch, seq, d_model)"),
            *[Row(n + f"attn.{x}", f"{att}.{x}", heads=True, layout="(batch, seq, heads, d_head)") for x in "qkv"],
            Row(n + "attn.z", f"{att}.o", "in", heads=True, layout="(batch, seq, heads, d_head)"),
            Row(n + "attn.out", f"{att}.o", layout="(batch, seq, d_model)"),
            Row(n + "mlp.post", f"{blk}.layer.1.DenseReluDense.wo", "in", layout="(batch, seq, d_ff)"),
            Row(prefix + "ln_final", f"{root}.encoder.final_layer_norm", layout="(batch, seq, d_model)"),
        ]
    return []


class PipelineAdapter(Adapter):
    """Adapters over a diffusers pipeline: sites span its text encoders and its denoiser."""

    family = "diffusion"
    denoiser: str = "unet"  # component name of the denoiser
    text_encoders: tuple[str, ...] = ("text_encoder",)

    def root(self) -> nn.Module:
        """A ModuleDict *view* of the components (the pipeline and its modules are not changed)."""
        comps = {k: v for k, v in self.model.components.items() if isinstance(v, nn.Module)}
        return nn.ModuleDict(comps)

    def text_rows(self) -> list[Row]:
        rows = []
        for name in self.text_encoders:
            module = getattr(self.model, name, None)
            if module is not None:
                rows += text_encoder_rows(f"{name}.", name, module)
        return rows
