"""Overhead of caching every residual stream: mmlens vs a plain forward, raw torch hooks and nnsight.

JSON lines on stdout (and appended to --out). Random weights; only the shapes matter.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SHAPES = {
    # vision tower (CLIP ViT), LM (Llama); image tokens = (image / patch) ** 2
    "tiny": dict(v_layers=2, v_width=64, v_heads=4, image=32, patch=8, lm_layers=2, lm_width=64, lm_heads=4,
                 lm_kv=2, lm_mlp=128, vocab=128, text=16),
    "small": dict(v_layers=6, v_width=256, v_heads=4, image=224, patch=14, lm_layers=8, lm_width=512, lm_heads=8,
                  lm_kv=8, lm_mlp=1408, vocab=4096, text=64),
    "llava-1.5-7b": dict(v_layers=24, v_width=1024, v_heads=16, image=336, patch=14, lm_layers=32, lm_width=4096,
                         lm_heads=32, lm_kv=32, lm_mlp=11008, vocab=32064, text=64),
}


def build(shape: str, device: str, dtype: torch.dtype):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    s = SHAPES[shape]
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=s["v_width"], intermediate_size=4 * s["v_width"],
                                       num_hidden_layers=s["v_layers"], num_attention_heads=s["v_heads"],
                                       image_size=s["image"], patch_size=s["patch"]),
        text_config=LlamaConfig(vocab_size=s["vocab"], hidden_size=s["lm_width"], intermediate_size=s["lm_mlp"],
                                num_hidden_layers=s["lm_layers"], num_attention_heads=s["lm_heads"],
                                num_key_value_heads=s["lm_kv"], max_position_embeddings=4096),
        image_token_id=s["vocab"] - 1, vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg).eval()
    torch.set_default_dtype(old)
    n_img = (s["image"] // s["patch"]) ** 2
    ids = torch.randint(0, s["vocab"] - 2, (1, s["text"] + n_img), device=device)
    ids[0, 1 : 1 + n_img] = cfg.image_token_id
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, s["image"], s["image"], device=device, dtype=dtype)}
    return model, inputs


def timed(fn, device: str, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def block_modules(model):
    return [*model.model.vision_tower.encoder.layers, *model.model.language_model.layers]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    repeats = args.repeats or (30 if args.device.startswith("cuda") else 10)

    import transformers

    import mmlens

    transformers.logging.set_verbosity_error()
    model, inputs = build(args.shape, args.device, dtype)
    lens = mmlens.load(model)
    names = lens.hook_points("*.blocks.*.resid_post")
    blocks = block_modules(model)
    assert len(blocks) == len(names)

    def plain():
        with torch.no_grad():
            model(**inputs)

    def raw_hooks():
        saved = []
        hs = [m.register_forward_hook(lambda mod, a, o: saved.append(o[0] if isinstance(o, tuple) else o)) for m in blocks]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hs:
                h.remove()
        return saved

    def with_mmlens():
        return lens.run_with_cache(inputs, names=names)

    modes = {"plain": plain, "torch_hooks": raw_hooks, "mmlens": with_mmlens}
    try:
        from nnsight_saver import make_nnsight_saver  # benchmarks/nnsight_saver.py (nnsight needs a source file)

        modes["nnsight"] = make_nnsight_saver(model, inputs, blocks)
    except ImportError as err:
        print(json.dumps({"bench": "overhead", "note": f"nnsight not measured: {err}"}), file=sys.stderr)

    # interleave the modes round by round so drift (thermal, other load) hits them equally
    times = {m: [] for m in modes}
    for fn in modes.values():
        timed(fn, args.device, 0, warmup=2)
    for _ in range(repeats):
        for m, fn in modes.items():
            times[m] += timed(fn, args.device, 1, warmup=0)
    base = statistics.median(times["plain"])
    meta = {"bench": "overhead", "shape": args.shape, "device": args.device, "dtype": str(dtype).replace("torch.", ""),
            "values_cached": len(names), "seq": int(inputs["input_ids"].shape[1]), "repeats": repeats,
            "torch": torch.__version__, "transformers": transformers.__version__, "mmlens": mmlens.__version__,
            "host": platform.node(), "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    lines = []
    for m, ts in times.items():
        med = statistics.median(ts)
        lines.append({**meta, "mode": m, "median_ms": round(med, 3), "min_ms": round(min(ts), 3),
                      "ratio": round(med / base, 4)})
    if args.device.startswith("cuda"):
        for m, fn in modes.items():
            torch.cuda.reset_peak_memory_stats()
            fn()
            next(x for x in lines if x["mode"] == m)["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    for line in lines:
        print(json.dumps(line))
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
