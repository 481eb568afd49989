"""Everything outside a call that a case must leave as it found it, and the harness around a case.

`snapshot` / `leaks`: hooks, attention processors, the transformers attention table and mmlens' global state before
and after a call. `watchdog`: the per-case time limit. `quiet` / `build_all`: silent libraries and the tiny models.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .cases import ARCHS, FOLDER_OF, CaseTimeout


def snapshot(lens) -> dict[str, Any]:
    """Every place a session may leave something: hooks per module, diffusers attention processors (and patched
    `get_attention_scores`), the transformers attention table, mmlens' kernel registry, step tracker, thread guard,
    torch function modes, grad mode, `F.scaled_dot_product_attention`, the pipeline's progress-bar config."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ...hooks import attention as A

    hooks, procs = {}, {}
    for name, m in lens.adapter.root().named_modules():
        n = (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
             len(getattr(m, "_backward_pre_hooks", {})))
        if any(n):
            hooks[name or "<root>"] = n
        if A.is_diffusers_attention(m):
            procs[name] = (type(m.processor).__qualname__, id(m.processor))
            if "get_attention_scores" in m.__dict__:
                procs[name + ".get_attention_scores"] = "patched"
    g = torch.nn.modules.module
    hooks["<global>"] = (len(g._global_forward_hooks), len(g._global_forward_pre_hooks),
                         len(g._global_backward_hooks), len(g._global_backward_pre_hooks))
    steps = getattr(lens, "_steps", None)
    state = {
        "kernel_users": {k: v for k, v in A.KERNELS.users.items() if v},
        "kernel_handlers": sum(len(v) for v in A.KERNELS.handlers.values()),
        "kernel_installed": sorted(A.KERNELS.installed),
        "step_users": None if steps is None else (steps._users, steps._handle is not None,
                                                  len(steps._said) + len(steps._seen)),
        "guard": (lens._guard.owner, lens._guard.depth),
        "sdpa": id(F.scaled_dot_product_attention),
        "function_modes": torch._C._len_torch_function_stack(),
        "grad_enabled": torch.is_grad_enabled(),
        "progress": repr(getattr(lens.model, "_progress_bar_config", None)),
    }
    return {"hooks": hooks, "processors": procs,
            "attention_table": {k: id(v) for k, v in ALL_ATTENTION_FUNCTIONS._local_mapping.items()},
            "state": state}


def leaks(before: dict, after: dict) -> dict[str, list[str]]:
    """category -> what differs between two snapshots (empty when nothing was left)."""
    out = {}
    for cat in before:
        a, b = before[cat], after[cat]
        diff = [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b), key=str) if a.get(k) != b.get(k)]
        if diff:
            out[cat] = diff
    return out


@contextlib.contextmanager
def watchdog(seconds: float | None):
    """Raise CaseTimeout in the main thread after `seconds` (SIGALRM); elsewhere a no-op (callers also time)."""
    usable = (seconds and hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout(f"over {seconds}s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def quiet() -> None:
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    diffusers.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


def build_all(root: str | os.PathLike, archs=ARCHS) -> dict[str, Path]:
    """Tiny models under `root/<arch>` (built when missing, deterministic weights)."""
    from ..tiny_models import build

    quiet()
    folders = {}
    for a in dict.fromkeys(FOLDER_OF.get(a, a) for a in archs):
        f = Path(root) / a
        if not (f / ".complete").exists():
            build(a, f)
            (f / ".complete").write_text("ok")
        folders[a] = f
    return {a: folders[FOLDER_OF.get(a, a)] for a in archs}
