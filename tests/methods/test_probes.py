"""Linear probes: ridge equals least squares, classification finds what is there and not what is not, features
are the cached activations, estimators round-trip, and the Hewitt-Liang control task catches a probe that memorises
types."""

from __future__ import annotations

import pytest
import torch

from mmlens.methods import LinearProbe, ProbeSweepResult, Result, probe_features, probe_sweep
from mmlens.methods.probes import control_task_labels
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
    assert type(back) is ProbeSweepResult and torch.equal(back.score, res.score) and back.control_task == "shuffle"
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
    with pytest.raises(ValueError, match="20 samples in X but 19 labels"):
        probe_sweep(X, y[:19], train=10)


def test_control_task_errors():
    X, y = _data(n=20)
    types = list(range(20))
    with pytest.raises(ValueError, match=r"control='random'; allowed: \('shuffle', 'types'\)"):
        probe_sweep(X, y, train=10, control="random")
    with pytest.raises(ValueError, match="control='types' needs types=: one type id per sample"):
        probe_sweep(X, y, train=10, control="types")
    with pytest.raises(ValueError, match="types has 19 entries but there are 20 samples; types needs one type id"):
        probe_sweep(X, y, train=10, control="types", types=types[:19])
    with pytest.raises(ValueError, match="types= is read only by control='types'"):
        probe_sweep(X, y, train=10, types=types)
    with pytest.raises(ValueError, match="types must be hashable ids"):
        control_task_labels(y, [{"a": 1}] * 20)
    with pytest.raises(ValueError, match="types must be a sequence"):
        control_task_labels(y, "abcdefghijklmnopqrst")


def _typed(n=600, n_types=12, seed=0):
    """Every sample is one of `n_types` types, in turn (0, 1, ..., T-1, 0, 1, ...)."""
    types = torch.arange(n) % n_types
    return types, torch.Generator().manual_seed(seed)


def test_types_control_catches_a_probe_that_memorises_types(tmp_path):
    """X is the one-hot type and the label is a function of the type: the probe scores perfectly by reading the type,
    and so it does on Hewitt and Liang's control task (a random label per type), while shuffled labels sit at chance.
    Selectivity against the types control says the representation holds nothing beyond type identity."""
    types, g = _typed()
    X = torch.nn.functional.one_hot(types, 12).float() + 0.05 * torch.randn(600, 12, generator=g)
    y = types % 3
    shuffle = probe_sweep(X, y, train=450)
    typed = probe_sweep(X, y, train=450, control="types", types=types)
    assert shuffle.score[0] == 1.0 and typed.score[0] == 1.0
    assert typed.control[0] > 0.9, typed.control  # memorised: every type was seen in training
    assert shuffle.control[0] < 0.5, shuffle.control  # 3 classes: chance is 1/3
    assert typed.selectivity[0] < 0.1 and shuffle.selectivity[0] > 0.5
    assert typed.control_task == "types" and shuffle.control_task == "shuffle"
    back = Result.load(typed.save(tmp_path / "typed"))
    assert back.control_task == "types" and torch.equal(back.control, typed.control)
    legend = [t.get_text() for t in typed.plot().axes[0].get_legend().get_texts()]
    assert legend == ["held-out", "control (Hewitt-Liang: a random label per type)"]
    legend = [t.get_text() for t in shuffle.plot().axes[0].get_legend().get_texts()]
    assert legend == ["held-out", "control (shuffled labels)"]


def test_types_control_is_selective_when_the_label_is_encoded_beyond_type():
    """X encodes the label linearly and not the type (labels independent of types): the probe reads the label and
    the control labels, a function of the type only, are out of its reach, so selectivity is high."""
    types, g = _typed(n_types=40)
    y = torch.randint(0, 3, (600,), generator=g)
    X = torch.nn.functional.one_hot(y, 3).float() @ torch.randn(3, 8, generator=g) * 3 + \
        0.3 * torch.randn(600, 8, generator=g)
    res = probe_sweep(X, y, train=450, control="types", types=types)
    assert res.score[0] > 0.95 and res.control[0] < 0.6, (res.score, res.control)
    assert res.selectivity[0] > 0.4
    # regression: the same, with R^2
    v = torch.rand(600, generator=g)
    Xr = v[:, None] * torch.randn(1, 8, generator=g) + 0.05 * torch.randn(600, 8, generator=g)
    reg = probe_sweep(Xr, v, train=450, task="regression", control="types", types=types)
    assert reg.score[0] > 0.9 and reg.control[0] < 0.2 and reg.selectivity[0] > 0.7, (reg.score, reg.control)


def test_control_task_labels_are_one_draw_per_type():
    """Constant within each type, drawn from the labels' own values (classes or regression values), seeded; any
    hashable type ids (tuples, strings, tensor rows)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 5, (300,), generator=g)
    types = torch.randint(0, 30, (300,), generator=g)
    c = control_task_labels(y, types, seed=3)
    assert c.shape == y.shape and c.dtype == y.dtype
    for t in types.unique():
        assert len(c[types == t].unique()) == 1
    assert set(c.tolist()) <= set(y.tolist())
    assert torch.equal(c, control_task_labels(y, types, seed=3))
    assert not torch.equal(c, control_task_labels(y, types, seed=4))
    # not the true labels: the control is unrelated to them beyond what the type carries
    assert (c != y).float().mean() > 0.5
    # regression: values drawn from the empirical values
    v = torch.rand(300, generator=g)
    cv = control_task_labels(v, types.tolist())
    assert all(len(cv[types == t].unique()) == 1 for t in types.unique()) and set(cv.tolist()) <= set(v.tolist())
    # tuples, strings and tensor rows as types
    shapes = [("circle", "red"), ("square", "red"), ("circle", "red"), ("square", "blue")] * 5
    ct = control_task_labels(y[:20], shapes)
    for s in set(shapes):
        assert len({ct[i].item() for i in range(20) if shapes[i] == s}) == 1
    cs = control_task_labels(y[:20], [f"{a}-{b}" for a, b in shapes])
    assert torch.equal(cs, ct)  # the same types in the same first-seen order: the same draws
    rows = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1]] * 5)
    assert torch.equal(control_task_labels(y[:20], rows), ct)


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
