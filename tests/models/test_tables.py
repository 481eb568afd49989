"""Every row of every adapter's name table binds to a live module on at least one tiny model of its family.

`expand` drops rows that match no module without a word (a table lists modules only some checkpoints have), so a
misspelt path would just be a hook point that never exists. Here each adapter's rows are expanded on every tiny
model it serves (plus variants built in memory: towers alone, BLIP-2 over T5, SD3 with its T5 encoder); a row that
binds on none of them fails the test unless ALLOWED names it with the reason.
"""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmlens.hooks.sites import Row, expand, unbound_rows
from mmlens.models import adapter_for, supported

SRC = Path(__file__).resolve().parents[2] / "src" / "mmlens"

# adapter -> the tiny models (mmlens.testing.tiny_models) it serves; variants built in memory are in VARIANTS
TINY = {
    "clip": ["clip"],
    "siglip": ["siglip"],
    "llava": ["llava", "llava_full"],
    "qwen2_vl": ["qwen2_vl"],
    "paligemma": ["paligemma"],
    "blip2": ["blip2"],
    "sd_unet": ["sd"],
    "pixart": ["pixart"],
    "sd3": ["sd3"],
}

# adapter -> {row name template: why no tiny model has the module}. A name listed here that does bind fails too.
ALLOWED = {
    "clip": {
        "vision.head.out": "the attention-pooling head exists only in SigLIP (shared ViT table)",
        "text.head.out": "the text head exists only in SigLIP (shared text table)",
    },
    "siglip": {
        "vision.ln_pre": "SigLIP has no pre_layrnorm (CLIP-only, shared ViT table)",
    },
    "llava": {
        "vision.head.out": "LLaVA's vision tower is a bare CLIP/SigLIP ViT, without SigLIP's pooling head",
    },
    "paligemma": {
        "vision.ln_pre": "PaliGemma's tower is SigLIP's ViT: no pre_layrnorm",
    },
    "blip2": {
        "vision.ln_pre": "BLIP-2's ViT has no pre_layrnorm (shared ViT table)",
        "vision.head.out": "BLIP-2's ViT has no pooling head (shared ViT table)",
    },
    "sd_unet": {
        "text_encoder.head.out": "the pipeline's text encoder is CLIP's, without SigLIP's text head",
    },
    "sd3": {
        "text_encoder.head.out": "CLIP text encoder: no SigLIP text head",
        "text_encoder_2.head.out": "CLIP text encoder: no SigLIP text head",
    },
}


def _sub_config(full, vision: bool, projection: bool):
    sub = copy.deepcopy(full.vision_config if vision else full.text_config)
    if projection:
        sub.projection_dim = full.projection_dim
    return sub


def _towers(tiny_lens, family: str, classes: list[str]) -> list:
    """The family's towers alone (as in tests/hooks/test_names.py::test_towers_alone), random, in memory."""
    import transformers

    full = tiny_lens(family).model.config
    return [getattr(transformers, c)(_sub_config(full, "Vision" in c, c.endswith("WithProjection"))) for c in classes]


def _blip2_t5(tiny_lens):
    """BLIP-2 over a T5 encoder-decoder instead of OPT: the table's T5 rows."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    cfg = tiny_lens("blip2").model.config
    t5 = T5Config(vocab_size=cfg.text_config.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                  num_decoder_layers=1, num_heads=4, decoder_start_token_id=0, pad_token_id=0)
    blip2 = Blip2Config(vision_config=cfg.vision_config, qformer_config=cfg.qformer_config, text_config=t5,
                        num_query_tokens=cfg.num_query_tokens)
    return [Blip2ForConditionalGeneration(blip2)]


def _sd3_t5(tiny_lens):
    """The tiny SD3 pipeline with a third, T5, text encoder (the tiny build leaves it out)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    pipe = tiny_lens("sd3").model
    comps = {k: v for k, v in pipe.components.items() if k not in ("text_encoder_3", "tokenizer_3")}
    t5 = T5EncoderModel(T5Config(vocab_size=len(pipe.tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=4))
    return [StableDiffusion3Pipeline(**comps, text_encoder_3=t5, tokenizer_3=pipe.tokenizer)]


VARIANTS = {
    "clip": lambda tl: _towers(tl, "clip", ["CLIPVisionModel", "CLIPTextModel", "CLIPVisionModelWithProjection",
                                            "CLIPTextModelWithProjection"]),
    "siglip": lambda tl: _towers(tl, "siglip", ["SiglipVisionModel", "SiglipTextModel"]),
    "blip2": _blip2_t5,
    "sd3": _sd3_t5,
}


def _key(row: Row) -> tuple[str, str]:
    return row.name, row.path


def table_report(models: list) -> tuple[dict[tuple[str, str], Row], set[tuple[str, str]]]:
    """Every row the adapter produced on any of `models` (by name and path), and those that bound on at least one."""
    rows, bound = {}, set()
    for model in models:
        adapter = adapter_for(type(model).__name__)(model)
        table = adapter.rows()
        unbound = {_key(r) for r in unbound_rows(table, expand(table, adapter.root()))}
        for row in table:
            rows.setdefault(_key(row), row)
            if _key(row) not in unbound:
                bound.add(_key(row))
    return rows, bound


def unexplained(adapter: str, models: list) -> list[str]:
    """Rows that bind on none of `models` and are not in ALLOWED, as 'name <- path'."""
    rows, bound = table_report(models)
    allowed = ALLOWED.get(adapter, {})
    return [f"{n} <- {p}" for (n, p) in rows if (n, p) not in bound and n not in allowed]


def _models(tiny_lens, adapter: str) -> list:
    models = [tiny_lens(name).model for name in TINY[adapter]]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return models + (VARIANTS[adapter](tiny_lens) if adapter in VARIANTS else [])


def test_every_adapter_is_covered():
    assert set(TINY) == set(supported())
    assert set(ALLOWED) <= set(TINY)


@pytest.mark.parametrize("adapter", list(TINY))
def test_every_row_binds_on_some_tiny_model(tiny_lens, adapter):
    models = _models(tiny_lens, adapter)
    assert {adapter_for(type(m).__name__).name for m in models} == {adapter}
    missing = unexplained(adapter, models)
    assert not missing, f"{adapter}: rows that bind on no tiny model (typo, or add to ALLOWED with a reason): {missing}"
    rows, bound = table_report(models)
    names_bound = {n for n, _ in bound}
    stale = {n for n in ALLOWED.get(adapter, {}) if n in names_bound or all(n != r for r, _ in rows)}
    assert not stale, f"{adapter}: ALLOWED lists rows that bind (or are not in the table): {sorted(stale)}"


def test_a_misspelt_path_is_reported(tiny_lens, monkeypatch):
    """The check above catches a typo that expand would drop without a word."""
    from mmlens.models.sd_unet import StableDiffusionAdapter

    lens = tiny_lens("sd")
    root = StableDiffusionAdapter(lens.model).root()
    rows = StableDiffusionAdapter(lens.model).rows()
    typo = Row("unet.mid.out", "unet.mid_blok", layout="(batch, channels, h, w)")
    bad = [typo if r.name == "unet.mid.out" else r for r in rows]
    sites = expand(bad, root)
    assert "unet.mid.out" not in sites and len(sites) == len(expand(rows, root)) - 1  # silently absent...
    before = unbound_rows(rows, expand(rows, root))
    assert [r.name for r in before] == ["text_encoder.head.out"]  # (the allowed one)
    assert unbound_rows(bad, sites) == before + [typo]  # ...but reported, in table order

    # a typo inside a templated row (the cross-attention of every UNet block) fails the table test itself
    original = StableDiffusionAdapter.rows
    monkeypatch.setattr(StableDiffusionAdapter, "rows", lambda self: [
        Row(r.name, r.path.replace(".attn2", ".atn2"), r.read, r.pick, r.heads, r.part, r.layout)
        for r in original(self)])
    missing = unexplained("sd_unet", [lens.model])
    up = "unet.up.{b}.attn.{a}.cross.pattern <- unet.up_blocks.{b}.attentions.{a}.transformer_blocks.0.atn2"
    assert up in missing
    assert len(missing) == 3 * 6  # down, mid, up: q, k, v, z, out, pattern


def test_registry_imports_no_adapter_and_fills_on_import():
    """Registration flows one way: adapters import the registry, `mmlens.models` imports the adapters."""
    tree = ast.parse((SRC / "models" / "registry.py").read_text())
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    adapters = {p.stem for p in (SRC / "models").glob("*.py")} - {"__init__", "registry", "base", "towers", "diffusion"}
    assert not imported & adapters, imported & adapters
    code = ("import mmlens.models.registry as r; import mmlens; "
            "assert len(r.supported()) == 9, r.supported(); "
            "assert r.adapter_for('LlavaForConditionalGeneration').name == 'llava'; print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
