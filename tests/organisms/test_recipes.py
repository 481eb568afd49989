"""Each organism's training recipe, run for a couple of steps on a tiny pool: it ends in a folder that the real
classes load, and the same seed gives the same weights (the issue asks for deterministic training)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from mmlens.organisms import WEIGHTS, available

TINY = {
    "clip": dict(steps=2, batch=8, pool=16, warmup=1),
    "vlm": dict(vision_steps=1, vision_batch=4, steps=2, batch=2, pool=8, warmup=1),
    "diffusion": dict(vae_steps=1, vae_batch=4, steps=2, batch=4, pool=8, pairs=8, warmup=1),
}


def _train(name, root):
    from mmlens.organisms import clip, diffusion, vlm

    fn = {"clip": clip.train, "vlm": vlm.train, "diffusion": diffusion.train}[name]
    extra = {} if name == "clip" else {"clip_folder": WEIGHTS / "clip"}
    torch.manual_seed(123)  # the recipe must not depend on the caller's global seed
    return fn(root / "out", root / "work", **extra, **TINY[name])


def _weights(folder):
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"no safetensors in {folder}"
    return {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(str(f)).items()}


@pytest.mark.parametrize("name", ["clip", "vlm", "diffusion"])
def test_recipe_is_deterministic_and_saves_a_loadable_folder(name, tmp_path):
    if name != "clip" and "clip" not in available():
        pytest.skip("needs the shipped clip organism")
    stats = _train(name, tmp_path / "a")
    assert stats["steps"] == TINY[name]["steps"] and len(stats["loss_curve"]) == TINY[name]["steps"]
    _train(name, tmp_path / "b")
    a, b = _weights(tmp_path / "a" / "out"), _weights(tmp_path / "b" / "out")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)

    out = tmp_path / "a" / "out"
    if name == "clip":
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(out)
        assert model.config.vision_config.image_size == 48
    elif name == "vlm":
        from transformers import CLIPModel, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(out)
        clip = CLIPModel.from_pretrained(WEIGHTS / "clip")
        # the tower starts from the clip organism: after 3 small steps it is close to it, not a fresh init
        ref = clip.vision_model.embeddings.patch_embedding.weight
        got = model.model.vision_tower.embeddings.patch_embedding.weight
        assert (got - ref).abs().max() < 1e-2 < ref.abs().max()
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(out)
        assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
        # how the tokenizer was loaded (tests run with HF_HUB_OFFLINE=1) is not saved as part of it
        cfg = json.loads((out / "tokenizer" / "tokenizer_config.json").read_text())
        assert "local_files_only" not in cfg and "is_local" not in cfg and cfg["model_max_length"] == 16
