"""`probes` scored against the organisms' ground truth (see benchmarks/groundtruth.py).

Two controls per probe. The shuffled-label control (`control` field of each accuracy / R^2 line) sits at chance and
catches leakage. Hewitt and Liang's (2019) control task (`*_selectivity_types@layer` lines) gives every type a random
label; the type is the sample's identity in every attribute except the probed one (see `TYPES_SOURCE`), so a probe
that memorises what else the tokens show reaches the control, and the selectivity is what the layer tells the probe
about the probed attribute beyond that.
"""

from __future__ import annotations

import torch

from ._common import SEED, line

TYPES_SOURCE = (
    "Hewitt and Liang 2019 control task: each type gets one random label drawn from the empirical labels; "
    "selectivity = score - control accuracy (R^2). The type is the sample's identity in every attribute but the "
    "probed one ({types}): the probed label is independent of it, so the control can only be reached by "
    "memorising what else the tokens show, and selectivity is what the layer encodes about {what} beyond that. "
    "(Not the background alone: 4 backgrounds are trivially memorised, so the control would sit near 1 whatever "
    "the layer encodes.) Reported, no bar")


def score(n_clip: int = 480, n_vlm: int = 480) -> list[dict]:
    """clip: colour and shape from the class token per image-tower layer. vlm: an object's horizontal position
    (centre x, R^2) and left/right half from the mean of its patch tokens, in the vision tower and in the LM:
    does the organism that fails left/right questions know where objects are? Each probe also against Hewitt and
    Liang's control task (a random label per type), reported as selectivity."""
    import mmlens.organisms as organisms
    from mmlens.methods import probe_features, probe_sweep
    from mmlens.organisms.prompts import vlm_inputs
    from mmlens.world import make_scene, single_object_scene
    from mmlens.world.scene import BACKGROUNDS, COLOURS, SHAPES

    out = []
    clip = organisms.load("clip")
    scenes = [single_object_scene(SEED + 50_000 + k, background=BACKGROUNDS[k % len(BACKGROUNDS)]) for k in range(n_clip)]
    batches = [clip.processor(text=["a"], images=[s.pil() for s in scenes[i:i + 96]], return_tensors="pt", padding=True)
               for i in range(0, n_clip, 96)]  # CLIPModel runs both towers: one dummy text
    names = clip.resolve("vision.blocks.*.resid_post")
    X = probe_features(clip, batches, names=["vision.embed", *names], positions="cls")
    objs = [s.objects[0] for s in scenes]
    for what, labels, chance, types, spelled in (
            ("colour", [list(COLOURS).index(o.colour) for o in objs], 1 / 6,
             [(o.shape, o.size, s.background) for o, s in zip(objs, scenes)], "shape x size x background"),
            ("shape", [SHAPES.index(o.shape) for o in objs], 1 / 4,
             [(o.colour, o.size, s.background) for o, s in zip(objs, scenes)], "colour x size x background")):
        res = probe_sweep(X, labels, train=0.75, names=["vision.embed", *names], lens=clip)
        typed = probe_sweep(X, labels, train=0.75, names=res.names, control="types", types=types, lens=clip)
        for k, name in enumerate(res.names):
            last = k == len(res.names) - 1
            out.append(line("probes", "clip", f"{what}_probe_acc@{name}", res.score[k], 0.95 if last else None,
                            control=round(float(res.control[k]), 4), chance=round(chance, 4), layer=name,
                            source="the last layer must carry what the organism classifies at >= 0.95 zero-shot; "
                                   "earlier layers reported; control: shuffled labels"))
            out.append(line("probes", "clip", f"{what}_selectivity_types@{name}", typed.selectivity[k], None,
                            score=round(float(typed.score[k]), 4), control_types=round(float(typed.control[k]), 4),
                            chance=round(chance, 4), types=len(set(types)), layer=name,
                            source=TYPES_SOURCE.format(types=spelled, what=what)))
    vlm = organisms.load("vlm")
    vscenes = [make_scene(SEED + 60_000 + k, background=None) for k in range(n_vlm)]
    groups_lm, groups_vit, xs, halves, kinds = [], [], [], [], []
    batches = []
    for i in range(0, n_vlm, 32):
        chunk = vscenes[i:i + 32]
        inputs = vlm_inputs(vlm, chunk, ["how many objects are there ?"] * len(chunk))
        tm = vlm.token_map(inputs)
        g_lm, g_vit = [], []
        for b, s in enumerate(chunk):
            for j, o in enumerate(s.objects):
                pos = tm.positions_in_mask(s.masks[j], batch=b)
                if len(pos):
                    g_lm.append((b, pos.tolist()))
                    rows, cols = tm.row[b, pos], tm.col[b, pos]
                    g_vit.append((b, (1 + rows * tm.grids[0][1] + cols).tolist()))  # tower tokens: CLS first
                    xs.append(o.x)
                    halves.append(int(o.x > 0.5))
                    kinds.append((o.shape, o.colour, o.size))  # the object's appearance: all but where it is
        groups_lm.append(g_lm)
        groups_vit.append(g_vit)
        batches.append(inputs)
    vit_names, lm_names = vlm.resolve("vision.blocks.*.resid_post"), vlm.resolve("lm.blocks.*.resid_post")
    X_vit = probe_features(vlm, batches, names=vit_names, positions=groups_vit)
    X_lm = probe_features(vlm, batches, names=lm_names, positions=groups_lm)
    # The tokens are chosen by the object's mask, so their position embeddings alone encode where it is: the bar of
    # each layer is the same probe on blank images through the same tokens (position only, no object).
    blank = [{**b, "pixel_values": torch.zeros_like(b["pixel_values"])} for b in batches]
    X_vit_b = probe_features(vlm, blank, names=vit_names, positions=groups_vit)
    X_lm_b = probe_features(vlm, blank, names=lm_names, positions=groups_lm)
    src = ("bar: the same probe on blank images through the same tokens (their positions alone); above it, the layer "
           "carries where the object is beyond where its tokens sit")
    for X, Xb, names in ((X_vit, X_vit_b, vit_names), (X_lm, X_lm_b, lm_names)):
        r2 = probe_sweep(X, xs, train=0.75, names=names, task="regression", lens=vlm, l2=0.1)
        r2b = probe_sweep(Xb, xs, train=0.75, names=names, task="regression", l2=0.1)
        lr = probe_sweep(X, halves, train=0.75, names=names, lens=vlm)
        lrb = probe_sweep(Xb, halves, train=0.75, names=names)
        r2t = probe_sweep(X, xs, train=0.75, names=names, task="regression", control="types", types=kinds, l2=0.1)
        lrt = probe_sweep(X, halves, train=0.75, names=names, control="types", types=kinds)
        for k, name in enumerate(names):
            out.append(line("probes", "vlm", f"object_x_r2@{name}", r2.score[k], round(float(r2b.score[k]), 4),
                            control=round(float(r2.control[k]), 4), layer=name, objects=len(xs), source=src))
            out.append(line("probes", "vlm", f"left_right_acc@{name}", lr.score[k], round(float(lrb.score[k]), 4),
                            control=round(float(lr.control[k]), 4), layer=name, objects=len(xs),
                            source=src + "; chance 0.5; the organism answers left/right questions at 0.53"))
            for metric, t in (("object_x_r2", r2t), ("left_right", lrt)):
                out.append(line("probes", "vlm", f"{metric}_selectivity_types@{name}", t.selectivity[k], None,
                                score=round(float(t.score[k]), 4), control_types=round(float(t.control[k]), 4),
                                types=len(set(kinds)), layer=name, objects=len(xs),
                                source=TYPES_SOURCE.format(types="shape x colour x size", what="where the object is")))
    return out
