"""Linear probes (Alain and Bengio 2016; with control tasks, Hewitt and Liang 2019): what a layer encodes linearly.

    X = probe_features(lens, batches, names="vision.blocks.*.resid_post", positions="cls")   # (layers, n, d)
    probe = LinearProbe().fit(X[:, :800], colours[:800])         # one probe per layer, fit together
    probe.score(X[:, 800:], colours[800:])                        # held-out accuracy per layer
    res = probe_sweep(X, colours, train=800)                      # accuracy, control accuracy, selectivity per layer

`positions` picks which tokens become one sample: "cls" (position 0), "mean" (mean over the sequence), an int, or
a list of position lists, one per sample (e.g. an object's image tokens from `TokenMap.positions_in_mask`, averaged).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from ..io import CONFIG_FILE, WEIGHTS_FILE, atomic_path, atomic_write_text
from .result import Result, provenance

TASKS = ("classification", "regression")


@dataclass
class LinearProbeConfig:
    """Hyperparameters, stored as given; `fit` validates them."""

    task: str = "classification"
    l2: float = 1e-3
    steps: int = 300
    lr: float = 0.05
    seed: int = 0


class LinearProbe:
    """One linear read-out per layer, all layers fit at once on standardised features (batched matmuls):
    classification by softmax regression (full-batch Adam, L2), regression by ridge (closed form).
    Fitted: `weight_` (layers, d, out), `bias_` (layers, out), `mean_`/`std_` (layers, d), `classes_`."""

    def __init__(self, task: str = "classification", *, l2: float = 1e-3, steps: int = 300, lr: float = 0.05,
                 seed: int = 0):
        self.config = LinearProbeConfig(task, l2, steps, lr, seed)

    def fit(self, X: Float[Tensor, "layers n d"], y: Tensor) -> LinearProbe:
        cfg = self.config
        if cfg.task not in TASKS:
            raise ValueError(f"task={cfg.task!r}; allowed: {TASKS}")
        X = _check_X(X)
        y = torch.as_tensor(y)
        if y.shape[0] != X.shape[1]:
            raise ValueError(f"{X.shape[1]} samples in X but {y.shape[0]} labels")
        self.mean_, self.std_ = X.mean(1), X.std(1).clamp(min=1e-6)
        Z = (X - self.mean_[:, None]) / self.std_[:, None]
        if cfg.task == "regression":
            Y = y.float().reshape(len(y), -1)
            Zb = torch.cat([Z, torch.ones(*Z.shape[:2], 1)], dim=-1)  # (layers, n, d + 1)
            reg = cfg.l2 * Z.shape[1] * torch.eye(Zb.shape[-1])
            reg[-1, -1] = 0  # no penalty on the bias
            W = torch.linalg.solve(Zb.transpose(1, 2) @ Zb + reg, Zb.transpose(1, 2) @ Y.expand(len(Z), -1, -1))
            self.weight_, self.bias_, self.classes_ = W[:, :-1], W[:, -1], None
            return self
        self.classes_, target = torch.unique(y, return_inverse=True)
        g = torch.Generator().manual_seed(cfg.seed)
        W = (torch.randn(Z.shape[0], Z.shape[2], len(self.classes_), generator=g) * 0.01).requires_grad_()
        b = torch.zeros(Z.shape[0], len(self.classes_), requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=cfg.lr)
        for _ in range(cfg.steps):
            logits = Z @ W + b[:, None]  # (layers, n, classes)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.repeat(len(Z))) * len(Z) \
                + cfg.l2 * (W ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        self.weight_, self.bias_ = W.detach(), b.detach()
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "weight_"):
            raise RuntimeError("this LinearProbe is not fitted: call fit(X, y) or LinearProbe.load(folder)")

    def decision(self, X: Float[Tensor, "layers n d"]) -> Float[Tensor, "layers n out"]:
        self._check_fitted()
        X = _check_X(X)
        if X.shape[0] != self.weight_.shape[0] or X.shape[2] != self.weight_.shape[1]:
            raise ValueError(f"X has shape {tuple(X.shape)}; this probe was fit on (layers={self.weight_.shape[0]}, n, "
                             f"d={self.weight_.shape[1]})")
        return (X - self.mean_[:, None]) / self.std_[:, None] @ self.weight_ + self.bias_[:, None]

    def predict(self, X: Float[Tensor, "layers n d"]) -> Tensor:
        """Per layer: the predicted class (classification) or value (regression)."""
        out = self.decision(X)
        if self.classes_ is None:
            return out.squeeze(-1) if out.shape[-1] == 1 else out
        return self.classes_[out.argmax(-1)]

    def score(self, X: Float[Tensor, "layers n d"], y: Tensor) -> Float[Tensor, "layers"]:
        """Per layer: accuracy (classification) or R^2 (regression)."""
        y = torch.as_tensor(y)
        pred = self.predict(X)
        if self.classes_ is not None:
            return (pred == y).float().mean(-1)
        y = y.float().reshape(pred.shape[1:])
        ss_res = ((pred - y) ** 2).reshape(len(pred), -1).sum(-1)
        ss_tot = ((y - y.mean(0)) ** 2).sum()
        return 1 - ss_res / ss_tot.clamp(min=1e-12)

    def save(self, folder: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        self._check_fitted()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"weight_": self.weight_, "bias_": self.bias_, "mean_": self.mean_, "std_": self.std_}
        if self.classes_ is not None:
            tensors["classes_"] = self.classes_
        with atomic_path(folder / WEIGHTS_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        atomic_write_text(folder / CONFIG_FILE, json.dumps({"estimator": "LinearProbe",
                                                            "config": dataclasses.asdict(self.config)}))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LinearProbe:
        from safetensors.torch import load_file

        folder = Path(folder)
        doc = json.loads((folder / CONFIG_FILE).read_text())
        if doc.get("estimator") != "LinearProbe":
            raise ValueError(f"{folder / CONFIG_FILE} holds a {doc.get('estimator')!r}, not a LinearProbe")
        self = cls(**doc["config"])
        t = load_file(str(folder / WEIGHTS_FILE))
        self.weight_, self.bias_, self.mean_, self.std_ = t["weight_"], t["bias_"], t["mean_"], t["std_"]
        self.classes_ = t.get("classes_")
        return self


def _check_X(X) -> Tensor:
    X = torch.as_tensor(X).float()
    if X.dim() == 2:
        X = X[None]
    if X.dim() != 3:
        raise ValueError(f"X must be (layers, n, d) (or (n, d) for one layer); got shape {tuple(X.shape)}")
    return X


@torch.no_grad()
def probe_features(lens, batches: Sequence[dict], *, names: str | Sequence[str],
                   positions: str | int | Sequence[Sequence[Sequence[int]]] = "cls") -> Float[Tensor, "layers n d"]:
    """One feature vector per sample from each of `names`, over `batches` (processor outputs), on CPU.

    `positions`: "cls" (position 0; one sample per batch row), "mean" (mean over positions), an int, or, per batch,
    a list (one entry per sample) of position lists in that batch's rows: `[[(row, [p, ...]), ...], ...]`, each
    sample the mean of its positions (objects' image tokens -> one sample per object).
    """
    resolved = lens.resolve(names)
    feats = []
    for bi, inputs in enumerate(batches):
        _, cache = lens.run_with_cache(inputs, names=resolved, cache_device="cpu", cache_dtype=torch.float32)
        stack = torch.stack([cache[n] for n in resolved])  # (layers, batch, seq, d)
        if stack.dim() != 4:
            raise ValueError(f"probe_features reads (batch, seq, d) values; {resolved[0]} gives {tuple(stack.shape[1:])}")
        if positions == "cls":
            feats.append(stack[:, :, 0])
        elif positions == "mean":
            feats.append(stack.mean(2))
        elif isinstance(positions, int):
            feats.append(stack[:, :, positions])
        elif isinstance(positions, str):
            raise ValueError(f"positions={positions!r}; allowed: 'cls', 'mean', an int, or per-sample position lists")
        else:
            samples = positions[bi]
            feats.append(torch.stack([stack[:, row, torch.as_tensor(pos)].mean(1) for row, pos in samples], dim=1))
    return torch.cat(feats, dim=1)


@dataclass(repr=False)
class ProbeSweepResult(Result):
    """Held-out `score` per layer (accuracy or R^2), the same probe on shuffled labels (`control`, Hewitt and
    Liang's control task adapted to images: labels carry no information, so what the probe reaches there is
    memorisation), and `selectivity = score - control`."""

    names: list[str]
    task: str
    score: Tensor
    control: Tensor

    @property
    def selectivity(self) -> Tensor:
        return self.score - self.control

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * len(self.names)), 2.4))
        x = range(len(self.names))
        ax.plot(x, self.score.numpy(), marker="o", label="held-out")
        ax.plot(x, self.control.numpy(), marker="x", label="control (shuffled labels)")
        ax.set_xticks(list(x), [n.rsplit(".", 1)[0] for n in self.names], fontsize=6, rotation=60)
        ax.set_ylabel("accuracy" if self.task == "classification" else "R^2", fontsize=8)
        ax.legend(fontsize=7)
        return fig


def probe_sweep(X: Float[Tensor, "layers n d"], y: Tensor, *, train: int | float = 0.75, names: Sequence[str] = (),
                task: str = "classification", lens=None, seed: int = 0, **probe_kw) -> ProbeSweepResult:
    """Fit a probe per layer on the first `train` samples (a count or a fraction), score on the rest, and the
    same with labels shuffled (control)."""
    X = _check_X(X)
    n = X.shape[1]
    k = int(train * n) if isinstance(train, float) else int(train)
    if not 0 < k < n:
        raise ValueError(f"train={train} leaves no training or no held-out samples of {n}")
    y = torch.as_tensor(y)
    probe = LinearProbe(task, seed=seed, **probe_kw).fit(X[:, :k], y[:k])
    shuffled = y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    control = LinearProbe(task, seed=seed, **probe_kw).fit(X[:, :k], shuffled[:k])
    names = list(names) or [f"layer {i}" for i in range(X.shape[0])]
    meta = provenance(lens, names) if lens is not None else {"names": names}
    return ProbeSweepResult(meta=meta, names=names, task=task, score=probe.score(X[:, k:], y[k:]),
                            control=control.score(X[:, k:], shuffled[k:]))
