"""SAE training throughput: tokens/s of mmlens's TopK training step against a plain dense PyTorch TopK step and
against SAELens's TopK step, on the same config and the same batch.

Modes, each timed over `--steps` steps after `--warmup` steps, best of `--repeats` runs (mmlens and dense
interleaved: one sample on a busy host swings by tens of percent):
- mmlens: `_sae_fit.Trainer.step`, the step `SAE.fit` runs (sparse TopK kernels, aux-loss bookkeeping, decoder
  renormalisation, firing statistics, Adam);
- dense: what one writes by hand: pre = (x - b_dec) @ W_enc + b_enc, top-k, a dense (batch, d_sae) code, decode
  by matmul, MSE, backward, Adam, decoder rows renormalised;
- saelens: SAELens's TopKTrainingSAE.training_forward_pass + the rest of its `SAETrainer._train_step` (firing
  counts, backward, grad clipping, Adam), run by `--saelens-python` (a Python whose environment has sae-lens:
  its pins clash with ours, so it lives in its own venv, e.g. /work/saelens-venv) in a subprocess that prints one
  JSON line. Without `--saelens-python` it is skipped (a note goes to stderr).
mmlens's gradients are checked against the dense step's on one batch (max_abs_grad_diff). `--store` adds the
activation store's write / shuffled-read figures (benchmarks/store_io.py, `measure()`). JSON lines on stdout (and
appended to --out).

    python benchmarks/sae.py                                  # CPU small: d_in 128, d_sae 2048, k 16, batch 4096
    python benchmarks/sae.py --shape gpu --device cuda --dtype bfloat16 --saelens-python /work/saelens-venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

SHAPES = {"small": {"d_in": 128, "d_sae": 2048, "k": 16, "batch": 4096},
          "gpu": {"d_in": 1024, "d_sae": 32768, "k": 64, "batch": 4096}}

# Runs in the SAELens venv: argv[1] is a JSON dict of the shape and timing settings; prints one JSON line.
SAELENS_DRIVER = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
import sae_lens
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
a = json.loads(sys.argv[1])
torch.manual_seed(0)
dev, dtype = a["device"], getattr(torch, a["dtype"])
torch.backends.cuda.matmul.allow_tf32 = bool(a.get("tf32"))
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a["d_in"], d_sae=a["d_sae"], k=a["k"], dtype=a["dtype"], device=dev))
opt = torch.optim.Adam(sae.parameters(), lr=a["lr"], betas=(0.9, 0.999))
x = torch.randn(a["batch"], a["d_in"], device=dev, dtype=dtype)
since_fired = torch.zeros(a["d_sae"], device=dev)
act_freq = torch.zeros(a["d_sae"], device=dev)
def sync():
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
def step():  # SAETrainer._train_step without logging and schedulers
    global since_fired
    sae.train()
    out = sae.training_forward_pass(step_input=TrainStepInput(sae_in=x, coefficients={},
        dead_neuron_mask=(since_fired > 1000).bool(), n_training_steps=0, is_logging_step=False))
    with torch.no_grad():
        firing = out.feature_acts.bool().float()
        did_fire = firing.sum(-2).bool()
        since_fired += 1
        since_fired[did_fire] = 0
        act_freq.add_(firing.sum(0))
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
for _ in range(a["warmup"]):
    step()
best = float("inf")
for _ in range(a["repeats"]):
    sync(); t = time.perf_counter()
    for _ in range(a["steps"]):
        step()
    sync(); best = min(best, time.perf_counter() - t)
print(json.dumps({"seconds": best, "sae_lens": sae_lens.__version__, "torch": torch.__version__,
                  "threads": torch.get_num_threads()}))
'''


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 or bfloat16 (parameters and batch)")
    ap.add_argument("--batch", type=int, default=None, help="tokens per step (default: the shape's)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", default="",
                    help="comma-separated modes not to run (mmlens, dense, matryoshka, auxk, saelens)")
    ap.add_argument("--saelens-python", default=None, help="python of a venv with sae-lens installed")
    ap.add_argument("--store", action="store_true", help="also run benchmarks/store_io.py's measure()")
    ap.add_argument("--store-tokens", type=int, default=None, help="tokens of the store figures (default: its own)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (float32 on a GPU with tensor cores)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    shape = dict(SHAPES[args.shape], **({"batch": args.batch} if args.batch else {}))
    dtype = getattr(torch, args.dtype)
    skip = set(filter(None, args.skip.split(",")))

    import mmlens

    meta = {"bench": "sae", "shape": args.shape, **shape, "device": args.device, "dtype": args.dtype,
            "torch": torch.__version__, "mmlens": mmlens.__version__, "threads": torch.get_num_threads(),
            "host": platform.node(), "tf32": args.tf32,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    torch.manual_seed(0)
    x = torch.randn(shape["batch"], shape["d_in"], device=args.device, dtype=dtype)
    lines, seconds = [], {}

    def emit(mode: str, secs: float, **extra) -> None:
        tps = args.steps * shape["batch"] / secs
        seconds[mode] = secs
        line = {**meta, "mode": mode, "seconds_per_step": round(secs / args.steps, 5),
                "tokens_per_s": round(tps, 1), **extra}
        lines.append(line)
        print(json.dumps(line), flush=True)

    # the in-process modes are timed interleaved (repeat r of every mode, then r + 1): load on a shared host drifts
    steppers = {m: make(shape, args.device, dtype, x) for m, make in (("mmlens", mmlens_step), ("dense", dense_step),
                                                                       ("matryoshka", matryoshka_step),
                                                                       ("auxk", auxk_step))
                if m not in skip}
    best = {m: float("inf") for m in steppers}
    for m, step in steppers.items():
        for i in range(args.warmup):
            step(i)
    for _ in range(args.repeats):
        for m, step in steppers.items():
            best[m] = min(best[m], timed(step, args))
    for m in steppers:
        extra = {"max_abs_grad_diff": grad_diff(shape, args.device, dtype, x)} if m == "mmlens" else \
            {"matryoshka_widths": matryoshka_widths(shape["d_sae"])} if m == "matryoshka" else {}
        emit(m, best[m], **extra)
    if "saelens" not in skip:
        if args.saelens_python:
            payload = {**shape, "device": args.device, "dtype": args.dtype, "lr": 4e-4, "steps": args.steps,
                       "warmup": args.warmup, "repeats": args.repeats, "tf32": args.tf32}
            res = subprocess.run([args.saelens_python, "-c", SAELENS_DRIVER, json.dumps(payload)],
                                 check=False, capture_output=True, text=True, timeout=3600)
            if res.returncode != 0:
                print(json.dumps({"bench": "sae", "note": f"SAELens failed: {res.stderr[-2000:]}"}), file=sys.stderr)
            else:
                got = json.loads(res.stdout.strip().splitlines()[-1])
                emit("saelens", got.pop("seconds"), **{f"peer_{k}": v for k, v in got.items()})
        else:
            print(json.dumps({"bench": "sae", "note": "SAELens not measured: give --saelens-python"}),
                  file=sys.stderr)
    if "mmlens" in seconds and len(seconds) > 1:
        ratios = {f"mmlens_vs_{m}": round(s / seconds["mmlens"], 2) for m, s in seconds.items()
                  if m not in ("mmlens", "matryoshka", "auxk")}
        for m in ("matryoshka", "auxk"):  # what the nested loss / the aux loss costs over the plain step (not peers)
            if m in seconds:
                ratios[f"{m}_step_cost"] = round(seconds[m] / seconds["mmlens"], 2)
        line = {**meta, "mode": "ratios", **ratios}
        lines.append(line)
        print(json.dumps(line), flush=True)
    if args.store:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from store_io import measure  # benchmarks/store_io.py (the activation store's figures)

        for line in measure(**({"tokens": args.store_tokens} if args.store_tokens else {})):
            lines.append(line)
            print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(step, args) -> float:
    """Seconds for `args.steps` steps."""
    _sync(args.device)
    t = time.perf_counter()
    for i in range(args.steps):
        step(i)
    _sync(args.device)
    return time.perf_counter() - t


def _sae(shape, device, dtype, widths=None, **cfg):
    from mmlens.methods.sae import SAE, SAEConfig

    cfg = SAEConfig(d_in=shape["d_in"], d_sae=shape["d_sae"], architecture="topk", k=shape["k"],
                    batch_size=shape["batch"], normalize="none", dtype=str(dtype).replace("torch.", ""),
                    matryoshka_widths=widths, **cfg)
    return SAE(cfg).to(device)


def matryoshka_widths(d_sae: int) -> list[int]:
    """Three nested levels, as in the Matryoshka paper's small settings: d_sae/16, d_sae/4, d_sae."""
    return [d_sae // 16, d_sae // 4, d_sae]


def matryoshka_step(shape, device, dtype, x):
    """The same TopK step with Matryoshka prefixes (every prefix decoded and scored): the nested loss's cost."""
    return mmlens_step(shape, device, dtype, x, widths=matryoshka_widths(shape["d_sae"]))


def auxk_step(shape, device, dtype, x):
    """The same TopK step with every feature counted dead (dead_tokens=0), so AuxK runs over all of them with the
    default aux_k: the most the auxiliary loss can cost."""
    return mmlens_step(shape, device, dtype, x, dead_tokens=0)


def mmlens_step(shape, device, dtype, x, widths=None, **cfg):
    from mmlens.methods._sae_fit import Trainer

    sae = _sae(shape, device, dtype, widths, **cfg)
    trainer = Trainer(sae, total=10**6)
    trainer.initialise(x)
    return lambda i: trainer.step(i, x)


class DenseTopK(torch.nn.Module):
    """The plain PyTorch TopK SAE a user writes: dense code, dense decode, autograd for everything."""

    def __init__(self, sae):
        super().__init__()
        self.k = sae.cfg.k
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            setattr(self, name, torch.nn.Parameter(getattr(sae, name).detach().clone()))

    def loss(self, x):
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        vals, idx = pre.topk(self.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
        recon = f @ self.W_dec + self.b_dec
        return (recon - x).pow(2).sum(-1).mean()


def dense_step(shape, device, dtype, x):
    model = DenseTopK(_sae(shape, device, dtype))
    opt = torch.optim.Adam(model.parameters(), lr=4e-4)

    def step(i):
        loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.W_dec.div_(model.W_dec.norm(dim=1, keepdim=True))
    return step


def grad_diff(shape, device, dtype, x) -> float:
    """Max |grad| difference between mmlens's sparse step and the dense step on one batch (same weights)."""
    from mmlens.methods._sae_fit import losses

    sae = _sae(shape, device, dtype)
    with torch.no_grad():
        sae.b_dec.copy_(x.mean(0))
    dense = DenseTopK(sae)
    losses(sae, x)["loss"].backward()
    dense.loss(x).backward()
    return max(float((getattr(sae, n).grad.float() - getattr(dense, n).grad.float()).abs().max())
               for n in ("W_enc", "b_enc", "W_dec", "b_dec"))


if __name__ == "__main__":
    main()
