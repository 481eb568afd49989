"""Attention knockout on the vlm organism (Geva et al. 2023; on VLMs Neo et al. 2024): block the answer position's
attention to the image, or to the question, in one LM block at a time, and see what the answer accuracy does.
"what colour is the {shape} ?" is answered at the last position ('answer :'); cutting its view of the image hurts
in the early blocks only, and part of the colour still arrives through the question's tokens, which read the image
themselves; cutting its view of the question in block 0 leaves it not knowing what was asked.

    .venv/bin/python examples/attention_knockout.py
"""

from __future__ import annotations

import torch

import mmlens.organisms as organisms
from mmlens.hooks.tokens import MODALITIES
from mmlens.methods.knockout import knockout
from mmlens.organisms.prompts import binding_scenes, vlm_inputs


def main(n_scenes: int = 24, seed: int = 10_000_500) -> dict:
    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    scenes, questions = binding_scenes(n_scenes, seed)
    truth = torch.tensor(tok.convert_tokens_to_ids([s.objects[0].colour for s in scenes]), device=vlm.device)
    inputs = vlm_inputs(vlm, scenes, questions)  # left-padded: the last position of every row is the answer's ':'

    # the question: every text token before the last position ("what colour is the square ? answer")
    tm = vlm.token_map(inputs)
    seq = inputs["input_ids"].shape[1]
    question = (tm.modality == MODALITIES.index("text")) & (torch.arange(seq) < seq - 1)

    def accuracy(out):  # one value per example: is the answer's top-1 token the true colour?
        return (out.logits[:, -1].argmax(-1) == truth).float()

    edges = {"image->last": ("image", "last"), "question->last": (question, "last")}
    res = knockout(vlm, inputs, edges=edges, window=1, metric=accuracy)
    acc = res.values.mean(-1)  # (layers, edges)
    print(f"{n_scenes} scenes, 'what colour is the <shape> ?': accuracy {res.baseline.mean():.2f} without knockout")
    print(f"  {'knocked out in':16s}" + "".join(f"{e:>16s}" for e in res.edges))
    for label, row in zip(res.windows, acc.tolist()):
        print(f"  {label:16s}" + "".join(f"{a:16.2f}" for a in row))
    return {"accuracy": acc, "baseline": res.baseline.mean(), "windows": res.windows, "edges": res.edges}


if __name__ == "__main__":
    main()
