"""Steering and task vectors: add, scale, project out or replace a direction in the activations at chosen hook
points, positions and (diffusion) denoising steps and guidance branches.

Activation addition (Turner et al. 2023) adds a direction built from a contrast of prompts; in-context function /
task vectors (Hendel et al. 2023; Todd et al. 2024) are the mean activation of in-context prompts at their last
position, patched into a zero-shot run; projecting a direction out (Ravfogel et al. 2020, the simple rank-one form
of LEACE) erases what a layer says along it. In VLMs the same edits steer an answer from the image tokens or the
answer position (Li et al. 2024), and in diffusion models the cross-attention keys/values carry the prompt.

    v = SteeringVector.mean_difference(vlm, red_inputs, blue_inputs, names="lm.blocks.2.resid_post")  # last position
    out = steer(vlm, inputs, v, alpha=4.0, positions=-1)             # one forward, the edit at the answer position
    with steering(vlm, v, alpha=4.0, positions=-1):                  # hooks for the block only (removed on error)
        vlm.model.generate(**vlm.prepare(inputs), max_new_tokens=3)
    erased = steer(clip, inputs, colour, mode="project_out")         # x - (x . u) u: nothing left along u
    sweep = steering_sweep(vlm, inputs, v, alphas=[0, 1, 2, 4], metric=p_red)   # dose-response per name

Modes, with u = v / |v| and the edit applied at the chosen positions only:
    "add"          x + alpha * v
    "scale"        x + (alpha - 1) (x . u) u      (alpha = 1 is the identity, 0 projects out, -1 reflects)
    "project_out"  x - (x . u) u                   (alpha ignored)
    "replace"      v                               (alpha ignored; task vectors patched into a zero-shot run)

The width of a site's activation is its last dimension, or `heads * d_head` for head-split values (`attn.q/k/v/z`:
a direction of shape (heads, d_head) or (heads * d_head,) both fit), or the channels of a diffusion feature map
(batch, C, h, w), which is steered per pixel (positions then index the h * w cells in raster order). Pooled
values without a sequence axis (batch, d) are steered row by row; they take no positions.

Diffusion: `steps` restricts the edit to those denoising step indices (text-encoder sites always fire: the text is
encoded once, before the first step), `branches=("cond",)` to the conditional half of a classifier-free-guidance
batch. A text-encoder site cannot be told apart by branch (the pipeline encodes the prompt, then the negative
prompt, in separate calls; both are edited), which is one reason to steer the cross-attention keys and values
instead. The recipe, a colour swap through the keys/values of the colour word:

    kv = sd.hook_points("unet.*.cross.[kv]")
    red = SteeringVector.mean_difference(sd, ["a red square"], ["a blue square"], names=kv, positions=2,
                                         num_inference_steps=1)   # k and v depend only on the text, not the step
    with steering(sd, red, positions=2, steps=range(0, 10), branches=("cond",)):
        out, _ = sd.generate("a blue square", num_inference_steps=20, names=[])

`positions=2` is the colour word's token (`<s> a red square </s>`, BOS first). Keys and values are linear in the
text encoder's output, so adding the difference makes that token's k and v exactly the red prompt's (its later
tokens still read "blue" through the causal text encoder); `steps` chooses how much of the trajectory sees it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._estimator import load_estimator, save_estimator
from .result import Result, provenance

MODES = ("add", "scale", "project_out", "replace")
BRANCHES = ("uncond", "cond")
READ_POSITIONS = ("last", "mean")
_UNNAMED = "direction"  # the tensor key of a direction bound to no hook point
_TEXT_TOWERS = ("lm.", "text.")  # sequences the attention_mask describes


# ------------------------------------------------------------------------------------------------ the vector
@dataclass
class SteeringVectorConfig:
    """What a SteeringVector was built from, stored with it. `names`: the hook points of its directions, in order
    ([] for one direction bound to none); `source`: "mean_difference", "task_vector", "probe" or "manual";
    `positions`: how the source activations were read; `detail`: source-specific extras (probe layer, target)."""

    names: list[str] = field(default_factory=list)
    source: str = "manual"
    positions: Any = None
    n_positive: int = 0
    n_negative: int = 0
    architecture: str | None = None
    detail: dict = field(default_factory=dict)


class SteeringVector:
    """One direction per hook point (float32, CPU), in activation space.

    `SteeringVector(tensor)` is a direction bound to no hook point (give `names=` when steering);
    `SteeringVector({"lm.blocks.2.resid_post": t, ...})` one per name. Build them with `mean_difference`,
    `task_vector` or `from_probe`; combine them with `+`, `-` and scalar `*`; `save`/`load` a folder
    (cfg.json + weights.safetensors, no pickle).
    """

    def __init__(self, directions: Tensor | np.ndarray | Mapping[str, Tensor],
                 config: SteeringVectorConfig | None = None):
        if isinstance(directions, Mapping):
            if not directions:
                raise ValueError("SteeringVector: no directions given")
            dirs = {str(k): _as_direction(v, str(k)) for k, v in directions.items()}
            names = list(dirs)
        else:
            dirs, names = {_UNNAMED: _as_direction(directions, "direction")}, []
        self.directions: dict[str, Tensor] = dirs
        self.config = dataclasses.replace(config or SteeringVectorConfig(), names=names)

    # ------------------------------------------------------------------------------------------------- access
    @property
    def names(self) -> list[str]:
        """The hook points this vector holds directions for ([] when it is bound to none)."""
        return list(self.config.names)

    @property
    def direction(self) -> Tensor:
        """The direction, when the vector holds exactly one."""
        if len(self.directions) != 1:
            raise ValueError(f"this SteeringVector holds {len(self.directions)} directions ({self.names}); "
                             "use vector[name]")
        return next(iter(self.directions.values()))

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.directions:
            raise KeyError(f"no direction for {name!r}; this vector holds {self.names or 'one unnamed direction'}")
        return self.directions[name]

    def __len__(self) -> int:
        return len(self.directions)

    def norm(self) -> dict[str, float]:
        return {k: float(v.norm()) for k, v in self.directions.items()}

    def unit(self) -> SteeringVector:
        """Every direction scaled to norm 1 (so alpha in "add" mode is a distance in activation space)."""
        return self._map(lambda v: v / _nonzero_norm(v, "unit"))

    # ------------------------------------------------------------------------------------------- arithmetic
    def _map(self, fn: Callable[[Tensor], Tensor], source: str | None = None) -> SteeringVector:
        cfg = dataclasses.replace(self.config, detail=dict(self.config.detail))
        if source:
            cfg.source = source
        data = {k: fn(v) for k, v in self.directions.items()}
        return SteeringVector(data if self.names else data[_UNNAMED], cfg)

    def _zip(self, other: SteeringVector, op: Callable[[Tensor, Tensor], Tensor]) -> SteeringVector:
        if not isinstance(other, SteeringVector):
            return NotImplemented
        if set(self.directions) != set(other.directions):
            raise ValueError(f"cannot combine vectors over different hook points: {self.names} and {other.names}")
        for k in self.directions:
            if self.directions[k].shape != other.directions[k].shape:
                raise ValueError(f"{k}: shapes {tuple(self.directions[k].shape)} and "
                                 f"{tuple(other.directions[k].shape)} differ")
        cfg = SteeringVectorConfig(source="manual", architecture=self.config.architecture)
        data = {k: op(v, other.directions[k]) for k, v in self.directions.items()}
        return SteeringVector(data if self.names else data[_UNNAMED], cfg)

    def __add__(self, other):
        return self._zip(other, torch.add)

    def __sub__(self, other):
        return self._zip(other, torch.sub)

    def __neg__(self):
        return self._map(torch.neg, "manual")

    def __mul__(self, k):
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            return NotImplemented
        return self._map(lambda v: v * float(k), "manual")

    __rmul__ = __mul__

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(v.shape)} |{float(v.norm()):.3g}|" for k, v in self.directions.items())
        return f"SteeringVector({self.config.source}; {shapes})"

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> Path:
        return save_estimator(folder, "SteeringVector", self.config, self.directions)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> SteeringVector:
        cfg, tensors, _ = load_estimator(folder, "SteeringVector", SteeringVectorConfig)
        keys = cfg.names or [_UNNAMED]
        if set(tensors) != set(keys):
            raise ValueError(f"{folder}: tensors {sorted(tensors)} do not match the names {keys} in its config")
        return cls({k: tensors[k] for k in keys} if cfg.names else tensors[_UNNAMED], cfg)

    # -------------------------------------------------------------------------------------------- builders
    @classmethod
    @torch.no_grad()
    def mean_difference(cls, lens, positive_inputs, negative_inputs, *, names: str | Sequence[str],
                        positions=READ_POSITIONS[0], negative_positions=None, step: int = 0,
                        **run_kwargs) -> SteeringVector:
        """Mean activation over the positive inputs minus over the negative inputs, at each of `names`.

        Inputs: a processor output (one batch) or a list of them; for diffusion, prompts (a string, a list) or
        dicts of pipeline keywords, run through `lens.generate` (denoiser sites read at denoising `step`, on the
        conditional branch; text-encoder sites on the prompt's encoding). `positions`, per batch row: "last" (the
        last real token under the attention mask of `lm.`/`text.` sites, else the last position), "mean" (over real
        tokens), an int, a list of ints (their mean), or a (batch, seq) bool mask (the mean of its positions; a row
        with none is no sample); a list with one mask per batch when the inputs are a list of batches.
        `negative_positions`: the same for the negative inputs (default: `positions`), e.g. another batch's mask.
        `run_kwargs` go to `lens.run_with_cache` (diffusion: `lens.generate`, e.g. num_inference_steps).
        """
        resolved = _names_for_reading(lens, names)
        pos, n_pos = _mean_activations(lens, positive_inputs, resolved, positions, step, run_kwargs, "positive_inputs")
        neg_pos = positions if negative_positions is None else negative_positions
        neg, n_neg = _mean_activations(lens, negative_inputs, resolved, neg_pos, step, run_kwargs, "negative_inputs")
        detail = {"step": step} if lens.family == "diffusion" else {}
        if negative_positions is not None:
            detail["negative_positions"] = _describe_positions(negative_positions)
        cfg = SteeringVectorConfig(source="mean_difference", positions=_describe_positions(positions),
                                   n_positive=n_pos, n_negative=n_neg, architecture=lens.architecture,
                                   detail=detail)
        return cls({n: pos[n] - neg[n] for n in resolved}, cfg)

    @classmethod
    def from_probe(cls, probe, layer: int = 0, *, name: str | None = None, target=None) -> SteeringVector:
        """A fitted LinearProbe's direction for `target`, mapped back to activation space.

        The probe reads standardised features z = (x - mean) / std, so the gradient of its logit for class c with
        respect to x is w_c / std. Softmax logits are defined up to a shared shift, so the class direction is
        centred: (w_target - mean_c w_c) / std, the gradient of the target's logit minus the mean logit (for two
        classes, half the gradient of the log-odds). `target`: a class label (default: the second class of a
        binary probe); regression probes: the output index (default 0). `layer` indexes the probe's layers;
        `name` binds the direction to a hook point.
        """
        if not hasattr(probe, "weight_"):
            raise RuntimeError("this LinearProbe is not fitted: call fit(X, y) or LinearProbe.load(folder)")
        n_layers = probe.weight_.shape[0]
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n_layers <= layer < n_layers:
            raise ValueError(f"layer={layer!r}; the probe has {n_layers} layers (0 to {n_layers - 1})")
        W, std = probe.weight_[layer].float(), probe.std_[layer].float()  # (d, out), (d,)
        if probe.classes_ is None:
            col = 0 if target is None else int(target)
            if not 0 <= col < W.shape[1]:
                raise ValueError(f"target={target!r}: the regression probe has {W.shape[1]} outputs")
            w, label = W[:, col], col
        else:
            classes = probe.classes_.tolist()
            if target is None:
                if len(classes) != 2:
                    raise ValueError(f"the probe has {len(classes)} classes {classes}; pass target= (one of them)")
                idx = 1
            else:
                t = target.item() if isinstance(target, Tensor) else target
                if t not in classes:
                    raise ValueError(f"target={target!r} is not one of the probe's classes {classes}")
                idx = classes.index(t)
            w, label = W[:, idx] - W.mean(1), classes[idx]
        cfg = SteeringVectorConfig(source="probe", detail={"layer": layer, "target": label})
        direction = w / std
        return cls({name: direction} if name is not None else direction, cfg)


def task_vector(lens, icl_inputs, names: str | Sequence[str], position=-1, *, step: int = 0,
                **run_kwargs) -> SteeringVector:
    """The mean activation of in-context prompts at `position` (default the last), at each of `names`
    (Hendel et al. 2023; Todd et al. 2024). Patch it into a zero-shot run with
    `steer(lens, zero_shot, tv, mode="replace", positions=-1)` (or mode="add" for a function vector).
    `position` takes what `SteeringVector.mean_difference`'s `positions` takes; inputs likewise."""
    resolved = _names_for_reading(lens, names)
    with torch.no_grad():
        means, n = _mean_activations(lens, icl_inputs, resolved, position, step, run_kwargs, "icl_inputs")
    cfg = SteeringVectorConfig(source="task_vector", positions=_describe_positions(position), n_positive=n,
                               architecture=lens.architecture)
    return SteeringVector({k: means[k] for k in resolved}, cfg)


# ------------------------------------------------------------------------------------------------ steering
@contextlib.contextmanager
def steering(lens, vector, *, names=None, mode: str = "add", alpha: float = 1.0, positions=None,
             steps=None, branches: Sequence[str] | None = None, guidance: bool | None = None) -> Iterator[Any]:
    """Install the edit for the `with` block: run `lens(inputs)`, `model.generate(...)` or `lens.generate(prompt)`
    inside. The hooks go through `lens.hooks`, so they are removed on exit, also when the block raises, and blocks
    nest (two vectors: two blocks).

    `vector`: a SteeringVector, or a bare tensor / {name: tensor} dict. `names`: hook points or globs (default: the
    vector's); a vector with one direction applies it at every name given. `positions`: None (every position),
    an int (negatives from the end; "last" is -1), a list of ints, or a bool mask (batch, seq) or (seq,); they
    index each edited site's own sequence, in every forward call (during `model.generate` the decode steps see one
    new position each: -1 or None keep steering them, a mask fits only the prompt's forward). `steps`,
    `branches` (a subset of ("uncond", "cond")) and `guidance`: diffusion only, see the module docstring.
    """
    fns = _plan(lens, vector, names, mode, alpha, positions, branches)
    with lens.hooks(fns, steps=steps, guidance=guidance) as session:
        yield session


def steer(lens, inputs, vector, *, names=None, mode: str = "add", alpha: float = 1.0, positions=None, steps=None,
          branches: Sequence[str] | None = None, **run_kwargs):
    """One steered run: the model's output for `inputs` (a processor output) with the edit of `steering`; for a
    diffusion pipeline, the output of one `lens.generate` (inputs: a prompt, a list of prompts or a dict of
    pipeline keywords; `run_kwargs` go to the pipeline, e.g. num_inference_steps, generator)."""
    fns = _plan(lens, vector, names, mode, alpha, positions, branches)
    if lens.family == "diffusion":
        kw = dict(inputs) if isinstance(inputs, Mapping) else {"prompt": inputs}
        kw.update(run_kwargs)
        kw.setdefault("progress", False)
        kw.setdefault("names", [])
        with torch.no_grad():
            out, _ = lens.generate(hooks=fns, steps=steps, **kw)
        return out
    with torch.no_grad(), lens.hooks(fns, steps=steps):
        return lens(inputs, **run_kwargs)


# ----------------------------------------------------------------------------------------------- the sweep
@dataclass(repr=False)
class SteeringSweepResult(Result):
    """`values[i, j, b]`: metric(output) for batch row b with the vector applied at `names[i]` alone with
    strength `alphas[j]` (dose-response); `baseline[b]`: the metric of the unsteered run."""

    names: list[str]
    alphas: list[float]
    mode: str
    values: Tensor
    baseline: Tensor

    @property
    def mean(self) -> Tensor:
        """(names, alphas): the metric averaged over the batch."""
        return self.values.mean(-1)

    def summary(self) -> str:
        return (f"SteeringSweepResult({self.meta.get('architecture', '?')}: {len(self.names)} names x "
                f"{len(self.alphas)} alphas x {self.values.shape[-1]} rows, mode {self.mode})")

    def plot(self, **kw):
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.2, 2.8))
        mean = self.mean
        for i, name in enumerate(self.names):
            ax.plot(self.alphas, mean[i].numpy(), marker="o", label=name)
        ax.axhline(float(self.baseline.mean()), color="k", ls="--", lw=1, label="unsteered")
        ax.set_xlabel("alpha" if self.mode in ("add", "scale") else f"alpha ({self.mode} ignores it)", fontsize=8)
        ax.set_ylabel(self.meta.get("metric", "metric"), fontsize=8)
        ax.legend(fontsize=6)
        ax.set_title(f"steering ({self.mode}): metric per alpha, mean over {self.values.shape[-1]} rows", fontsize=8)
        fig.tight_layout()
        return fig


def steering_sweep(lens, inputs, vector, *, alphas: Sequence[float], metric: Callable[[Any], Tensor],
                   names=None, mode: str = "add", positions=None, steps=None, branches=None,
                   **run_kwargs) -> SteeringSweepResult:
    """metric(steer(...)) for each name alone and each alpha: the dose-response of a steering vector.

    `metric(output)` returns one number per batch row (a (batch,) tensor) or one number. `names` default to the
    vector's; each is steered on its own (a one-direction vector applies its direction at each name in turn)."""
    alphas = [_check_alpha(a) for a in alphas]
    if not alphas:
        raise ValueError("alphas is empty: give the strengths to try")
    vec = _as_vector(vector)
    resolved = _resolve_targets(lens, vec, names)
    rewind = _rewinder(inputs, run_kwargs)
    with torch.no_grad():
        if lens.family == "diffusion":
            kw = dict(inputs) if isinstance(inputs, Mapping) else {"prompt": inputs}
            base_out, _ = lens.generate(**{"progress": False, "names": [], **kw, **run_kwargs})
        else:
            base_out = lens(inputs, **run_kwargs)
    baseline = _metric_values(metric, base_out, None)
    rows = []
    for name in resolved:
        per_alpha = []
        for a in alphas:
            rewind()
            out = steer(lens, inputs, vec, names=[name], mode=mode, alpha=a, positions=positions, steps=steps,
                        branches=branches, **run_kwargs)
            per_alpha.append(_metric_values(metric, out, len(baseline)))
        rows.append(torch.stack(per_alpha))
    meta = provenance(lens, resolved, metric=getattr(metric, "__name__", "metric"), mode=mode,
                      positions=_describe_positions(positions), steps=None if steps is None else list(steps))
    return SteeringSweepResult(meta=meta, names=resolved, alphas=alphas, mode=mode, values=torch.stack(rows),
                               baseline=baseline)


def _rewinder(inputs, run_kwargs: dict) -> Callable[[], None]:
    """Every run of a sweep starts from the same noise: a torch.Generator passed to the pipeline (or model) is put
    back to its state before the first run (otherwise each run would draw new noise)."""
    found = [run_kwargs.get("generator"), inputs.get("generator") if isinstance(inputs, Mapping) else None]
    gens = [g for x in found for g in (x if isinstance(x, (list, tuple)) else [x]) if isinstance(g, torch.Generator)]
    states = [g.get_state() for g in gens]

    def rewind() -> None:
        for g, st in zip(gens, states):
            g.set_state(st)

    return rewind


def _metric_values(metric, out, n: int | None) -> Tensor:
    m = metric(out)
    m = torch.as_tensor(m.detach() if isinstance(m, Tensor) else m).float().flatten().cpu()
    if n is not None and len(m) != n:
        raise ValueError(f"metric(output) gave {len(m)} values on a steered run but {n} on the unsteered one")
    return m


# ------------------------------------------------------------------------------------------------ plumbing
def _as_direction(v, name: str) -> Tensor:
    t = torch.as_tensor(v.detach() if isinstance(v, Tensor) else np.asarray(v))
    if not t.is_floating_point():
        raise TypeError(f"{name}: a direction must hold floats; got {t.dtype}")
    if t.dim() == 0 or t.numel() == 0:
        raise ValueError(f"{name}: a direction needs at least one feature; got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: the direction holds NaN or infinite values")
    return t.detach().to("cpu", torch.float32).clone()


def _as_vector(vector) -> SteeringVector:
    if isinstance(vector, SteeringVector):
        return vector
    if isinstance(vector, (Tensor, np.ndarray, Mapping)):
        return SteeringVector(vector)
    raise TypeError(f"vector must be a SteeringVector, a tensor or a {{name: tensor}} dict; got "
                    f"{type(vector).__name__}")


def _nonzero_norm(v: Tensor, where: str) -> Tensor:
    n = v.norm()
    if not float(n) > 0:
        raise ValueError(f"{where}: the direction has norm 0, so it defines no axis to scale or project out")
    return n


def _check_alpha(alpha) -> float:
    if isinstance(alpha, Tensor) and alpha.numel() == 1:
        alpha = alpha.item()
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite number; got {alpha!r:.40}")
    return float(alpha)


def _ints(items) -> list[int] | None:
    """A non-empty list of ints (numpy and 0-d tensor integers too), or None when `items` is not one."""
    if isinstance(items, (bool, str)) or not isinstance(items, Sequence) or not items:
        return None
    out = []
    for p in items:
        if isinstance(p, (bool, float)) or isinstance(p, (Tensor, np.ndarray)) and (p.ndim or p.dtype in (
                torch.bool, np.bool_)):
            return None
        try:
            out.append(operator.index(p))
        except TypeError:
            return None
    return out


def _check_positions(positions) -> list[int] | Tensor | None:
    """None (every position), a list of ints, or a bool mask (1-D or 2-D)."""
    if positions is None:
        return None
    if isinstance(positions, str):
        if positions == "last":
            return [-1]
        raise ValueError(f"positions={positions!r}; allowed: None (every position), 'last', an int, a list of "
                         "ints or a (batch, seq) bool mask")
    if isinstance(positions, (Tensor, np.ndarray)):
        t = torch.as_tensor(positions)
        if t.dtype == torch.bool:
            if t.dim() not in (1, 2):
                raise ValueError(f"a positions mask is (batch, seq) or (seq,); got shape {tuple(t.shape)}")
            return t
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"positions must hold ints or bools; got a {t.dtype} tensor")
        positions = t.reshape(-1).tolist() if t.dim() else int(t)
    if isinstance(positions, int) and not isinstance(positions, bool):
        return [positions]
    ints = _ints(positions)
    if ints is None:
        raise TypeError(f"positions must be None, 'last', an int, a non-empty list of ints or a bool mask; got "
                        f"{type(positions).__name__} {positions!r:.60}")
    return ints


def _check_branches(lens, branches) -> tuple[str, ...] | None:
    if branches is None:
        return None
    if lens.family != "diffusion":
        raise ValueError(f"branches: classifier-free-guidance branches exist only in diffusion pipelines; "
                         f"{lens.architecture} is a {lens.family} model")
    chosen = (branches,) if isinstance(branches, str) else tuple(branches)
    bad = [b for b in chosen if b not in BRANCHES]
    if bad or not chosen:
        raise ValueError(f"branches={branches!r}; choose a non-empty subset of {BRANCHES}")
    return None if set(chosen) == set(BRANCHES) else chosen


def _resolve_targets(lens, vec: SteeringVector, names) -> list[str]:
    if names is None:
        if not vec.names:
            raise ValueError("this SteeringVector is bound to no hook point; pass names= (a name or glob)")
        resolved = lens.resolve(vec.names)
    else:
        resolved = lens.resolve(names)
    for n in resolved:
        if lens.sites[n].row.read == "pattern":
            raise ValueError(f"{n!r} is an attention pattern; steering edits activations (residual streams, "
                             "attention and MLP outputs, q/k/v); edit patterns with lens.hooks")
    return resolved


def _plan(lens, vector, names, mode, alpha, positions, branches) -> dict[str, Callable]:
    """Validate everything that can be checked before a forward, and build one edit function per site."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {MODES}")
    alpha = _check_alpha(alpha)
    pos = _check_positions(positions)
    chosen = _check_branches(lens, branches)
    vec = _as_vector(vector)
    resolved = _resolve_targets(lens, vec, names)
    fns = {}
    for n in resolved:
        if n in vec.directions:
            d = vec.directions[n]
        elif len(vec.directions) == 1:
            d = vec.direction
        else:
            raise ValueError(f"the vector holds no direction for {n!r}; it holds {vec.names} (a one-direction "
                             "vector applies at any name)")
        if mode in ("scale", "project_out"):
            _nonzero_norm(d, n)
        fns[n] = _edit_fn(lens.sites[n], d, mode, alpha, pos, chosen)
    return fns


def _to_tokens(value: Tensor, site) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """The value as (batch, seq, features) or (rows, features), and the map back to its own layout."""
    if value.dim() == 4 and site.row.heads:  # (batch, seq, heads, d_head)
        return value.flatten(-2), lambda x: x.unflatten(-1, value.shape[-2:])
    if value.dim() == 4:  # a feature map (batch, C, h, w): one token per pixel
        b, c, h, w = value.shape
        return value.flatten(2).transpose(1, 2), lambda x: x.transpose(1, 2).reshape(b, c, h, w)
    if value.dim() in (2, 3):
        return value, lambda x: x
    raise ValueError(f"{site.name!r}: cannot steer a value of shape {tuple(value.shape)} (expected (batch, seq, d), "
                     "(batch, seq, heads, d_head), (batch, C, h, w) or (batch, d))")


def _selection(x: Tensor, site_name: str, pos, chosen, ctx) -> Tensor | None:
    """Bool over x's leading dims ((batch, seq) or (rows,)): where the edit applies; None for everywhere."""
    sel = None
    if chosen is not None and ctx.step is not None:  # a denoiser site, with one guidance branch chosen
        if ctx.branches is None:
            raise ValueError(f"{site_name!r}: branches={chosen} but mmlens cannot tell whether this denoiser batch "
                             "holds [uncond, cond] halves (a direct pipeline call); run through lens.generate / "
                             "lens(...), or pass guidance= to steering")
        rows = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        half = x.shape[0] // len(ctx.branches)
        for k, b in enumerate(ctx.branches):
            if b in chosen:
                rows[k * half:(k + 1) * half] = True
        sel = rows if x.dim() == 2 else rows[:, None].expand(x.shape[:2])
    if pos is None:
        return sel
    if x.dim() == 2:
        raise ValueError(f"{site_name!r} has no sequence axis (shape {tuple(x.shape)}); steer it with positions=None")
    b, s = x.shape[:2]
    if isinstance(pos, Tensor):
        mask = pos.to(x.device)
        if mask.shape[-1] != s or (mask.dim() == 2 and mask.shape[0] not in (1, b)):
            raise ValueError(f"positions: a mask of shape {tuple(pos.shape)} does not fit {site_name!r}, whose value "
                             f"has {b} rows of {s} positions (during model.generate, the decode steps see one "
                             "position at a time)")
        where = mask.expand(b, s) if mask.dim() == 2 else mask[None].expand(b, s)
    else:
        bad = [p for p in pos if not -s <= p < s]
        if bad:
            raise ValueError(f"positions {bad} are out of range for {site_name!r}, which has {s} positions "
                             f"(allowed: 0 to {s - 1}, or -{s} to -1)")
        where = torch.zeros(b, s, dtype=torch.bool, device=x.device)
        where[:, torch.as_tensor(pos, device=x.device) % s] = True
    return where if sel is None else where & sel


def _edit_fn(site, direction: Tensor, mode: str, alpha: float, pos, chosen) -> Callable:
    moved: dict[torch.device, Tensor] = {}

    def edit(value: Tensor, ctx) -> Tensor:
        x, back = _to_tokens(value, site)
        width = x.shape[-1]
        if direction.numel() != width:
            raise ValueError(f"the steering direction for {site.name!r} has {direction.numel()} features "
                             f"(shape {tuple(direction.shape)}); the activation there has {width} (value shape "
                             f"{tuple(value.shape)})")
        v = moved.get(x.device)
        if v is None:
            v = moved[x.device] = direction.reshape(width).to(x.device)
        sel = _selection(x, site.name, pos, chosen, ctx)
        xf = x.float()
        if mode == "add":
            new = xf + alpha * v
        elif mode == "replace":
            new = v.expand_as(xf)
        else:
            u = v / v.norm()
            factor = alpha - 1.0 if mode == "scale" else -1.0
            new = xf + factor * (xf @ u)[..., None] * u
        if sel is not None:
            new = torch.where(sel[..., None], new, xf)
        return back(new.to(value.dtype))

    return edit


# ------------------------------------------------------------------------------------- reading activations
def _names_for_reading(lens, names) -> list[str]:
    resolved = lens.resolve(names)
    for n in resolved:
        if lens.sites[n].row.read == "pattern":
            raise ValueError(f"{n!r} is an attention pattern, not an activation a direction lives in")
    return resolved


def _describe_positions(positions):
    """A JSON-safe note of how positions were chosen (masks are not stored)."""
    if positions is None or isinstance(positions, str):
        return positions
    if isinstance(positions, (Tensor, np.ndarray)):
        t = torch.as_tensor(positions)
        return "mask" if t.dtype == torch.bool else t.tolist()
    if isinstance(positions, int):
        return int(positions)
    ints = _ints(positions)
    return ints if ints is not None else "masks"


def _batches(inputs, arg: str) -> list:
    if isinstance(inputs, Mapping):
        return [inputs]
    if isinstance(inputs, Sequence) and not isinstance(inputs, str) and inputs and all(
            isinstance(b, Mapping) for b in inputs):
        return list(inputs)
    raise TypeError(f"{arg} must be a processor output (a dict) or a non-empty list of them; got "
                    f"{type(inputs).__name__}")


def _reduce(value: Tensor, site, positions, attention_mask, where: str) -> Tensor:
    """One (samples, features) matrix from a site's value: a sample per row, its positions averaged."""
    x, _ = _to_tokens(value, site)
    x = x.float()
    if x.dim() == 2:  # pooled: every row is one sample
        return x
    b, s, _ = x.shape
    am = attention_mask.to(x.device).bool() if attention_mask is not None and site.name.startswith(_TEXT_TOWERS) \
        and tuple(attention_mask.shape) == (b, s) else None
    if isinstance(positions, str):
        if positions == "last":
            idx = (s - 1 - am.flip(-1).long().argmax(-1)) if am is not None else torch.full((b,), s - 1)
            return x[torch.arange(b), idx.to(x.device)]
        if positions == "mean":
            if am is None:
                return x.mean(1)
            w = am.to(x.dtype)[..., None]
            return (x * w).sum(1) / w.sum(1).clamp(min=1)
        raise ValueError(f"positions={positions!r}; allowed: 'last', 'mean', an int, a list of ints or a "
                         "(batch, seq) bool mask")
    if isinstance(positions, (Tensor, np.ndarray)) and torch.as_tensor(positions).dtype == torch.bool:
        mask = torch.as_tensor(positions).to(x.device)
        if mask.dim() == 1:
            mask = mask[None].expand(b, -1)
        if tuple(mask.shape) != (b, s):
            raise ValueError(f"{where}: a positions mask of shape {tuple(mask.shape)} does not fit {site.name!r}, "
                             f"whose value has {b} rows of {s} positions")
        keep = mask.any(1)
        w = mask.to(x.dtype)[..., None]
        return ((x * w).sum(1) / w.sum(1).clamp(min=1))[keep]
    idx = [positions] if isinstance(positions, int) and not isinstance(positions, bool) else _ints(positions)
    if idx is None:
        raise TypeError(f"positions must be 'last', 'mean', an int, a list of ints or a bool mask; got "
                        f"{type(positions).__name__} {positions!r:.60}")
    bad = [p for p in idx if not -s <= p < s]
    if bad:
        raise ValueError(f"{where}: positions {bad} are out of range for {site.name!r}, which has {s} positions")
    return x[:, torch.as_tensor(idx) % s].mean(1)


def _mean_activations(lens, inputs, names: list[str], positions, step: int, run_kwargs: dict,
                      arg: str) -> tuple[dict[str, Tensor], int]:
    """Mean over samples of each name's reduced activation, and the number of samples (of the first name)."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {n: 0 for n in names}
    shapes: dict[str, tuple] = {}
    if lens.family == "diffusion":
        runs = _diffusion_batches(inputs, arg)
    else:
        runs = _batches(inputs, arg)
    per_batch = isinstance(positions, Sequence) and not isinstance(positions, str) and len(positions) == len(runs) \
        and all(isinstance(p, (Tensor, np.ndarray)) for p in positions)
    for bi, batch in enumerate(runs):
        pos = positions[bi] if per_batch else positions
        if lens.family == "diffusion":
            kw = {"progress": False, "output_type": "latent", **batch, **run_kwargs}
            denoiser = lens.adapter.denoiser
            _, cache = lens.generate(names=names, record_steps=[step], cache_device="cpu", cache_dtype=torch.float32,
                                     **kw)
            values = {n: (cache.get(n, step=step, branch="cond") if _on(lens.sites[n], denoiser) else
                          cache.get(n, branch="cond")) for n in names}
            mask = None
        else:
            _, cache = lens.run_with_cache(batch, names=names, cache_device="cpu", cache_dtype=torch.float32,
                                           **run_kwargs)
            values = {n: cache[n] for n in names}
            mask = batch.get("attention_mask") if isinstance(batch.get("attention_mask"), Tensor) else None
        for n in names:
            site = lens.sites[n]
            shapes.setdefault(n, _feature_shape(values[n], site))
            rows = _reduce(values[n], site, pos, mask, arg)
            sums[n] = rows.sum(0) + sums.get(n, 0)
            counts[n] += rows.shape[0]
    empty = [n for n in names if counts[n] == 0]
    if empty:
        raise ValueError(f"{arg}: no samples at {empty} (every row's positions mask is empty?)")
    means = {n: (sums[n] / counts[n]).reshape(shapes[n]) for n in names}
    return means, counts[names[0]]


def _feature_shape(value: Tensor, site) -> tuple:
    if value.dim() == 4 and site.row.heads:
        return tuple(value.shape[-2:])
    if value.dim() == 4:
        return (value.shape[1],)
    return (value.shape[-1],)


def _on(site, denoiser: str) -> bool:
    return site.path == denoiser or site.path.startswith(denoiser + ".")


def _diffusion_batches(inputs, arg: str) -> list[dict]:
    if isinstance(inputs, str):
        return [{"prompt": [inputs]}]
    if isinstance(inputs, Mapping):
        return [dict(inputs)]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(p, str) for p in inputs):
        return [{"prompt": list(inputs)}]
    if isinstance(inputs, Sequence) and inputs and all(isinstance(p, Mapping) for p in inputs):
        return [dict(p) for p in inputs]
    raise TypeError(f"{arg}: a diffusion pipeline reads prompts (a string or a list of strings) or dicts of "
                    f"pipeline keywords; got {type(inputs).__name__}")


__all__ = ["MODES", "SteeringSweepResult", "SteeringVector", "SteeringVectorConfig", "steer", "steering",
           "steering_sweep", "task_vector"]
