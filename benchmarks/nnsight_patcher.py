"""nnsight's patch loop (its own file: nnsight reads `with` bodies from source): one trace per patch, the clean
block input written into the corrupt run at one position, as nnsight's activation-patching tutorial does."""

from __future__ import annotations

import torch
from nnsight_saver import _walk  # benchmarks/ is on sys.path when patching.py runs


def make_nnsight_loop(model, clean, corrupt, blocks, targets, src, metric):
    from nnsight import NNsight

    wrapped = NNsight(model)
    paths = [name for name, m in model.named_modules() if any(m is b for b in blocks)]
    envoys = [_walk(wrapped, p) for p in paths]

    def run():
        out = torch.empty(len(targets))
        for k, (i, p) in enumerate(targets):
            with torch.no_grad():
                with wrapped.trace(**corrupt):
                    envoys[i].input[:, p] = src[i][:, p]
                    logits = wrapped.output.logits.save()
            out[k] = metric({"logits": logits})[0].float().cpu()
        return out

    return run

