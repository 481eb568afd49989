"""`mmlens demo`, `mmlens hook-points`, `mmlens supported`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="mmlens: interpretability for multimodal models.")


@app.command()
def demo(out: Path = typer.Option(Path("mmlens-report"), help="folder for the HTML report"),
         quick: bool = typer.Option(False, help="every section, smaller: fewer scenes and denoising steps"),
         device: str = typer.Option(None, help="load the organisms there, e.g. cuda (default: cpu)"),
         dtype: str = typer.Option(None, help="float32 (default), bfloat16 or float16")) -> None:
    """Run the demo on the three shipped organisms and write a self-contained HTML report."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..demo import load_options, require_organisms, run_demo

    try:
        require_organisms()
        load_options(device, dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        typer.echo(f"mmlens demo: {err}", err=True)
        raise typer.Exit(1) from None
    path = run_demo(out, quick=quick, device=device, dtype=dtype)
    typer.echo(f"report: {path.resolve()}")


@app.command("hook-points")
def hook_points(path: Path, glob: str = typer.Option(None, help="only names matching this glob"),
                folded: bool = typer.Option(True, help="fold block indices")) -> None:
    """List the canonical hook points of a local checkpoint folder."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..loading import load

    lens = load(path)
    typer.echo(lens.describe() if folded and glob is None else "\n".join(lens.hook_points(glob)))


organisms_app = typer.Typer(no_args_is_help=True, help="Train and evaluate the bundled model organisms.")
app.add_typer(organisms_app, name="organisms")


@organisms_app.command("train")
def organisms_train(name: str, out: Path = typer.Option(None, help="output folder (default: the package's weights)"),
                    work: Path = typer.Option(None, help="checkpoint folder; a rerun resumes from it"),
                    steps: int = typer.Option(None, help="override the number of steps")) -> None:
    """Train one organism (one at a time: two trainings on 2 cores run ~15x slower), evaluate, write its card."""
    from ..organisms.build import train_organism

    result = train_organism(name, out, work, **({"steps": steps} if steps else {}))
    typer.echo(json.dumps(result["metrics"]))


@organisms_app.command("eval")
def organisms_eval(name: str, folder: Path = typer.Option(None, help="organism folder (default: shipped)"),
                   full: bool = typer.Option(True, help="full-size evaluation")) -> None:
    """Evaluate an organism on held-out scenes; prints JSON."""
    from ..organisms import path
    from ..organisms.build import evaluate

    typer.echo(json.dumps(evaluate(name, folder or path(name), full=full)))


@app.command()
def supported() -> None:
    """The supported architectures, per adapter."""
    from ..models.registry import supported as table

    for name, classes in table().items():
        typer.echo(f"{name:10s} {', '.join(classes)}")
