"""The CLI is a thin shell that works; the generated docs match the tables."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from typer.testing import CliRunner

from mmlens.cli import app

ROOT = Path(__file__).resolve().parent.parent


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


def test_cli_demo_quick(tmp_path):
    res = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "index.html").read_text()
    assert "data:image/png;base64," in html and "vision.blocks.{0.." in html and ".resid_post" in html


def test_hook_point_docs_are_generated_from_tables():
    spec = importlib.util.spec_from_file_location("gen", ROOT / "scripts" / "gen_hook_docs.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert (ROOT / "docs" / "hook_points.md").read_text() == gen.render(), "run python scripts/gen_hook_docs.py"
