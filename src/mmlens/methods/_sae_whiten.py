"""Training an SAE on whitened activations (`SAEConfig(normalize="whiten")`), folded back into plain weights.

Why: a residual stream is strongly anisotropic (the clip organism's block 2: the top covariance eigenvalue is ~3,000
times the median), so the reconstruction loss spends the dictionary on a few high-variance directions and leaves
concepts in low-variance ones without a feature of their own. Training on whitened inputs, z = (x - mean) @ M with
M = E diag(lambda + eps)^(-1/2) from the covariance's eigendecomposition, weighs every direction alike (Saraswatula
& Klindt 2025, arXiv 2511.13981; SAELens's `covariance_whitening`). Measured on the clip organism (TopK, d_sae 512,
k 8, three seeds, `benchmarks/scores/sae.py`): the worst colour's best-feature AUROC per seed rises from 0.78-0.88 to
0.87-0.96, and the median over seeds reaches 0.95 for all six colours (four before).

Both maps are affine, so after the fit they are folded into the weights (as SAELens does) and the SAE is a plain one
on raw activations, with identical codes: W_enc <- M W_enc, W_dec <- W_dec M^-1, b_dec <- b_dec M^-1 + mean
(our encoder subtracts b_dec from its input, so the mean is taken out there). Its decoder rows are then not unit
norm. The statistics ride along with the fitting counters (saved with the SAE as `stats.whitening.*`, in
checkpoints too), so a later `fit` unfolds the weights with them (the exact inverse) and goes on in the same
coordinates. A trained SAE without them (read from SAELens, or fitted with another `normalize`) gets statistics
estimated, its weights moved into those coordinates and its decoder rows made unit norm, as training needs: the same
function for ReLU and JumpReLU, not exactly for TopK, whose selection compares the rescaled pre-activations.

`eps` is relative: `cfg.whiten_eps` times the mean eigenvalue is added to every eigenvalue, so one value suits every
site's scale (SAELens adds an absolute 1e-3). Measured: on the clip organism 0.1 and 0.01 are within seed noise
of each other (worst colour's median over seeds 0.946 and 0.955; raw EV 0.938 and 0.923; 0.001 was worse in a
scratch run, 0.90-0.97 for the worst colour per seed); on synthetic atoms whose second half
lives in a subspace of 1/400 the variance, the low-variance atoms' detection AUROC is 0.73 at 0.1, 0.93 at 0.01 and
0.96 at 0.001 (0.59 without whitening): the mean eigenvalue follows the large ones, so 0.1 floors too much of a
steep spectrum. Default 0.01. The whitened inputs are then scaled so their root-mean-square norm is sqrt(d_in) (as
`expected_norm` does for the mean norm), folded into M.

What it costs: the raw-space decoder rows W_dec M^-1 amplify any small error a row has along a low-whitened (high
variance) direction, so they are noisier as directions in the raw space than a plain SAE's (on the synthetic atoms
above, the low-variance atoms' decoder rows reach cosine 0.5 with their atoms either way; with a dense
high-variance nuisance added, raw-space cosine drops from 0.93 to 0.54 while the whitened-space one is 0.95).
Use it for finding features (the encoder side), and check steering directions on raw-space fits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class Whitening(nn.Module):
    """mean (d_in,), matrix M and its inverse (d_in, d_in), float64; z = (x - mean) @ M."""

    def __init__(self, d_in: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d_in, dtype=torch.float64))
        self.register_buffer("matrix", torch.eye(d_in, dtype=torch.float64))
        self.register_buffer("inverse", torch.eye(d_in, dtype=torch.float64))
        self.register_buffer("tokens", torch.zeros((), dtype=torch.float64))  # estimated from; 0 = not yet

    @property
    def estimated(self) -> bool:
        return float(self.tokens) > 0

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype)

    @torch.no_grad()
    def estimate(self, batches: list[Tensor], eps: float, reduce=None) -> Whitening:
        """Mean and covariance of `batches` (summed over ranks by `reduce`, an in-place all-reduce), then M."""
        d = self.mean.numel()
        dev = self.mean.device
        n = torch.zeros((), dtype=torch.float64, device=dev)
        s = torch.zeros(d, dtype=torch.float64, device=dev)
        ss = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for x in batches:
            x = x.to(dev, torch.float64)
            n += x.shape[0]
            s += x.sum(0)
            ss += x.T @ x
        flat = torch.cat([n[None], s, ss.reshape(-1)])
        if reduce is not None:
            reduce(flat)
        n, s, ss = flat[0], flat[1:d + 1], flat[d + 1:].reshape(d, d)
        if float(n) < 2:
            raise ValueError("SAE.fit: whitening needs at least 2 tokens")
        mean = s / n
        cov = (ss - n * torch.outer(mean, mean)) / (n - 1)
        lam, vec = torch.linalg.eigh(cov)
        raw = lam.clamp_min(0)
        lam = raw + eps * raw.mean().clamp_min(1e-30)
        scale = math.sqrt(d / max(float((raw / lam).sum()), 1e-12))  # E||z||^2 = sum(raw / lam) before scaling
        self.mean.copy_(mean)
        self.matrix.copy_(vec * (lam.rsqrt() * scale))
        self.inverse.copy_((lam.sqrt() / scale)[:, None] * vec.T)
        self.tokens.fill_(float(n))
        return self


def fold(sae, w: Whitening) -> None:
    """Whitened-coordinate weights -> raw-coordinate weights computing the same function."""
    _change(sae, w.matrix, w.inverse, before=None, after=w.mean)


def unfold(sae, w: Whitening) -> None:
    """The inverse of `fold`: raw-coordinate weights -> whitened ones computing the same function."""
    _change(sae, w.inverse, w.matrix, before=-w.mean, after=None)


@torch.no_grad()
def _change(sae, enc: Tensor, dec: Tensor, before: Tensor | None, after: Tensor | None) -> None:
    """W_enc <- enc W_enc, W_dec <- W_dec dec, b_dec <- (b_dec + before) dec + after, in float64."""
    dev, dt = sae.W_enc.device, sae.W_enc.dtype
    enc, dec = enc.to(dev), dec.to(dev)
    b = sae.b_dec.double() + (before.to(dev) if before is not None else 0)
    b = b @ dec + (after.to(dev) if after is not None else 0)
    sae.W_enc.copy_((enc @ sae.W_enc.double()).to(dt))
    sae.W_dec.copy_((sae.W_dec.double() @ dec).to(dt))
    sae.b_dec.copy_(b.to(dt))
