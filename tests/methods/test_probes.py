"""Linear probes: ridge equals least squares, classification finds what is there and not what is not, features
are the cached activations, estimators round-trip."""

from __future__ import annotations

import pytest
import torch

from mmlens.methods import LinearProbe, ProbeSweepResult, Result, probe_features, probe_sweep
from mmlens.testing.tiny_models import sample_inputs


def _data(n=400, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    informative = torch.nn.functional.one_hot(y, 3).float() @ torch.randn(3, d, generator=g) * 3 + \
        torch.randn(n, d, generator=g) * 0.3
    noise = torch.randn(n, d, generator=g)
    return torch.stack([informative, noise]), y


def test_ridge_without_penalty_is_least_squares():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 200, 5, generator=g)
    y = X[0] @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0]) + 0.7
    probe = LinearProbe("regression", l2=0.0).fit(X, y)
    for k in range(2):
        Z = (X[k] - X[k].mean(0)) / X[k].std(0)
        ref = torch.linalg.lstsq(torch.cat([Z, torch.ones(200, 1)], 1), y[:, None]).solution
        torch.testing.assert_close(probe.weight_[k], ref[:-1], atol=1e-4, rtol=1e-4)
    r2 = probe.score(X, y)
    assert r2[0] > 0.999 and r2[1] < 0.2


def test_classification_finds_only_what_is_there(tmp_path):
    X, y = _data()
    res = probe_sweep(X, y, train=300, names=["informative", "noise"])
    assert res.score[0] == 1.0 and res.score[1] < 0.55 and (res.control < 0.55).all()
    assert res.selectivity[0] > 0.45
    back = Result.load(res.save(tmp_path / "sweep"))
    assert type(back) is ProbeSweepResult and torch.equal(back.score, res.score)
    probe = LinearProbe().fit(X[:, :300], y[:300])
    again = LinearProbe.load(probe.save(tmp_path / "probe"))
    assert torch.equal(again.predict(X[:, 300:]), probe.predict(X[:, 300:]))
    assert set(probe.predict(X).unique().tolist()) <= {0, 1, 2}


def test_probe_features_are_cached_activations(tiny_lens):
    lens = tiny_lens("llava")
    batches = [sample_inputs("llava", lens, batch=2, seed=s) for s in range(2)]
    names = "lm.blocks.*.resid_post"
    cls = probe_features(lens, batches, names=names, positions="cls")
    groups = [[(0, [1, 2]), (1, [3])], [(1, [0, 4, 5])]]
    per = probe_features(lens, batches, names=names, positions=groups)
    assert cls.shape == (2, 4, 64) and per.shape == (2, 3, 64)
    _, c = lens.run_with_cache(batches[1], names=names)
    torch.testing.assert_close(cls[:, 2:], torch.stack([c[n][:, 0] for n in lens.resolve(names)]))
    torch.testing.assert_close(per[:, 2], torch.stack([c[n][1, [0, 4, 5]].mean(0) for n in lens.resolve(names)]))


def test_probe_errors():
    X, y = _data(n=20)
    with pytest.raises(ValueError, match="task='ranking'; allowed"):
        LinearProbe("ranking").fit(X, y)
    with pytest.raises(ValueError, match="20 samples in X but 19 labels"):
        LinearProbe().fit(X, y[:19])
    with pytest.raises(RuntimeError, match="not fitted"):
        LinearProbe().predict(X)
    with pytest.raises(ValueError, match="leaves no training"):
        probe_sweep(X, y, train=20)


def test_interrupted_save_is_refused(tmp_path):
    """New tensors next to an old JSON (a save cut between the two files) must not load as a mixture."""
    X, y = _data(n=60)
    res = probe_sweep(X, y, train=40)
    res.save(tmp_path / "a")
    res2 = probe_sweep(X * 2 + 1, y, train=40, task="classification", seed=1)
    res2.save(tmp_path / "b")
    (tmp_path / "a" / "tensors.safetensors").write_bytes((tmp_path / "b" / "tensors.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        Result.load(tmp_path / "a")
    probe = LinearProbe().fit(X[:, :40], y[:40])
    probe.save(tmp_path / "p")
    LinearProbe().fit(X[:, :40] + 1, y[:40]).save(tmp_path / "q")
    (tmp_path / "p" / "weights.safetensors").write_bytes((tmp_path / "q" / "weights.safetensors").read_bytes())
    with pytest.raises(ValueError, match="does not match"):
        LinearProbe.load(tmp_path / "p")
