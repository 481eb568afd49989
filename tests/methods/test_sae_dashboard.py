"""Feature dashboards against brute force over `store.tensor(name)`: top tokens, histograms, text-token tallies,
overlays; the regenerated diffusion image against a steered generate; HTML and save/load."""

from __future__ import annotations

import contextlib

import matplotlib
import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.methods.maps import images_uint8
from mmlens.methods.result import Result
from mmlens.methods.sae_dashboard import THUMB, FeatureDashboard, feature_dashboard
from mmlens.methods.sae_splice import steer_features
from mmlens.store import MODALITIES, write_activations
from mmlens.testing.tiny_models import sample_image
from tests.methods.test_sae_splice import random_sae

matplotlib.use("Agg")
FEATS = [0, 5, 9]


@pytest.fixture(scope="module")
def clip_store(tiny_lens, tmp_path_factory):
    lens = tiny_lens("clip")
    site = "vision.blocks.1.resid_post"
    images = [np.asarray(sample_image(s)) for s in range(6)]
    store = write_activations(lens, images, names=site, folder=tmp_path_factory.mktemp("acts"), batch_size=4,
                              progress=False)
    return lens, site, images, store


def brute_top(a: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest positive activations, ties to the lower index."""
    on = (a > 0).nonzero().flatten()
    return on[torch.argsort(-a[on], stable=True)][:k]


def test_top_tokens_histogram_overlays(clip_store):
    lens, site, images, store = clip_store
    sae = random_sae(64, hook_name=site, seed=2)
    dash = feature_dashboard(lens, sae, store, FEATS, k=8, images=images, prompts=[f"image {i}" for i in range(6)],
                             bins=12, progress=False)
    A = sae.encode(store.tensor(site))[:, FEATS]
    assert dash.n_tokens == len(store) == 6 * 17
    for j, f in enumerate(FEATS):
        a = A[:, j]
        top = brute_top(a, 8)
        assert len(top) == 8  # every chosen feature fires on more than k tokens here
        assert torch.equal(dash.top_index[j], top)
        torch.testing.assert_close(dash.top_values[j], a[top])
        assert int(dash.fire_count[j]) == int((a != 0).sum())
        assert int(dash.hist_counts[j].sum()) == int((a != 0).sum())
        assert dash.hist_counts.shape == (3, 12) and float(dash.hist_edges[j, -1]) == pytest.approx(float(a.max()))
        for rec, i in zip(dash.top(f), top.tolist()):  # metadata of each top token, from the store's table
            assert rec["index"] == i and rec["activation"] == pytest.approx(float(a[i]))
            assert rec["example"] == int(store.meta["example"][i]) and rec["row"] == int(store.meta["row"][i])
            assert rec["col"] == int(store.meta["col"][i])
            assert rec["modality"] == MODALITIES[int(store.meta["modality"][i])]
            assert rec["text"] == f"image {rec['example']}"
        # the first overlay is the top patch token's image; its grid holds the feature on every patch of it
        first = next(r for r in dash.top(f) if r["row"] >= 0)
        info = dash.overlays[j][0]
        assert (info["example"], info["image"]) == (first["example"], first["image"])
        assert (info["rows"], info["cols"]) == (4, 4)
        rows = store.select(example=first["example"], image=first["image"]) & (store.meta["row"] >= 0)
        want = torch.zeros(4, 4)
        want[store.meta["row"][rows].long(), store.meta["col"][rows].long()] = A[rows, j]
        torch.testing.assert_close(dash.overlay_maps[j, 0], want)
        assert float(dash.overlay_maps[j, 0, first["row"], first["col"]]) == pytest.approx(first["activation"])
        assert len({(o["example"], o["image"]) for o in dash.overlays[j]}) == len(dash.overlays[j]) <= 4
    assert dash.overlay_images.shape == (3, 4, THUMB, THUMB, 3) and dash.overlay_images.dtype == torch.uint8
    assert dash.text_tokens == [[], [], []]  # a vision tower: no text tokens
    html = dash._repr_html_()
    for f in FEATS:
        assert f"id='feature-{f}'" in html and f"<h4>feature {f}</h4>" in html
    # a histogram and an overlay per distinct top image (at most 4) per feature
    assert html.count("data:image/png;base64,") == sum(1 + len(o) for o in dash.overlays)
    assert all(2 <= len(o) <= 4 for o in dash.overlays)
    assert isinstance(dash.plot(), Figure)


def test_save_load_round_trip(clip_store, tmp_path):
    lens, site, images, store = clip_store
    dash = feature_dashboard(lens, random_sae(64, hook_name=site, seed=2), store, [5, 9], k=4, images=images,
                             progress=False)
    back = Result.load(dash.save(tmp_path / "dash"))
    assert isinstance(back, FeatureDashboard)
    for f in ("name", "features", "k", "n_tokens", "top_tokens", "text_tokens", "overlays", "regenerate", "meta"):
        assert getattr(back, f) == getattr(dash, f), f
    for f in ("top_values", "top_index", "fire_count", "hist_counts", "hist_edges", "overlay_maps",
              "overlay_images", "regen_base", "regen_images"):
        assert torch.equal(getattr(back, f), getattr(dash, f)), f
    assert back._repr_html_() == dash._repr_html_()


def test_text_tokens_on_a_vlm_lm_site(tiny_lens, tmp_path):
    """LLaVA's LM: the text tokens a feature fires on, counted and averaged by hand over the store's text rows."""
    lens = tiny_lens("llava")
    site = "lm.blocks.0.resid_post"
    data = [{"image": sample_image(s), "text": t} for s, t in
            enumerate(["<image> what colour is the square ?", "<image> is the circle red ?",
                       "<image> what shape is on the left ?"])]
    store = write_activations(lens, data, names=site, folder=tmp_path / "acts", progress=False)
    sae = random_sae(64, hook_name=site, seed=4)
    with torch.no_grad():  # the tiny LM's residuals are small (norm ~0.2): no biases, so features fire on about half
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    dash = feature_dashboard(lens, sae, store, [1, 2], k=5, text_tokens=50, progress=False)
    A = sae.encode(store.tensor(site))[:, [1, 2]]
    text = (store.meta["modality"] == MODALITIES.index("text")) & (store.meta["token"] >= 0)
    for j in range(2):
        on = text & (A[:, j] != 0)
        want = {}
        for t, v in zip(store.meta["token"][on].tolist(), A[on, j].tolist()):
            c, s = want.get(t, (0, 0.0))
            want[t] = (c + 1, s + v)
        got = {r["id"]: (r["count"], r["mean"]) for r in dash.text_tokens[j]}
        assert set(got) == set(want) and len(got) > 0
        for t, (c, s) in want.items():
            assert got[t][0] == c and got[t][1] == pytest.approx(s / c, rel=1e-5)
        assert [r["count"] for r in dash.text_tokens[j]] == sorted((c for c, _ in want.values()), reverse=True)
        assert all(r["token"] == store.token_strings[r["id"]] for r in dash.text_tokens[j])
        assert torch.equal(dash.top_index[j], brute_top(A[:, j], 5))
    # image tokens among the top ones get overlays on their patch grid; without images, the heat map alone
    assert dash.overlay_images.numel() == 0 and any(dash.overlays)
    html = dash._repr_html_()
    assert "text tokens it fires on" in html and html.count("data:image/png") == sum(1 + len(o) for o in dash.overlays)


def test_diffusion_regenerate(tiny_lens, tmp_path):
    lens = tiny_lens("sd")
    site = "unet.mid.out"
    gen = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32)
    store = write_activations(lens, ["a red square", "a blue circle"], names=site, folder=tmp_path / "acts",
                              progress=False, **gen)
    sae = random_sae(64, hook_name=site, seed=5)
    dash = feature_dashboard(lens, sae, store, [1, 2], k=6, progress=False,
                             regenerate=dict(prompt="a red square", value=4.0, seed=3, steps=[0], **gen))
    assert all(r["step"] in (0, 1) and r["branch"] in ("uncond", "cond") for r in dash.top(1))
    assert dash.overlays[0] and all(o["step"] >= 0 for o in dash.overlays[0])  # latent cells, per step and branch

    def image(feats=None):
        with steer_features(lens, sae, feats, steps=[0]) if feats else contextlib.nullcontext():
            out, _ = lens.generate("a red square", names=[], generator=torch.Generator().manual_seed(3),
                                   progress=False, output_type="np", **gen)
        return images_uint8(list(out.images))[0]

    assert torch.equal(dash.regen_base, image())
    assert torch.equal(dash.regen_images[0], image({1: 4.0}))
    assert torch.equal(dash.regen_images[1], image({2: 4.0}))
    assert not torch.equal(dash.regen_images[0], dash.regen_base)
    assert dash.regenerate == {"prompt": "a red square", "values": [4.0, 4.0], "seed": 3, "mode": "clamp",
                               "steps": [0], **gen}
    assert "clamp 4" in dash._repr_html_()
    top = feature_dashboard(lens, sae, store, [1], k=2, progress=False,
                            regenerate=dict(prompt="a red square", value="max", **gen))
    assert top.regenerate["values"] == [pytest.approx(float(top.top_values[0, 0]))]


def test_errors(clip_store, tiny_lens):
    lens, site, images, store = clip_store
    sae = random_sae(64, hook_name=site)
    with pytest.raises(ValueError, match="feature 40 is out of range: this SAE has d_sae=32"):
        feature_dashboard(lens, sae, store, [40], progress=False)
    with pytest.raises(ValueError, match=r"features \[1, 1\] repeat an index"):
        feature_dashboard(lens, sae, store, [1, 1], progress=False)
    with pytest.raises(ValueError, match="k must be a positive int"):
        feature_dashboard(lens, sae, store, [1], k=0, progress=False)
    with pytest.raises(ValueError, match=r"the store holds \['vision.blocks.1.resid_post'\], not 'vision.blocks.0"):
        feature_dashboard(lens, random_sae(64, hook_name="vision.blocks.0.resid_post"), store, [1], progress=False)
    with pytest.raises(ValueError, match="has 64 features per token in the store; this SAE reads d_in=32"):
        feature_dashboard(lens, random_sae(32, hook_name=site), store, [1], progress=False)
    with pytest.raises(ValueError, match="regenerate: images are regenerated by diffusion pipelines"):
        feature_dashboard(lens, sae, store, [1], regenerate=dict(prompt="x", value=1.0), progress=False)
    with pytest.raises(IndexError, match="images has 2 entries; the store's example"):
        feature_dashboard(lens, sae, store, [0, 5, 9], images=images[:2], progress=False)
    with pytest.raises(TypeError, match="features must be"):
        feature_dashboard(lens, sae, store, "red", progress=False)
