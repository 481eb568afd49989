"""Canonical names: required forms exist, globs work, unknown names teach, every name fires."""

from __future__ import annotations

import pytest

import mmlens
from mmlens.testing.tiny_models import sample_inputs
from tests.conftest import ALL, DIFFUSION

REQUIRED = {
    "clip": ["vision.blocks.1.resid_post", "vision.blocks.1.attn.pattern", "text.blocks.1.resid_post", "logits",
             "image_embeds", "text_embeds", "vision.embed", "vision.ln_post", "text.ln_final"],
    "siglip": ["vision.blocks.1.resid_post", "vision.blocks.1.attn.pattern", "text.blocks.1.resid_post",
               "vision.head.out", "logits"],
    "llava": ["vision.blocks.1.resid_post", "vision.blocks.1.attn.pattern", "lm.blocks.1.resid_post",
              "lm.blocks.1.attn.pattern", "projector.out", "lm.embed", "lm.ln_final", "logits"],
    "qwen2_vl": ["vision.blocks.1.resid_post", "vision.blocks.1.attn.pattern", "lm.blocks.1.resid_post",
                 "lm.blocks.1.attn.pattern", "projector.out", "logits"],
    "paligemma": ["vision.blocks.1.resid_post", "lm.blocks.1.attn.pattern", "projector.out", "logits"],
    "blip2": ["vision.blocks.1.resid_post", "qformer.blocks.1.resid_post", "qformer.blocks.0.cross.pattern",
              "lm.blocks.1.resid_post", "lm.blocks.1.attn.pattern", "projector.out", "logits"],
    "sd": ["text_encoder.blocks.1.resid_post", "unet.up.1.attn.0.cross.pattern", "unet.down.0.attn.0.self.pattern",
           "unet.mid.attn.0.cross.pattern", "unet.out"],
    "pixart": ["text_encoder.blocks.1.resid_post", "dit.blocks.1.cross.pattern", "dit.blocks.1.self.pattern", "dit.out"],
    "sd3": ["text_encoder.blocks.1.resid_post", "text_encoder_2.blocks.1.resid_post", "dit.blocks.1.joint.pattern",
            "dit.blocks.0.context_resid_post", "dit.out"],
}
PER_BLOCK = ["resid_pre", "resid_post", "attn.q", "attn.k", "attn.v", "attn.z", "attn.out", "attn.pattern",
             "mlp.post", "mlp.out"]


@pytest.mark.parametrize("name", list(REQUIRED))
def test_required_names_exist(tiny_lens, name):
    lens = tiny_lens(name)
    points = set(lens.hook_points())
    assert not set(REQUIRED[name]) - points
    if name not in DIFFUSION:
        towers = {p.split(".blocks.")[0] for p in points if ".blocks." in p}
        for tower in towers - {"qformer"}:
            assert {f"{tower}.blocks.0.{s}" for s in PER_BLOCK} <= points, tower


@pytest.mark.parametrize("name", [n for n in ALL if n not in DIFFUSION])
def test_every_name_fires_with_documented_rank(tiny_lens, name):
    lens = tiny_lens(name)
    _, cache = lens.run_with_cache(sample_inputs(name, lens, batch=2), names="*")
    assert set(cache) == set(lens.hook_points())
    for n in cache:
        layout = lens.sites[n].row.layout
        if layout.startswith("(") and "," in layout.split(")")[0] and name != "qwen2_vl":
            rank = layout.split(")")[0].count(",") + 1
            assert cache[n].dim() == rank, (n, tuple(cache[n].shape), layout)


def test_globs_and_natural_order(tiny_lens):
    lens = tiny_lens("llava")
    assert lens.hook_points("lm.blocks.*.resid_post") == ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"]
    assert lens.resolve(["lm.blocks.0.resid_post", "lm.blocks.*.resid_post"]) == lens.hook_points("lm.blocks.*.resid_post")


def test_unknown_name_lists_close_matches(tiny_lens):
    lens = tiny_lens("llava")
    with pytest.raises(ValueError) as err:
        lens.run_with_cache(sample_inputs("llava", lens), names="lm.blocks.1.resid_pots")
    msg = str(err.value)
    assert "'lm.blocks.1.resid_pots'" in msg and "lm.blocks.1.resid_post" in msg and "models/llava.py" in msg
    with pytest.raises(ValueError, match="vision.blocks.0.attn.pattern"):
        lens.hooks({"vision.block.0.attn.pattern": lambda x, c: None}).__enter__()
    with pytest.raises(ValueError, match="glob matching no hook point 'nothing.\*'"):
        lens.hook_points("nothing.*")


def test_describe_folds_blocks(tiny_lens):
    text = tiny_lens("llava").describe()
    assert "lm.blocks.{0..1}.resid_post" in text and "projector.out" in text


def test_unsupported_architecture_error(tmp_path):
    import transformers

    cfg = transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8)
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        mmlens.load(tmp_path)
    msg = str(err.value)
    assert "'BertModel'" in msg and "LlavaForConditionalGeneration" in msg and "src/mmlens/models/" in msg


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        mmlens.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        mmlens.load(tmp_path)
    with pytest.raises(TypeError, match="expected a folder path"):
        mmlens.load(42)


@pytest.mark.parametrize("cls,prefix", [("CLIPVisionModel", "vision."), ("CLIPTextModel", "text."),
                                        ("SiglipVisionModel", "vision."), ("CLIPVisionModelWithProjection", "vision.")])
def test_towers_alone(tiny_folder, tmp_path, cls, prefix):
    import transformers

    full = mmlens.load(tiny_folder("clip" if cls.startswith("CLIP") else "siglip")).model.config
    sub = full.vision_config if "Vision" in cls else full.text_config
    if cls.endswith("WithProjection"):
        sub.projection_dim = full.projection_dim
    getattr(transformers, cls)(sub).save_pretrained(tmp_path)
    lens = mmlens.load(tmp_path)
    assert type(lens.model).__name__ == cls
    assert f"{prefix}blocks.1.resid_post" in lens.hook_points()
    kw = {"pixel_values": __import__("torch").randn(1, 3, 32, 32)} if prefix == "vision." else \
        {"input_ids": __import__("torch").tensor([[2, 9, 29, 40, 3]])}
    out, cache = lens.run_with_cache(kw, names=f"{prefix}blocks.*.resid_post")
    ref = lens.model(**kw, output_hidden_states=True).hidden_states
    __import__("torch").testing.assert_close(cache[f"{prefix}blocks.1.resid_post"], ref[2])


def test_a_pattern_resolves_once_per_lens(tiny_lens, monkeypatch):
    """The sites never change, so `lens.resolve` keeps each pattern's names (a glob over every hook point, re-sorted,
    cost ~2 ms a call at LLaVA-7B's 650 names); callers get their own list; an alias still warns every time."""
    import mmlens.lens

    lens = tiny_lens("llava")
    first = lens.resolve("lm.blocks.*.resid_post")
    calls = []
    real = mmlens.lens.resolve
    monkeypatch.setattr(mmlens.lens, "resolve", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    again = lens.resolve("lm.blocks.*.resid_post")
    assert again == first and calls == []
    again.append("junk")
    assert lens.resolve("lm.blocks.*.resid_post") == first
    assert lens.resolve(["lm.blocks.0.resid_post", "lm.blocks.*.attn.pattern"]) == \
        ["lm.blocks.0.resid_post", *lens.hook_points("lm.blocks.*.attn.pattern")]
    for _ in range(2):
        with pytest.warns(FutureWarning, match="alias"):
            assert lens.resolve("lm.blocks.0.attn.probs") == ["lm.blocks.0.attn.pattern"]
    with pytest.raises(mmlens.errors.UnknownNameError):
        lens.resolve("lm.blocks.*.nonsense")


def test_malformed_names_still_get_the_named_error(tiny_lens):
    lens = tiny_lens("llava")
    with pytest.raises(TypeError, match="must hold strings"):
        lens.resolve(["lm.blocks.0.resid_post", ["lm.blocks.1.resid_post"]])
