"""Linear probes (Alain and Bengio 2016; with control tasks, Hewitt and Liang 2019): what a layer encodes linearly.

    X = probe_features(lens, batches, names="vision.blocks.*.resid_post", positions="cls")   # (layers, n, d)
    probe = LinearProbe().fit(X[:, :800], colours[:800])         # one probe per layer, fit together
    probe.score(X[:, 800:], colours[800:])                        # held-out accuracy per layer
    res = probe_sweep(X, colours, train=800)                      # accuracy, control accuracy, selectivity per layer
    res = probe_sweep(X, colours, train=800, control="types", types=shapes)   # Hewitt-Liang control task

Two control tasks. "shuffle" (the default): the labels permuted across samples, so they carry no information and
the control sits at chance for a probe that cannot memorise across the split; it guards against leakage and
degenerate features. "types" (Hewitt and Liang 2019): every type (one id per sample: the token id, the patch cell,
the object's shape, ...) gets one random label drawn once from the labels' empirical distribution, the same for all
its samples; a probe that memorises types scores well on it, so `selectivity = score - control` is what the
representation lets the probe read beyond type identity. `control_task_labels` makes those labels.

`positions` picks which tokens become one sample: "cls" (position 0), "mean" (mean over the sequence), an int, or
a list of position lists, one per sample (e.g. an object's image tokens from `TokenMap.positions_in_mask`, averaged).

Diffusion models, one sample per pixel (Chen et al. 2023: UNet activations linearly encode the foreground):

    feats = diffusion_probe_features(lens, prompts, names=["unet.mid.out", "unet.up.1.out"], steps=[2, 10, 18],
                                     num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    res = pixel_probe(feats, masks, train=2 / 3)        # masks (n_images, H, W) of feats.images; Dice per block x step
    res.best                                            # the cell best on validation images, its Dice on test images
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from ._estimator import load_estimator, save_estimator
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
        if not (isinstance(cfg.steps, int) and cfg.steps >= 1 and cfg.l2 >= 0 and cfg.lr > 0):
            raise ValueError(f"LinearProbe: steps must be a positive int, l2 >= 0 and lr > 0; got {cfg}")
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
        self._check_fitted()
        tensors = {"weight_": self.weight_, "bias_": self.bias_, "mean_": self.mean_, "std_": self.std_}
        if self.classes_ is not None:
            tensors["classes_"] = self.classes_
        return save_estimator(folder, "LinearProbe", self.config, tensors)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> LinearProbe:
        cfg, t, _ = load_estimator(folder, "LinearProbe", LinearProbeConfig)
        self = cls(**dataclasses.asdict(cfg))
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
        elif positions == "mean":  # over real tokens: padding would make a sample depend on its batch
            mask = inputs.get("attention_mask")
            if mask is not None and mask.shape[-1] == stack.shape[2]:
                w = mask.to(stack.dtype).cpu()[None, :, :, None]
                feats.append((stack * w).sum(2) / w.sum(2).clamp(min=1))
            else:
                feats.append(stack.mean(2))
        elif isinstance(positions, int):
            feats.append(stack[:, :, positions])
        elif isinstance(positions, str):
            raise ValueError(f"positions={positions!r}; allowed: 'cls', 'mean', an int, or per-sample position lists")
        else:
            samples = positions[bi]
            feats.append(torch.stack([stack[:, row, torch.as_tensor(pos)].mean(1) for row, pos in samples], dim=1))
    return torch.cat(feats, dim=1)


CONTROLS = ("shuffle", "types")
_CONTROL_LEGEND = {"shuffle": "control (shuffled labels)", "types": "control (Hewitt-Liang: a random label per type)"}


@dataclass(repr=False)
class ProbeSweepResult(Result):
    """Held-out `score` per layer (accuracy or R^2), `control`: the same probe fit and scored on a control task's
    labels, and `selectivity = score - control`. `control_task` says which control:

    - "shuffle": the labels permuted across samples. They carry no information, so the control sits at chance for a
      probe that cannot memorise across the split; it guards against leakage and degenerate features, not against a
      probe that memorises.
    - "types": Hewitt and Liang's (2019) control task. Every type (`probe_sweep(types=...)`) gets one random label
      drawn from the labels' empirical distribution, the same for all its samples. A probe that reads the type can
      reach it by memorising, so a high control means the probe is expressive enough to fit arbitrary type-level
      labels and `selectivity` is what the representation encodes beyond type identity.
    """

    names: list[str]
    task: str
    score: Tensor
    control: Tensor
    control_task: str = "shuffle"

    @property
    def selectivity(self) -> Tensor:
        return self.score - self.control

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(max(3.0, 0.5 * len(self.names)), 2.4))
        x = range(len(self.names))
        ax.plot(x, self.score.numpy(), marker="o", label="held-out")
        ax.plot(x, self.control.numpy(), marker="x",
                label=_CONTROL_LEGEND.get(self.control_task, f"control ({self.control_task})"))
        ax.set_xticks(list(x), [n.rsplit(".", 1)[0] for n in self.names], fontsize=6, rotation=60)
        ax.set_ylabel("accuracy" if self.task == "classification" else "R^2", fontsize=8)
        ax.legend(fontsize=7)
        return fig


def _type_index(types, n: int) -> Tensor:
    """One int per sample: the index of its type in order of first appearance. Types are any hashable ids (ints,
    strings, tuples); a tensor or array gives one type per row (rows of several values become tuples)."""
    if types is None:
        raise ValueError("control='types' needs types=: one type id per sample (e.g. the token id, the patch cell, "
                         "the object's shape), hashable (int, str, tuple)")
    if isinstance(types, (Tensor, np.ndarray)):
        types = types.tolist()
    if isinstance(types, (str, bytes)) or not hasattr(types, "__len__"):
        raise ValueError(f"types must be a sequence of one hashable type id per sample; got {type(types).__name__}")
    if len(types) != n:
        raise ValueError(f"types has {len(types)} entries but there are {n} samples; types needs one type id per "
                         "sample")
    index: dict = {}
    out = []
    for t in types:
        t = tuple(t) if isinstance(t, list) else t
        try:
            out.append(index.setdefault(t, len(index)))
        except TypeError:
            raise ValueError(f"types must be hashable ids (int, str, tuple); got {type(t).__name__}") from None
    return torch.tensor(out, dtype=torch.long)


def control_task_labels(y: Tensor, types, *, seed: int = 0) -> Tensor:
    """Hewitt and Liang's (2019) control task: every distinct type gets one label drawn once (seeded) from the
    empirical distribution of `y` (a uniformly random sample's label: a class for classification, a value for
    regression), and every sample of that type gets it. `types`: one hashable id per sample."""
    y = torch.as_tensor(y)
    t = _type_index(types, len(y))
    n_types = int(t.max()) + 1 if len(t) else 0
    draw = torch.randint(len(y), (n_types,), generator=torch.Generator().manual_seed(seed))
    return y[draw][t]


def probe_sweep(X: Float[Tensor, "layers n d"], y: Tensor, *, train: int | float = 0.75, names: Sequence[str] = (),
                task: str = "classification", control: str = "shuffle", types=None, lens=None, seed: int = 0,
                **probe_kw) -> ProbeSweepResult:
    """Fit a probe per layer on the first `train` samples (a count or a fraction), score on the rest, and the
    same on a control task's labels.

    `control`: "shuffle" (the labels permuted across samples: chance level) or "types" (Hewitt and Liang 2019: a
    random label per type, drawn once from the empirical labels, see `control_task_labels`), which needs `types`,
    one hashable id per sample (the token id, the patch cell, the object's shape, ...)."""
    if control not in CONTROLS:
        raise ValueError(f"control={control!r}; allowed: {CONTROLS}")
    if control == "shuffle" and types is not None:
        raise ValueError("types= is read only by control='types' (the Hewitt-Liang control task); with "
                         "control='shuffle' it would be ignored")
    X = _check_X(X)
    n = X.shape[1]
    k = int(train * n) if isinstance(train, float) else int(train)
    if not 0 < k < n:
        raise ValueError(f"train={train} leaves no training or no held-out samples of {n}")
    y = torch.as_tensor(y)
    if y.shape[0] != n:
        raise ValueError(f"{n} samples in X but {y.shape[0]} labels")
    if control == "types":
        y_control = control_task_labels(y, types, seed=seed)
    else:
        y_control = y[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
    probe = LinearProbe(task, seed=seed, **probe_kw).fit(X[:, :k], y[:k])
    ctrl = LinearProbe(task, seed=seed, **probe_kw).fit(X[:, :k], y_control[:k])
    names = list(names) or [f"layer {i}" for i in range(X.shape[0])]
    meta = provenance(lens, names) if lens is not None else {"names": names}
    return ProbeSweepResult(meta=meta, names=names, task=task, score=probe.score(X[:, k:], y[k:]),
                            control=ctrl.score(X[:, k:], y_control[k:]), control_task=control)


# ------------------------------------------------------------------------------------------ per-pixel probes
# Chen et al. 2023 ("Beyond surface statistics"): a diffusion model's intermediate activations linearly encode the
# foreground of the image it is about to draw, already at early denoising steps. Every pixel is one sample.


@dataclass
class PixelFeatures:
    """What `diffusion_probe_features` gives: per (block, step) one row per pixel of the generated images.

    `features[(name, step)]`: (n_images * H * W, C), rows image-major then row then column, so
    `masks.reshape(-1)` of (n_images, H, W) masks are the matching labels. `images`: the decoded samples,
    (n_images, H_img, W_img, 3) floats in [0, 1]. `size`: (H, W) of the pixel grid.
    """

    names: list[str]
    steps: list[int]
    timesteps: list[float]
    size: tuple[int, int]
    features: dict[tuple[str, int], Tensor]
    images: np.ndarray

    def block(self, name: str) -> Float[Tensor, "steps pixels C"]:
        """One block's features at every recorded step, stacked: one LinearProbe fits all steps at once."""
        return torch.stack([self.features[(name, t)] for t in self.steps])


@torch.no_grad()
def diffusion_probe_features(lens, prompts: str | Sequence[str], *, names: str | Sequence[str],
                             steps: Sequence[int], size: int | tuple[int, int] | None = None,
                             **generate_kwargs) -> PixelFeatures:
    """Generate `prompts`, recording `names` (UNet feature maps, (batch, C, h, w)) at denoising `steps` on the
    conditional branch, and turn every map into one C-vector per pixel of the decoded image.

    The maps are upsampled to `size` (default: the decoded image's resolution) bilinearly rather than the masks
    downsampled to each map's h x w: every block is then scored against the same full-resolution labels, so Dice is
    comparable across blocks, and bilinear interpolation is a fixed convex combination of neighbouring cells, so a
    linear probe on upsampled features equals the upsampled read-out of the block's own cells (nothing is added).
    `steps`: 0-based denoising step indices, negatives from the end. `generate_kwargs` go to `lens.generate`
    (num_inference_steps, guidance_scale, generator, height, width, ...).
    """
    if lens.family != "diffusion":
        raise TypeError(f"diffusion_probe_features reads denoiser feature maps; {lens.architecture} is a "
                        f"{lens.family} model")
    if generate_kwargs.setdefault("output_type", "np") != "np":
        raise ValueError(f"output_type={generate_kwargs['output_type']!r}: diffusion_probe_features returns the "
                         "images as arrays, so it needs output_type='np'")
    generate_kwargs.setdefault("progress", False)
    steps = [int(t) for t in steps]
    resolved = lens.resolve(names)
    out, cache = lens.generate(prompts, names=resolved, record_steps=steps, cache_device="cpu",
                               cache_dtype=torch.float32, **generate_kwargs)
    images = np.asarray(out.images)
    ran = getattr(getattr(lens.model, "scheduler", None), "timesteps", None)
    n_run = 0 if ran is None else len(ran)
    steps = [t + n_run if t < 0 and n_run else t for t in steps]  # negatives count from the end, as in generate
    hw = tuple(images.shape[1:3]) if size is None else ((size, size) if isinstance(size, int) else tuple(size))
    missing = [t for t in steps if t not in cache.steps]
    if missing:
        raise ValueError(f"steps {missing} were not recorded; the pipeline ran steps {cache.steps}")
    feats = {}
    for name in resolved:
        for t in steps:
            fmap = cache.get(name, step=t, branch="cond")
            if fmap.dim() != 4:
                raise ValueError(f"diffusion_probe_features reads (batch, C, h, w) feature maps; {name} gives "
                                 f"{tuple(fmap.shape)}")
            up = torch.nn.functional.interpolate(fmap.float(), size=hw, mode="bilinear", align_corners=False)
            feats[(name, t)] = up.permute(0, 2, 3, 1).reshape(-1, up.shape[1]).contiguous()
    ts = cache.timesteps
    return PixelFeatures(names=list(resolved), steps=steps, timesteps=[float(ts[t]) for t in steps], size=hw,
                         features=feats, images=images)


def dice(pred: Bool[Tensor, "... pixels"], mask: Bool[Tensor, "pixels"]) -> Float[Tensor, "..."]:
    """2 |pred & mask| / (|pred| + |mask|), pooled over all pixels given (1 when both are empty)."""
    pred, mask = pred.bool(), mask.bool()
    inter = (pred & mask).sum(-1).float()
    total = (pred.sum(-1) + mask.sum(-1)).float()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))


@dataclass(repr=False)
class PixelProbeResult(Result):
    """Dice of a per-pixel linear probe of the object mask, per block (rows) and denoising step (columns), on held-out
    images split in two: `dice_val` on the validation images (to choose a cell: `best`) and `dice` on the test
    images (to report), so the reported Dice of the chosen cell is not picked on the images it is measured on.
    `control`: the same probe fit on masks shuffled across the training images (what location and size priors alone
    reach), scored against the true masks of the test images."""

    names: list[str]
    steps: list[int]
    timesteps: list[float]
    n_train: int
    n_val: int
    n_test: int
    dice: Tensor
    dice_val: Tensor
    control: Tensor

    @property
    def best(self) -> tuple[str, int, float]:
        """(block, step, test Dice) of the cell with the highest validation Dice (`dice_val`)."""
        k = int(self.dice_val.argmax())
        b, s = divmod(k, len(self.steps))
        return self.names[b], self.steps[s], float(self.dice[b, s])

    def plot(self):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(self.steps), 0.9 + 0.4 * len(self.names)))
        im = ax.imshow(self.dice.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for b in range(len(self.names)):
            for s in range(len(self.steps)):
                v = float(self.dice[b, s])
                ax.text(s, b, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w" if v < 0.6 else "k")
        ax.set_xticks(range(len(self.steps)), [f"step {s}\nt={t:.0f}" for s, t in zip(self.steps, self.timesteps)],
                      fontsize=7)
        ax.set_yticks(range(len(self.names)), self.names, fontsize=7)
        name, step, _ = self.best
        ax.add_patch(plt.Rectangle((self.steps.index(step) - 0.5, self.names.index(name) - 0.5), 1, 1, fill=False,
                                   edgecolor="r", linewidth=1.5))
        ax.set_title(f"test Dice of the object-mask probe ({self.n_test} images; red: best on validation)",
                     fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05)
        return fig


def pixel_probe(feats: PixelFeatures, masks: Bool[Tensor, "n h w"], *, train: int | float = 2 / 3,
                val: int | float = 0.5, train_stride: int = 1, lens=None, seed: int = 0,
                **probe_kw) -> PixelProbeResult:
    """Fit a logistic per-pixel probe of `masks` per block (all steps at once) on the first `train` images (a count
    or a fraction), and score Dice on all pixels of the rest, split in order into validation images (the first `val`
    of them: a count, or a fraction of the held-out images, at least 1) and test images (the rest, at least 1).
    `dice_val` chooses the best cell, `dice` reports it; the control fits on masks shuffled across training images.

    `train_stride` > 1 fits on every stride-th pixel row and column of the training images only: upsampled
    neighbours are near-duplicates (an 8x8 map holds 64 distinct cells), so this cuts the fit's cost by stride^2 at
    little loss; held-out Dice always counts every pixel."""
    masks = torch.as_tensor(np.asarray(masks)).bool()
    n = len(feats.images)
    if tuple(masks.shape) != (n, *feats.size):
        raise ValueError(f"masks have shape {tuple(masks.shape)}; expected (images={n}, {feats.size[0]}, "
                         f"{feats.size[1]}), the features' pixel grid")
    k = int(train * n) if isinstance(train, float) else int(train)
    if not 0 < k < n:
        raise ValueError(f"train={train} leaves no training or no held-out images of {n}")
    held = n - k
    if isinstance(val, float):
        if not 0 < val < 1:
            raise ValueError(f"val={val}: a fraction of the held-out images must lie strictly between 0 and 1")
        n_val = min(max(1, round(val * held)), held - 1)
    else:
        n_val = int(val)
    if not 0 < n_val < held:
        raise ValueError(f"val={val} leaves no validation or no test images of the {held} held-out images "
                         f"(train={train} of {n}); validation and test need at least 1 image each")
    px = feats.size[0] * feats.size[1]
    y = masks.reshape(-1).long()
    st = int(train_stride)
    if st < 1:
        raise ValueError(f"train_stride={train_stride}; it must be a positive int")
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    perm = perm.roll(1)[perm.argsort()]  # a derangement: no training image keeps its own mask
    y_fit = masks[:k, ::st, ::st].reshape(-1).long()
    shuffled = masks[:k][perm][:, ::st, ::st].reshape(-1).long()
    if len(y_fit.unique()) < 2:
        raise ValueError("the training masks are all one class: nothing to probe")
    va, te = slice(k * px, (k + n_val) * px), slice((k + n_val) * px, None)
    scores, scores_val, controls = [], [], []
    for name in feats.names:
        X = feats.block(name)
        X_fit = X[:, : k * px].reshape(len(X), k, *feats.size, -1)[:, :, ::st, ::st].reshape(len(X), len(y_fit), -1)
        probe = LinearProbe(seed=seed, **probe_kw).fit(X_fit, y_fit)
        scores_val.append(dice(probe.predict(X[:, va]) == 1, y[va] == 1))
        scores.append(dice(probe.predict(X[:, te]) == 1, y[te] == 1))
        ctrl = LinearProbe(seed=seed, **probe_kw).fit(X_fit, shuffled)
        controls.append(dice(ctrl.predict(X[:, te]) == 1, y[te] == 1))
    meta = provenance(lens, feats.names) if lens is not None else {"names": list(feats.names)}
    return PixelProbeResult(meta=meta, names=list(feats.names), steps=list(feats.steps),
                            timesteps=list(feats.timesteps), n_train=k, n_val=n_val, n_test=held - n_val,
                            dice=torch.stack(scores), dice_val=torch.stack(scores_val), control=torch.stack(controls))
