"""The training loop every learned thing shares (organisms, tuned lenses, probes, SAEs): seeding, resumable
checkpoints (safetensors only), warmup-cosine schedule, progress."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_path, atomic_write_text


def _flat_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflat_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in meta["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Checkpointer:
    """Save (model, optimizer, step) every `every` steps into `folder`; `resume` picks up the last one."""

    def __init__(self, folder: str | os.PathLike, every: int = 200):
        self.folder, self.every = Path(folder), every

    def save(self, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer, extra: dict | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        with atomic_path(self.folder / "model.safetensors") as tmp:
            save_file(weights, str(tmp))
        tensors, meta = _flat_optimizer(opt)
        with atomic_path(self.folder / "optimizer.safetensors") as tmp:
            save_file(tensors, str(tmp))
        atomic_write_text(self.folder / "state.json", json.dumps({"step": step, "optimizer": meta, **(extra or {})}))

    def resume(self, model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
        """The step to continue from (0 when there is no checkpoint)."""
        state_file = self.folder / "state.json"
        if not state_file.exists():
            return 0
        state = json.loads(state_file.read_text())
        model.load_state_dict(load_file(str(self.folder / "model.safetensors")), strict=False)
        _unflat_optimizer(opt, load_file(str(self.folder / "optimizer.safetensors")), state["optimizer"])
        return int(state["step"])


def cosine_lr(step: int, total: int, peak: float, warmup: int, hold: float = 0.0) -> float:
    """Linear warmup; `peak` for the first `hold` fraction of the remaining steps; then cosine down to 5% of `peak`
    (`hold=0`: plain warmup-cosine; `hold=1`: constant). Holding lets a slow-to-emerge skill form at full lr."""
    import math

    if step < warmup:
        return peak * (step + 1) / warmup
    start = warmup + hold * (total - warmup)
    if hold >= 1.0 or step < start:
        return peak
    p = min(1.0, (step - start) / max(1.0, total - start))
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def loop(total: int, start: int, desc: str, losses: list[float] | None = None) -> Iterator[int]:
    """Steps start..total-1 with a progress bar (showing the mean of the last 20 `losses`, when given)."""
    from tqdm.auto import tqdm

    with tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=2.0) as bar:
        for step in range(start, total):
            yield step
            if losses:
                recent = losses[-20:]
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", refresh=False)
            bar.update(1)


def run_training(*, name: str, model: torch.nn.Module, params, steps: int, lr: float, warmup: int, seed: int,
                 work: str | os.PathLike, step_fn: Callable[[int], torch.Tensor], every: int = 200,
                 weight_decay: float = 0.01, log: Callable[[int, float], None] | None = None,
                 hold: float = 0.0) -> dict:
    """AdamW + warmup/cosine; `step_fn(step)` returns the loss of one batch (its data drawn from `step`, so a
    resumed run sees exactly the batches an uninterrupted one would). Returns timing and the loss curve."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ckpt = Checkpointer(work, every)
    start = ckpt.resume(model, opt)
    curve, t0 = [], time.perf_counter()
    model.train()
    for step in loop(steps, start, f"train {name}", curve):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, steps, lr, warmup, hold) * g.get("lr_scale", 1.0)
        torch.manual_seed(seed * 1_000_003 + step)
        loss = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        curve.append(loss.item())
        if log is not None:
            log(step, curve[-1])
        if (step + 1) % every == 0 or step + 1 == steps:
            ckpt.save(step + 1, model, opt)
    model.eval()
    return {"steps": steps, "resumed_from": start, "seconds": round(time.perf_counter() - t0, 1),
            "loss_curve": [round(sum(c) / len(c), 4) for c in _buckets(curve, 10)]}


def combine(last: dict, **earlier: dict) -> dict:
    """Stats of a multi-stage recipe: the last stage's, each earlier stage nested under its name, and `seconds`
    the sum over all stages (so a card's time is the whole recipe's)."""
    out = {**last, **earlier}
    out["seconds"] = round(last["seconds"] + sum(s["seconds"] for s in earlier.values()), 1)
    return out


def _buckets(xs: list[float], n: int) -> list[list[float]]:
    if not xs:
        return []
    k = max(1, len(xs) // n)
    return [xs[i : i + k] for i in range(0, len(xs), k)]
