"""BLIP-2: a ViT with fused qkv, a Q-Former whose learned queries cross-attend to the image, and OPT (or T5)."""

from __future__ import annotations

from jaxtyping import Float
from torch import Tensor

from ..hooks.sites import Row
from ..hooks.tokens import TokenMap
from .base import Adapter
from .registry import register
from .towers import FUSED_QKV_BLOCK, OPT_BLOCK, clip_like_vision, decoder_lm


def qformer_rows() -> list[Row]:
    blk, n = "qformer.encoder.layer.{i}", "qformer.blocks.{i}."
    rows = [
        Row(n + "resid_pre", blk, "in", layout="(batch, queries, d_q)"),
        Row(n + "resid_post", blk, "out", layout="(batch, queries, d_q)"),
        Row(n + "resid_mid", f"{blk}.attention", layout="(batch, queries, d_q): after self-attention (post-LN)"),
        Row(n + "attn.pattern", f"{blk}.attention.attention", "pattern", layout="(batch, heads, queries, queries)"),
        Row(n + "attn.z", f"{blk}.attention.output.dense", "in", heads=True, layout="(batch, queries, heads, d_head)"),
        Row(n + "attn.out", f"{blk}.attention.output.dense", layout="(batch, queries, d_q)"),
        Row(n + "cross.pattern", f"{blk}.crossattention.attention", "pattern",
            layout="(batch, heads, queries, image_tokens); only in cross-attention layers"),
        Row(n + "cross.z", f"{blk}.crossattention.output.dense", "in", heads=True, layout="(batch, queries, heads, d_head)"),
        Row(n + "cross.out", f"{blk}.crossattention.output", layout="(batch, queries, d_q): after cross-attention (post-LN)"),
        Row(n + "mlp.post", f"{blk}.output_query.dense", "in", layout="(batch, queries, d_mlp)"),
        Row(n + "mlp.out", f"{blk}.output_query", layout="(batch, queries, d_q)"),
    ]
    for part in ("attention", "crossattention"):
        tag = "attn" if part == "attention" else "cross"
        rows += [Row(n + f"{tag}.{x}", f"{blk}.{part}.attention.{p}", heads=True, layout="(batch, seq, heads, d_head)")
                 for x, p in (("q", "query"), ("k", "key"), ("v", "value"))]
    return rows


@register
class Blip2Adapter(Adapter):
    name = "blip2"
    family = "generative"
    architectures = ("Blip2ForConditionalGeneration",)
    # OPT: final_layer_norm only when it normalises before each block, project_out only when its embeddings are
    # narrower than d_model (`?`: skipped where absent)
    unembed_paths = ("language_model.model.decoder.final_layer_norm?", "language_model.model.decoder.project_out?",
                     "language_model.lm_head")

    def rows(self) -> list[Row]:
        lm = [*decoder_lm("lm.", "language_model.model.decoder", OPT_BLOCK, norm="final_layer_norm")]
        if type(self.model.language_model).__name__.startswith("T5"):
            lm = [Row("lm.encoder.blocks.{i}.resid_post", "language_model.encoder.block.{i}", layout="(batch, seq, d)"),
                  Row("lm.blocks.{i}.resid_post", "language_model.decoder.block.{i}", layout="(batch, seq, d)")]
        return [
            # post_layernorm runs twice in BLIP-2 (all tokens, then pooled CLS): read the tower's output instead
            *[r for r in clip_like_vision("vision.", "vision_model", FUSED_QKV_BLOCK) if r.name != "vision.ln_post"],
            Row("vision.ln_post", "vision_model", pick=0, layout="(batch, seq, d_model): what the Q-Former reads"),
            Row("qformer.query_tokens", "qformer.layernorm", layout="(batch, queries, d_q): normalised query tokens"),
            *qformer_rows(),
            Row("qformer.out", "qformer", pick=0, layout="(batch, queries, d_q)"),
            Row("projector.out", "language_projection", layout="(batch, queries, d_lm)"),
            *lm,
            Row("logits", "", pick="logits", layout="(batch, seq, vocab)"),
        ]

    def tokens_per_image(self) -> int:
        return self.model.config.num_query_tokens

    def token_map(self, inputs: dict, processor=None) -> TokenMap:
        return TokenMap.from_runs(inputs["input_ids"], self.model.config.image_token_id, None, processor,
                                  per_image=self.tokens_per_image(), modality="query")

    def unembed(self, resid: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch vocab"]:
        if type(self.model.language_model).__name__.startswith("T5"):
            raise NotImplementedError(
                "unembed is not implemented for BLIP-2 with a T5 LM: it is an encoder-decoder whose logits come "
                "from the decoder stream (decoder.final_layer_norm, then a d_model**-0.5 rescale when embeddings "
                "are tied, then lm_head), and no tiny T5 BLIP-2 checks such a map against the model's logits")
        return super().unembed(resid)
