"""TRAK over an ensemble of models or checkpoints (Park et al. 2023): one linearisation is noisy, an average of M is
not, and the paper's scores improve steadily with M (checkpoints of one run, or independently trained models).

    ens = TRAKEnsemble(TRAKConfig(proj_dim=1024, params="vision_model.encoder.layers.3.*"))
    ens.fit(clip, train_batches, contrastive_margin, checkpoints=["ft/a.safetensors", "ft/b.safetensors", None],
            store="out/trak")                    # None: the lens's own weights; or ens.fit([lens_a, lens_b], ...)
    res = ens.attribute(clip, test_inputs, contrastive_margin, checkpoints=[...])   # the same models, same order
    ens.save("out/ens"); TRAKEnsemble.load("out/ens")

The estimator, as the reference implementation's `TRAKer.finalize_scores` computes it (the paper's ensemble
estimator without its soft threshold): with phi_m the projected gradients of model m (one projection P, the same
seed, for every model) and p_m,i = sigmoid(f_m(x_i)),

    tau(z, x_i) = [1/M sum_m phi_m(z)^T (Phi_m^T Phi_m + lambda_m I)^-1 phi_m,i] x [1/M sum_m (1 - p_m,i)]

(the second factor only when `weighting` and the output function is a margin: not for `diffusion_square` and
`diffusion_loss`). Memory: one model at a time. Given one lens and `checkpoints` (paths of safetensors state dicts,
state dicts, or None), each checkpoint is copied into the lens in turn over the lens's own weights (a partial state
dict changes only its keys) and the lens gets its own weights back at the end, however the call ends (for a
diffusion pipeline the checkpoints are state dicts of its denoiser, e.g. `pipe.unet`). Store: model m's shards go
to `store/model-{m:03d}/`; a killed fit resumes at the model and batch it stopped at.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor

from . import data_attribution as da
from ._estimator import load_estimator, save_estimator
from .result import provenance

MODEL_DIR = "model-{:03d}"


class TRAKEnsemble:
    """Estimator: `fit(models, train_batches, output_fn, checkpoints=...)` fits one `TRAK` per model (`members_`,
    each unweighted: the ensemble applies the averaged weighting); `attribute(models, targets, output_fn,
    checkpoints=...)` averages their scores. `models`: one lens (with `checkpoints`) or a list of lenses."""

    def __init__(self, config: da.TRAKConfig | None = None, **kw):
        self.config = da.TRAK(config, **kw).config  # the same checks as TRAK

    def _member(self) -> da.TRAK:
        return da.TRAK(dataclasses.replace(self.config, weighting=False))

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self, models, train_batches: Iterable[Mapping], output_fn, *,
            checkpoints: Sequence[str | os.PathLike | Mapping[str, Tensor] | None] | None = None,
            store: str | os.PathLike | None = None, progress: bool = True) -> TRAKEnsemble:
        """One TRAK per model over the same `train_batches` (walked once per model, so a list or a DataLoader that
        does not shuffle, not a generator), each with its store under `store/model-{m:03d}`."""
        from tqdm.auto import tqdm

        self._member()._check_config()
        if isinstance(train_batches, Iterator):
            raise TypeError(f"train_batches is a {type(train_batches).__name__}, consumed by one pass; an ensemble "
                            "walks it once per model: give a list (or a DataLoader that does not shuffle)")
        members, first = [], None
        with _Models(models, checkpoints) as ms:
            for m in tqdm(range(len(ms)), desc="TRAKEnsemble.fit", disable=not progress or len(ms) == 1):
                lens = ms.get(m)
                member = self._member()
                if members:
                    _check_same_params(member, lens, members[0], m)
                replay = _replay(train_batches, first, m)
                sub = Path(store) / MODEL_DIR.format(m) if store is not None else None
                member.fit(lens, replay, output_fn, store=sub, progress=progress)
                first = replay.digests if first is None else first
                members.append(member)
        self.members_ = members
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "members_"):
            raise RuntimeError("this TRAKEnsemble is not fitted: call fit(models, train_batches, output_fn, "
                               "checkpoints=...) or TRAKEnsemble.load(folder)")

    @property
    def n_models_(self) -> int:
        self._check_fitted()
        return len(self.members_)

    @property
    def weights_(self) -> Float[Tensor, "train"]:
        """(train,) float64: 1/M sum_m (1 - sigmoid(f_m(x_i))), TRAK's Q averaged over the models."""
        self._check_fitted()
        return torch.stack([1 - torch.sigmoid(t.outputs_.double()) for t in self.members_]).mean(0)

    # --------------------------------------------------------------------------------------------- attribute
    def attribute(self, models, target_inputs: Mapping | Iterable[Mapping], output_fn, *,
                  checkpoints: Sequence[str | os.PathLike | Mapping[str, Tensor] | None] | None = None,
                  progress: bool = False) -> da.AttributionResult:
        """Ensemble scores (targets, train): the members' scores averaged, times the averaged weighting. `models`
        and `checkpoints` name the models the ensemble was fit on, in the same order."""
        self._check_fitted()
        self._member()._check_config()
        cfg = self.config
        batches = [target_inputs] if isinstance(target_inputs, Mapping) else list(target_inputs)
        total, meta_lens = None, None
        with _Models(models, checkpoints) as ms:
            if len(ms) != len(self.members_):
                raise ValueError(f"this ensemble was fit on {len(self.members_)} models; got {len(ms)} "
                                 "(give the same models or checkpoints, in the same order)")
            for m, member in enumerate(self.members_):
                member.config = dataclasses.replace(self.config, weighting=False)  # config edits after fit apply
                lens = ms.get(m)
                if da._params_digest(member._select(lens)) != member.param_digest_:
                    warnings.warn(f"TRAKEnsemble.attribute: model {m}'s parameter values differ from those at fit "
                                  "(models or checkpoints in another order?); attribution assumes the same models",
                                  stacklevel=2)
                with warnings.catch_warnings():  # said above, with the model's index
                    warnings.filterwarnings("ignore", message="TRAK.attribute: the parameters' values differ")
                    s = member.attribute(lens, batches, output_fn, progress=progress).scores.double()
                total = s if total is None else total + s
                meta_lens = lens if m == 0 else meta_lens
        scores = total / len(self.members_)
        weighting = da._weighting(cfg, output_fn, "TRAKEnsemble.attribute")
        if weighting:
            scores = scores * self.weights_
        meta = provenance(meta_lens, [], technique="TRAK", ensemble=len(self.members_), params=cfg.params,
                          proj_dim=cfg.proj_dim, seed=cfg.seed, damping=cfg.damping, weighting=weighting,
                          output_fn=da._fn_name(output_fn), n_params=self.members_[0].n_params_)
        return da.AttributionResult(meta=meta, scores=scores.float(), method="trak")

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """`cfg.json` (config; per model: parameter names, shapes and value digest) and `weights.safetensors`
        (`features_.{m}`, `outputs_.{m}` per model)."""
        self._check_fitted()
        tensors = {}
        for m, t in enumerate(self.members_):
            tensors[f"features_.{m}"], tensors[f"outputs_.{m}"] = t.features_, t.outputs_
        members = [{"param_names": t.param_names_, "param_shapes": t.param_shapes_, "n_params": t.n_params_,
                    "param_digest": t.param_digest_} for t in self.members_]
        return save_estimator(folder, "TRAKEnsemble", self.config, tensors, members=members)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TRAKEnsemble:
        cfg, t, doc = load_estimator(folder, "TRAKEnsemble", da.TRAKConfig)
        self = cls(cfg)
        members = []
        for m, d in enumerate(doc["members"]):
            if f"features_.{m}" not in t or f"outputs_.{m}" not in t:
                raise ValueError(f"{folder}: weights lack model {m}'s features_/outputs_ (a damaged save?)")
            member = self._member()
            member.features_, member.outputs_ = t[f"features_.{m}"], t[f"outputs_.{m}"]
            member.param_names_, member.param_shapes_ = d["param_names"], d["param_shapes"]
            member.n_params_, member.param_digest_ = d["n_params"], d["param_digest"]
            member._kernel = None
            members.append(member)
        if not members:
            raise ValueError(f"{folder}: an ensemble of no models")
        self.members_ = members
        return self


# ---------------------------------------------------------------------------------------------------- models
class _Models:
    """The M models, one at a time: several lenses, or one lens whose weights are swapped checkpoint by checkpoint
    (its own weights are restored on exit)."""

    def __init__(self, models, checkpoints):
        several = isinstance(models, (list, tuple))
        if several and checkpoints is not None:
            raise TypeError("give several lenses, or one lens with checkpoints; not both")
        if several:
            if not models:
                raise ValueError("no models: give at least one lens (or one lens and a list of checkpoints)")
            for m, lens in enumerate(models):
                if not hasattr(lens, "model"):
                    raise TypeError(f"models[{m}] is a {type(lens).__name__}, not a lens")
            self.lenses, self.checkpoints = list(models), None
            return
        if not hasattr(models, "model"):
            raise TypeError(f"models must be a lens or a list of lenses; got {type(models).__name__}")
        if checkpoints is None:
            checkpoints = [None]
        if isinstance(checkpoints, (str, os.PathLike, Mapping)) or not isinstance(checkpoints, Sequence):
            raise TypeError(f"checkpoints must be a list (of safetensors paths, state dicts or None); got "
                            f"{type(checkpoints).__name__}")
        if not checkpoints:
            raise ValueError("checkpoints is empty: give at least one (a safetensors path, a state dict, or None "
                             "for the lens's own weights)")
        for m, c in enumerate(checkpoints):
            if isinstance(c, (str, os.PathLike)):
                if not Path(c).is_file():
                    raise FileNotFoundError(f"checkpoints[{m}]: no file {c}")
            elif c is not None and not isinstance(c, Mapping):
                raise TypeError(f"checkpoints[{m}] is of type {type(c).__name__}; allowed: a safetensors path, a state "
                                "dict (name -> tensor) or None (the lens's own weights)")
        self.lenses, self.checkpoints = [models], list(checkpoints)
        self._saved: dict[str, Tensor] = {}

    def __len__(self) -> int:
        return len(self.lenses) if self.checkpoints is None else len(self.checkpoints)

    def __enter__(self) -> _Models:
        return self

    def __exit__(self, *exc) -> None:
        if self.checkpoints is not None:
            self._put({})

    def get(self, m: int):
        if self.checkpoints is None:
            return self.lenses[m]
        c = self.checkpoints[m]
        if c is None:
            sd = {}
        elif isinstance(c, Mapping):
            sd = dict(c)
        else:
            from safetensors.torch import load_file

            sd = load_file(str(c))
        self._put(sd, m)
        return self.lenses[0]

    def _put(self, sd: Mapping[str, Tensor], m: int | None = None) -> None:
        """The lens's own weights, overwritten by `sd`; originals of every key ever overwritten are kept (CPU)."""
        model = da._module(self.lenses[0])  # a diffusion pipeline's denoiser: checkpoints are its state dicts
        state = model.state_dict()
        unknown = [k for k in sd if k not in state]
        if unknown:
            raise ValueError(f"checkpoint {m} has {len(unknown)} keys the model lacks, e.g. {unknown[:4]}; a "
                             "checkpoint is a state dict of the lens's own model (a diffusion pipeline's denoiser)")
        for k, v in sd.items():
            if not isinstance(v, Tensor) or tuple(v.shape) != tuple(state[k].shape):
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"checkpoint {m}: {k} is {got} but the model's is {tuple(state[k].shape)}; every "
                                 "checkpoint must share the lens's architecture")
        with torch.no_grad():
            for k in sd:
                if k not in self._saved:
                    self._saved[k] = state[k].detach().to("cpu", copy=True)
            for k, v in self._saved.items():
                if k not in sd:
                    state[k].copy_(v)
            for k, v in sd.items():
                state[k].copy_(v)


def _check_same_params(member: da.TRAK, lens, first: da.TRAK, m: int) -> None:
    params = member._select(lens)
    got = [(n, list(p.shape)) for n, p in params.items()]
    want = [(n, list(s)) for n, s in zip(first.param_names_, first.param_shapes_)]
    if got != want:
        i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        what = (f"{got[i]} where model 0 has {want[i]}" if i < min(len(got), len(want))
                else f"{len(got)} parameters where model 0 has {len(want)}")
        raise ValueError(f"model {m}'s parameters matching {member.config.params!r} differ from model 0's: {what}; "
                         "every model of an ensemble must share the architecture")


def _replay(batches, first: list[str] | None, m: int) -> _Replay:
    return (_SizedReplay if hasattr(batches, "__len__") else _Replay)(batches, first, m)


class _Replay:
    """`batches` walked again, checked batch by batch against the first model's walk (same examples, same order)."""

    def __init__(self, batches, first: list[str] | None, m: int):
        self.batches, self.first, self.m, self.digests = batches, first, m, []

    def __iter__(self):
        for j, inputs in enumerate(self.batches):
            if isinstance(inputs, Mapping):
                d = da._inputs_digest(inputs)
                if self.first is not None and (j >= len(self.first) or self.first[j] != d):
                    raise ValueError(f"train_batches gave model {self.m} another batch {j} than model 0 (a "
                                     "shuffling DataLoader?): every model must see the same examples in the same order")
                self.digests.append(d)
            yield inputs
        if self.first is not None and len(self.digests) != len(self.first):
            raise ValueError(f"train_batches gave model {self.m} {len(self.digests)} batches, model 0 "
                             f"{len(self.first)}: every model must see the same examples")


class _SizedReplay(_Replay):
    def __len__(self) -> int:  # TRAK.fit's progress bar reads it
        return len(self.batches)


__all__ = ["TRAKEnsemble"]
