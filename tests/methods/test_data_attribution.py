"""TRAK: projected features are per-example gradients times the projection; the scores are the influence formula on
a linear model; a killed fit resumes to identical features from safetensors shards; the baseline is cosine
similarity; bad input raises."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from mmlens.methods.data_attribution import (TRAK, AttributionResult, TRAKConfig, contrastive_margin,
                                             generative_margin, representation_similarity)
from mmlens.methods.result import Result
from mmlens.testing.tiny_models import sample_inputs

CLIP_PARAMS = ["vision_model.encoder.layers.1.mlp.fc2.weight", "visual_projection.weight"]


def _clip_batches(lens, n_batches: int = 3, batch: int = 3):
    """Batches of `batch` images against 6 shared texts, each image with a label (a text index)."""
    out = []
    for b in range(n_batches):
        x = sample_inputs("clip", lens, batch=batch, seed=10 * b)
        x["labels"] = torch.tensor([(b + k) % x["input_ids"].shape[0] for k in range(batch)])
        out.append(x)
    return out


def _hand_clip_grads(lens, inputs, names):
    """Per-example gradients, one image at a time, of the margin computed by hand from the HF model's logits."""
    model = lens.model
    params = dict(model.named_parameters())
    rows = []
    for i in range(inputs["pixel_values"].shape[0]):
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"][i:i + 1]).logits_per_image[0]
        y = int(inputs["labels"][i])
        margin = logits[y] - torch.cat([logits[:y], logits[y + 1:]]).logsumexp(0)
        g = torch.autograd.grad(margin, [params[n] for n in names])
        rows.append(torch.cat([x.reshape(-1) for x in g]))
    return torch.stack(rows)


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_features_are_projected_per_example_gradients(tiny_lens, per_example):
    lens = tiny_lens("clip")
    batches = _clip_batches(lens, 2)
    trak = TRAK(TRAKConfig(proj_dim=48, seed=3, params=CLIP_PARAMS, per_example=per_example))
    trak.fit(lens, batches, contrastive_margin, progress=False)
    G = torch.cat([_hand_clip_grads(lens, b, CLIP_PARAMS) for b in batches])
    P = trak.projection_matrix()
    assert P.shape == (G.shape[1], 48) and trak.n_params_ == G.shape[1]
    torch.testing.assert_close(P.abs(), torch.full_like(P, 48 ** -0.5))  # Rademacher, variance 1 / proj_dim
    assert 0.4 < (P > 0).float().mean() < 0.6
    torch.testing.assert_close(trak.features_, G @ P, atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in lens.model.parameters())  # the model took no gradient


def test_contrastive_margin_values(tiny_lens):
    """One label: logit minus logsumexp of the others; a bool mask: logsumexp of the marked minus of the rest."""
    lens = tiny_lens("clip")
    x = _clip_batches(lens, 1)[0]
    with torch.no_grad():
        logits = lens.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                            pixel_values=x["pixel_values"]).logits_per_image
        got = contrastive_margin(lens, x)
        mask = torch.zeros(3, 6, dtype=torch.bool)
        mask[:, [0, 2]] = True
        got_set = contrastive_margin(lens, {**x, "labels": mask})
    for i, y in enumerate(x["labels"].tolist()):
        others = [logits[i, j] for j in range(6) if j != y]
        torch.testing.assert_close(got[i], logits[i, y] - torch.stack(others).logsumexp(0))
        torch.testing.assert_close(got_set[i], logits[i, [0, 2]].logsumexp(0) - logits[i, [1, 3, 4, 5]].logsumexp(0))
    with pytest.raises(ValueError, match="at least one marked and one unmarked text"):
        contrastive_margin.validate(lens, {**x, "labels": torch.ones(3, 6, dtype=torch.bool)})


def test_output_loop_without_example_keys(tiny_lens):
    """An output function without example_keys: one forward of the batch, one backward per output."""
    lens = tiny_lens("clip")
    batches = _clip_batches(lens, 1)
    plain = lambda lens, inputs: contrastive_margin(lens, inputs)  # noqa: E731  (no example_keys attribute)
    a = TRAK(proj_dim=16, params=CLIP_PARAMS).fit(lens, batches, plain, progress=False)
    b = TRAK(proj_dim=16, params=CLIP_PARAMS).fit(lens, batches, contrastive_margin, progress=False)
    torch.testing.assert_close(a.features_, b.features_, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.outputs_, b.outputs_, atol=1e-6, rtol=0)


def test_generative_margin_gradients(tiny_lens):
    """llava: the answer token's margin at the last real position; vmap and loop agree with a hand loop."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    inputs["labels"] = torch.tensor([5, 9])
    names = ["lm_head.weight"] if "lm_head.weight" in dict(lens.model.named_parameters()) else None
    names = names or [n for n, _ in lens.model.named_parameters()][-1:]
    params = dict(lens.model.named_parameters())
    rows = []
    for i in range(2):
        one = {k: v[i:i + 1] for k, v in inputs.items() if k != "labels"}
        logits = lens.model(**one).logits[0, int(one["attention_mask"][0].nonzero().max())]
        y = int(inputs["labels"][i])
        margin = logits[y] - torch.cat([logits[:y], logits[y + 1:]]).logsumexp(0)
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(margin, [params[n] for n in names])]))
    G = torch.stack(rows)
    for mode in ("auto", "loop"):
        trak = TRAK(proj_dim=8, params=names, per_example=mode).fit(lens, [inputs], generative_margin, progress=False)
        torch.testing.assert_close(trak.features_, G @ trak.projection_matrix(), atol=1e-5, rtol=1e-4)
    # the baseline takes the same batches (their labels stay out of the forward): each row is its own best match
    sim = representation_similarity(lens, inputs, [inputs], name="lm.blocks.1.resid_post", position="mean")
    torch.testing.assert_close(sim.scores.diagonal(), torch.ones(2))
    assert (sim.scores.diagonal() >= sim.scores.max(1).values - 1e-6).all()


def _linear_lens(d: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(d, 1, bias=False)
    return SimpleNamespace(model=model, architecture="linear", family="test", processor=None)


def _linear_fn(lens, inputs):
    return lens.model(inputs["x"])[:, 0]


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
def test_scores_are_the_influence_formula_on_a_linear_model(projection):
    """f(x) = w.x, so g_i = x_i and, unprojected and undamped, tau(z, x_i) = x_z^T (X^T X)^-1 x_i."""
    lens = _linear_lens()
    g = torch.Generator().manual_seed(1)
    X, Z = torch.randn(20, 6, generator=g), torch.randn(4, 6, generator=g)
    batches = [{"x": X[:8]}, {"x": X[8:]}]
    exact = (Z.double() @ torch.linalg.inv(X.double().T @ X.double()) @ X.double().T).float()
    for proj_dim, damping in ((6, 0.0), (64, 1e-10)):  # P square; P wider than the gradient, damping -> 0
        trak = TRAK(proj_dim=proj_dim, damping=damping, weighting=False, projection=projection,
                    example_keys=["x"]).fit(lens, batches, _linear_fn, progress=False)
        res = trak.attribute(lens, {"x": Z}, _linear_fn)
        torch.testing.assert_close(res.scores, exact, atol=1e-4, rtol=1e-4)
    # TRAK's weighting multiplies example i's column by 1 - sigmoid(f(x_i))
    w = TRAK(proj_dim=6, damping=0.0, weighting=True, projection=projection, example_keys=["x"]).fit(
        lens, batches, _linear_fn, progress=False)
    f = (X @ lens.model.weight[0].detach())
    torch.testing.assert_close(w.outputs_, f, atol=1e-6, rtol=0)
    torch.testing.assert_close(w.attribute(lens, {"x": Z}, _linear_fn).scores, exact * (1 - torch.sigmoid(f)),
                               atol=1e-4, rtol=1e-4)
    # damping shrinks the scores towards 0 (changing it after fit takes effect: the solve is not stale)
    w.config.damping, w.config.weighting = 10.0, False
    assert w.attribute(lens, {"x": Z}, _linear_fn).scores.abs().sum() < 0.5 * exact.abs().sum()


def test_resume_after_kill_gives_identical_features(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    batches = _clip_batches(lens, 4, batch=2)
    cfg = dict(proj_dim=32, seed=1, params=CLIP_PARAMS)
    clean = TRAK(**cfg).fit(lens, batches, contrastive_margin, progress=False)

    def killed():
        yield from batches[:2]
        raise KeyboardInterrupt  # the process dies while the third batch is being read

    store = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        TRAK(**cfg).fit(lens, killed(), contrastive_margin, store=store, progress=False)
    done = sorted(p.name for p in store.iterdir())
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    (store / ".shard-00002.safetensors.x.tmp").write_bytes(b"half a shard")  # what a SIGKILL mid-write leaves
    stamps = {p: p.stat().st_mtime_ns for p in store.glob("shard-*")}
    calls = []

    class Counting(type(contrastive_margin)):
        def __call__(self, lens, inputs):
            calls.append(inputs["pixel_values"].shape[0])
            return super().__call__(lens, inputs)

    counting = Counting()  # repr "contrastive_margin": the same output function as far as the store is concerned
    resumed = TRAK(**cfg).fit(lens, batches, counting, store=store, progress=False)
    assert torch.equal(resumed.features_, clean.features_) and torch.equal(resumed.outputs_, clean.outputs_)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # finished shards were not recomputed
    assert len(calls) == 2  # the two missing batches only (vmap: one call per batch)
    for j in range(4):  # every shard is a safetensors file holding that batch's rows
        with safe_open(str(store / f"shard-{j:05d}.safetensors"), framework="pt") as f:
            assert f.metadata()["format"] == "mmlens.TRAK.shard"
            assert torch.equal(f.get_tensor("features"), clean.features_[2 * j:2 * j + 2])
    # damping and weighting act after the features: a store serves any of them
    stamps = {p: p.stat().st_mtime_ns for p in store.glob("shard-*")}
    other_damping = TRAK(**cfg, damping=0.5, weighting=False).fit(lens, batches, counting, store=store,
                                                                  progress=False)
    assert torch.equal(other_damping.features_, clean.features_) and len(calls) == 2
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # a store written for another config, or for other data, is refused
    with pytest.raises(ValueError, match="another model, parameter set, config"):
        TRAK(**{**cfg, "seed": 2}).fit(lens, batches, contrastive_margin, store=store, progress=False)
    other = [dict(b) for b in batches]
    other[0]["labels"] = other[0]["labels"].flip(0)
    with pytest.raises(ValueError, match="training data changed"):
        TRAK(**cfg).fit(lens, other, contrastive_margin, store=store, progress=False)


def test_save_load_and_result(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    batches = _clip_batches(lens, 2)
    trak = TRAK(proj_dim=16, params=CLIP_PARAMS).fit(lens, batches, contrastive_margin, progress=False)
    target = _clip_batches(lens, 1, batch=2)[0]
    res = trak.attribute(lens, target, contrastive_margin)
    back = TRAK.load(trak.save(tmp_path / "trak"))
    assert back.config == trak.config and back.param_names_ == CLIP_PARAMS
    assert torch.equal(back.attribute(lens, target, contrastive_margin).scores, res.scores)
    assert res.scores.shape == (2, 6) and res.method == "trak"
    # the scores are phi(z) (Phi^T Phi + lambda I)^-1 Phi^T diag(1 - p_i), from the stored features
    phi_t = TRAK(proj_dim=16, params=CLIP_PARAMS).fit(lens, [target], contrastive_margin, progress=False).features_
    Phi = trak.features_.double()
    K = Phi.T @ Phi
    K += 1e-3 * K.diagonal().mean() * torch.eye(16, dtype=K.dtype)
    ref = phi_t.double() @ torch.linalg.inv(K) @ Phi.T * (1 - torch.sigmoid(trak.outputs_.double()))
    torch.testing.assert_close(res.scores, ref.float(), atol=1e-4, rtol=1e-4)
    same = Result.load(res.save(tmp_path / "res"))
    assert isinstance(same, AttributionResult) and torch.equal(same.scores, res.scores)
    vals, idx = res.top(3)
    assert torch.equal(vals, res.scores.sort(1, descending=True).values[:, :3])
    best = idx[:, 0]
    assert torch.equal(res.precision_at_k(best[:1], k=1), (best == best[0]).float())
    import matplotlib.figure
    import numpy as np

    assert isinstance(res.plot(), matplotlib.figure.Figure)
    page = res.html(k=2, train_images=np.zeros((6, 8, 8, 3), np.uint8), train_labels=[f"ex{i}" for i in range(6)])
    assert page.count("<img") == 4 and "ex" in page and "<tr>" in page


def test_representation_similarity_is_cosine(tiny_lens):
    lens = tiny_lens("clip")
    batches, target = _clip_batches(lens, 2), _clip_batches(lens, 1, batch=2)[0]
    res = representation_similarity(lens, target, batches, name="image_embeds")

    def emb(x):
        with torch.no_grad():
            return lens.model(input_ids=x["input_ids"], attention_mask=x["attention_mask"],
                              pixel_values=x["pixel_values"]).image_embeds

    t, x = emb(target), torch.cat([emb(b) for b in batches])
    torch.testing.assert_close(res.scores, torch.nn.functional.normalize(t, dim=-1)
                               @ torch.nn.functional.normalize(x, dim=-1).T, atol=1e-5, rtol=1e-5)
    cls = representation_similarity(lens, target, batches, name="vision.blocks.1.resid_post", position="mean")
    assert cls.scores.shape == (2, 6) and cls.method == "representation_similarity"


def test_errors(tiny_lens):
    lens = tiny_lens("clip")
    batches = _clip_batches(lens, 1)
    fit = lambda trak, fn=contrastive_margin, b=batches: trak.fit(lens, b, fn, progress=False)  # noqa: E731
    with pytest.raises(ValueError, match="proj_dim must be a positive int"):
        fit(TRAK(proj_dim=0))
    with pytest.raises(ValueError, match="projection='sparse'"):
        fit(TRAK(projection="sparse"))
    with pytest.raises(ValueError, match="per_example='batch'"):
        fit(TRAK(per_example="batch"))
    with pytest.raises(ValueError, match="matches none of the model's"):
        fit(TRAK(params="nope.*"))
    with pytest.raises(TypeError, match="not both"):
        TRAK(TRAKConfig(), proj_dim=3)
    with pytest.raises(RuntimeError, match="not fitted"):
        TRAK().attribute(lens, batches[0], contrastive_margin)
    with pytest.raises(ValueError, match="gave no batch"):
        fit(TRAK(params=CLIP_PARAMS), b=[])
    with pytest.raises(ValueError, match="must return a \\(batch,\\) tensor"):
        fit(TRAK(params=CLIP_PARAMS, per_example="loop"), fn=lambda lens, x: contrastive_margin(lens, x).sum())
    with pytest.raises(ValueError, match="needs example_keys"):
        fit(TRAK(params=CLIP_PARAMS, per_example="vmap"), fn=lambda lens, x: contrastive_margin(lens, x))
    no_labels = {k: v for k, v in batches[0].items() if k != "labels"}
    with pytest.raises(ValueError, match="reads inputs\\['labels'\\]"):
        fit(TRAK(params=CLIP_PARAMS), b=[no_labels])
    with pytest.raises(ValueError, match="labels must be \\(3,\\) ints in \\[0, 5\\]"):
        fit(TRAK(params=CLIP_PARAMS), b=[{**batches[0], "labels": torch.tensor([0, 1, 6])}])
    with pytest.raises(TypeError, match="applies to generative models"):
        fit(TRAK(params=CLIP_PARAMS), fn=generative_margin)
    with pytest.raises(TypeError, match="diffusion pipelines are not supported"):
        TRAK().fit(SimpleNamespace(model=object(), architecture="sd"), batches, contrastive_margin)
    trak = fit(TRAK(proj_dim=8, params=CLIP_PARAMS))
    trak.param_shapes_ = [[1], [1]]
    with pytest.raises(ValueError, match="not those the features were fit on"):
        trak.attribute(lens, batches[0], contrastive_margin)
    trak.param_shapes_ = [list(p.shape) for n, p in lens.model.named_parameters() if n in CLIP_PARAMS]
    res = trak.attribute(lens, batches[0], contrastive_margin)
    with pytest.raises(ValueError, match="k must be an int in \\[1, 3\\]"):
        res.top(4)
    with pytest.raises(ValueError, match="relevant indices must lie in"):
        res.precision_at_k([7])
    with pytest.raises(ValueError, match="name must pick one hook point"):
        representation_similarity(lens, batches[0], batches, name="vision.blocks.*.resid_post")
