"""Sparse autoencoders (ReLU/L1, TopK, BatchTopK, JumpReLU; Matryoshka training for each) as estimators over any
hook point of any family.

    sae = SAE(SAEConfig(d_in=128, d_sae=2048, architecture="topk", k=16, hook_name="vision.blocks.2.resid_post"))
    f = sae.encode(x)          # (..., d_sae) feature activations, zeros where a feature is off
    x_hat = sae.decode(f)      # (..., d_in)
    x_hat = sae(x)             # decode(encode(x))
    sae.fit(store, tokens=50_000_000, work="runs/sae")   # or an iterable of (tokens, d_in) tensors, or step -> tensor
    sae.save("out/sae"); SAE.load("out/sae")              # cfg.json + weights.safetensors
    sae.save_saelens("out/sl"); SAE.from_saelens("out/sl") # SAELens's cfg.json + sae_weights.safetensors

Conventions follow SAELens so that its saved SAEs load here and ours there: `W_enc` (d_in, d_sae), `b_enc`,
`W_dec` (d_sae, d_in), `b_dec` subtracted from the input before encoding, `threshold` (d_sae) for JumpReLU and for
BatchTopK at inference (BatchTopK keeps the top k * batch activations of a batch while training, then one global
threshold, Bussmann et al. 2024).

Matryoshka SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025), for any architecture: `matryoshka_widths=[m_1, ...,
d_sae]` adds the loss of each prefix's reconstruction decode(f[:, :m_j]), so general features (a colour) settle in
the first features instead of being absorbed into specific ones (a red square). It changes the training loss only:

    SAEConfig(d_in=128, d_sae=2048, architecture="batchtopk", k=16, matryoshka_widths=[128, 512, 2048])

Inputs are multiplied by `input_scale` before encoding and outputs divided by it (`normalize="expected_norm"` sets
it so the mean input norm is sqrt(d_in): one learning rate for every site). `normalize="whiten"` trains on whitened
activations, so low-variance directions get features too, and folds the whitening into the weights at the end of
the fit (`_sae_whiten`): the fitted SAE reads raw activations like any other, its decoder rows not unit norm.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")
LR_SCHEDULES = ("cosine", "constant")
DTYPES = ("float32", "float64", "bfloat16", "float16")
NORMALIZE = ("none", "expected_norm", "whiten")


@dataclasses.dataclass
class SAEConfig:
    """Shape, sparsity mechanism and training recipe of one SAE; saved as JSON beside its safetensors.

    `k`: active features per token (topk; batchtopk: on average). `l1_coefficient`: ReLU's L1 weight (on |f| *
    ||W_dec row||). `l0_coefficient`, `jumprelu_bandwidth`, `jumprelu_init_threshold`: JumpReLU's L0 penalty and
    straight-through estimator (Rajamanoharan et al. 2024); its log-thresholds move about `lr` per step, so a short
    fit's sparsity is set more by the initial threshold than by the penalty. `aux_k` / `aux_coefficient`: the TopK
    paper's auxiliary loss, the top `aux_k` dead features reconstruct the residual error (Gao et al. 2024; 0 turns it
    off); a feature is dead after `dead_tokens` tokens without firing (the aux loss revives dead features of every
    architecture; see `_sae_fit`). `batch_size`: tokens per optimizer step over all ranks. `lr_schedule`: "cosine"
    (linear warmup, cosine to 5%) or "constant" (after the warmup). `batch_threshold_lr`: the rate of BatchTopK's
    running mean of each batch's smallest kept activation. `matryoshka_widths`: [m_1 < ... < d_sae] trains a
    Matryoshka SAE (every architecture): each prefix of the features must reconstruct the input alone (training only;
    `encode`/`decode` are unchanged). `matryoshka_aux`: the aux loss per level instead, each band's dead features
    reconstructing the error of their own prefix (SAELens's `use_matryoshka_aux_loss`). `hook_name`: the canonical
    site the SAE reads; `normalize`: "none", "expected_norm" or "whiten" (see the module docstring; `whiten_eps`:
    added to every covariance eigenvalue, as a share of their mean; `whiten_tokens`: tokens read for the covariance);
    `dtype`: the parameters' dtype."""

    d_in: int
    d_sae: int
    architecture: str = "topk"
    k: int = 32
    l1_coefficient: float = 1.0
    l0_coefficient: float = 1.0
    jumprelu_bandwidth: float = 0.001
    jumprelu_init_threshold: float = 0.001
    aux_k: int = 256
    aux_coefficient: float = 1 / 32
    dead_tokens: int = 1_000_000
    lr: float = 4e-4
    batch_size: int = 4096
    warmup_steps: int = 100
    seed: int = 0
    normalize: str = "expected_norm"
    whiten_eps: float = 0.01
    whiten_tokens: int = 100_000
    hook_name: str | None = None
    dtype: str = "float32"
    lr_schedule: str = "cosine"
    batch_threshold_lr: float = 0.01
    matryoshka_widths: list[int] | None = None
    matryoshka_aux: bool = False

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r}; allowed: {ARCHITECTURES}")
        if self.d_in < 1 or self.d_sae < 1:
            raise ValueError(f"d_in and d_sae must be >= 1; got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise ValueError(f"k={self.k}: a {self.architecture} SAE needs 1 <= k <= d_sae ({self.d_sae})")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize={self.normalize!r}; allowed: {NORMALIZE}")
        if not self.whiten_eps > 0 or self.whiten_tokens < 1:
            raise ValueError(f"whiten_eps > 0 and whiten_tokens >= 1 are needed; got whiten_eps={self.whiten_eps}, "
                             f"whiten_tokens={self.whiten_tokens}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r}; allowed: {LR_SCHEDULES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; allowed: {DTYPES}")
        if self.batch_size < 1 or self.lr <= 0 or self.aux_k < 0 or self.jumprelu_bandwidth <= 0:
            raise ValueError(f"batch_size >= 1, lr > 0, aux_k >= 0 and jumprelu_bandwidth > 0 are needed; got "
                             f"batch_size={self.batch_size}, lr={self.lr}, aux_k={self.aux_k}, "
                             f"jumprelu_bandwidth={self.jumprelu_bandwidth}")
        if self.matryoshka_widths is not None:
            w = self.matryoshka_widths
            if isinstance(w, (str, bytes)) or not hasattr(w, "__iter__"):
                raise ValueError(f"matryoshka_widths={w!r}: expected a list of ints ending at d_sae ({self.d_sae})")
            w = list(w)
            bad = [v for v in w if isinstance(v, bool) or not isinstance(v, int)]
            if not w or bad:
                raise ValueError(f"matryoshka_widths={w!r}: expected a non-empty list of ints ending at d_sae "
                                 f"({self.d_sae})")
            if w[0] < 1 or any(a >= b for a, b in zip(w, w[1:])) or w[-1] != self.d_sae:
                raise ValueError(f"matryoshka_widths={w}: widths must be >= 1, strictly increasing and end at "
                                 f"d_sae={self.d_sae}, e.g. [{max(1, self.d_sae // 16)}, {max(1, self.d_sae // 4)}, "
                                 f"{self.d_sae}]")
            self.matryoshka_widths = w
        if self.matryoshka_aux and self.matryoshka_widths is None:
            raise ValueError("matryoshka_aux=True is the per-level aux loss of a Matryoshka SAE: give "
                             "matryoshka_widths too")


class SAE(nn.Module):
    """The autoencoder itself; `fit` (in `_sae_fit`) trains it. Decoder rows start at unit norm and the encoder at
    the decoder's transpose, as in SAELens and the TopK paper."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(w.clone())
        self.W_enc = nn.Parameter(w.T.clone().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        if cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
        # BatchTopK's inference threshold (estimated while training; 0 = not yet) and the input scale: buffers
        self.register_buffer("batch_threshold", torch.zeros(()))
        self.register_buffer("input_scale", torch.ones(()))
        if cfg.dtype != "float32":
            self.to(getattr(torch, cfg.dtype))
        object.__setattr__(self, "_fit_state", None)  # `_sae_fit.FitState` once fitted (not part of the weights)

    def _apply(self, fn, recurse=True):
        """`.to(dtype)` casts everything but BatchTopK's threshold: it is a running average of small steps
        (`batch_threshold_lr` x the gap), which bfloat16 rounds away (measured: stuck at 2.62 where float32 reaches
        1.96, inference L0 2.6 instead of k 4)."""
        super()._apply(fn, recurse)
        if self.batch_threshold.dtype != torch.float32:
            self.batch_threshold = self.batch_threshold.float()
        return self

    # ------------------------------------------------------------------------------------------ forward
    @property
    def threshold(self) -> Tensor:
        """Per-feature threshold: JumpReLU's learned one, BatchTopK's global one broadcast, else zeros."""
        if self.cfg.architecture == "jumprelu":
            return self.log_threshold.exp()
        return self.batch_threshold.expand(self.cfg.d_sae)

    def pre_acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        self._check(x)
        return (x * self.input_scale - self.b_dec) @ self.W_enc + self.b_enc

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations (inference rule: TopK keeps k per token; BatchTopK and JumpReLU cut at the
        threshold; ReLU keeps every positive)."""
        return self.activate(self.pre_acts(x))

    def activate(self, pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        arch = self.cfg.architecture
        if arch == "relu":
            return torch.relu(pre)
        if arch == "topk":
            return topk_relu(pre, self.cfg.k)
        if arch == "batchtopk" and float(self.batch_threshold) <= 0:
            return topk_relu(pre, self.cfg.k)  # no threshold estimated yet: per-token top k
        return torch.where(pre > self.threshold.to(pre.dtype), pre, torch.zeros_like(pre))

    def decode(self, f: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        if f.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"features have {f.shape[-1]} entries in their last dim; this SAE has d_sae={self.cfg.d_sae}")
        return (f @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_in"]:
        return self.decode(self.encode(x))

    def _check(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"activations have {x.shape[-1]} entries in their last dim; this SAE reads d_in="
                             f"{self.cfg.d_in}" + (f" (from {self.cfg.hook_name})" if self.cfg.hook_name else ""))

    # ---------------------------------------------------------------------------------------- estimator
    def fit(self, data, *, name: str | None = None, tokens: int | None = None, steps: int | None = None,
            work: str | os.PathLike | None = None, progress: bool = True, every: int = 500, **store_options) -> SAE:
        """Train on `data`: an `mmlens.store.ActivationStore` (`name=` the hook name when it holds several;
        `store_options` such as where= / stratify= go to `store.batches`), an iterable of (tokens, d_in) tensors, or
        a callable step -> (tokens, d_in) tensor. Length: `steps=` or `tokens=` (/ cfg.batch_size); a store's
        default is one pass. `work`: checkpoint folder (every `every` steps; a rerun resumes where a killed run
        stopped and ends with the same weights; an iterable is then re-read from its start, skipping the batches
        already seen). Under torchrun each rank must give its own batches (a store slices itself by rank).
        Details in `_sae_fit`."""
        from ._sae_fit import fit

        return fit(self, data, name=name, tokens=tokens, steps=steps, work=work, progress=progress, every=every,
                   **store_options)

    def transform(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Estimator alias of `encode`."""
        return self.encode(x)

    @property
    def feature_stats(self) -> dict:
        """Counts kept while fitting: tokens, steps, fire_count / frequency per feature, tokens_since_fired and
        dead (no firing for cfg.dead_tokens tokens). Zeros before any fit."""
        from ._sae_fit import FitState

        state = self._fit_state if self._fit_state is not None else FitState(self.cfg.d_sae)
        return state.as_dict(self.cfg.dead_tokens)

    def save(self, folder: str | os.PathLike) -> Path:
        """cfg.json + weights.safetensors (the fitting counters ride along in the weights as `stats.*`)."""
        from ._estimator import save_estimator

        tensors = dict(self.state_dict())
        if self._fit_state is not None:
            tensors.update({f"stats.{k}": v for k, v in self._fit_state.state_dict().items()})
        return save_estimator(folder, "SAE", self.cfg, tensors)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SAE:
        from ._estimator import load_estimator
        from ._sae_fit import FitState

        cfg, tensors, _ = load_estimator(folder, "SAE", SAEConfig)
        sae = cls(cfg)
        stats = {k[len("stats."):]: v for k, v in tensors.items() if k.startswith("stats.")}
        sae.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("stats.")}, strict=True)
        if stats:
            state = FitState(cfg.d_sae, cfg.d_in if any(k.startswith("whitening.") for k in stats) else None)
            state.load_state_dict(stats, strict=True)
            object.__setattr__(sae, "_fit_state", state)
        return sae

    def save_saelens(self, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
        """SAELens 6's format (cfg.json + sae_weights.safetensors [+ sparsity.safetensors]); see `_sae_saelens`."""
        from ._sae_saelens import save_saelens

        return save_saelens(self, folder, model_name=model_name)

    @classmethod
    def from_saelens(cls, folder: str | os.PathLike, *, hook_name: str | None = None) -> SAE:
        """An SAE saved by SAELens (`save_model` / `save_inference_model`) or by `save_saelens`. `hook_name`
        replaces the file's (SAELens names TransformerLens hooks, not mmlens sites). Counts as trained: `fit`
        continues from these weights (no input scale or b_dec initialisation)."""
        from ._sae_fit import FitState
        from ._sae_saelens import from_saelens

        sae = from_saelens(cls, SAEConfig, folder, hook_name=hook_name)
        object.__setattr__(sae, "_fit_state", FitState(sae.cfg.d_sae))  # trained: `fit` fine-tunes, never re-inits
        return sae

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{c.architecture}, d_in={c.d_in}, d_sae={c.d_sae}" + (f", k={c.k}" if "topk" in c.architecture else "") + \
            (f", matryoshka_widths={c.matryoshka_widths}" if c.matryoshka_widths else "") + \
            (f", hook_name={c.hook_name!r}" if c.hook_name else "")


def topk_relu(pre: Float[Tensor, "... d"], k: int) -> Float[Tensor, "... d"]:
    """ReLU of the k largest pre-activations per row, zeros elsewhere."""
    vals, idx = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
