"""Name tables shared by many families: a transformer block's sites, rooted wherever a tower lives.

Every family's block has the same canonical sites; only the module paths differ, so a tower is
described by a `BlockPaths` and `block_rows` turns it into rows. LLaVA's `vision.` rows are the CLIP
rows re-rooted under `model.vision_tower`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..hooks.sites import Row


@dataclass(frozen=True)
class BlockPaths:
    """Module paths inside one block (relative to the block); None where the architecture has no such module."""

    attn: str = "self_attn"
    q: str | None = "self_attn.q_proj"
    k: str | None = "self_attn.k_proj"
    v: str | None = "self_attn.v_proj"
    qkv: str | None = None  # fused projection, split in thirds
    o: str = "self_attn.out_proj"
    ln2: str | None = "layer_norm2"  # its input is the residual stream between attention and MLP
    fc1: str | None = "mlp.fc1"
    fc2: str = "mlp.fc2"  # its input is the neuron activations
    mlp: str | None = "mlp"
    resid_pick: int = 0
    flat_mlp: bool = False  # OPT flattens (batch, seq) into one dim around its MLP


CLIP_BLOCK = BlockPaths()
LLAMA_BLOCK = BlockPaths(o="self_attn.o_proj", ln2="post_attention_layernorm", fc1=None, fc2="mlp.down_proj")
OPT_BLOCK = BlockPaths(ln2="final_layer_norm", fc1="fc1", fc2="fc2", mlp=None, flat_mlp=True)
FUSED_QKV_BLOCK = BlockPaths(q=None, k=None, v=None, qkv="self_attn.qkv", o="self_attn.projection")
QWEN_VIT_BLOCK = BlockPaths(attn="attn", q=None, k=None, v=None, qkv="attn.qkv", o="attn.proj", ln2="norm2")


def block_rows(prefix: str, layers: str, b: BlockPaths = CLIP_BLOCK) -> list[Row]:
    """Rows `{prefix}blocks.{i}.*` for the blocks at module path `{layers}.{i}`."""
    blk = f"{layers}.{{i}}"
    n = f"{prefix}blocks.{{i}}."
    tok = "(batch * seq, " if b.flat_mlp else "(batch, seq, "
    rows = [
        Row(n + "resid_pre", blk, "in", layout="(batch, seq, d_model)"),
        Row(n + "resid_post", blk, "out", pick=b.resid_pick, layout="(batch, seq, d_model)"),
        Row(n + "attn.z", f"{blk}.{b.o}", "in", heads=True, layout="(batch, seq, heads, d_head)"),
        Row(n + "attn.out", f"{blk}.{b.o}", "out", layout="(batch, seq, d_model)"),
        Row(n + "attn.pattern", f"{blk}.{b.attn}", "pattern", layout="(batch, heads, query, key)"),
        Row(n + "mlp.post", f"{blk}.{b.fc2}", "in", layout=tok + "d_mlp)"),
    ]
    if b.qkv:
        rows += [Row(n + f"attn.{x}", f"{blk}.{b.qkv}", "out", heads=True, part=(j, 3), layout="(batch, seq, heads, d_head)")
                 for j, x in enumerate("qkv")]
    else:
        rows += [Row(n + f"attn.{x}", f"{blk}.{p}", "out", heads=True, layout="(batch, seq, heads, d_head)")
                 for x, p in (("q", b.q), ("k", b.k), ("v", b.v))]
    if b.ln2:
        rows.append(Row(n + "resid_mid", f"{blk}.{b.ln2}", "in", layout=tok + "d_model)"))
    if b.fc1:
        rows.append(Row(n + "mlp.pre", f"{blk}.{b.fc1}", "out", layout=tok + "d_mlp)"))
    rows.append(Row(n + "mlp.out", f"{blk}.{b.mlp}" if b.mlp else f"{blk}.{b.fc2}", "out", layout=tok + "d_model)"))
    return rows


def clip_like_vision(prefix: str, root: str, block: BlockPaths = CLIP_BLOCK, *, pooled_ln_post: bool = True) -> list[Row]:
    """A CLIP/SigLIP ViT (embeddings, encoder.layers, post_layernorm) rooted at `root`.

    CLIP and BLIP-2 apply post_layernorm to the pooled CLS token; SigLIP to every token (`pooled_ln_post=False`).
    """
    r = f"{root}." if root else ""
    ln_post = "(batch, d_model): pooled CLS token" if pooled_ln_post else "(batch, seq, d_model)"
    return [
        Row(prefix + "embed", f"{r}embeddings", layout="(batch, 1 + patches, d_model)"),
        Row(prefix + "ln_pre", f"{r}pre_layrnorm", layout="(batch, 1 + patches, d_model)"),
        *block_rows(prefix, f"{r}encoder.layers", block),
        Row(prefix + "ln_post", f"{r}post_layernorm", layout=ln_post),
        Row(prefix + "head.out", f"{r}head", layout="(batch, d_model): SigLIP attention-pooling head"),
    ]


def clip_like_text(prefix: str, root: str) -> list[Row]:
    r = f"{root}." if root else ""
    return [
        Row(prefix + "embed", f"{r}embeddings", layout="(batch, seq, d_model)"),
        *block_rows(prefix, f"{r}encoder.layers", CLIP_BLOCK),
        Row(prefix + "ln_final", f"{r}final_layer_norm", layout="(batch, seq, d_model)"),
        Row(prefix + "head.out", f"{r}head", layout="(batch, d_proj): SigLIP text head"),
    ]


def decoder_lm(prefix: str, root: str, block: BlockPaths = LLAMA_BLOCK, *, layers: str = "layers",
               embed: str = "embed_tokens", norm: str = "norm") -> list[Row]:
    """A decoder-only LM (Llama, Gemma, Qwen2, OPT, ...) rooted at `root`."""
    r = f"{root}." if root else ""
    return [
        Row(prefix + "embed", f"{r}{embed}", layout="(batch, seq, d_model): token embeddings before image features are merged"),
        *block_rows(prefix, f"{r}{layers}", block),
        Row(prefix + "ln_final", f"{r}{norm}", layout="(batch, seq, d_model)"),
    ]
