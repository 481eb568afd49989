"""write_activations / stream_activations on every family: the stored rows are the model's activations at the
positions the metadata names (contrastive towers, a VLM's LM and vision tower, a diffusion UNet's maps and token
sequences per step and guidance branch), padding is dropped, and bad input is refused with a clear error."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import UnknownNameError
from mmlens.store import MODALITIES, ActivationStore, stream_activations, write_activations
from mmlens.store.diffusion import seeded_generators
from mmlens.testing.tiny_models import sample_image

IMAGE, TEXT, SPECIAL, LATENT = (MODALITIES.index(m) for m in ("image", "text", "special", "latent"))


def test_clip_vision_tokens_are_the_towers_activations(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    imgs = [sample_image(i) for i in range(5)]
    name = "vision.blocks.1.resid_post"
    store = write_activations(lens, imgs, name, tmp_path / "s", dtype="float32", batch_size=2, shard_tokens=20,
                              progress=False)
    inputs = dict(lens.processor(images=imgs, text=["a"] * 5, return_tensors="pt", padding=True))
    _, cache = lens.run_with_cache(inputs, names=name)
    ref = cache[name]  # (5, 17, 64): CLS + 4x4 patches
    m = store.meta
    assert len(store) == 5 * 17 and store.d == {name: 64} and len(store.shards) == 3  # 34 >= 20 tokens a shard
    torch.testing.assert_close(store.tensor(name), ref[m["example"], m["position"].long()], atol=1e-5, rtol=1e-5)
    pos = m["position"].long()
    assert torch.equal(m["example"], torch.arange(5).repeat_interleave(17))
    assert torch.equal(m["modality"].long(), torch.where(pos == 0, SPECIAL, IMAGE))
    assert torch.equal(m["row"].long(), torch.where(pos == 0, -1, (pos - 1) // 4))
    assert torch.equal(m["col"].long(), torch.where(pos == 0, -1, (pos - 1) % 4))
    assert (m["image"] == 0).all() and (m["token"] == -1).all() and (m["step"] == -1).all()
    assert (m["branch"] == -1).all() and m["timestep"].isnan().all()
    reopened = ActivationStore(tmp_path / "s")
    assert reopened.names == [name] and torch.equal(reopened.tensor(name), store.tensor(name))


def test_clip_text_drops_padding_and_marks_special_tokens(tiny_lens, tmp_path):
    lens = tiny_lens("clip")
    texts = ["a photo of a red square", "red", "a blue circle"]
    name = "text.blocks.0.resid_post"
    store = write_activations(lens, texts, name, tmp_path / "t", dtype="bfloat16", progress=False)
    enc = lens.processor.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad(), lens.hooks(captures={name: [lambda v, ctx: got.append(v)]}):
        got = []
        lens.model.get_text_features(**enc)
    mask = enc["attention_mask"].bool()
    assert len(store) == int(mask.sum()) < mask.numel()  # padding dropped
    m = store.meta
    assert torch.equal(m["token"], enc["input_ids"][mask])
    assert torch.equal(m["position"].long(), torch.arange(mask.shape[1]).expand_as(mask)[mask])
    special = torch.isin(m["token"], torch.tensor(lens.processor.tokenizer.all_special_ids))
    assert special.any() and torch.equal(m["modality"] == SPECIAL, special) and (m["modality"][~special] == TEXT).all()
    assert store.dtype == torch.bfloat16
    torch.testing.assert_close(store.tensor(name), got[0][mask].to(torch.bfloat16).float())
    assert store.token_strings[int(m["token"][1])] in ("a", "red")


def test_llava_lm_tokens_follow_the_token_map(tiny_lens, tmp_path):
    lens = tiny_lens("llava")
    convs = [{"image": sample_image(i), "text": t} for i, t in
             enumerate(["<image> what colour is the square ?", "<image> red", "<image> is it a circle"])]
    name = "lm.blocks.1.resid_post"
    store = write_activations(lens, convs + ["what is red ?"], name, tmp_path / "v", dtype="float32", batch_size=3,
                              progress=False)
    inputs = dict(lens.processor(text=[c["text"] for c in convs], images=[c["image"] for c in convs],
                                 return_tensors="pt", padding=True))
    _, cache = lens.run_with_cache(inputs, names=name)
    tm = lens.token_map(inputs)
    mask = inputs["attention_mask"].bool()
    m = store.meta
    first = m["example"] < 3
    ex, pos = m["example"][first], m["position"][first].long()
    assert int(first.sum()) == int(mask.sum()) < mask.numel()
    torch.testing.assert_close(store.tensor(name)[first], cache[name][ex, pos])
    for col, ref in (("modality", tm.modality), ("row", tm.row), ("col", tm.col), ("token", inputs["input_ids"])):
        assert torch.equal(m[col][first].long(), ref[ex, pos].long()), col
    assert torch.equal(m["image"][first].long(), torch.where(tm.image[ex, pos] >= 0, 0, -1))
    assert (m["modality"][first] == IMAGE).sum() == 3 * 16
    text_only = m["example"] == 3
    assert text_only.any() and (m["modality"][text_only] != IMAGE).all() and (m["image"][text_only] == -1).all()


def test_llava_vision_tower_rows_are_per_image(tiny_lens):
    lens = tiny_lens("llava")
    convs = [{"image": sample_image(i), "text": "<image> red"} for i in range(2)]
    (acts, meta), = list(stream_activations(lens, convs + ["red"], "vision.blocks.0.resid_post", batch_size=2))
    inputs = dict(lens.processor(text=["<image> red"] * 2, images=[c["image"] for c in convs], return_tensors="pt",
                                 padding=True))
    _, cache = lens.run_with_cache(inputs, names="vision.blocks.0.resid_post")
    ref = cache["vision.blocks.0.resid_post"]  # (images, 17, d); the text-only example adds nothing
    torch.testing.assert_close(acts["vision.blocks.0.resid_post"], ref.reshape(-1, ref.shape[-1]))
    assert torch.equal(meta["example"], torch.arange(2).repeat_interleave(17))
    assert torch.equal(meta["row"][:17].long(), torch.tensor([-1] + [r for r in range(4) for _ in range(4)]))


def test_diffusion_latent_tokens_per_step_and_branch(tiny_lens, tmp_path):
    lens = tiny_lens("sd")
    prompts = ["a red square", "a blue circle", "a square"]
    names = ["unet.mid.out", "unet.mid.attn.0.resid_post"]  # a (B, C, h, w) map and a (B, h*w, C) sequence
    kw = dict(num_inference_steps=3, record_steps=[0, 2], height=32, width=32, guidance_scale=7.5)  # not step 1
    store = write_activations(lens, prompts, names, tmp_path / "d", dtype="float32", batch_size=2, progress=False,
                              seed=5, **kw)
    m = store.meta
    assert len(store) == 3 * 2 * 2 * 64  # prompts x steps x branches x 8x8 cells
    assert (m["modality"] == LATENT).all() and set(m["step"].tolist()) == {0, 2} and set(m["branch"].tolist()) == {0, 1}
    assert torch.equal(m["position"].long(), m["row"].long() * 8 + m["col"].long())
    for lo, hi in ((0, 2), (2, 3)):  # the batches as written: same prompts, same per-example noise
        gens = seeded_generators(lens, torch.arange(lo, hi), 1, 5)
        _, cache = lens.generate(prompts[lo:hi], names=names, cache_device="cpu", progress=False,
                                 output_type="latent", generator=gens, **kw)
        for s in (0, 2):
            assert float(m["timestep"][m["step"] == s][0]) == cache.timesteps[s]
            for b, branch in enumerate(("uncond", "cond")):
                sel = (m["example"] >= lo) & (m["example"] < hi) & (m["step"] == s) & (m["branch"] == b)
                ex, r, c = m["example"][sel] - lo, m["row"][sel].long(), m["col"][sel].long()
                fmap = cache.get("unet.mid.out", step=s, branch=branch)
                torch.testing.assert_close(store.tensor("unet.mid.out", where=sel), fmap[ex, :, r, c])
                seq = cache.get("unet.mid.attn.0.resid_post", step=s, branch=branch)
                torch.testing.assert_close(store.tensor("unet.mid.attn.0.resid_post", where=sel),
                                           seq[ex, m["position"][sel].long()])


def test_diffusion_without_guidance_and_several_images(tiny_lens):
    lens = tiny_lens("sd")
    (acts, meta), = list(stream_activations(lens, ["a red square"], "unet.down.0.attn.0.self.q", num_inference_steps=2,
                                            record_steps=[1], guidance_scale=1.0, num_images_per_prompt=2,
                                            height=32, width=32))
    assert acts["unet.down.0.attn.0.self.q"].shape == (2 * 256, 32)  # heads x d_head flattened
    assert (meta["branch"] == 1).all() and torch.equal(meta["image"].unique(), torch.tensor([0, 1], dtype=torch.int32))
    assert int(meta["row"].max()) == 15 and int(meta["col"].max()) == 15


def test_bad_input_is_refused(tiny_lens, tmp_path):
    clip, sd = tiny_lens("clip"), tiny_lens("sd")
    img = [sample_image(0)]
    with pytest.raises(UnknownNameError, match="vision.blocks.1.resid_post"):
        write_activations(clip, img, "vision.blocks.1.resid_pots", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="empty"):
        write_activations(clip, [], "vision.blocks.1.resid_post", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="empty"):
        write_activations(clip, iter([]), "vision.blocks.1.resid_post", tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        write_activations(clip, img, "vision.blocks.1.resid_post", tmp_path / "a", dtype="int8", progress=False)
    with pytest.raises(ValueError, match="attention maps"):
        write_activations(clip, img, "vision.blocks.1.attn.pattern", tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="towers"):
        write_activations(clip, img, ["vision.blocks.1.resid_post", "text.blocks.1.resid_post"], tmp_path / "a")
    with pytest.raises(ValueError, match="same token rows"):
        write_activations(clip, img, ["vision.blocks.1.resid_post", "vision.proj"], tmp_path / "b", progress=False)
    with pytest.raises(TypeError, match="must be images"):
        write_activations(clip, ["a red square"], "vision.blocks.1.resid_post", tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="single item in a list"):
        write_activations(clip, sample_image(0), "vision.blocks.1.resid_post", tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="uint8"):
        next(stream_activations(clip, [torch.rand(32, 32, 3)], "vision.blocks.1.resid_post"))
    with pytest.raises(ValueError, match="mix denoiser sites and text-encoder sites"):
        write_activations(sd, ["a"], ["unet.mid.out", "text_encoder.blocks.0.resid_post"], tmp_path / "a",
                          progress=False)
    with pytest.raises(ValueError, match="not cells of the"):
        next(stream_activations(sd, ["a"], "unet.down.0.attn.0.cross.k", num_inference_steps=1, height=32, width=32))
    with pytest.raises(FileNotFoundError, match="not a store"):
        ActivationStore(tmp_path / "nothing")
