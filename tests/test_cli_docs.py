"""The CLI is a thin shell that works; the demo runs every section; the generated docs match the tables; run-time
code never imports the test helpers."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmlens import organisms
from mmlens.cli import app

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "mmlens"
SHIPPED = pytest.mark.skipif(set(organisms.available()) != set(organisms.NAMES), reason="needs all three organisms")


def test_cli_supported_lists_every_adapter():
    res = CliRunner().invoke(app, ["supported"])
    assert res.exit_code == 0
    for name in ("clip", "siglip", "llava", "qwen2_vl", "paligemma", "blip2", "sd_unet", "pixart", "sd3"):
        assert name in res.output


def test_cli_hook_points(tiny_folder):
    res = CliRunner().invoke(app, ["hook-points", str(tiny_folder("llava"))])
    assert res.exit_code == 0 and "lm.blocks.{0..1}.attn.pattern" in res.output
    res = CliRunner().invoke(app, ["hook-points", str(tiny_folder("llava")), "--glob", "projector.*"])
    assert res.output.split() == ["projector.out"]


@SHIPPED
def test_cli_demo_quick_runs_every_section(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "index.html").read_text()
    assert "data:image/png;base64," in html and "vision.blocks.{0.." in html and ".resid_post" in html
    sections = html.split("<h2>")[1:]
    assert [s.split(":")[0] for s in sections] == ["contrastive", "generative", "diffusion", "causal",
                                                   "multimodal-native", "sparse autoencoders"]
    contrastive, generative, diffusion, causal, native, sae = sections
    assert contrastive.startswith("contrastive: CLIPModel") and "zero-shot classification" in contrastive
    assert generative.startswith("generative: LlavaForConditionalGeneration")
    assert "attending to image patches" in generative
    assert "lm.blocks.{0..3}.attn.pattern" in generative
    assert diffusion.startswith("diffusion: StableDiffusionPipeline") and "judged by the world" in diffusion
    assert "unet.up." in diffusion
    assert causal.startswith("causal: interventions on the `vlm` organism")
    for title in ("activation patching: recovery", "attribution patching: estimated", "attention knockout:",
                  "steering: P(&#x27;red&#x27;)"):
        assert title in causal, title
    assert causal.count("data:image/png;base64,") == 4 and "correlate with exact patching at r = " in causal
    for title in ("TextSpan: each head", "SpLiCE: sparse concept codes", "network dissection (CLIP-Dissect)",
                  "word maps: where each prompt word acts", "zero-shot segmenter", "feature visualisation:",
                  "relevancy of the answer", "integrated gradients of the answer", "training-data attribution (TRAK)"):
        assert title in native, title
    assert "The shape word&#x27;s map against the object the judge finds: mIoU" in native
    assert "A TopK SAE (256 features, 8 active per token)" in sae and "SAE feature dashboards" in sae
    assert sae.count("data:image/png;base64,") >= 2


def test_demo_without_an_organism_names_the_command_that_trains_it(tmp_path, monkeypatch):
    import mmlens.demo

    monkeypatch.setattr(organisms, "available", lambda: ["clip"])
    with pytest.raises(FileNotFoundError, match="`mmlens organisms train vlm`; `mmlens organisms train diffusion`"):
        mmlens.demo.run_demo(tmp_path, quick=True)
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 1 and "mmlens organisms train vlm" in res.output
    assert not (tmp_path / "index.html").exists()


def test_demo_device_and_dtype_options_are_checked(tmp_path, monkeypatch):
    from mmlens.demo import load_options

    assert load_options() == {}
    assert load_options("cpu", "bfloat16") == {"device": torch.device("cpu"), "dtype": torch.bfloat16}
    assert load_options(dtype=torch.float16) == {"dtype": torch.float16}
    with pytest.raises(ValueError, match=r"dtype 'float64' is not one of \('float32', 'bfloat16', 'float16'\)"):
        load_options(dtype="float64")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="'cuda': CUDA is not available here"):
        load_options("cuda")
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path), "--dtype", "int8"])
    assert res.exit_code == 1 and "dtype 'int8' is not one of" in res.output
    assert not (tmp_path / "index.html").exists()


@pytest.mark.skipif("vlm" not in organisms.available(), reason="needs the shipped vlm organism")
def test_demo_generative_section_leaves_the_padding_side_as_it_was():
    from mmlens.demo import SECTIONS
    from mmlens.viz.report import Report

    lens = organisms.load("vlm")
    tok = lens.processor.tokenizer
    tok.padding_side = "right"
    report = Report("t")
    cache = SECTIONS["generative"](report, lens, True)
    assert tok.padding_side == "right"
    assert "lm.blocks.3.attn.pattern" in cache and len(report.parts) >= 3


def _imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports (relative imports resolved against its package)."""
    package = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            base = base[: len(base) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            found |= {mod} | {f"{mod}.{a.name}" for a in node.names}
    return found


def test_runtime_code_never_imports_the_test_helpers():
    """`mmlens.testing` (tiny random models) is for tests and benchmarks; the demo, the organisms and the rest of
    the package run without it. Tests may import run-time code, never the reverse."""
    offenders = {}
    for path in sorted(SRC.rglob("*.py")):
        if path.is_relative_to(SRC / "testing"):
            continue
        bad = {m for m in _imports(path) if m == "mmlens.testing" or m.startswith("mmlens.testing.")}
        if bad:
            offenders[str(path.relative_to(SRC))] = sorted(bad)
    assert not offenders, offenders
    assert _imports(SRC / "organisms" / "vocab.py") >= {"mmlens.organisms.tokenizer.word_tokenizer"}  # resolver works
    assert "mmlens.testing.tokenizer" in _imports(SRC / "testing" / "tiny_models.py")
    from mmlens.organisms.tokenizer import word_tokenizer
    from mmlens.testing.tokenizer import word_tokenizer as reexported

    assert reexported is word_tokenizer


def test_hook_point_docs_are_generated_from_tables():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_hook_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "hook_points.md").read_text() == gen.render(), "run python scripts/gen_hook_docs.py"


@pytest.mark.skipif("vlm" not in organisms.available(), reason="needs the shipped vlm organism")
def test_device_check_runs_sections_in_bfloat16_and_reports_failures(capsys, monkeypatch):
    """scripts/device_check.py runs demo sections on a dtype/device, one JSON line each; a failing section is
    reported (with where it raised) and the others still run."""
    import json

    spec = importlib.util.spec_from_file_location("device_check", ROOT / "scripts" / "device_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    import mmlens.demo

    def boom(*a, **k):
        raise RuntimeError("planted")

    monkeypatch.setattr(mmlens.demo, "_diffusion", boom)
    assert mod.main(["--dtype", "bfloat16", "--only", "diffusion,generative"]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    by = {x.get("section"): x for x in lines}
    assert by["generative"]["ok"] is True and by["generative"]["dtype"] == "bfloat16"
    assert by["diffusion"]["ok"] is False and by["diffusion"]["error"] == "RuntimeError: planted"
    assert lines[-1]["failed"] == ["diffusion"] and lines[-1]["ok"] == 1
    with pytest.raises(SystemExit):
        mod.main(["--only", "nonsense"])
