"""Tuned lens (Belrose et al. 2023): the logit lens with a learned affine translator per layer, trained so each
layer's translated residual, read through the model's own final norm and unembedding, matches the model's final
next-token distribution (KL). Where the logit lens misreads a layer whose basis has not yet settled, the tuned lens
reads what that layer already knows.

    tl = TunedLens(steps=300).fit(vlm, batches)      # batches: processor outputs (a list, reused every epoch)
    res = tl.transform(vlm, inputs, positions="answer")   # a LogitLensResult, as logit_lens gives
    tl.save("out/tuned"); TunedLens.load("out/tuned")
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ._estimator import load_estimator, save_estimator
from .logit_lens import LogitLensResult, read_out
from .result import require_family


@dataclasses.dataclass
class TunedLensConfig:
    """Hyperparameters, stored as given (scikit-learn style); `fit` validates them."""

    names: str | list[str] = "lm.blocks.*.resid_post"
    steps: int = 300
    lr: float = 1e-3
    warmup: int = 20
    batch_tokens: int = 512
    seed: int = 0


class TunedLens:
    """Estimator: `fit(lens, batches)` learns `translators_` (one `nn.Linear(d, d)` per name, initialised to the
    identity); the model's last block keeps the identity (its residual is the model's output). Fitted attributes
    end in `_`."""

    def __init__(self, names: str | Sequence[str] = "lm.blocks.*.resid_post", *, steps: int = 300, lr: float = 1e-3,
                 warmup: int = 20, batch_tokens: int = 512, seed: int = 0):
        self.config = TunedLensConfig(names if isinstance(names, str) else list(names), steps, lr, warmup,
                                      batch_tokens, seed)

    # ------------------------------------------------------------------------------------------------- fit
    def fit(self, lens, batches: Sequence[dict], *, work: str | os.PathLike | None = None) -> TunedLens:
        """Train on every text position of `batches` (processor outputs; image tokens, padding and special tokens
        are left out: the model never learned to predict the token after them). `work`: a folder for resumable
        checkpoints (a rerun continues where an interrupted one stopped)."""
        require_family(lens, "generative", "TunedLens.fit")
        cfg = self.config
        if not isinstance(cfg.steps, int) or cfg.steps < 1 or cfg.batch_tokens < 1 or cfg.lr <= 0:
            raise ValueError(f"TunedLens: steps and batch_tokens must be positive ints and lr > 0; got {cfg}")
        if not batches:
            raise ValueError("TunedLens.fit needs at least one batch of processor outputs")
        names = lens.resolve(cfg.names)
        hidden, target = _collect(lens, names, batches)  # (layers, tokens, d), (tokens, vocab) log-probs
        last = lens.hook_points("lm.blocks.*.resid_post")[-1]
        trainable = [n != last for n in names]
        translators = _identity_translators(len(names), hidden.shape[-1])
        heads = _FrozenHeads(lens)
        from ..train import run_training

        def step_fn(step: int) -> Tensor:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            idx = torch.randint(0, hidden.shape[1], (cfg.batch_tokens,), generator=g)
            losses = [_kl(lens.unembed(t(hidden[k, idx])), target[idx])
                      for k, (t, train) in enumerate(zip(translators, trainable)) if train]
            return torch.stack(losses).sum() if losses else hidden.new_zeros((), requires_grad=True)

        params = [p for t, train in zip(translators, trainable) if train for p in t.parameters()]
        with heads, tempfile.TemporaryDirectory() as tmp:
            stats = run_training(name="tuned-lens", model=translators, params=params, steps=cfg.steps, lr=cfg.lr,
                                 warmup=cfg.warmup, seed=cfg.seed, work=work or tmp, step_fn=step_fn,
                                 every=max(1, cfg.steps // 4), weight_decay=0.0)
        self.names_, self.translators_, self.training_ = names, translators.requires_grad_(False), stats
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "translators_"):
            raise RuntimeError("this TunedLens is not fitted: call fit(lens, batches) or TunedLens.load(folder)")

    # ------------------------------------------------------------------------------------------- transform
    @torch.no_grad()
    def transform(self, lens, inputs, *, positions=None) -> LogitLensResult:
        """The tuned lens's logits (layers, batch, positions, vocab), as `logit_lens` returns them."""
        self._check_fitted()

        def translate(k: int, h: Tensor) -> Tensor:
            t = self.translators_[k]
            return t(h.to(t.weight.device, t.weight.dtype))

        return read_out(lens, inputs, self.names_, positions, "TunedLens.transform", translate)

    # ----------------------------------------------------------------------------------------- persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """`cfg.json` (config, names, training stats) and `weights.safetensors`, each written atomically."""
        self._check_fitted()
        return save_estimator(folder, "TunedLens", self.config, self.translators_.state_dict(), names=self.names_,
                              training=self.training_)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TunedLens:
        cfg, weights, doc = load_estimator(folder, "TunedLens", TunedLensConfig)
        self = cls(cfg.names, steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, batch_tokens=cfg.batch_tokens,
                   seed=cfg.seed)
        self.translators_ = _identity_translators(len(doc["names"]), weights["0.weight"].shape[0])
        self.translators_.load_state_dict(weights)
        self.translators_.requires_grad_(False)
        self.names_, self.training_ = doc["names"], doc["training"]
        return self


def _identity_translators(n: int, d: int) -> nn.ModuleList:
    mods = nn.ModuleList(nn.Linear(d, d) for _ in range(n))
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(torch.eye(d))
            m.bias.zero_()
    return mods


@torch.no_grad()
def _collect(lens, names: list[str], batches: Sequence[dict]) -> tuple[Tensor, Tensor]:
    """Residuals of every layer and the model's final log-probs at every text position (on CPU, float32): the
    positions whose next token the model was trained to predict (image tokens and padding are not)."""
    hidden, target = [], []
    for inputs in batches:
        out, cache = lens.run_with_cache(inputs, names=names, cache_device="cpu", cache_dtype=torch.float32)
        keep = text_positions(lens, inputs)
        hidden.append(torch.stack([cache[n][keep] for n in names]))
        target.append(out.logits.float().cpu()[keep].log_softmax(-1))
    return torch.cat(hidden, dim=1), torch.cat(target)


def text_positions(lens, inputs) -> Tensor:
    """(batch, seq) bool: the text tokens of `inputs` (no padding, special or image tokens)."""
    from ..hooks.tokens import MODALITIES

    return (lens.token_map(inputs).modality == MODALITIES.index("text")).cpu()


def kl_to_final(logits: Float[Tensor, "layers *positions vocab"], keep: Tensor | None = None
                ) -> Float[Tensor, "layers"]:
    """KL(last layer || layer k) per layer, averaged over the positions `keep` selects (default all): how far each
    layer's read-out is from the model's final distribution (the last layer of a lens result is the model's own)."""
    p = logits[-1].float().log_softmax(-1)
    kl = torch.stack([(p.exp() * (p - lg.float().log_softmax(-1))).sum(-1) for lg in logits])
    if keep is None:
        return kl.flatten(1).mean(1)
    keep = keep.to(kl.device).expand_as(kl[0])
    return (kl * keep).flatten(1).sum(1) / keep.sum().clamp(min=1)


def _kl(logits: Tensor, target_logp: Tensor) -> Tensor:
    """KL(model's final distribution || lens distribution), mean over tokens."""
    logp = logits.float().log_softmax(-1)
    return (target_logp.exp() * (target_logp - logp.to(target_logp.device))).sum(-1).mean()


class _FrozenHeads:
    """The unembedding path's parameters take no gradient while translators train (and are left as they were)."""

    def __init__(self, lens):
        self.params = [p for m in lens.adapter.unembed_modules() for p in m.parameters()]

    def __enter__(self):
        self.saved = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)
        return self

    def __exit__(self, *exc):
        for p, r in zip(self.params, self.saved):
            p.requires_grad_(r)
        return False
