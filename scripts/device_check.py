"""Run every `mmlens demo` section on a device and dtype, each on its own, and report which ones raise.

The demo touches most of the library (hook layer, read-outs, patching, knockout, steering, TextSpan, SpLiCE,
dissection, relevancy, gradient maps, word maps, the activation store and SAEs) on the three organisms, so this is
the quickest way to see what breaks off CPU float32. `sae_fit` trains every SAE architecture on the device, and
`example:<name>` runs each of examples/ with the organisms loaded there. One JSON line per section (ok, seconds, the
error's last traceback lines), then a summary line; exit status 1 if any section failed.

    python scripts/device_check.py --device cuda --dtype bfloat16
    python scripts/device_check.py --dtype bfloat16 --only generative,causal     # CPU, a subset
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def sections(kw: dict) -> dict:
    from mmlens import demo, demo_native, organisms
    from mmlens.demo_sae import sae_section

    load = lambda name: organisms.load(name, **kw)  # noqa: E731
    return {
        "contrastive": lambda r, q: demo._contrastive(r, load("clip"), q),
        "generative": lambda r, q: demo._generative(r, load("vlm"), q),
        "diffusion": lambda r, q: demo._diffusion(r, load("diffusion"), q),
        "causal": lambda r, q: demo._causal(r, load("vlm"), q),
        "native_contrastive": lambda r, q: demo_native._contrastive(r, load("clip"), q),
        "native_generative": lambda r, q: demo_native._generative(r, load("vlm"), q),
        "native_diffusion": lambda r, q: demo_native._diffusion(r, load("diffusion"), q),
        "sae": lambda r, q: sae_section(r, q, **kw),
        "sae_fit": lambda r, q: sae_fit(kw),
        **{f"example:{f.stem}": (lambda r, q, f=f: example(f, kw)) for f in sorted(EXAMPLES.glob("*.py"))},
    }


EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def example(path: Path, kw: dict) -> None:
    """Run examples/<name>.py's main() (its default sizes) with every `organisms.load` given the device and dtype:
    the examples reach the methods the demo does not (feature visualization, TRAK, D-TRAK, tuned lens, ...)."""
    import runpy

    import mmlens.organisms as organisms

    real = organisms.load
    organisms.load = lambda name, **k: real(name, **{**kw, **k})
    try:
        runpy.run_path(str(path))["main"]()
    finally:
        organisms.load = real


def sae_fit(kw: dict) -> dict:
    """Every SAE architecture (and Matryoshka) fit on the device in the dtype, with the aux loss live (a small
    dead_tokens), on tokens that are sparse sums of known unit directions; the explained variance of each comes back
    (a fit that runs but learns nothing shows there)."""
    import torch

    from mmlens.methods import SAE, SAEConfig
    from mmlens.methods._sae_fit import explained_variance

    device, dtype = kw.get("device", torch.device("cpu")), kw.get("dtype", torch.float32)
    g = torch.Generator().manual_seed(0)
    atoms = torch.nn.functional.normalize(torch.randn(256, 64, generator=g), dim=1)

    def batch(step: int, n: int = 1024) -> torch.Tensor:
        gen = torch.Generator().manual_seed(step)
        idx = torch.rand(n, 256, generator=gen).topk(4).indices
        return ((torch.rand(n, 4, generator=gen) + 0.5)[:, :, None] * atoms[idx]).sum(1)

    held = batch(10**6).to(device, dtype)
    evs = {}
    for arch, extra in (("topk", {}), ("batchtopk", {}), ("relu", {"l1_coefficient": 1e-3}),
                        ("jumprelu", {"l0_coefficient": 1e-3}), ("topk", {"matryoshka_widths": [64, 512]})):
        cfg = SAEConfig(d_in=64, d_sae=512, architecture=arch, k=4, batch_size=1024, lr=3e-3, warmup_steps=10,
                        dead_tokens=4096, dtype=str(dtype).replace("torch.", ""), **extra)
        sae = SAE(cfg).to(device).fit(batch, steps=300, progress=False)
        with torch.no_grad():
            evs[arch + ("_matryoshka" if extra.get("matryoshka_widths") else "")] = round(
                explained_variance(sae.decode(sae.encode(held)), held), 4)
    return {"explained_variance": evs}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--only", default="", help="comma-separated section names")
    ap.add_argument("--full", action="store_true", help="the full demo's sizes (default: --quick's)")
    args = ap.parse_args(argv)
    import torch

    from mmlens.demo import load_options
    from mmlens.viz.report import Report

    kw = load_options(args.device, args.dtype)
    todo = sections(kw)
    if args.only:
        unknown = set(args.only.split(",")) - set(todo)
        if unknown:
            ap.error(f"unknown sections {sorted(unknown)}; choose from {sorted(todo)}")
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    failed = []
    for name, run in todo.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        line = {"section": name, "device": args.device or "cpu", "dtype": args.dtype or "float32"}
        try:
            got = run(Report(name), not args.full)
            line["ok"] = True
            if isinstance(got, dict):  # figures a section reports (sae_fit: explained variance per architecture)
                line.update(got)
        except Exception as err:  # noqa: BLE001 - every section's failure is reported, the others still run
            failed.append(name)
            line.update(ok=False, error=f"{type(err).__name__}: {err}"[:600],
                        where=traceback.format_exc().strip().splitlines()[-8:-1])
        line["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps(line), flush=True)
    print(json.dumps({"summary": True, "ok": len(todo) - len(failed), "failed": failed,
                      "torch": torch.__version__}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
