"""Full evaluation of the shipped organisms: one JSON line per organism."""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from mmlens.organisms import available, path
    from mmlens.organisms.build import THRESHOLDS, evaluate

    torch.set_num_threads(2)
    for name in sys.argv[1:] or available():
        t = time.perf_counter()
        metrics = evaluate(name, path(name), full=True)
        passed = {k: metrics.get(k, 0) >= v for k, v in THRESHOLDS[name].items()}
        print(json.dumps({"bench": "organisms", "organism": name, **metrics, "passed": passed,
                          "seconds": round(time.perf_counter() - t, 1)}))


if __name__ == "__main__":
    main()
