"""Patch sweeps: patches per second of `mmlens.methods.patch` against the peers' ways of doing the same sweep.

A causal-tracing sweep on a LLaVA-shaped model (random weights, only shapes matter): the clean residual stream
patched into the corrupt run at every LM block input x every text position after the image (one patch each),
metric = a logit difference at the last position. Modes, each timed on the same sweep:
- torch_loop: one forward per patch with a raw torch pre-hook (what nnsight / TransformerLens loops do);
- torch_batched: `--chunk` patches per forward with raw hooks (the fastest thing peers' users write by hand);
- mmlens_loop / mmlens_batched / mmlens: `patch(engine="loop" | "batched" | "auto")`; auto replays each patch
  from its layer and reuses the keys/values before the patched position;
- nnsight_loop: one `trace` per patch, when nnsight is installed;
- transformerlens_loop: one `run_with_hooks` per patch on TransformerLens's TransformerBridge, when installed.
Every mode's values are checked against torch_loop (max_abs_diff_vs_loop). Also timed: attribution patching
over every LM block input x image-token position, against one plain forward (`attribution_vs_forward`). JSON lines on stdout (and --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import SHAPES, build  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--positions", type=int, default=None, help="text positions swept (default: all after the image)")
    ap.add_argument("--chunk", type=int, default=32, help="patches per forward for torch_batched")
    ap.add_argument("--skip", default="", help="comma-separated modes not to run (e.g. torch_loop on a slow host)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))

    import transformers

    import mmlens
    from mmlens import metrics
    from mmlens.methods import patch

    transformers.logging.set_verbosity_error()
    model, clean = build(args.shape, args.device, dtype)
    corrupt = {**clean, "pixel_values": torch.randn_like(clean["pixel_values"])}
    lens = mmlens.load(model)
    s = SHAPES[args.shape]
    n_img = (s["image"] // s["patch"]) ** 2
    seq = clean["input_ids"].shape[1]
    positions = list(range(1 + n_img, seq))[-(args.positions or seq):]
    blocks = list(model.model.language_model.layers)
    metric = metrics.logit_diff(3, 5)
    targets = [(i, p) for i in range(len(blocks)) for p in positions]

    src = {}
    hs = [b.register_forward_pre_hook(lambda m, a, i=i: src.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(**clean)
    for h in hs:
        h.remove()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def torch_loop():
        out = torch.empty(len(targets))
        for k, (i, p) in enumerate(targets):
            def pre(m, a, i=i, p=p):
                x = a[0].clone()
                x[:, p] = src[i][:, p]
                return (x,) + a[1:]
            h = blocks[i].register_forward_pre_hook(pre)
            with torch.no_grad():
                out[k] = metric(model(**corrupt))[0].float().cpu()
            h.remove()
        return out

    def torch_batched():
        out = torch.empty(len(targets))
        for lo in range(0, len(targets), args.chunk):
            chunk = targets[lo: lo + args.chunk]
            batch = {k: torch.cat([v] * len(chunk)) for k, v in corrupt.items()}
            hooks = []
            for i in sorted({t[0] for t in chunk}):
                rows = [(j, p) for j, (li, p) in enumerate(chunk) if li == i]

                def pre(m, a, i=i, rows=rows):
                    x = a[0].clone()
                    for j, p in rows:
                        x[j, p] = src[i][0, p]
                    return (x,) + a[1:]
                hooks.append(blocks[i].register_forward_pre_hook(pre))
            with torch.no_grad():
                lg = model(**batch).logits[:, -1].float()
            for h in hooks:
                h.remove()
            out[lo: lo + len(chunk)] = (lg[:, 3] - lg[:, 5]).cpu()
        return out

    def with_mmlens(engine):
        def run():
            res = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=positions, metric=metric,
                        engine=engine)
            return res.per_example[:, :, 0].reshape(-1)
        return run

    modes = {"torch_loop": torch_loop, "torch_batched": torch_batched, "mmlens_loop": with_mmlens("loop"),
             "mmlens_batched": with_mmlens("batched"), "mmlens": with_mmlens("auto")}
    try:
        from nnsight_patcher import make_nnsight_loop  # benchmarks/nnsight_patcher.py

        modes["nnsight_loop"] = make_nnsight_loop(model, clean, corrupt, blocks, targets, src, metric)
    except ImportError as err:
        print(json.dumps({"bench": "patching", "note": f"nnsight not measured: {err}"}), file=sys.stderr)
    try:
        from tl_patcher import make_tl_loop  # benchmarks/tl_patcher.py

        modes["transformerlens_loop"] = make_tl_loop(model, clean, corrupt, targets, src, metric)
    except ImportError as err:
        print(json.dumps({"bench": "patching", "note": f"TransformerLens not measured: {err}"}), file=sys.stderr)
    for m in filter(None, args.skip.split(",")):
        modes.pop(m, None)

    meta = {"bench": "patching", "shape": args.shape, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
            "patches": len(targets), "layers": len(blocks), "positions": len(positions), "seq": seq,
            "torch": torch.__version__, "transformers": transformers.__version__, "mmlens": mmlens.__version__,
            "host": platform.node(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    with_mmlens("auto")()  # warm-up (first-call kernel selection, lazy imports)
    reference = None
    lines = []
    for name, fn in modes.items():
        sync()
        t = time.perf_counter()
        vals = fn()
        sync()
        dt = time.perf_counter() - t
        if reference is None:
            reference = vals
        line = {**meta, "peer": name.split("_")[0], "mode": name, "seconds": round(dt, 3),
                "patches_per_s": round(len(targets) / dt, 1),
                "max_abs_diff_vs_loop": float((vals.float() - reference.float()).abs().max())}
        if args.device.startswith("cuda"):
            line["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            torch.cuda.reset_peak_memory_stats()
        lines.append(line)
        print(json.dumps(line), flush=True)
    from mmlens.methods import attribution_patching

    image_positions = list(range(1, 1 + n_img))
    times = {}
    for what, fn in (("forward", lambda: model(**corrupt)),
                     ("attribution", lambda: attribution_patching(lens, clean, corrupt, "lm.blocks.*.resid_pre",
                                                                  positions=image_positions, metric=metric))):
        with torch.no_grad() if what == "forward" else torch.enable_grad():
            fn()
            best = float("inf")
            for _ in range(3):  # best of three: one sample on a busy 2-core host swings by 10%
                sync()
                t = time.perf_counter()
                fn()
                sync()
                best = min(best, time.perf_counter() - t)
            times[what] = best
    line = {**meta, "peer": "mmlens", "mode": "attribution_patching", "sites": len(blocks) * len(image_positions),
            "seconds": round(times["attribution"], 3), "forward_seconds": round(times["forward"], 4),
            "attribution_vs_forward": round(times["attribution"] / times["forward"], 2)}
    lines.append(line)
    print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
