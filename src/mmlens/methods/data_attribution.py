"""Training-data attribution with TRAK (Park et al. 2023): which training examples made the model give an output.

    trak = TRAK(TRAKConfig(proj_dim=1024, seed=0, params="vision_model.encoder.layers.3.*"))
    trak.fit(clip, train_batches, contrastive_margin, store="out/trak")   # resumable: rerun after a kill
    res = trak.attribute(clip, test_inputs, contrastive_margin)           # an AttributionResult
    res.scores                       # (targets, train): tau(z, x_i)
    res.top(8); res.precision_at_k(planted); res.plot(); res.html(train_images=imgs)
    trak.save("out/trak_fitted"); TRAK.load("out/trak_fitted")
    base = representation_similarity(clip, test_inputs, train_batches, name="image_embeds")   # the baseline

    ens = TRAKEnsemble(TRAKConfig(proj_dim=1024, params="vision_model.encoder.layers.3.*"))   # over M models
    ens.fit(clip, train_batches, contrastive_margin, checkpoints=["a.safetensors", "b.safetensors"], store="out/e")
    res = ens.attribute(clip, test_inputs, contrastive_margin, checkpoints=["a.safetensors", "b.safetensors"])

How. For every training example x_i, the gradient g_i of the model output function f (one scalar per example, see
`_data_attribution_result`) with respect to the chosen parameters is projected to `proj_dim` dimensions by a seeded
random matrix P (Rademacher or Gaussian, entries of variance 1 / proj_dim): phi_i = P^T g_i. With Phi the stacked
features, a target z scores every training example by

    tau(z, x_i) = phi(z)^T (Phi^T Phi + lambda I)^-1 phi_i  [x (1 - p_i), p_i = sigmoid(f(x_i)), when `weighting`]

the linearised model's influence of x_i on f(z) (for a linear model and no projection it is exactly
g_z^T (G^T G)^-1 g_i). `damping` sets lambda relative to the mean diagonal of Phi^T Phi: it keeps the solve defined
when proj_dim exceeds the number of examples. The weighting is TRAK's Q for outputs that are logit margins (as
`contrastive_margin` and `generative_margin` are); switch it off for other outputs (output functions that declare
`weighting = False`, as the diffusion ones do, switch it off themselves). `TRAKEnsemble` (in
`_trak_ensemble`) averages over M models or checkpoints as the paper does: the mean of the M models' scores times
the mean of their weightings, one model in memory at a time (several lenses, or one lens and a list of state
dicts swapped into it in turn).

Diffusion (D-TRAK, Zheng et al. 2024; `_diffusion_tda`). On a diffusion pipeline TRAK differentiates the denoiser
(`pipe.unet`, `pipe.transformer`): `params` globs its own parameter names ("up_blocks.1.attentions.*"). Examples
come from `diffusion_examples(lens, images, prompts)` (latents, text states and K fixed (t, noise) draws each) and
the output function is `diffusion_square` (D-TRAK's best: the mean squared denoiser output) or `diffusion_loss`.
Neither is a logit margin: they declare `weighting = False` and `attribute` skips the weighting for them (warning
when the config asks for it; say `weighting=False`). Stable Diffusion 1/2 UNets, PixArt and SD3 are supported.

    ex = diffusion_examples(sd, images, prompts, timesteps=8, seed=0)
    trak = TRAK(TRAKConfig(proj_dim=512, params="up_blocks.1.attentions.*", weighting=False))
    trak.fit(sd, [{k: v[i:i + 8] for k, v in ex.items()} for i in range(0, len(prompts), 8)], diffusion_square)
    res = trak.attribute(sd, target_ex, diffusion_square)

Per-example gradients. When the output function says which input keys hold one row per example (`example_keys`),
`torch.func.vmap(grad(...))` over `functional_call` takes them all in one pass; when that fails (a model doing
something vmap cannot batch) or the keys are unknown, a loop takes them one example at a time (identical values up
to float rounding). Only the parameters matching `params` (globs over `model.named_parameters()` names) are
differentiated.

Projection. P is drawn block by block (4096 rows of the flattened gradient at a time, each block from its own seed),
so it is the same matrix whatever the batch size or device, and a (n_params x proj_dim) matrix is never held whole
unless it fits in `max_projection_mb` (then it is kept, to avoid drawing it again for every batch).

Store. `fit(..., store=folder)` writes one safetensors shard per training batch (atomically: a kill leaves no half
shard) that records a fingerprint of the config, the parameters' names, shapes and values, and the batch's inputs.
Rerunning skips every finished shard (the features are identical to an uninterrupted run) and refuses shards
written for another model, config or data.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..io import atomic_path, atomic_write_text
from ._estimator import load_estimator, save_estimator
from ._data_attribution_result import (AttributionResult, contrastive_margin, generative_margin,
                                      representation_similarity, representations)
from ._diffusion_tda import diffusion_examples, diffusion_loss, diffusion_square
from .result import provenance

PROJECTIONS = ("rademacher", "gaussian")
PER_EXAMPLE = ("auto", "vmap", "loop")
BLOCK = 4096  # rows of P drawn per seed: part of P's definition, never change it
SHARD = "shard-{:05d}.safetensors"
MANIFEST = "store.json"


@dataclasses.dataclass
class TRAKConfig:
    """Hyperparameters, stored as given; `fit` validates them.

    `params`: glob(s) over `model.named_parameters()` names. `damping`: lambda / mean diag(Phi^T Phi) (0: none, the
    solve then needs proj_dim <= examples). `example_keys`: input keys with one row per example (overrides the
    output function's own; "all" for every tensor). `per_example`: 'auto', 'vmap' or 'loop'."""

    proj_dim: int = 1024
    seed: int = 0
    params: str | list[str] = "*"
    damping: float = 1e-3
    projection: str = "rademacher"
    weighting: bool = True
    per_example: str = "auto"
    example_keys: str | list[str] | None = None
    max_projection_mb: int = 512


class TRAK:
    """Estimator: `fit(lens, train_batches, output_fn)` computes the projected gradient features `features_`
    (train, proj_dim) and outputs `outputs_` (train,) of the training examples; `attribute(lens, targets,
    output_fn)` scores them for each target. Fitted attributes end in `_`."""

    def __init__(self, config: TRAKConfig | None = None, **kw):
        if config is not None and kw:
            raise TypeError(f"give a TRAKConfig or keywords, not both; got config and {sorted(kw)}")
        if config is not None and not isinstance(config, TRAKConfig):
            raise TypeError(f"config must be a TRAKConfig; got {type(config).__name__}")
        self.config = config if config is not None else TRAKConfig(**kw)
        self._P: dict[int, Tensor] = {}
        self._vmap_failed = False

    # ------------------------------------------------------------------------------------------- validation
    def _check_config(self) -> TRAKConfig:
        c = self.config
        if not isinstance(c.proj_dim, int) or isinstance(c.proj_dim, bool) or c.proj_dim < 1:
            raise ValueError(f"proj_dim must be a positive int; got {c.proj_dim!r}")
        if not isinstance(c.seed, int):
            raise ValueError(f"seed must be an int; got {c.seed!r}")
        if not isinstance(c.damping, (int, float)) or c.damping < 0:
            raise ValueError(f"damping must be a number >= 0; got {c.damping!r}")
        if c.projection not in PROJECTIONS:
            raise ValueError(f"projection={c.projection!r}; allowed: {PROJECTIONS}")
        if c.per_example not in PER_EXAMPLE:
            raise ValueError(f"per_example={c.per_example!r}; allowed: {PER_EXAMPLE}")
        return c

    def _select(self, lens) -> dict[str, Tensor]:
        model = _module(lens)
        globs = [self.config.params] if isinstance(self.config.params, str) else list(self.config.params)
        if not globs or not all(isinstance(g, str) for g in globs):
            raise ValueError(f"params must be a glob or a list of globs over parameter names; got "
                             f"{self.config.params!r}")
        named = list(model.named_parameters())
        chosen = {n: p for n, p in named if any(fnmatch.fnmatchcase(n, g) for g in globs)}
        if not chosen:
            what = "model's" if model is lens.model else f"{lens.adapter.denoiser}'s (the denoiser's)"
            raise ValueError(f"params={self.config.params!r} matches none of the {what} {len(named)} parameters; "
                             f"e.g. {[n for n, _ in named[:6]]}")
        return chosen

    # ------------------------------------------------------------------------------------------- projection
    def _block(self, b: int, rows: int, device) -> Tensor:
        if b in self._P:
            return self._P[b].to(device)
        c = self.config
        g = torch.Generator().manual_seed(c.seed * 1_000_003 + b)
        if c.projection == "rademacher":
            P = torch.randint(0, 2, (rows, c.proj_dim), generator=g).float().mul_(2).sub_(1)
        else:
            P = torch.randn(rows, c.proj_dim, generator=g)
        P.div_(c.proj_dim ** 0.5)
        if getattr(self, "_keep_P", False):
            self._P[b] = P
        return P.to(device)

    def projection_matrix(self, n_params: int | None = None) -> Float[Tensor, "n_params proj_dim"]:
        """P as one dense matrix (for checks on small models: it is n_params x proj_dim floats)."""
        n = self.n_params_ if n_params is None else n_params
        return torch.cat([self._block(b, min(BLOCK, n - s), "cpu") for b, s in enumerate(range(0, n, BLOCK))])

    def _project(self, G: Float[Tensor, "batch n_params"]) -> Float[Tensor, "batch proj_dim"]:
        out = G.new_zeros(G.shape[0], self.config.proj_dim)
        n = G.shape[1]
        for b, s in enumerate(range(0, n, BLOCK)):
            out += G[:, s:s + BLOCK] @ self._block(b, min(BLOCK, n - s), G.device)
        return out

    # ----------------------------------------------------------------------------------- per-example gradients
    def _example_keys(self, lens, fn, inputs: Mapping) -> list[str] | None:
        keys = self.config.example_keys
        if keys is None:
            keys = getattr(fn, "example_keys", None)
            if callable(keys):
                keys = keys(lens, inputs)
        if keys is None:
            return None
        tensors = [k for k, v in inputs.items() if isinstance(v, Tensor)]
        keys = tensors if keys == "all" else [keys] if isinstance(keys, str) else list(keys)
        missing = [k for k in keys if k not in inputs or not isinstance(inputs[k], Tensor)]
        if missing:
            raise ValueError(f"example_keys {missing} are not tensors of the inputs (keys: {sorted(inputs)})")
        sizes = {inputs[k].shape[0] if inputs[k].dim() else None for k in keys}
        return keys if len(sizes) == 1 and None not in sizes else None

    def _gradients(self, lens, fn, inputs: Mapping, params: dict[str, Tensor]
                   ) -> tuple[Float[Tensor, "batch n_params"], Float[Tensor, "batch"]]:
        if callable(getattr(fn, "validate", None)):
            fn.validate(lens, inputs)
        mode = self.config.per_example
        keys = self._example_keys(lens, fn, inputs)
        if mode == "vmap" and keys is None:
            raise ValueError("per_example='vmap' needs example_keys (which inputs hold one row per example): set "
                             "TRAKConfig(example_keys=...) or give the output function an example_keys attribute")
        wrapper = _Output(lens, fn)
        detached = {n: p.detach() for n, p in params.items()}
        if keys is not None and mode != "loop" and not (mode == "auto" and self._vmap_failed):
            try:
                return _vmap_grads(wrapper, detached, inputs, keys)
            except Exception as e:  # noqa: BLE001  vmap cannot batch every model; the loop can
                if mode == "vmap":
                    raise
                self._vmap_failed = True
                warnings.warn(f"TRAK: vectorised per-example gradients failed ({type(e).__name__}: {str(e)[:200]}); "
                              "looping over examples instead", stacklevel=4)
        return _loop_grads(wrapper, detached, inputs, keys)

    def _features(self, lens, fn, inputs: Mapping, params: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        G, out = self._gradients(lens, fn, inputs, params)
        return self._project(G).cpu(), out.detach().float().cpu()

    def _prepare_projection(self, n_params: int) -> None:
        self._keep_P = n_params * self.config.proj_dim * 4 <= self.config.max_projection_mb * 2**20

    # -------------------------------------------------------------------------------------------------- fit
    def fit(self, lens, train_batches: Iterable[Mapping], output_fn, *, store: str | os.PathLike | None = None,
            progress: bool = True) -> TRAK:
        """Features of every training example, batch by batch (`train_batches`: processor outputs plus what
        `output_fn` reads, e.g. `labels`; any iterable, consumed once). `store`: a folder for one shard per batch;
        a rerun skips the shards already there (see the module docstring)."""
        from tqdm.auto import tqdm

        cfg = self._check_config()
        if not callable(output_fn):
            raise TypeError(f"output_fn must be a function (lens, inputs) -> Tensor (batch,); got {output_fn!r:.60}")
        params = self._select(lens)
        _check_eval(lens, "TRAK.fit")
        names = list(params)
        shapes = [list(p.shape) for p in params.values()]
        self._P, self._vmap_failed = {}, False
        self._prepare_projection(sum(p.numel() for p in params.values()))
        fingerprint = _fingerprint(cfg, params, output_fn)
        folder = Path(store) if store is not None else None
        feats, outs = [], []
        total = len(train_batches) if hasattr(train_batches, "__len__") else None
        for j, inputs in enumerate(tqdm(train_batches, desc="TRAK.fit", total=total, disable=not progress)):
            if not isinstance(inputs, Mapping):
                raise TypeError(f"train_batches[{j}] is a {type(inputs).__name__}; each batch must be a dict of "
                                "inputs (processor output)")
            digest = _inputs_digest(inputs)
            path = folder / SHARD.format(j) if folder is not None else None
            if path is not None and path.exists():
                phi, out = _read_shard(path, fingerprint, digest, j)
            else:
                phi, out = self._features(lens, output_fn, inputs, params)
                if path is not None:
                    _write_shard(path, phi, out, fingerprint, digest, j)
            feats.append(phi)
            outs.append(out)
        if not feats:
            raise ValueError("train_batches gave no batch")
        if folder is not None:
            atomic_write_text(folder / MANIFEST, json.dumps({"fingerprint": fingerprint, "shards": len(feats),
                                                             "examples": sum(len(o) for o in outs)}, indent=1))
        self.features_, self.outputs_ = torch.cat(feats), torch.cat(outs)
        self.param_names_, self.param_shapes_ = names, shapes
        self.n_params_ = sum(p.numel() for p in params.values())
        self.param_digest_ = _params_digest(params)
        self._kernel = None
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "features_"):
            raise RuntimeError("this TRAK is not fitted: call fit(lens, train_batches, output_fn) or TRAK.load(folder)")

    def _train_side(self, weighting: bool | None = None) -> Float[Tensor, "train proj_dim"]:
        """Phi (Phi^T Phi + lambda I)^-1 (float64), times (1 - p_i) per row when weighting (default: the config's)."""
        weighting = self.config.weighting if weighting is None else weighting
        key = (self.config.damping, weighting)
        if getattr(self, "_kernel", None) is None or self._kernel[0] != key:
            Phi = self.features_.double()
            K = Phi.T @ Phi
            lam = self.config.damping * K.diagonal().mean()
            K = K + lam * torch.eye(K.shape[0], dtype=K.dtype)
            try:
                side = torch.linalg.solve(K, Phi.T).T  # K symmetric: (K^-1 Phi^T)^T = Phi K^-1
            except torch.linalg.LinAlgError:
                raise ValueError(f"Phi^T Phi is singular ({len(Phi)} examples, proj_dim {Phi.shape[1]}): use "
                                 "damping > 0 or a proj_dim no larger than the number of examples") from None
            if weighting:
                side = side * (1 - torch.sigmoid(self.outputs_.double()))[:, None]
            self._kernel = (key, side)
        return self._kernel[1]

    # --------------------------------------------------------------------------------------------- attribute
    def attribute(self, lens, target_inputs: Mapping | Iterable[Mapping], output_fn, *,
                  progress: bool = False) -> AttributionResult:
        """TRAK scores (targets, train) of the targets' outputs `output_fn(lens, target_inputs)` (one batch or an
        iterable of batches), with the model the features were fit on."""
        from tqdm.auto import tqdm

        self._check_fitted()
        cfg = self._check_config()
        params = self._select(lens)
        _check_eval(lens, "TRAK.attribute")
        got = (list(params), [list(p.shape) for p in params.values()])
        if got != (self.param_names_, self.param_shapes_):
            raise ValueError(f"this model's parameters matching {cfg.params!r} ({len(got[0])}: {got[0][:3]}...) are "
                             f"not those the features were fit on ({len(self.param_names_)}: "
                             f"{self.param_names_[:3]}...)")
        if _params_digest(params) != self.param_digest_:
            warnings.warn("TRAK.attribute: the parameters' values differ from those at fit; attribution assumes "
                          "the same model", stacklevel=2)
        self._prepare_projection(self.n_params_)
        batches = [target_inputs] if isinstance(target_inputs, Mapping) else list(target_inputs)
        if not batches:
            raise ValueError("target_inputs gave no batch")
        phi = torch.cat([self._features(lens, output_fn, b, params)[0]
                         for b in tqdm(batches, desc="TRAK.attribute", disable=not progress)])
        weighting = _weighting(cfg, output_fn, "TRAK.attribute")
        scores = (phi.double() @ self._train_side(weighting).T).float()
        meta = provenance(lens, [], technique="TRAK", params=cfg.params, proj_dim=cfg.proj_dim, seed=cfg.seed,
                          damping=cfg.damping, weighting=weighting, output_fn=_fn_name(output_fn),
                          n_params=self.n_params_)
        return AttributionResult(meta=meta, scores=scores, method="trak")

    # ------------------------------------------------------------------------------------------ persistence
    def save(self, folder: str | os.PathLike) -> Path:
        """`cfg.json` (config, parameter names and shapes) and `weights.safetensors` (features_, outputs_)."""
        self._check_fitted()
        return save_estimator(folder, "TRAK", self.config, {"features_": self.features_, "outputs_": self.outputs_},
                              param_names=self.param_names_, param_shapes=self.param_shapes_,
                              n_params=self.n_params_, param_digest=self.param_digest_)

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TRAK:
        cfg, t, doc = load_estimator(folder, "TRAK", TRAKConfig)
        self = cls(cfg)
        self.features_, self.outputs_ = t["features_"], t["outputs_"]
        self.param_names_, self.param_shapes_ = doc["param_names"], doc["param_shapes"]
        self.n_params_, self.param_digest_ = doc["n_params"], doc["param_digest"]
        self._kernel = None
        return self


# ------------------------------------------------------------------------------------------------- gradients
def _module(lens) -> nn.Module:
    """What TRAK differentiates: the lens's model, or a diffusion pipeline's denoiser (`pipe.unet`,
    `pipe.transformer`, as the adapter names it)."""
    model = getattr(lens, "model", None)
    if isinstance(model, nn.Module):
        return model
    den = getattr(getattr(lens, "adapter", None), "denoiser", None)
    module = getattr(model, den, None) if isinstance(den, str) else None
    if not isinstance(module, nn.Module):
        raise TypeError(f"TRAK differentiates a torch module, or the denoiser of a diffusion pipeline (Stable "
                        f"Diffusion UNet, PixArt, SD3); {getattr(lens, 'architecture', lens)!r} wraps a "
                        f"{type(model).__name__} with neither (other diffusion pipelines are not supported)")
    return module


def _weighting(cfg: TRAKConfig, output_fn, where: str) -> bool:
    """The config's weighting, off for output functions that declare `weighting = False` (not logit margins)."""
    if cfg.weighting and getattr(output_fn, "weighting", True) is False:
        warnings.warn(f"{where}: {_fn_name(output_fn)} is not a logit margin, so TRAK's (1 - sigmoid(f)) weighting "
                      "does not apply and is skipped; set TRAKConfig(weighting=False) to say so", stacklevel=3)
        return False
    return bool(cfg.weighting)


def _check_eval(lens, where: str) -> None:
    if _module(lens).training:
        warnings.warn(f"{where}: the model is in training mode (dropout active, outputs random); call "
                      "eval() on it first (lens.model, or a pipeline's denoiser)", stacklevel=3)


class _Output(nn.Module):
    """`output_fn(lens, inputs)` as a module owning `lens.model` (a pipeline's denoiser), so `functional_call` can
    swap in parameters."""

    def __init__(self, lens, fn):
        super().__init__()
        self.model = _module(lens)
        self._lens, self._fn = lens, fn

    def forward(self, inputs: Mapping) -> Tensor:
        out = self._fn(self._lens, inputs)
        if not isinstance(out, Tensor) or out.dim() != 1:
            raise ValueError(f"output_fn must return a (batch,) tensor, one output per example; got "
                             f"{type(out).__name__} {tuple(out.shape) if isinstance(out, Tensor) else ''}")
        return out


def _flat(grads: Mapping[str, Tensor], names: Sequence[str], n: int) -> Tensor:
    return torch.cat([grads[k].reshape(n, -1).float() for k in names], 1)


def _vmap_grads(wrapper: _Output, params: dict[str, Tensor], inputs: Mapping, keys: list[str]):
    from torch.func import functional_call, grad, vmap

    mapped = {k: inputs[k] for k in keys}
    shared = {k: v for k, v in inputs.items() if k not in mapped}
    n = next(iter(mapped.values())).shape[0]

    def f(p, example):
        one = {**shared, **{k: v.unsqueeze(0) for k, v in example.items()}}
        out = functional_call(wrapper, {"model." + k: v for k, v in p.items()}, (one,))
        if out.shape != (1,):
            raise ValueError(f"output_fn gave shape {tuple(out.shape)} for one example; expected (1,)")
        return out[0], out[0].detach()

    with torch.no_grad():  # grad() ignores the outer no_grad; it only keeps the frozen weights out of the graph
        g, out = vmap(grad(f, has_aux=True), in_dims=(None, 0))(params, mapped)
    return _flat(g, list(params), n), out


def _loop_grads(wrapper: _Output, params: dict[str, Tensor], inputs: Mapping, keys: list[str] | None):
    """With example keys: one forward and backward per example. Without: one forward of the batch and one
    backward per output (each output's gradient is exact however the examples interact)."""
    from torch.func import functional_call

    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    swap = {"model." + k: v for k, v in leaves.items()}
    plist = list(leaves.values())
    rows, outs = [], []
    if keys is not None:
        n = inputs[keys[0]].shape[0]
        for i in range(n):
            one = {k: (v[i:i + 1] if k in keys else v) for k, v in inputs.items()}
            with torch.enable_grad():
                out = functional_call(wrapper, swap, (one,))
                if out.shape != (1,):
                    raise ValueError(f"output_fn gave shape {tuple(out.shape)} for one example; expected (1,)")
                g = torch.autograd.grad(out[0], plist, allow_unused=True)
            rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).float()
                                   for x, p in zip(g, plist)]))
            outs.append(out.detach())
    else:
        with torch.enable_grad():
            out = functional_call(wrapper, swap, (inputs,))
            for i in range(out.shape[0]):
                g = torch.autograd.grad(out[i], plist, retain_graph=i + 1 < out.shape[0], allow_unused=True)
                rows.append(torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).float()
                                       for x, p in zip(g, plist)]))
        outs.append(out.detach())
    return torch.stack(rows), torch.cat(outs)


# ---------------------------------------------------------------------------------------------------- store
def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _params_digest(params: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name, p in params.items():
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def _inputs_digest(inputs: Mapping) -> str:
    h = hashlib.sha256()
    for k in sorted(inputs):
        v = inputs[k]
        h.update(k.encode())
        if isinstance(v, Tensor):
            h.update(f"{v.dtype}{tuple(v.shape)}".encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(v).encode())
    return h.hexdigest()[:24]


def _fingerprint(cfg: TRAKConfig, params, output_fn) -> str:
    what = ("proj_dim", "seed", "params", "projection")  # what the features depend on (damping, weighting: not)
    doc = {"config": {k: getattr(cfg, k) for k in what},
           "params": [[n, list(p.shape)] for n, p in params.items()], "values": _params_digest(params),
           "output_fn": _fn_name(output_fn)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:24]


def _write_shard(path: Path, phi: Tensor, out: Tensor, fingerprint: str, digest: str, j: int) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({"features": phi.contiguous(), "outputs": out.contiguous()}, str(tmp),
                  metadata={"format": "mmlens.TRAK.shard", "fingerprint": fingerprint, "inputs": digest,
                            "batch": str(j)})


def _read_shard(path: Path, fingerprint: str, digest: str, j: int) -> tuple[Tensor, Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("fingerprint") != fingerprint:
            raise ValueError(f"{path} was written for another model, parameter set, config or output function; "
                             "use a fresh store folder (or delete it)")
        if meta.get("inputs") != digest:
            raise ValueError(f"{path} was computed from other inputs than batch {j} now gives; the training data "
                             "changed: use a fresh store folder")
        return f.get_tensor("features"), f.get_tensor("outputs")


def __getattr__(name: str):
    """`TRAKEnsemble` lives in `_trak_ensemble` (it builds on TRAK); imported on first use, in either order."""
    if name == "TRAKEnsemble":
        from ._trak_ensemble import TRAKEnsemble

        return TRAKEnsemble
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AttributionResult", "TRAK", "TRAKConfig", "TRAKEnsemble", "contrastive_margin", "diffusion_examples",
           "diffusion_loss", "diffusion_square", "generative_margin", "representation_similarity", "representations"]
