"""`logit_lens` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

import torch

from ._common import line, vlm_binding_scenes


def score(n_scenes: int = 96) -> list[dict]:
    """vlm: the asked colour at the answer position per layer; each object's colour / shape at its image tokens."""
    import mmlens.organisms as organisms
    from mmlens.methods import logit_lens
    from mmlens.organisms.prompts import vlm_inputs
    from mmlens.world.scene import COLOURS, SHAPES

    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    scenes, questions, truth = vlm_binding_scenes(n_scenes, tok)
    out = []
    for i in range(0, n_scenes, 32):
        inputs = vlm_inputs(vlm, scenes[i:i + 32], questions[i:i + 32])
        res = logit_lens(vlm, inputs, positions="answer")
        hits = res.logits[:, :, 0].argmax(-1) == truth[i:i + 32]
        out.append(hits.float())
    hit = torch.cat(out, dim=1).mean(1)  # (layers,)
    names = res.names
    lines = [line("logit_lens", "vlm", f"answer_colour_top1@{n}", h, 0.9 if k >= 1 else None, layer=n,
                  source="issue 10: top-1 from lm.blocks.1.resid_post on; 0.9 = the organism's binding bar"
                  if k >= 1 else "reported, no bar: block 0 has not read the image yet", n=n_scenes)
             for k, (n, h) in enumerate(zip(names, hit.tolist()))]
    # Neo et al. 2024: an object's image tokens decode as its name. Here: among the 6 colour (4 shape) words, the
    # object's own is the most probable at its patches (positions_in_mask of the ground-truth mask, >= 50% cover).
    colour_ids = torch.tensor(tok.convert_tokens_to_ids(list(COLOURS)))
    shape_ids = torch.tensor(tok.convert_tokens_to_ids(list(SHAPES)))
    layer_names = ["lm.blocks.0.resid_pre", *vlm.hook_points("lm.blocks.*.resid_post")]
    colour_hits, shape_hits = [], []
    for i in range(0, n_scenes, 16):
        chunk = scenes[i:i + 16]
        inputs = vlm_inputs(vlm, chunk, questions[i:i + 16])
        res = logit_lens(vlm, inputs, names=layer_names)
        tm = vlm.token_map(inputs)
        best_c, best_s = res.logits[..., colour_ids].argmax(-1), res.logits[..., shape_ids].argmax(-1)
        for b, s in enumerate(chunk):
            for j, o in enumerate(s.objects):
                pos = tm.positions_in_mask(s.masks[j], batch=b)
                if len(pos):
                    colour_hits.append((best_c[:, b, pos] == list(COLOURS).index(o.colour)).float().mean(1))
                    shape_hits.append((best_s[:, b, pos] == SHAPES.index(o.shape)).float().mean(1))
    for what, hits, chance in (("colour", colour_hits, 1 / len(COLOURS)), ("shape", shape_hits, 1 / len(SHAPES))):
        rate = torch.stack(hits).mean(0)
        for n, v in zip(layer_names, rate.tolist()):
            lines.append(line("logit_lens", "vlm", f"object_{what}_at_image_tokens@{n}", v, 0.9, layer=n,
                              chance=round(chance, 4), objects=len(hits),
                              source="Neo et al. 2024 (object tokens decode as the object); issue 10: already at "
                                     "lm.blocks.0.resid_pre; 0.9 = a clear majority of patches"))
    return lines
