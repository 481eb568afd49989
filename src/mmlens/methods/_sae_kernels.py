"""Sparse training kernels for SAEs: a TopK step touches k of d_sae features per token, so everything after the
dense encoder matmul and its top-k costs O(batch * k * d_in) instead of O(batch * d_sae * d_in).

Kept entries are a ragged "bag" list (as `torch.nn.functional.embedding_bag` takes them): `cols` (nnz,) the feature
of each entry, `offsets` (batch,) where each token's entries start (tokens in order; TopK: every k). Measured on CPU
(d_in 128, d_sae 2048, k 16, batch 4096): the sparse decode plus the sparse encoder backward run a training step
~2.4x faster than the same step with dense matrices, with equal gradients.

- `topk_pre`: the dense pre-activations, computed in row chunks and reduced to their top k while the chunk is
  still in cache (no grad; the selection is what the step needs).
- `SparseEncode`: the pre-activations at the kept entries, with a backward that never builds the (batch, d_sae)
  gradient: grad x = bag-sum of g * W_enc[:, col], grad W_enc[:, col] += g * x[row], grad b_enc = bincount.
- `sparse_decode`: sum of value * W_dec[col] per token (embedding_bag with per-sample weights; its own backward
  gathers only the kept rows).
- `prefix_decode` / `prefix_decode_dense`: Matryoshka's nested reconstructions, the decode of each prefix
  `f[:, :m_j]` of the features (Bussmann et al. 2025): entries are grouped by (token, band between two widths) so
  one embedding_bag decodes every band, and a cumulative sum over bands gives every prefix.
- `JumpReLU` / `Step`: the JumpReLU activation and its L0 count with the straight-through pseudo-gradient of a
  rectangle kernel for the threshold (Rajamanoharan et al. 2024, "Jumping ahead").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

CHUNK_ELEMENTS = 1 << 19  # pre-activation entries per chunk in `topk_pre` (2 MiB of float32: stays in L2)


@torch.no_grad()
def topk_pre(x: Float[Tensor, "batch d_in"], W_enc: Float[Tensor, "d_in d_sae"], b_enc: Float[Tensor, " d_sae"],
             k: int) -> tuple[Float[Tensor, "batch k"], Int[Tensor, "batch k"]]:
    """(values, feature ids) of the k largest pre-activations `x @ W_enc + b_enc` of each row."""
    n, d_sae = x.shape[0], W_enc.shape[1]
    rows = max(1, CHUNK_ELEMENTS // d_sae) if x.device.type == "cpu" else n
    if rows >= n:
        return torch.addmm(b_enc, x, W_enc).topk(k, dim=-1, sorted=False)
    vals = torch.empty(n, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(n, k, dtype=torch.long, device=x.device)
    for lo in range(0, n, rows):
        v, i = torch.addmm(b_enc, x[lo: lo + rows], W_enc).topk(k, dim=-1, sorted=False)
        vals[lo: lo + rows], idx[lo: lo + rows] = v, i
    return vals, idx


def bag_rows(offsets: Int[Tensor, " batch"], nnz: int) -> Int[Tensor, " nnz"]:
    """The token of each entry, from the bags' start offsets."""
    counts = torch.diff(offsets, append=offsets.new_full((1,), nnz))
    return torch.repeat_interleave(torch.arange(len(offsets), device=offsets.device), counts, output_size=nnz)


def dense_backed(t: Tensor) -> bool:
    """Whether the sparse ops below run as dense matmuls on a (batch, d_sae) code instead of gathers.

    On a GPU with tensor cores (bf16/fp16, or fp32 with TF32 allowed) one (4096 x 1024) @ (1024 x 32768) product takes
    ~0.3 ms on an H100, faster than any PyTorch gather/scatter over the same k entries (embedding_bag's backward alone
    takes ~1.1 ms; its per-sample-weight gradient has no bf16 kernel at all). The sparse gains there come from what
    is skipped instead: the input gradient of the encoder matmul and the autograd graph of the dense top-k. On CPUs
    and on GPUs in strict fp32 the gathers win (benchmarks/sae.py)."""
    if t.device.type != "cuda":
        return False
    return t.dtype in (torch.float16, torch.bfloat16) or (t.dtype == torch.float32
                                                          and torch.backends.cuda.matmul.allow_tf32)


def dense_code(values: Float[Tensor, " nnz"], offsets: Int[Tensor, " batch"], cols: Int[Tensor, " nnz"],
               d_sae: int) -> Float[Tensor, "batch d_sae"]:
    """The (batch, d_sae) code with the kept entries in place and zeros elsewhere (differentiable in `values`)."""
    rows = bag_rows(offsets, cols.shape[0])
    return values.new_zeros(offsets.shape[0], d_sae).index_put((rows, cols), values)


class SparseEncode(torch.autograd.Function):
    """pre[row, col] = (x[row] - shift) @ W_enc[:, col] + b_enc[col] at the kept entries only.

    `values`: the same numbers already computed (by `topk_pre`, under no grad) so the forward is free; None computes
    them here (gradcheck, tests). `shift` (b_dec) gets its gradient as -W_enc @ (column sums of g), a mat-vec, so a
    step whose data needs no gradient never builds grad x. The backward is one embedding_bag forward+backward over
    W_enc's transpose, or on `dense_backed` devices one matmul with the densified gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, W_enc: Tensor, b_enc: Tensor, offsets: Tensor, cols: Tensor,
                values: Tensor | None = None, shift: Tensor | None = None) -> Tensor:
        xs = x if shift is None else x - shift
        ctx.save_for_backward(xs, W_enc, offsets, cols)
        ctx.d_sae = b_enc.shape[0]
        if values is None:
            rows = bag_rows(offsets, cols.shape[0])
            values = torch.einsum("nd,nd->n", xs[rows], W_enc.T[cols]) + b_enc[cols]
        return values.clone()

    @staticmethod
    def backward(ctx, g: Tensor):
        xs, W_enc, offsets, cols = ctx.saved_tensors
        need_x, need_W, need_b = ctx.needs_input_grad[:3]
        need_shift = ctx.needs_input_grad[6]
        gx = gW = gb = gshift = None
        g = g.contiguous()
        if dense_backed(W_enc) and (need_x or need_W):
            G = dense_code(g, offsets, cols, ctx.d_sae)
            gx = G @ W_enc.T if need_x else None
            gW = xs.T @ G if need_W else None
        elif need_x or need_W:
            with torch.enable_grad():
                wt = W_enc.detach().T.contiguous().requires_grad_(True)
                # bag-sum of g * W_enc[:, col] is grad x; its gradient wrt the table, seeded with x, is grad W_enc.T
                out = F.embedding_bag(cols, wt, offsets, mode="sum", per_sample_weights=g)
                (gwt,) = torch.autograd.grad(out, wt, xs.detach(), retain_graph=False) if need_W else (None,)
            gx = out.detach() if need_x else None
            gW = gwt.T if need_W else None
        if need_b or need_shift:
            col_sums = torch.zeros(ctx.d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
            gb = col_sums if need_b else None
            gshift = -(W_enc @ col_sums) if need_shift else None
        return gx, gW, gb, None, None, None, gshift


def sparse_encode(x: Float[Tensor, "batch d_in"], W_enc: Float[Tensor, "d_in d_sae"], b_enc: Float[Tensor, " d_sae"],
                  offsets: Int[Tensor, " batch"], cols: Int[Tensor, " nnz"],
                  values: Float[Tensor, " nnz"] | None = None,
                  shift: Float[Tensor, " d_in"] | None = None) -> Float[Tensor, " nnz"]:
    return SparseEncode.apply(x, W_enc, b_enc, offsets, cols, values, shift)


def sparse_decode(values: Float[Tensor, " nnz"], offsets: Int[Tensor, " batch"], cols: Int[Tensor, " nnz"],
                  W_dec: Float[Tensor, "d_sae d_in"]) -> Float[Tensor, "batch d_in"]:
    """Per token, the sum of value * W_dec[col] over its entries (no bias)."""
    if dense_backed(W_dec):
        return dense_code(values, offsets, cols, W_dec.shape[0]) @ W_dec
    return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=values)


def prefix_decode(values: Float[Tensor, " nnz"], offsets: Int[Tensor, " batch"], cols: Int[Tensor, " nnz"],
                  W_dec: Float[Tensor, "d_sae d_in"], widths: list[int]) -> Float[Tensor, "batch levels d_in"]:
    """Per token and width m_j, the sum of value * W_dec[col] over its entries with col < m_j (no bias).

    Entries are stably sorted by (token, band) with band j holding widths[j-1] <= col < widths[j]; each
    (token, band) pair is one bag of a single embedding_bag (so W_dec's gradient is built once, not once per
    level), and the cumulative sum over bands turns band decodes into prefix decodes."""
    if dense_backed(W_dec):
        return prefix_decode_dense(dense_code(values, offsets, cols, W_dec.shape[0]), W_dec, widths)
    n, levels = offsets.shape[0], len(widths)
    bounds = torch.as_tensor(widths, device=cols.device, dtype=cols.dtype)
    band = torch.bucketize(cols, bounds, right=True).clamp_max_(levels - 1)
    key = bag_rows(offsets, cols.shape[0]) * levels + band
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=n * levels)
    bag_offsets = torch.cumsum(counts, 0) - counts
    bands = F.embedding_bag(cols[order], W_dec, bag_offsets, mode="sum", per_sample_weights=values[order])
    return bands.view(n, levels, -1).cumsum(1)


def prefix_decode_dense(f: Float[Tensor, "batch d_sae"], W_dec: Float[Tensor, "d_sae d_in"],
                        widths: list[int]) -> Float[Tensor, "batch levels d_in"]:
    """`prefix_decode` for a dense code (ReLU, JumpReLU): f[:, :m_j] @ W_dec[:m_j] for every width m_j."""
    bands, lo = [], 0
    for hi in widths:
        bands.append(f[:, lo:hi] @ W_dec[lo:hi])
        lo = hi
    return torch.stack(bands, 1).cumsum(1)


def fixed_offsets(batch: int, k: int, device) -> Int[Tensor, " batch"]:
    return torch.arange(0, batch * k, k, device=device)


def rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x.dtype)


class JumpReLU(torch.autograd.Function):
    """z * H(z - t). Gradient to z: H(z - t); to t: -(t / bw) * rect((z - t) / bw), summed over the batch."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return z * (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, t = ctx.saved_tensors
        bw = ctx.bandwidth
        gz = (z > t).to(g.dtype) * g
        gt = (-(t / bw) * rectangle((z - t) / bw) * g).reshape(-1, t.shape[-1]).sum(0)
        return gz, gt, None


class Step(torch.autograd.Function):
    """H(z - t), the per-feature firing indicator summed into the L0 penalty. Gradient only to t (as DeepMind's
    JumpReLU): -(1 / bw) * rect((z - t) / bw)."""

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(z, t)
        ctx.bandwidth = bandwidth
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        z, t = ctx.saved_tensors
        bw = ctx.bandwidth
        gt = (-(1.0 / bw) * rectangle((z - t) / bw) * g).reshape(-1, t.shape[-1]).sum(0)
        return None, gt, None
