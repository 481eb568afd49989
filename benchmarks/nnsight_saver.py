"""nnsight's way of saving every block output (kept in its own file: nnsight reads `with` bodies from source)."""

from __future__ import annotations

import torch


def make_nnsight_saver(model, inputs, blocks):
    from nnsight import NNsight

    wrapped = NNsight(model)
    paths = [name for name, m in model.named_modules() if any(m is b for b in blocks)]
    envoys = [wrapped.get(p) if hasattr(wrapped, "get") else _walk(wrapped, p) for p in paths]

    def run():
        saved = []
        with torch.no_grad():
            with wrapped.trace(**inputs):
                for e in envoys:
                    saved.append(e.output.save())
        return saved

    return run


def _walk(envoy, path: str):
    for part in path.split("."):
        envoy = envoy[int(part)] if part.isdigit() else getattr(envoy, part)
    return envoy
