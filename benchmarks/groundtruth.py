"""Every technique scored against the organisms' ground truth: one JSON line per score.

    .venv/bin/python benchmarks/groundtruth.py                 # all techniques
    .venv/bin/python benchmarks/groundtruth.py --only logit_lens --only probes

Each line: {"technique", "organism", "metric", "value", "threshold", "higher_is_better", ...}; `passed` says whether
the value meets its threshold. Where each threshold comes from is stated next to it (a paper's finding, chance, the
organism's own bar). Scenes come from evaluation seeds no training pool used. Exits non-zero only when a technique
cannot run; a missed threshold is a finding, reported, not a crash.

This file is the driver and the registry; the scoring of each technique is its own module, `benchmarks/scores/NAME.py`
with a `score()` function (shared helpers in `benchmarks/scores/_common.py`). `benchmarks/` is put on `sys.path` below,
so the package imports as `scores` however this file is run (as a script from the repo root, or imported).
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
if str(Path(__file__).resolve().parent) not in sys.path:  # `scores` lives next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from scores import (data_attribution, diffusion_attribution, trak_ensemble, diffusion_lens, dissection, feature_viz, diffusion_patching, direct_effects, joint_lens, knockout, logit_lens, neurons,  # noqa: E402
                    patching, pixel_probe, probes, relevancy, sae, steering, textspan, tuned_lens, word_maps)

# technique name -> its scoring function (benchmarks/scores/<name>.py)
TECHNIQUES = {
    "logit_lens": logit_lens.score,
    "joint_lens": joint_lens.score,
    "direct_effects": direct_effects.score,
    "tuned_lens": tuned_lens.score,
    "probes": probes.score,
    "diffusion_lens": diffusion_lens.score,
    "pixel_probe": pixel_probe.score,
    "neurons": neurons.score,
    "patching": patching.score,
    "attribution_patching": patching.score_attribution,
    "knockout": knockout.score,
    "diffusion_patching": diffusion_patching.score,
    "steering": steering.score,
    "textspan": textspan.score,
    "splice": textspan.score_splice,
    "dissection": dissection.score,
    "relevancy": relevancy.score,
    "gradient_maps": relevancy.score_gradient_maps,
    "feature_viz": feature_viz.score,
    "data_attribution": data_attribution.score,
    "trak_ensemble": trak_ensemble.score_ensemble,
    "diffusion_attribution": diffusion_attribution.score,
    "word_maps": word_maps.score,
    "sae": sae.score,
    "sae_metrics": sae.score_metrics,
    "sae_splice": sae.score_splice,
    "sae_dashboard": sae.score_dashboard,
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(TECHNIQUES), action="append", help="run only this technique (repeatable)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    diffusers.logging.set_verbosity_error()
    failed = []
    for name in args.only or TECHNIQUES:
        t0 = time.perf_counter()
        try:
            lines = TECHNIQUES[name]()
        except Exception:  # noqa: BLE001  report, run the others, exit non-zero at the end
            traceback.print_exc()
            failed.append(name)
            continue
        for ln in lines:
            ln["seconds"] = round(time.perf_counter() - t0, 1)
            print(json.dumps(ln))
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(ln) + "\n")
    if failed:
        print(f"could not run: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
