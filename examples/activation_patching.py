"""Activation patching on the vlm organism: which tokens and layers carry the asked object's colour to the answer.

Colour counterfactuals from the world (one object's colour changed, every other pixel equal); the clean residual
stream is patched into the corrupt run per LM block and token region, and attribution patching estimates the same
grid from one backward pass.

    .venv/bin/python examples/activation_patching.py
"""

from __future__ import annotations

import torch

import mmlens.organisms as organisms
from mmlens import metrics
from mmlens.methods import attribution_patching, patch
from mmlens.organisms.prompts import vlm_inputs
from mmlens.world.pairs import counterfactual_pair


def main(n_pairs: int = 16, seed: int = 10_000_900) -> dict:
    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    pairs = []
    while len(pairs) < n_pairs:
        clean, corrupt = counterfactual_pair(seed, "colour", background=None)
        seed += 1
        i = corrupt.meta["changed_object"]
        if [o.shape for o in clean.objects].count(clean.objects[i].shape) == 1:  # the question names one object
            pairs.append((clean, corrupt, i))
    questions = [f"what colour is the {c.objects[i].shape} ?" for c, _, i in pairs]
    clean_in = vlm_inputs(vlm, [c for c, _, _ in pairs], questions)
    corrupt_in = vlm_inputs(vlm, [k for _, k, _ in pairs], questions)

    # regions per example, from the ground-truth masks through the token map
    tm = vlm.token_map(clean_in)
    last = clean_in["input_ids"].shape[1] - 1
    regions = {"object": [], "other image tokens": [], "answer": []}
    for b, (c, _, i) in enumerate(pairs):
        obj = tm.positions_in_mask(c.masks[i], batch=b).tolist()
        regions["object"].append(obj)
        regions["other image tokens"].append([p for p in tm.positions("image", batch=b).tolist() if p not in obj])
        regions["answer"].append([last])
    colour = lambda scenes: torch.tensor(tok.convert_tokens_to_ids([s.objects[i].colour for s, i in scenes]))  # noqa: E731
    m = metrics.logit_diff(colour([(c, i) for c, _, i in pairs]), colour([(k, i) for _, k, i in pairs]))

    res = patch(vlm, clean_in, corrupt_in, "lm.blocks.*.resid_pre", positions=regions, metric=m)
    est = attribution_patching(vlm, clean_in, corrupt_in, "lm.blocks.*.resid_pre", positions=regions, metric=m)
    rec, rec_est = res.recovery(), est.recovery()
    print(f"{n_pairs} colour counterfactuals; logit difference clean {res.clean.mean():.1f}, corrupt "
          f"{res.corrupt.mean():.1f}")
    print(f"  {'restored at':24s}" + "".join(f"{c:>20s}" for c in res.columns))
    for name, row, row_est in zip(res.names, rec.tolist(), rec_est.tolist()):
        print(f"  {name:24s}" + "".join(f"{v:11.2f} (~{e:5.2f})" for v, e in zip(row, row_est)))
    print("  (~ attribution patching's linear estimate of the same recovery)")
    return {"recovery": rec, "estimate": rec_est, "columns": res.columns, "names": res.names}


if __name__ == "__main__":
    main()
