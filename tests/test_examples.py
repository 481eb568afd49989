"""The scripts in examples/ run, and what they print is right against the world's ground truth."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest

from mmlens.organisms import available

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.skipif(not {"clip", "vlm"} <= set(available()), reason="needs the shipped clip and vlm organisms")
def test_organisms_tour(capsys):
    from mmlens.world import make_scene

    result = runpy.run_path(str(EXAMPLES / "organisms_tour.py"))["main"](seed=3)
    scene = make_scene(3, size=48)
    assert result["clip"] == f"a {scene.objects[0].name}"
    binding = [a == t for a, t, (_, _, kind) in zip(result["answers"], result["truth"], scene.questions())
               if kind in ("colour_of_shape", "shape_of_colour")]
    assert binding and all(binding)
    assert result["n_image"] == 65  # 8x8 patches + CLS, the "full" feature strategy
    assert "lm.blocks.3.resid_post (1, " in capsys.readouterr().out


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_attention_to_objects(capsys):
    """The answer position attends to the asked object's patches (ground-truth masks) more than to the other
    object's: at least 2x in its best layer, on held-out scenes."""
    result = runpy.run_path(str(EXAMPLES / "attention_to_objects.py"))["main"](n_scenes=16)
    ratio = result["asked"] / result["other"]
    assert result["n"] >= 8 and ratio.max() > 2.0
    assert ((result["asked"] > 0) & (result["asked"] < 1)).all()
    assert "block 1 attention from the answer" in capsys.readouterr().out


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_logit_lens_example():
    """The asked colour is top-1 at the answer from block 1 on; the object's patches decode its colour."""
    result = runpy.run_path(str(EXAMPLES / "logit_lens.py"))["main"]()
    assert [top[0] for top in result["top"][2:]] == [result["truth"]] * (len(result["top"]) - 2)
    assert result["grid"].shape[1:] == (8, 8)


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_direct_effects_example(capsys):
    """The direct terms rebuild the model's image embedding; attention carries more of it than the MLPs do."""
    result = runpy.run_path(str(EXAMPLES / "direct_effects.py"))["main"](n=24)
    assert result["gap"] < 1e-4
    assert abs(float(result["share"].sum()) - 1) < 1e-4
    acc = result["accuracy"]
    assert acc["none"] >= 0.9 and acc["attn"] < acc["mlp"]
    assert "share of the true class's logit" in capsys.readouterr().out


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_tuned_lens_example():
    result = runpy.run_path(str(EXAMPLES / "tuned_lens.py"))["main"](n_train=32, steps=80)
    assert (result["tuned"][:-1] < result["logit"][:-1]).all()  # below the logit lens at every layer but the last
    assert abs(float(result["tuned"][-1] - result["logit"][-1])) < 1e-6


@pytest.mark.skipif("diffusion" not in available(), reason="needs the shipped diffusion organism")
def test_diffusion_lens_example():
    result = runpy.run_path(str(EXAMPLES / "diffusion_lens.py"))["main"](steps=10)
    ok = result["colour_ok"]
    assert ok["text_encoder.blocks.1.resid_post"] >= 0.75 and ok["text_encoder.blocks.0.resid_post"] >= 0.75
    assert result["result"].images.shape[:2] == (3, 4)


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_probes_and_neurons_example():
    result = runpy.run_path(str(EXAMPLES / "probes_and_neurons.py"))["main"](n=120)
    sweep = result["sweep"]
    assert sweep.score[-1] >= 0.9 and sweep.control[-1] < 0.4  # colour is in the last layer, shuffled labels are not
    assert sweep.score[0] < 0.5  # the patch embeddings' class token carries no colour yet
    assert result["top"].values.shape == (1, 1, 4)


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_attention_knockout(capsys):
    """Cutting image -> answer attention hurts in the blocks where the answer forms (0-1), not after (2-3)."""
    result = runpy.run_path(str(EXAMPLES / "attention_knockout.py"))["main"](n_scenes=16)
    acc = result["accuracy"]  # (blocks, edges): image->last, question->last
    assert result["baseline"] == 1.0
    assert acc[:2, 0].min() < 0.95 and (acc[2:] == 1.0).all()
    assert "image->last" in capsys.readouterr().out


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_activation_patching(capsys):
    """The asked object's tokens carry the answer at block 0; from block 2 on the answer position does."""
    result = runpy.run_path(str(EXAMPLES / "activation_patching.py"))["main"](n_pairs=8)
    rec, col = result["recovery"], {c: k for k, c in enumerate(result["columns"])}
    assert rec[0, col["object"]] > 0.5 and rec[2:, col["answer"]].min() > 0.8
    assert rec[2:, col["object"]].max() < 0.2
    assert "restored at" in capsys.readouterr().out


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_textspan_example(capsys):
    """Some head is named by colours, another by shapes; SpLiCE's two heaviest concepts name the object."""
    result = runpy.run_path(str(EXAMPLES / "textspan.py"))["main"](n=48)
    assert {"colour", "shape"} <= set(result["labels"].values())
    assert result["hit_rate"] >= 0.8 and float(result["splice"].l0().mean()) <= 4
    assert "top-2 concepts are the object's colour and shape" in capsys.readouterr().out


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_network_dissection_example(capsys):
    """The best 'red' unit by NetDissect's IoU is 'red' to CLIP-Dissect too and really prefers red scenes."""
    result = runpy.run_path(str(EXAMPLES / "network_dissection.py"))["main"]()
    assert result["said"] == "red" and result["red_selectivity"] > 1.0 and result["red_unit"][2] > 0.2
    assert min(result["agree"].values()) > 0.2
    assert result["maps"].maps.shape == (4, 1, 48, 48)
    assert "CLIP-Dissect and NetDissect agree" in capsys.readouterr().out


@pytest.mark.skipif("vlm" not in available(), reason="needs the shipped vlm organism")
def test_relevancy_maps(capsys):
    """The answer logit's relevancy and IG peak on the asked object more often than chance (its area)."""
    result = runpy.run_path(str(EXAMPLES / "relevancy_maps.py"))["main"](n_scenes=8)
    hits = result["pointing_game"]
    assert hits["integrated_gradients"] >= 0.75 and hits["chefer"] > 2 * result["chance"]
    assert "pointing game" in capsys.readouterr().out


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_feature_visualization_example(capsys):
    """The 'red' direction's visualisations are judged red, and so are the world images it ranks first."""
    result = runpy.run_path(str(EXAMPLES / "feature_visualization.py"))["main"]()
    assert result["colours"] == ["red", "red"]
    assert result["top_colours"].count("red") >= 5
    assert min(result["rise"]) > 0
    assert "the judge's colour" in capsys.readouterr().out


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_data_attribution_example(capsys):
    """A rerun on the store skips every shard (identical features); training images used as targets rank themselves
    first; the top examples of new images share their class above chance."""
    result = runpy.run_path(str(EXAMPLES / "data_attribution.py"))["main"]()
    assert result["identical"] and result["rerun_seconds"] < 2.0
    assert result["self_top1"] == 1.0
    assert result["same_class"]["baseline"] > 0.3 and result["same_class"]["trak"] > 2 / 24
    assert "rank themselves first" in capsys.readouterr().out


@pytest.mark.skipif("diffusion" not in available(), reason="needs the shipped diffusion organism")
def test_diffusion_attribution_example(capsys):
    """D-TRAK on the diffusion organism: training images rank themselves first; a generated image's top training
    examples carry its prompt well above chance."""
    result = runpy.run_path(str(EXAMPLES / "diffusion_attribution.py"))["main"]()
    assert result["self_top1"] >= 5 / 6
    assert result["same_caption"] > 3 * result["chance"]
    assert "rank themselves first" in capsys.readouterr().out


@pytest.mark.skipif("diffusion" not in available(), reason="needs the shipped diffusion organism")
def test_word_maps_example(capsys):
    """Maps for every prompt and site; the shape word's map overlaps the judged object far better than marking the
    whole image (chance: the organism's cross-attention is trained to carry the layout), and the segmentation labels
    each pixel with a prompt word or background."""
    result = runpy.run_path(str(EXAMPLES / "word_maps.py"))["main"](steps=10)
    res = result["result"]
    assert res.maps.shape[:2] == (8, len(res.labels)) and len(result["per_site"]) == 4
    assert result["miou"] >= 0.5 > result["chance"] > 0
    seg = result["segmentation"]
    assert seg.shape == (8, 32, 32) and seg.min() >= -1 and seg.max() < len(res.labels)
    assert "shape word mIoU over all sites" in capsys.readouterr().out


@pytest.mark.skipif("clip" not in available(), reason="needs the shipped clip organism")
def test_sparse_autoencoder_example(capsys):
    """The SAE replaces the site well, a feature marks red objects (world masks), its dashboard's top patches come
    from images of red objects, and SAELens's format round-trips."""
    r = runpy.run_path(str(EXAMPLES / "sparse_autoencoder.py"))["main"](n=160)
    m = r["metrics"]
    assert m.explained_variance > 0.8 and abs(m.l0 - 8) < 1e-6
    assert m.downstream["spliced"] >= 0.8 * m.downstream["clean"]
    assert r["top_in_red_images"] >= 0.75
    assert r["roundtrip_diff"] < 1e-4
    assert "red feature" in capsys.readouterr().out
