"""TRAK ensembles: the scores are the mean of the models' scores times the mean of their weightings (checked against
per-example gradients taken by hand); one model is the single TRAK; checkpoints swapped into one lens equal separate
lenses and leave the lens's weights as they were; a kill mid-ensemble resumes to identical features; save/load; bad
input raises."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

import mmlens
from mmlens.methods.data_attribution import TRAK, TRAKConfig, TRAKEnsemble, contrastive_margin
from mmlens.testing.tiny_models import sample_inputs

CLIP_PARAMS = ["vision_model.encoder.layers.1.mlp.fc2.weight", "visual_projection.weight"]


class _MLP(torch.nn.Module):
    def __init__(self, d: int = 5, h: int = 4):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, h), torch.nn.Linear(h, 1)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_lens(seed: int, h: int = 4):
    torch.manual_seed(seed)
    return SimpleNamespace(model=_MLP(h=h).eval(), architecture="mlp", family="test", processor=None)


def _mlp_fn(lens, inputs):
    return lens.model(inputs["x"])[:, 0]


def _data():
    g = torch.Generator().manual_seed(5)
    X, Z = torch.randn(24, 5, generator=g), torch.randn(3, 5, generator=g)
    return [{"x": X[:10]}, {"x": X[10:]}], {"x": Z}, X, Z


def _hand(lens, X, Z, P, damping):
    """(scores without weighting, 1 - sigmoid(f(x_i))) of one model from autograd gradients, one example at a time."""
    params = list(lens.model.parameters())

    def grads(A):
        return torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(lens.model(a[None])[0, 0], params)])
                            for a in A]).double()

    Phi, phi = grads(X) @ P.double(), grads(Z) @ P.double()
    K = Phi.T @ Phi
    K = K + damping * K.diagonal().mean() * torch.eye(K.shape[0], dtype=K.dtype)
    with torch.no_grad():
        q = 1 - torch.sigmoid(lens.model(X)[:, 0].double())
    return phi @ torch.linalg.inv(K) @ Phi.T, q


CFG = dict(proj_dim=16, seed=2, damping=1e-3, example_keys=["x"])


def test_ensemble_is_mean_scores_times_mean_weighting(tmp_path):
    lenses = [_mlp_lens(s) for s in (0, 1, 2)]
    batches, target, X, Z = _data()
    ens = TRAKEnsemble(**CFG).fit(lenses, batches, _mlp_fn, progress=False)
    res = ens.attribute(lenses, target, _mlp_fn)
    P = ens.members_[0].projection_matrix()
    hand = [_hand(lens, X, Z, P, CFG["damping"]) for lens in lenses]
    s_mean = torch.stack([s for s, _ in hand]).mean(0)
    q_mean = torch.stack([q for _, q in hand]).mean(0)
    torch.testing.assert_close(res.scores, (s_mean * q_mean).float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ens.weights_, q_mean)
    # the weighting is averaged, then multiplied: not the mean of the weighted single-model scores
    per_model = torch.stack([s * q for s, q in hand]).mean(0).float()
    assert (res.scores - per_model).abs().max() > 1e-3
    # and it is the average of M single-model TRAKs (unweighted) times the averaged weighting
    singles = [TRAK(**CFG, weighting=False).fit(lens, batches, _mlp_fn, progress=False) for lens in lenses]
    avg = torch.stack([t.attribute(lens, target, _mlp_fn).scores for t, lens in zip(singles, lenses)]).mean(0)
    torch.testing.assert_close(res.scores, avg * q_mean.float(), atol=1e-5, rtol=1e-4)
    # weighting=False: the plain average
    ens.config.weighting = False
    torch.testing.assert_close(ens.attribute(lenses, target, _mlp_fn).scores, s_mean.float(), atol=1e-5, rtol=1e-4)
    assert res.meta["ensemble"] == 3 and res.method == "trak"

    # one lens with the same models as checkpoints (a state dict, a safetensors file, None = its own weights)
    ens.config.weighting = True
    lens = _mlp_lens(2)
    own = {k: v.clone() for k, v in lens.model.state_dict().items()}
    save_file({k: v.contiguous() for k, v in lenses[1].model.state_dict().items()}, str(tmp_path / "m1.safetensors"))
    partial = {"fc1.weight": lenses[0].model.fc1.weight.detach()}  # a partial checkpoint: only its keys change
    mixed = _mlp_lens(2)
    mixed.model.load_state_dict(partial, strict=False)
    ckpts = [partial, tmp_path / "m1.safetensors", None]
    by_ckpt = TRAKEnsemble(**CFG).fit(lens, batches, _mlp_fn, checkpoints=ckpts, progress=False)
    by_lens = TRAKEnsemble(**CFG).fit([mixed, lenses[1], lenses[2]], batches, _mlp_fn, progress=False)
    torch.testing.assert_close(by_ckpt.attribute(lens, target, _mlp_fn, checkpoints=ckpts).scores,
                               by_lens.attribute([mixed, lenses[1], lenses[2]], target, _mlp_fn).scores,
                               atol=1e-6, rtol=1e-5)
    assert all(torch.equal(v, own[k]) for k, v in lens.model.state_dict().items())  # its weights came back


def test_one_model_is_the_single_trak(tiny_lens):
    lens = tiny_lens("clip")
    batches = [sample_inputs("clip", lens, batch=3, seed=s) for s in (0, 1)]
    for b in batches:
        b["labels"] = torch.tensor([0, 2, 1])
    target = {**sample_inputs("clip", lens, batch=2, seed=7), "labels": torch.tensor([1, 0])}
    cfg = TRAKConfig(proj_dim=12, params=CLIP_PARAMS)
    single = TRAK(cfg).fit(lens, batches, contrastive_margin, progress=False)
    ens = TRAKEnsemble(cfg).fit(lens, batches, contrastive_margin, progress=False)
    torch.testing.assert_close(ens.attribute(lens, target, contrastive_margin).scores,
                               single.attribute(lens, target, contrastive_margin).scores, atol=1e-6, rtol=1e-5)
    assert torch.equal(ens.members_[0].features_, single.features_)


def _perturbed(lens, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """A second checkpoint: the chosen parameters nudged by seeded noise."""
    g = torch.Generator().manual_seed(11)
    params = dict(lens.model.named_parameters())
    return {n: params[n].detach() + scale * torch.randn(params[n].shape, generator=g) for n in CLIP_PARAMS}


def test_resume_after_kill_mid_ensemble(tiny_folder, tmp_path):
    lens = mmlens.load(tiny_folder("clip"))  # its own copy: checkpoints are swapped into it
    batches = []
    for s in range(3):
        b = sample_inputs("clip", lens, batch=2, seed=s)
        b["labels"] = torch.tensor([s % 2, (s + 1) % 2])
        batches.append(b)
    ckpts = [None, _perturbed(lens)]
    own = {k: v.clone() for k, v in lens.model.state_dict().items()}
    cfg = dict(proj_dim=16, seed=1, params=CLIP_PARAMS)
    clean = TRAKEnsemble(**cfg).fit(lens, batches, contrastive_margin, checkpoints=ckpts, progress=False)
    assert not torch.equal(clean.members_[0].features_, clean.members_[1].features_)

    class Dying:  # walks the batches once per model; the process dies reading model 1's second batch
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            for j, b in enumerate(batches):
                if (self.passes, j) == (2, 1):
                    raise KeyboardInterrupt
                yield b

    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        TRAKEnsemble(**cfg).fit(lens, Dying(), contrastive_margin, checkpoints=ckpts, store=store, progress=False)
    assert all(torch.equal(v, own[k]) for k, v in lens.model.state_dict().items())  # restored after the kill
    assert sorted(p.name for p in (store / "model-000").iterdir()) == [f"shard-0000{j}.safetensors" for j in range(3)] \
        + ["store.json"]
    assert sorted(p.name for p in (store / "model-001").iterdir()) == ["shard-00000.safetensors"]
    calls = []

    class Counting(type(contrastive_margin)):
        def __call__(self, lens, inputs):
            calls.append(inputs["pixel_values"].shape[0])
            return super().__call__(lens, inputs)

    resumed = TRAKEnsemble(**cfg).fit(lens, batches, Counting(), checkpoints=ckpts, store=store, progress=False)
    assert len(calls) == 2  # model 1's two missing batches only
    for a, b in zip(resumed.members_, clean.members_):
        assert torch.equal(a.features_, b.features_) and torch.equal(a.outputs_, b.outputs_)
    # the checkpoints in another order are refused by the stores (each model's shards record its weights)
    with pytest.raises(ValueError, match="another model, parameter set, config"):
        TRAKEnsemble(**cfg).fit(lens, batches, contrastive_margin, checkpoints=ckpts[::-1], store=store,
                                progress=False)


def test_save_load_round_trip(tmp_path):
    lenses = [_mlp_lens(s) for s in (0, 1)]
    batches, target, _, _ = _data()
    ens = TRAKEnsemble(**CFG).fit(lenses, batches, _mlp_fn, progress=False)
    back = TRAKEnsemble.load(ens.save(tmp_path / "ens"))
    assert back.config == ens.config and back.n_models_ == 2
    for a, b in zip(back.members_, ens.members_):
        assert torch.equal(a.features_, b.features_) and torch.equal(a.outputs_, b.outputs_)
        assert (a.param_names_, a.param_shapes_, a.param_digest_) == (b.param_names_, b.param_shapes_,
                                                                       b.param_digest_)
    assert torch.equal(back.attribute(lenses, target, _mlp_fn).scores, ens.attribute(lenses, target, _mlp_fn).scores)
    with pytest.raises(ValueError, match="holds a 'TRAKEnsemble', not a TRAK"):
        TRAK.load(tmp_path / "ens")


def test_errors(tmp_path):
    lenses = [_mlp_lens(s) for s in (0, 1)]
    batches, target, _, _ = _data()

    def fit(models, b=batches, **kw):
        return TRAKEnsemble(**CFG).fit(models, b, _mlp_fn, progress=False, **kw)

    with pytest.raises(ValueError, match="no models"):
        fit([])
    with pytest.raises(ValueError, match="checkpoints is empty"):
        fit(lenses[0], checkpoints=[])
    with pytest.raises(TypeError, match="not both"):
        fit(lenses, checkpoints=[None])
    with pytest.raises(TypeError, match="checkpoints must be a list"):
        fit(lenses[0], checkpoints=str(tmp_path / "a.safetensors"))
    with pytest.raises(FileNotFoundError, match="checkpoints\\[1\\]: no file"):
        fit(lenses[0], checkpoints=[None, tmp_path / "missing.safetensors"])
    with pytest.raises(TypeError, match="checkpoints\\[0\\] is of type int"):
        fit(lenses[0], checkpoints=[3])
    with pytest.raises(ValueError, match=r"model 1's parameters matching '\*' differ from model 0's: "
                                         r"\('fc1.weight', \[6, 5\]\) where model 0 has \('fc1.weight', \[4, 5\]\)"):
        fit([lenses[0], _mlp_lens(3, h=6)])
    own = {k: v.clone() for k, v in lenses[0].model.state_dict().items()}
    with pytest.raises(ValueError, match="checkpoint 1: fc1.weight is \\(6, 5\\) but the model's is \\(4, 5\\)"):
        fit(lenses[0], checkpoints=[lenses[1].model.state_dict(), {"fc1.weight": torch.zeros(6, 5)}])
    assert all(torch.equal(v, own[k]) for k, v in lenses[0].model.state_dict().items())
    with pytest.raises(ValueError, match="checkpoint 0 has 1 keys the model lacks"):
        fit(lenses[0], checkpoints=[{"fc3.weight": torch.zeros(1)}])
    with pytest.raises(TypeError, match="consumed by one pass"):
        fit(lenses, b=iter(batches))

    class Shuffled:  # a DataLoader with shuffle=True: each pass another order
        def __init__(self):
            self.passes = 0

        def __iter__(self):
            self.passes += 1
            return iter(batches if self.passes == 1 else batches[::-1])

    with pytest.raises(ValueError, match="another batch 0 than model 0"):
        fit(lenses, b=Shuffled())
    with pytest.raises(RuntimeError, match="not fitted"):
        TRAKEnsemble(**CFG).attribute(lenses, target, _mlp_fn)
    ens = fit(lenses)
    with pytest.raises(ValueError, match="fit on 2 models; got 1"):
        ens.attribute(lenses[:1], target, _mlp_fn)
    with pytest.warns(UserWarning, match="model 1's parameter values differ from those at fit"):
        ens.attribute([lenses[0], _mlp_lens(4)], target, _mlp_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same models: no warning
        ens.attribute(lenses, target, _mlp_fn)
