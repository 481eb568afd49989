"""Metrics for causal techniques: `metric(output) -> Tensor (batch,)`, one number per example.

    m = metrics.logit_diff(answer_ids, wrong_ids)          # logit[answer] - logit[wrong] at the last position
    res = methods.patch(lens, clean, corrupt, names, metric=m)
    res.recovery()                                          # (patched - corrupt) / (clean - corrupt)

Each metric reads the model's output: `output.logits` (batch, seq, vocab) of a generative VLM at `position`, or
`output.logits_per_image` (images, texts) of a contrastive model. A metric that says which position it reads (the
`position` attribute, an int) lets the patch engine unembed that position only, which at a 32k vocabulary and long
sequences is most of the memory a patch sweep would otherwise need. Any callable works as a metric; these are the
common ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

Targets = int | Sequence[int] | Tensor


def output_logits(output, position: int = -1) -> Float[Tensor, "batch classes"]:
    """The scores a metric compares: a VLM's next-token logits at `position`, or a contrastive model's image-text
    logits (one row per image)."""
    lpi = getattr(output, "logits_per_image", None)
    if lpi is not None:
        return lpi.float()
    logits = output["logits"] if isinstance(output, dict) else getattr(output, "logits", None)
    if logits is None:
        raise TypeError(f"the metric reads `logits` or `logits_per_image`; {type(output).__name__} has neither "
                        "(write your own metric(output) -> Tensor (batch,))")
    return (logits[:, position] if logits.dim() == 3 else logits).float()


def _ids(targets: Targets, n: int, device) -> Tensor:
    t = torch.as_tensor(targets, device=device).long().reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{t.numel()} target ids for {n} examples; give one id, or one per example")
    return t


class _Metric:
    position: int = -1

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r:.40}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class LogitDiff(_Metric):
    """logit[target] - logit[other] (per example); `other=None`: minus the mean logit (over the vocabulary or
    the texts)."""

    def __init__(self, target: Targets, other: Targets | None = None, *, position: int = -1):
        self.target, self.other, self.position = target, other, int(position)

    def __call__(self, output) -> Float[Tensor, "batch"]:
        lg = output_logits(output, self.position)
        rows = torch.arange(len(lg), device=lg.device)
        t = lg[rows, _ids(self.target, len(lg), lg.device)]
        if self.other is None:
            return t - lg.mean(-1)
        return t - lg[rows, _ids(self.other, len(lg), lg.device)]


class Prob(_Metric):
    """Softmax probability (or its log, `log=True`) of `target` at `position`."""

    def __init__(self, target: Targets, *, position: int = -1, log: bool = False):
        self.target, self.position, self.log = target, int(position), bool(log)

    def __call__(self, output) -> Float[Tensor, "batch"]:
        lg = output_logits(output, self.position)
        lp = lg.log_softmax(-1)[torch.arange(len(lg), device=lg.device), _ids(self.target, len(lg), lg.device)]
        return lp if self.log else lp.exp()


class KL(_Metric):
    """KL(reference || output) of the next-token (or image-text) distributions; `reference`: logits (batch, classes)
    at the same position, e.g. the clean run's. Lower = closer to the reference."""

    def __init__(self, reference: Tensor, *, position: int = -1):
        self.reference, self.position = reference.detach().float(), int(position)

    def __call__(self, output) -> Float[Tensor, "batch"]:
        lg = output_logits(output, self.position)
        ref = self.reference.to(lg.device).log_softmax(-1)
        if ref.shape != lg.shape:
            raise ValueError(f"KL reference has shape {tuple(ref.shape)}; the output's logits {tuple(lg.shape)}")
        return (ref.exp() * (ref - lg.log_softmax(-1))).sum(-1)


def logit_diff(target: Targets, other: Targets | None = None, *, position: int = -1) -> LogitDiff:
    return LogitDiff(target, other, position=position)


def prob(target: Targets, *, position: int = -1, log: bool = False) -> Prob:
    return Prob(target, position=position, log=log)


def kl(reference: Tensor, *, position: int = -1) -> KL:
    return KL(reference, position=position)


def recovery(value: Tensor, clean: Tensor, corrupt: Tensor, eps: float = 1e-9) -> Tensor:
    """Normalised recovery (patched - corrupt) / (clean - corrupt): 1 = the clean behaviour restored, 0 = none.
    Examples whose clean and corrupt values coincide (|difference| <= eps) give NaN rather than a huge ratio."""
    gap = clean - corrupt
    return torch.where(gap.abs() > eps, (value - corrupt) / gap.where(gap.abs() > eps, torch.ones_like(gap)),
                       torch.full_like(gap, float("nan")))
