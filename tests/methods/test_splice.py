"""SpLiCE: the batched non-negative lasso against closed forms, planted sparse codes and its KKT conditions; the
decomposition of a tiny CLIP's embeddings against the model's own features."""

from __future__ import annotations

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure
from torch import nn

from mmlens.methods import Result
from mmlens.methods.splice import SpliceResult, image_embeddings, nonneg_lasso, splice
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_image

matplotlib.use("Agg")

CONCEPTS = ["red", "blue", "green", "square", "circle", "cross", "left", "right"]


def _kkt(w, z, d, l1):
    """Largest violation of the optimality conditions of min_{w>=0} 1/2||z - wD||^2 + l1 |w|_1: with g the
    gradient of the quadratic, g + l1 = 0 where w > 0 and g + l1 >= 0 where w = 0."""
    w, z, d = w.double(), z.double(), d.double()
    g = (w @ d - z) @ d.T + l1
    active = w > 0
    return max(float(g[active].abs().max()) if active.any() else 0.0, float((-g[~active]).clamp_min(0).max()))


def test_orthonormal_dictionary_has_closed_form():
    """With orthonormal concept rows the problem separates: w = max(0, z D^T - l1)."""
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 6, generator=g))
    d = q.T  # (6, 20), orthonormal rows
    z = torch.randn(5, 20, generator=g)
    w = nonneg_lasso(z, d, 0.3)
    torch.testing.assert_close(w, (z @ d.T - 0.3).clamp_min(0), atol=1e-5, rtol=0)


def test_planted_sparse_code_and_kkt():
    g = torch.Generator().manual_seed(1)
    d = nn.functional.normalize(torch.randn(30, 64, generator=g), dim=-1)  # 30 concepts in 64 dims
    truth = torch.zeros(8, 30)
    for i in range(8):
        support = torch.randperm(30, generator=g)[:3]
        truth[i, support] = 0.5 + torch.rand(3, generator=g)
    z = truth @ d
    w = nonneg_lasso(z, d, 1e-4, max_iter=5000)
    torch.testing.assert_close(w, truth, atol=2e-3, rtol=0)  # a tiny penalty: the planted code itself
    assert torch.equal(w > 1e-2, truth > 0)
    noisy = z + 0.05 * torch.randn(z.shape, generator=g)
    for l1 in (0.05, 0.3):  # with noise and real penalties: non-negative and optimal by the KKT conditions
        w = nonneg_lasso(noisy, d, l1)
        assert bool((w >= 0).all()) and _kkt(w, noisy, d, l1) < 1e-5
    assert _kkt(truth, noisy, d, 0.3) > 1e-2  # the check bites: the planted code is not the penalised optimum
    w = nonneg_lasso(noisy, d, 0.1)
    assert float((w > 0).sum(1).float().mean()) < float((nonneg_lasso(noisy, d, 0.01) > 0).sum(1).float().mean())
    rows = torch.stack([nonneg_lasso(noisy[i:i + 1], d, 0.1)[0] for i in range(3)])  # batching changes nothing
    torch.testing.assert_close(w[:3], rows, atol=1e-5, rtol=0)


def test_solver_errors():
    with pytest.raises(ValueError, match="l1 must be"):
        nonneg_lasso(torch.zeros(1, 4), torch.eye(4), -1.0)
    with pytest.raises(ValueError, match="share d"):
        nonneg_lasso(torch.zeros(1, 4), torch.eye(3), 0.1)
    with pytest.raises(ValueError, match="max_iter"):
        nonneg_lasso(torch.zeros(1, 4), torch.eye(4), 0.1, max_iter=0)


def _text_ref(lens, texts):
    enc = dict(lens.processor.tokenizer(texts, padding=True, return_tensors="pt"))
    with torch.no_grad():
        out = lens.model.get_text_features(**enc)
    return nn.functional.normalize((out if isinstance(out, torch.Tensor) else out.pooler_output).float(), dim=-1)


def test_splice_on_tiny_clip(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    images = [sample_image(200 + i) for i in range(6)]
    classes = ["a red square", "a blue circle", "a green cross"]
    labels = [0, 1, 2, 0, 1, 2]
    res = splice(lens, images, CONCEPTS, l1=0.05, classes=classes, labels=labels, batch_size=4)
    pv = lens.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        f = lens.model.get_image_features(pixel_values=pv)
    x = nn.functional.normalize((f if isinstance(f, torch.Tensor) else f.pooler_output).float(), dim=-1)
    t = _text_ref(lens, CONCEPTS)
    torch.testing.assert_close(image_embeddings(lens, images), x, atol=1e-5, rtol=1e-5)
    mu = x.mean(0)
    z = nn.functional.normalize(x - mu, dim=-1)
    dic = nn.functional.normalize(t - t.mean(0), dim=-1)
    torch.testing.assert_close(res.dictionary, dic, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.image_mean, mu, atol=1e-6, rtol=1e-5)
    assert res.weights.shape == (6, len(CONCEPTS)) and bool((res.weights >= 0).all())
    assert _kkt(res.weights, z, dic, 0.05) < 1e-4
    torch.testing.assert_close(res.cosine, nn.functional.cosine_similarity(res.weights @ dic, z, dim=-1))
    scale = (x - mu).norm(dim=-1).mean()
    rebuilt = nn.functional.normalize(scale * nn.functional.normalize(res.weights @ dic, dim=-1) + mu, dim=-1)
    torch.testing.assert_close(res.reconstruct(), rebuilt, atol=1e-5, rtol=1e-5)
    c = _text_ref(lens, classes)
    y = torch.tensor(labels)
    assert res.accuracy == pytest.approx(float(((x @ c.T).argmax(-1) == y).float().mean()))
    assert res.accuracy_reconstructed == pytest.approx(float(((rebuilt @ c.T).argmax(-1) == y).float().mean()))
    top = res.top(0, 3)
    assert [w for _, w in top] == sorted([w for _, w in top], reverse=True) and all(w > 0 for _, w in top)
    back = Result.load(res.save(tmp_path / "sp"))
    assert isinstance(back, SpliceResult) and torch.equal(back.weights, res.weights) and back.classes == classes
    assert isinstance(res.plot(), Figure) and "6 images over 8 concepts" in res.summary()
    sparse = splice(lens, images, CONCEPTS, l1=0.5)  # a larger penalty: fewer concepts, no classes
    assert float(sparse.l0().sum()) < float(res.l0().sum()) and sparse.accuracy is None
    pinned = splice(lens, images[:1], CONCEPTS, image_mean=mu)  # one image with a given mean
    assert pinned.weights.shape == (1, len(CONCEPTS))


def test_splice_errors(tiny_lens):
    lens = tiny_lens("clip")
    images = [sample_image(i) for i in range(3)]
    with pytest.raises(ValueError, match="give both or neither"):
        splice(lens, images, CONCEPTS, classes=["a red square"])
    with pytest.raises(ValueError, match="one class index"):
        splice(lens, images, CONCEPTS, classes=["a red square"], labels=[0, 1, 0])
    with pytest.raises(ValueError, match="pass image_mean"):
        splice(lens, images[:1], CONCEPTS)
    with pytest.raises(ValueError, match="image_mean must have"):
        splice(lens, images, CONCEPTS, image_mean=torch.zeros(5))
    with pytest.raises(ValueError, match="l1 must be"):
        splice(lens, images, CONCEPTS, l1=-0.1)
    with pytest.raises(TypeError, match="contrastive"):
        splice(tiny_lens("sd"), images, CONCEPTS)


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_organism_concepts_name_colour_and_shape():
    """Single-object scenes of the clip organism: the two heaviest concepts are the object's colour and shape."""
    import mmlens.organisms as organisms
    from mmlens.world import single_object_scene
    from mmlens.world.scene import COLOURS, SHAPES, SIZES

    clip = organisms.load("clip")
    scenes = [single_object_scene(30_000 + i) for i in range(48)]
    concepts = {**{c: [f"a {c} {s}" for s in SHAPES] for c in COLOURS},
                **{s: [f"a {c} {s}" for c in COLOURS] for s in SHAPES}, **{z: [z] for z in SIZES}}
    res = splice(clip, [s.pil() for s in scenes], concepts)
    hits = [{c for c, _ in res.top(i, 2)} == {s.objects[0].colour, s.objects[0].shape} for i, s in enumerate(scenes)]
    assert sum(hits) / len(hits) >= 0.8
