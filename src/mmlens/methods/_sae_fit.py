"""`SAE.fit`: the training loop of every SAE architecture, from an activation store, an iterable of batches or a
callable step -> batch; resumable (safetensors checkpoints, optimizer included) and data-parallel under torchrun.

One step: loss = MSE (summed over d_in, averaged over tokens, as SAELens) + the architecture's sparsity term (ReLU:
L1 on |f| * ||W_dec row||; JumpReLU: L0 through the rectangle-kernel straight-through estimator) + the AuxK loss
(Gao et al. 2024: the top `aux_k` pre-activations of the dead features reconstruct the residual, scaled down while
few features are dead), for every architecture. With `cfg.matryoshka_widths` = [m_1, ..., d_sae] (Matryoshka SAEs,
Bussmann, Nabeshima, Karvonen & Nanda 2025) the MSE term becomes the sum over j of the MSE of the prefix
reconstruction decode(f[:, :m_j]) + b_dec, the codes f being the usual ones (as SAELens's MatryoshkaBatchTopK: one
encode, nested decodes; the AuxK residual is the whole SAE's); general features settle in the early prefixes
instead of being absorbed into specific ones. The sparse path decodes every prefix with one embedding_bag
(`_sae_kernels.prefix_decode`). Dead features are revived by that auxiliary loss rather than by
Anthropic-style resampling: resampling needs one choice of inputs agreed across ranks and surgery on the optimizer
state, the aux loss does the same job through the gradient and keeps data parallelism plain. The pre-activations
fed to it are not rectified (as SAELens), so a ReLU feature that never fires still gets a gradient. AuxK keeps
`aux_k` of the dead features per token: dense matmuls over the dead columns when that is at least a tenth of them
(`AUX_DENSE_SHARE`; a small dictionary with many dead features fits 2.3x faster than with the gather kernels), the
gather kernels below that.

Decoder rows stay unit-norm: the gradient's component along each row is removed before the optimizer step and the
rows are renormalised after it (Gao et al. 2024). TopK and BatchTopK use the sparse kernels of `_sae_kernels`
(exactly the dense step's gradients, several times faster); ReLU and JumpReLU are dense. Adam (0.9, 0.999), the
gradient norm clipped to 1 (as SAELens, but without JumpReLU's thresholds: see `Trainer`), linear warmup then cosine
to 5% (or constant, `cfg.lr_schedule`). JumpReLU's log-thresholds move by about `lr` per Adam step whatever the
L0 penalty, so a short fit keeps them near `jumprelu_init_threshold`: start them near the pre-activations' scale.

Before the first step of a never-fitted SAE (one read from SAELens counts as trained) `input_scale` is set from
the first batch so the mean input norm is sqrt(d_in) (`normalize="expected_norm"`), decoder rows are made unit
norm with the norm folded into the encoder, and `b_dec` starts at the first batch's mean (the TopK paper starts it
at the geometric median). With `normalize="whiten"` the fit first reads `whiten_tokens` tokens for the covariance
(and trains on them too), trains on whitened batches and folds the whitening into the weights when it ends, also
when it raises (`_sae_whiten`); checkpoints hold the whitened weights with the statistics, so a resume goes on in
the same coordinates.

Data parallel: when torch.distributed is initialised with more than one process the objective runs inside
`DistributedDataParallel` (gradient all-reduce by the engine); the statistics that must agree across ranks (first
batch statistics, which features fired, BatchTopK's threshold) are summed with `all_reduce`. `cfg.batch_size` is
the global batch: a store gives each rank `batch_size // world_size` rows of its own slice; iterables and callables
must give each rank its own rows. TopK on 2 ranks with B/2 rows each equals one process with B rows; BatchTopK's
top k*B is taken per rank.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..store import ActivationStore
from ..train import Checkpointer, cosine_lr
from ._sae_kernels import (JumpReLU, Step, fixed_offsets, prefix_decode, prefix_decode_dense, sparse_decode,
                           sparse_encode, topk_pre)
from ._sae_whiten import Whitening, fold, unfold

# AuxK runs dense when it keeps at least this share of the dead features: on CPU the dense matmuls win from
# ~1/8 (d_in 128, 4096 tokens: 216 vs 239 ms) and lose at 1/16 (d_in 1024: 603 vs 502 ms)
AUX_DENSE_SHARE = 0.1


# --------------------------------------------------------------------------------------------- bookkeeping
class FitState(nn.Module):
    """Per-feature counters kept while fitting (saved in checkpoints and with the SAE)."""

    def __init__(self, d_sae: int, whiten_d_in: int | None = None):
        super().__init__()
        # normalize="whiten": the statistics the fit trained under (`_sae_whiten`), kept for later fits
        self.whitening = Whitening(whiten_d_in) if whiten_d_in is not None else None
        self.register_buffer("fire_count", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("tokens_since_fired", torch.zeros(d_sae, dtype=torch.int64))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    def as_dict(self, dead_tokens: int) -> dict:
        tokens = int(self.tokens)
        return {"tokens": tokens, "steps": int(self.steps), "fire_count": self.fire_count.clone(),
                "frequency": self.fire_count.double() / max(tokens, 1),
                "tokens_since_fired": self.tokens_since_fired.clone(),
                "dead": self.tokens_since_fired >= dead_tokens}


def _dist() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(t: Tensor) -> Tensor:
    import torch.distributed as dist

    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# -------------------------------------------------------------------------------------------------- losses
class Objective(nn.Module):
    """What DistributedDataParallel wraps: one batch in, the loss and the step's statistics out."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x: Tensor, dead: Tensor | None) -> dict[str, Tensor]:
        return losses(self.sae, x, dead)


def losses(sae, x: Tensor, dead: Tensor | None = None) -> dict[str, Tensor]:
    """loss (to minimise), mse (of the whole SAE), recon (detached, in scaled units), target, l0 (active entries in
    the batch), fired (per-feature count of tokens where it fired), min_kept (BatchTopK: smallest kept activation),
    matryoshka_mse (with cfg.matryoshka_widths: the MSE of each prefix, the last being `mse`), aux (AuxK loss)."""
    cfg = sae.cfg
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    target = x * sae.input_scale
    xs = target - b_dec
    n, m = x.shape[0], cfg.d_sae
    widths = cfg.matryoshka_widths
    nested = widths is not None and len(widths) > 1
    out: dict[str, Tensor] = {}
    pre_dense = None
    penalty = None
    if cfg.architecture in ("topk", "batchtopk"):
        if cfg.architecture == "topk":
            vals, idx = topk_pre(xs.detach(), W_enc.detach(), b_enc.detach(), cfg.k)
            offsets, cols, vals = fixed_offsets(n, cfg.k, x.device), idx.reshape(-1), vals.reshape(-1)
        else:
            with torch.no_grad():
                pre_dense = torch.addmm(b_enc, xs, W_enc)
                flat = pre_dense.relu().reshape(-1).topk(min(cfg.k * n, n * m), sorted=False).indices.sort().values
                rows, cols = flat // m, flat % m
                counts = rows.new_zeros(n).index_add_(0, rows, torch.ones_like(rows))  # no host sync (bincount)
                offsets = torch.cumsum(counts, 0) - counts
                vals = pre_dense.reshape(-1)[flat]
        acts = F.relu(sparse_encode(target, W_enc, b_enc, offsets, cols, vals, shift=b_dec))
        if nested:
            prefixes = prefix_decode(acts, offsets, cols, W_dec, widths) + b_dec
        else:
            recon = sparse_decode(acts, offsets, cols, W_dec) + b_dec
        on = acts > 0
        out["fired"] = cols.new_zeros(m).index_add_(0, cols, on.to(cols.dtype))  # no host sync (bincount, cols[on])
        out["l0"] = on.sum()
        if cfg.architecture == "batchtopk":  # smallest kept activation, 0 if none is kept
            out["min_kept"] = torch.where(on, acts, torch.inf).min().nan_to_num(posinf=0.0).detach()
    else:
        pre = torch.addmm(b_enc, xs, W_enc)
        if cfg.architecture == "relu":
            f = F.relu(pre)
            penalty = cfg.l1_coefficient * (f * W_dec.norm(dim=1)).sum(-1).mean()
        else:
            t = sae.threshold
            f = JumpReLU.apply(pre, t, cfg.jumprelu_bandwidth)
            penalty = cfg.l0_coefficient * Step.apply(pre, t, cfg.jumprelu_bandwidth).sum(-1).mean()
        if nested:
            prefixes = prefix_decode_dense(f, W_dec, widths) + b_dec
        else:
            recon = f @ W_dec + b_dec
        on = f > 0
        out["fired"] = on.sum(0)
        out["l0"] = on.sum()
        pre_dense = pre.detach()
    if nested:  # Matryoshka: every prefix reconstructs alone; the last prefix is the whole SAE
        level_mse = (prefixes - target[:, None]).pow(2).sum(-1).mean(0)
        recon, mse = prefixes[:, -1], level_mse[-1]
        out["matryoshka_mse"] = level_mse.detach()
        loss = level_mse.sum()
    else:
        mse = (recon - target).pow(2).sum(-1).mean()
        loss = mse
    if penalty is not None:
        loss = loss + penalty
    if dead is not None:
        # (dead features, the error they reconstruct): the whole SAE's; or per Matryoshka level, the band's dead
        # features and the error of the prefix that ends with the band (SAELens's use_matryoshka_aux_loss)
        if nested and cfg.matryoshka_aux:
            feature, bounds = torch.arange(m, device=dead.device), [0, *widths]
            groups = [(dead & (feature >= lo) & (feature < hi), prefixes[:, j])
                      for j, (lo, hi) in enumerate(zip(bounds, bounds[1:]))]
        else:
            groups = [(dead, recon)]
        auxes = []
        for mask, rec in groups:
            n_dead = int(mask.sum())
            if n_dead == 0:
                continue
            kk = min(cfg.aux_k, n_dead)
            dead_idx = mask.nonzero().squeeze(1)
            if kk >= AUX_DENSE_SHARE * n_dead:  # a large share of the dead kept: dense matmuls beat the gathers
                pre_dead = torch.addmm(b_enc[dead_idx], xs, W_enc[:, dead_idx])
                keep = pre_dead.detach().topk(kk, dim=-1, sorted=False).indices
                e_hat = torch.zeros_like(pre_dead).scatter(1, keep, pre_dead.gather(1, keep)) @ W_dec[dead_idx]
            else:
                if pre_dense is not None:
                    dv, di = pre_dense[:, dead_idx].topk(kk, dim=-1, sorted=False)
                else:
                    dv, di = topk_pre(xs.detach(), W_enc.detach()[:, dead_idx], b_enc.detach()[dead_idx], kk)
                cols_a, off_a = dead_idx[di].reshape(-1), fixed_offsets(n, kk, x.device)
                e_hat = sparse_decode(sparse_encode(target, W_enc, b_enc, off_a, cols_a, dv.reshape(-1),
                                                    shift=b_dec), off_a, cols_a, W_dec)
            aux = (e_hat - (target - rec).detach()).pow(2).sum(-1).mean()
            loss = loss + cfg.aux_coefficient * min(n_dead / cfg.aux_k, 1.0) * aux
            auxes.append(aux.detach())
        if auxes:
            out["aux"] = torch.stack(auxes).sum()
    out.update(loss=loss, mse=mse.detach(), recon=recon.detach(), target=target.detach())
    return out


@torch.no_grad()
def fold_decoder_norms(sae) -> None:
    """Make decoder rows unit norm without changing the SAE's function (norms go into the encoder)."""
    norms = sae.W_dec.norm(dim=1).clamp_min(1e-8)
    sae.W_dec.div_(norms[:, None])
    sae.W_enc.mul_(norms[None, :])
    sae.b_enc.mul_(norms)
    if sae.cfg.architecture == "jumprelu":
        sae.log_threshold.add_(norms.log())
    elif sae.cfg.architecture == "batchtopk" and float(sae.batch_threshold) > 0 and not torch.allclose(norms, norms[0]):
        warnings.warn("BatchTopK SAE with decoder rows of different norms: its global threshold is kept as is")


# ------------------------------------------------------------------------------------------------- trainer
class Trainer:
    """Optimizer, schedule and one training step; `fit` drives it and `benchmarks/sae.py` times `step`."""

    def __init__(self, sae, total: int):
        self.sae, self.cfg, self.total = sae, sae.cfg, total
        self.state = sae._fit_state if sae._fit_state is not None else FitState(self.cfg.d_sae)
        if self.cfg.normalize == "whiten" and self.state.whitening is None:
            self.state.whitening = Whitening(self.cfg.d_in)
        self.state.to(sae.W_dec.device)
        self.holder = nn.ModuleDict({"sae": sae, "state": self.state})  # what checkpoints hold
        # normalize="whiten": the fit trains in whitened coordinates
        self.whitening: Whitening | None = self.state.whitening if self.cfg.normalize == "whiten" else None
        self._white: tuple[Tensor, Tensor] | None = None  # float32 copies of its mean and matrix
        self.whitened = False  # whether the SAE's weights are in whitened coordinates now
        self.rank, self.world = _dist()
        p = sae.W_dec
        fused = p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64, torch.bfloat16,
                                                                 torch.float16)
        self.opt = torch.optim.Adam(sae.parameters(), lr=self.cfg.lr, betas=(0.9, 0.999), fused=fused or None)
        # the norm clip leaves JumpReLU's thresholds out: their L0 gradient (x l0_coefficient / bandwidth) would
        # otherwise set the clip factor and shrink the reconstruction's gradients, so a larger l0_coefficient gave
        # a larger L0 (measured: 136 at 1, 180 at 60 after one epoch); Adam scales the thresholds' steps anyway
        self.clipped = [p for n, p in sae.named_parameters() if n != "log_threshold"]
        self.objective: nn.Module | None = None
        self._seen: int | None = None  # host copy of state.tokens (read once, at the first step: after a resume)

    def _wrapped(self) -> nn.Module:
        if self.objective is None:
            obj = Objective(self.sae)
            if self.world > 1:
                dev = self.sae.W_dec.device
                obj = nn.parallel.DistributedDataParallel(
                    obj, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False)
            self.objective = obj
        return self.objective

    @torch.no_grad()
    def initialise(self, x: Tensor) -> None:
        """Input scale, unit decoder rows and b_dec from the first batch (summed over ranks)."""
        sae = self.sae
        x = self._whiten(self._checked(0, x).to(sae.W_dec.device, torch.float32))
        sums = torch.cat([x.norm(dim=-1).sum()[None], x.sum(0), x.new_tensor([x.shape[0]])])
        if self.world > 1:
            _all_reduce(sums)
        count = sums[-1]
        if self.cfg.normalize == "expected_norm":
            sae.input_scale.fill_(math.sqrt(self.cfg.d_in) / float((sums[0] / count).clamp_min(1e-12)))
        fold_decoder_norms(sae)
        sae.b_dec.copy_((sums[1:-1] / count * sae.input_scale).to(sae.b_dec.dtype))

    def _checked(self, step: int, x) -> Tensor:
        if not isinstance(x, Tensor) or x.ndim != 2 or x.shape[1] != self.cfg.d_in or x.shape[0] < 1:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"SAE.fit: batch {step} is {got}; expected a (tokens, d_in={self.cfg.d_in}) tensor")
        return x

    @torch.no_grad()
    def enter_whitened(self, batches: list[Tensor], fresh: bool) -> None:
        """Move the SAE into whitened coordinates before its first step: with the statistics of its earlier
        whitened fit when it has them (the exact inverse of that fit's fold; `batches` unused), else with ones
        estimated from `batches` (all ranks); a trained SAE is then rewritten in them (input_scale folded in,
        `unfold`, unit decoder rows)."""
        sae, w = self.sae, self.whitening
        self._white = None
        if w.estimated:
            unfold(sae, w)
            self.whitened = True
            return
        w.estimate([self._checked(i, b) for i, b in enumerate(batches)], self.cfg.whiten_eps,
                   reduce=_all_reduce if self.world > 1 else None)
        if not fresh:
            s = sae.input_scale.clone()
            sae.W_enc.mul_(s)
            sae.W_dec.div_(s)
            sae.b_dec.div_(s)
            sae.input_scale.fill_(1.0)
            unfold(sae, w)
            fold_decoder_norms(sae)
        self.whitened = True

    def _whiten(self, x: Tensor) -> Tensor:
        if self.whitening is None:
            return x
        if self._white is None:
            self._white = (self.whitening.mean.float(), self.whitening.matrix.float())
        mean, m = self._white
        return ((x.float() - mean) @ m).to(x.dtype)

    def fold_whitening(self) -> None:
        """At the end of a fit: the whitening goes into the weights (`_sae_whiten.fold`)."""
        if self.whitened:
            fold(self.sae, self.whitening)
            self.whitened = False

    def lr(self, step: int) -> float:
        hold = 1.0 if self.cfg.lr_schedule == "constant" else 0.0
        return cosine_lr(step, self.total, self.cfg.lr, self.cfg.warmup_steps, hold)

    def step(self, step: int, x: Tensor) -> dict[str, Tensor]:
        sae, cfg, state = self.sae, self.cfg, self.state
        for g in self.opt.param_groups:
            g["lr"] = self.lr(step)
        x = self._whiten(self._checked(step, x).to(sae.W_dec.device, sae.W_dec.dtype, non_blocking=True))
        use_aux = cfg.aux_k > 0 and cfg.aux_coefficient > 0
        # no feature can be dead before dead_tokens tokens: skip the mask, and the host sync its count costs
        if self._seen is None:
            self._seen = int(state.tokens)
        maybe = self.world > 1 or self._seen >= cfg.dead_tokens
        dead = state.tokens_since_fired >= cfg.dead_tokens if use_aux and maybe else None
        out = self._wrapped()(x, dead)
        self.opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        W = sae.W_dec
        with torch.no_grad():
            if W.grad is not None:
                W.grad.sub_((W.grad * W).sum(1, keepdim=True) * W)
            torch.nn.utils.clip_grad_norm_(self.clipped, 1.0)
            self.opt.step()
            W.div_(W.norm(dim=1, keepdim=True).clamp_min(1e-8))
            self._count(out, x.shape[0])
        return out

    @torch.no_grad()
    def _count(self, out: dict[str, Tensor], n: int) -> None:
        sae, state = self.sae, self.state
        fired = torch.cat([out["fired"].to(torch.int64), out["fired"].new_full((1,), n, dtype=torch.int64)])
        if self.world > 1:
            _all_reduce(fired)
        tokens = fired[-1]
        fired = fired[:-1]
        if self._seen is not None:
            self._seen += n
        state.fire_count += fired
        state.tokens_since_fired.add_(tokens).masked_fill_(fired > 0, 0)
        state.tokens += tokens
        state.steps += 1
        if "min_kept" in out:
            v = torch.stack([out["min_kept"].float(), (out["min_kept"] > 0).float()])
            if self.world > 1:
                _all_reduce(v)
            t, new = sae.batch_threshold, v[0] / v[1].clamp_min(1)  # no host syncs: kept as tensor selects
            t.copy_(torch.where(v[1] > 0, torch.where(t <= 0, new, t + self.cfg.batch_threshold_lr * (new - t)), t))


# -------------------------------------------------------------------------------------------------- sources
class _Source:
    """Batches for steps start.. of any accepted data source, with the total step count it implies."""

    def __init__(self, sae, data, name: str | None, batches_kwargs: dict, rank: int, world: int):
        cfg = sae.cfg
        self.data, self.kw, self.rank, self.world, self.cfg = data, batches_kwargs, rank, world, cfg
        if isinstance(data, ActivationStore):
            self.kind = "store"
            if name is None:
                if len(data.names) != 1:
                    raise ValueError(f"SAE.fit: the store holds {list(data.names)}; pass name= (one of them)")
                name = data.names[0]
            if name not in data.names:
                raise ValueError(f"SAE.fit: name={name!r} is not in the store; it holds {list(data.names)}")
            if data.d[name] != cfg.d_in:
                raise ValueError(f"SAE.fit: {name} has width {data.d[name]}; this SAE has d_in={cfg.d_in}")
            if cfg.hook_name is not None and cfg.hook_name != name:
                raise ValueError(f"SAE.fit: this SAE reads {cfg.hook_name!r}, not {name!r} (make a new SAEConfig)")
            cfg.hook_name = name
            self.name = name
            if cfg.batch_size % world:
                raise ValueError(f"SAE.fit: batch_size={cfg.batch_size} is not divisible by world_size={world}")
        else:
            if batches_kwargs:
                raise ValueError("SAE.fit: store options (" + ", ".join(sorted(batches_kwargs)) + ") apply to an "
                                 "ActivationStore only")
            if name is not None and cfg.hook_name is not None and cfg.hook_name != name:
                raise ValueError(f"SAE.fit: this SAE reads {cfg.hook_name!r}, not {name!r} (make a new SAEConfig)")
            if name is not None:
                cfg.hook_name = name
            self.name = name
            if callable(data) and not isinstance(data, (Tensor, Iterable)):
                self.kind = "callable"
            elif isinstance(data, Iterable) and not isinstance(data, (Tensor, str, bytes)):
                self.kind = "iterable"
            else:
                hint = " (split one: x.split(cfg.batch_size))" if isinstance(data, Tensor) else ""
                raise TypeError(f"SAE.fit: data must be an ActivationStore, an iterable of (tokens, d_in) tensors or a "
                                f"callable step -> tensor; got {type(data).__name__}{hint}")

    def _unwrap(self, item):
        """A tensor; or `stream_activations`'s (acts, meta) / an {name: tensor} dict: the tensor of `name`."""
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], dict):
            item = item[0]
        if isinstance(item, dict):
            if self.name is None and len(item) != 1:
                raise ValueError(f"SAE.fit: batches hold {sorted(item)}; pass name= (one of them)")
            key = self.name if self.name is not None else next(iter(item))
            if key not in item:
                raise ValueError(f"SAE.fit: name={key!r} is not in the batch; it holds {sorted(item)}")
            item = item[key]
        return item

    def total(self, tokens: int | None, steps: int | None) -> int:
        bs = self.cfg.batch_size
        if steps is not None and tokens is not None:
            raise ValueError("SAE.fit: give tokens= or steps=, not both")
        if tokens is not None:
            steps = tokens // bs
            if steps < 1:
                raise ValueError(f"SAE.fit: tokens={tokens} is less than one batch (batch_size={bs})")
        if steps is None:
            if self.kind == "store":
                if self.kw.get("stratify") is not None:
                    raise ValueError("SAE.fit: with stratify= give steps= or tokens= (the pass length is not known)")
                where = self.kw.get("where")
                n = len(self.data) if where is None else int(
                    (where if isinstance(where, Tensor) else self.data.select(**where)).sum())
                steps = n // bs
                if steps < 1:
                    raise ValueError(f"SAE.fit: the store holds {n} (selected) tokens, less than one batch ({bs})")
            elif self.kind == "iterable" and hasattr(self.data, "__len__"):
                steps = len(self.data)
            else:
                article = "an" if self.kind == "iterable" else "a"
                raise ValueError(f"SAE.fit: {article} {self.kind} data source needs steps= or tokens=")
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"SAE.fit: steps must be a positive int; got {steps!r}")
        return steps

    def iterate(self, start: int, total: int) -> Iterator[Tensor]:
        if self.kind == "callable":
            for s in range(start, total):
                yield self._unwrap(self.data(s))
            return
        if self.kind == "iterable":
            yield from map(self._unwrap, itertools.islice(iter(self.data), start, total))
            return
        per_rank = self.cfg.batch_size // self.world

        def epochs():
            for epoch in itertools.count():
                got = False
                for b in self.data.batches(self.name, per_rank, shuffle=True, seed=self.cfg.seed + epoch,
                                           rank=self.rank, world_size=self.world, **self.kw):
                    got = True
                    yield b
                if not got:
                    raise ValueError(f"SAE.fit: the store gave no batch of {per_rank} rows for {self.name}")

        yield from itertools.islice(epochs(), start, total)


# ------------------------------------------------------------------------------------------------------ fit
def fit(sae, data, *, name: str | None = None, tokens: int | None = None, steps: int | None = None,
        work: str | os.PathLike | None = None, progress: bool = True, every: int = 500, **batches_kwargs):
    rank, world = _dist()
    source = _Source(sae, data, name, batches_kwargs, rank, world)
    total = source.total(tokens, steps)
    trainer = Trainer(sae, total)
    cfg_doc = dataclasses.asdict(sae.cfg)
    start = 0
    ckpt = None
    if work is not None:
        ckpt = Checkpointer(work, every)
        _check_work(Path(work), cfg_doc, total)
        start = ckpt.resume(trainer.holder, trainer.opt)
    fresh = sae._fit_state is None and start == 0
    object.__setattr__(sae, "_fit_state", trainer.state)  # not a submodule: stays out of the SAE's weights
    it = source.iterate(start, total)
    t0, last = time.perf_counter(), start
    try:
        if trainer.whitening is not None and start > 0:  # a resumed run: weights and statistics from the checkpoint
            trainer.whitened = True
        elif trainer.whitening is not None:
            peek = []
            if not trainer.whitening.estimated:
                peek = list(itertools.islice(it, max(1, math.ceil(sae.cfg.whiten_tokens / sae.cfg.batch_size))))
                if not peek:
                    raise ValueError("SAE.fit: the data source gave no batch")
            trainer.enter_whitened(peek, fresh)
            if peek:  # trained on too: a store or a callable gives them again, an iterable is read once: kept
                it = itertools.chain(peek, it) if source.kind == "iterable" else source.iterate(start, total)
            del peek
        if fresh:
            first = next(it, None)
            if first is None:
                raise ValueError("SAE.fit: the data source gave no batch")
            trainer.initialise(first)
            it = itertools.chain([first], it)
        sae.train()
        from tqdm.auto import tqdm

        with tqdm(total=total, initial=start, desc=f"SAE {sae.cfg.architecture}", dynamic_ncols=True, mininterval=1.0,
                  disable=not progress or rank != 0) as bar:
            for step, x in zip(range(start, total), it):
                out = trainer.step(step, x)
                last = step + 1
                if not bar.disable and (step % 10 == 0 or last == total):
                    bar.set_postfix(loss=f"{float(out['loss']):.4g}", L0=f"{float(out['l0']) / x.shape[0]:.1f}",
                                    EV=f"{explained_variance(out['recon'], out['target']):.3f}", refresh=False)
                bar.update(1)
                if ckpt is not None and rank == 0 and (last % every == 0 or last == total):
                    ckpt.save(last, trainer.holder, trainer.opt, extra={"config": cfg_doc, "total": total})
        if last < total:
            warnings.warn(f"SAE.fit: the data ran out after {last} of {total} steps")
            if ckpt is not None and rank == 0:
                ckpt.save(last, trainer.holder, trainer.opt, extra={"config": cfg_doc, "total": total})
    finally:  # also when the run raises: the SAE in memory stays one that reads raw activations
        trainer.fold_whitening()
        sae.eval()
    sae.fit_seconds_ = round(time.perf_counter() - t0, 3)
    return sae


def explained_variance(recon: Tensor, target: Tensor) -> float:
    """1 - residual variance / input variance over a batch (summed over dimensions)."""
    recon, target = recon.detach(), target.detach()
    resid = (target - recon).float().pow(2).sum()
    total = (target - target.mean(0)).float().pow(2).sum().clamp_min(1e-12)
    return float(1 - resid / total)


def _check_work(folder: Path, cfg_doc: dict, total: int) -> None:
    state = folder / "state.json"
    if not state.exists():
        return
    doc = json.loads(state.read_text())
    saved = doc.get("config")
    if saved is not None and saved != cfg_doc:
        diff = sorted(k for k in set(saved) | set(cfg_doc) if saved.get(k) != cfg_doc.get(k))
        raise ValueError(f"SAE.fit: {folder} holds a checkpoint of another SAEConfig (differs in {diff}); "
                         f"use a new work folder")
    if doc.get("total") not in (None, total):
        raise ValueError(f"SAE.fit: {folder} holds a run of {doc['total']} steps; this call asks for {total}")
