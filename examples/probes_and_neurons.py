"""Linear probes and neurons on the clip organism: colour and shape per image-tower layer (with a control task), and
the neurons most responsible for "red": where they fire on the image, and what ablating them does.

    .venv/bin/python examples/probes_and_neurons.py
"""

from __future__ import annotations


import mmlens.organisms as organisms
from mmlens.methods import ablate_neurons, neuron_attribution, probe_features, probe_sweep, top_activating
from mmlens.organisms.prompts import PROMPTS
from mmlens.world import single_object_scene
from mmlens.world.scene import BACKGROUNDS, COLOURS


def main(n: int = 240) -> dict:
    clip = organisms.load("clip")
    scenes = [single_object_scene(10_000_900 + k, background=BACKGROUNDS[k % 4]) for k in range(n)]
    batches = [clip.processor(text=PROMPTS, images=[s.pil() for s in scenes[i:i + 60]], return_tensors="pt",
                              padding=True) for i in range(0, n, 60)]

    # 1. probes: one per layer, fit together, on the class token; control = the same probe on shuffled labels
    names = ["vision.embed", *clip.hook_points("vision.blocks.*.resid_post")]
    X = probe_features(clip, batches, names=names, positions="cls")
    colours = [list(COLOURS).index(s.objects[0].colour) for s in scenes]
    sweep = probe_sweep(X, colours, train=0.75, names=names, lens=clip)
    for name, acc, ctl in zip(names, sweep.score.tolist(), sweep.control.tolist()):
        print(f"  colour probe {name:28s} held-out {acc:.2f}   control {ctl:.2f}")

    # 2. neurons: gradient x activation of the red prompts' logits, on red scenes; their top patches; ablation
    red = [i for i, s in enumerate(scenes[:60]) if s.objects[0].colour == "red"]
    red_prompts = [j for j, p in enumerate(PROMPTS) if p.split()[1] == "red"]
    inputs = {k: (v[red] if k == "pixel_values" else v) for k, v in batches[0].items()}
    attr = neuron_attribution(clip, inputs, lambda out: out.logits_per_image[:, red_prompts].sum())
    layer, neuron = divmod(int(attr.scores.mean(1).flatten().argmax()), attr.scores.shape[-1])
    name = attr.names[layer]
    top = top_activating(clip, batches, names=name, neurons=[neuron], k=4, positions="patches", progress=False)
    print(f"  most 'red' neuron: {name}[{neuron}]; its top activations {top.values[0, 0].tolist()}")
    before = clip(inputs).logits_per_image.argmax(-1)
    after = ablate_neurons(clip, inputs, {name: [neuron]}).logits_per_image.argmax(-1)
    print(f"  red scenes still read as red after ablating it: {(after == before).float().mean():.2f}")
    return {"sweep": sweep, "neuron": (name, neuron), "top": top}


if __name__ == "__main__":
    main()
