"""`mmlens demo`, `mmlens hook-points`, `mmlens supported`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmlens: interpretability for multimodal models.")


@app.command()
def demo(out: Path = typer.Option(Path("mmlens-report"), help="folder for the HTML report"),
         quick: bool = typer.Option(False, help="fewer families (smoke test)")) -> None:
    """Run the demo on the bundled models and write a self-contained HTML report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..demo import run_demo

    path = run_demo(out, quick=quick)
    typer.echo(f"report: {path.resolve()}")


@app.command("hook-points")
def hook_points(path: Path, glob: str = typer.Option(None, help="only names matching this glob"),
                folded: bool = typer.Option(True, help="fold block indices")) -> None:
    """List the canonical hook points of a local checkpoint folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..loading import load

    lens = load(path)
    typer.echo(lens.describe() if folded and glob is None else "\n".join(lens.hook_points(glob)))


@app.command()
def supported() -> None:
    """The supported architectures, per adapter."""
    from ..models.registry import supported as table

    for name, classes in table().items():
        typer.echo(f"{name:10s} {', '.join(classes)}")
