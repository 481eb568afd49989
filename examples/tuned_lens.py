"""The tuned lens on the vlm organism: affine translators fit on some scenes read each layer closer to the model's
final distribution than the logit lens does, on other scenes.

    .venv/bin/python examples/tuned_lens.py
"""

from __future__ import annotations

import mmlens.organisms as organisms
from mmlens.methods import TunedLens, kl_to_final, logit_lens
from mmlens.organisms.prompts import vlm_inputs
from mmlens.world import make_scene


def main(n_train: int = 48, steps: int = 150) -> dict:
    vlm = organisms.load("vlm")
    question = "what colour is the square ?"
    scenes = [make_scene(10_000_400 + k, background=None) for k in range(n_train + 16)]
    batches = [vlm_inputs(vlm, scenes[i:i + 16], [question] * 16) for i in range(0, n_train, 16)]
    tuned = TunedLens(steps=steps).fit(vlm, batches)  # progress bar; pass work= to resume an interrupted fit
    held_out = vlm_inputs(vlm, scenes[n_train:], [question] * 16)
    kl_tuned = kl_to_final(tuned.transform(vlm, held_out, positions="answer").logits)
    kl_logit = kl_to_final(logit_lens(vlm, held_out, positions="answer").logits)
    for name, t, lg in zip(tuned.names_, kl_tuned.tolist(), kl_logit.tolist()):
        print(f"  {name:24s} KL to the final distribution at the answer: tuned {t:.3f}   logit lens {lg:.3f}")
    return {"tuned": kl_tuned, "logit": kl_logit}


if __name__ == "__main__":
    main()
