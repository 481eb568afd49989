"""Cross-attention word maps against a hand sum of the recorded attention patterns (tiny SD, PixArt, SD3)."""

from __future__ import annotations

import pytest
import torch

from mmlens.methods.maps import upsample
from mmlens.methods.word_maps import WordMapResult, word_maps

KW = dict(num_inference_steps=3, guidance_scale=2.0, height=32, width=32)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _token_positions(tok, prompt, word, max_length):
    ids = tok(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    (wid,) = tok(word, add_special_tokens=False)["input_ids"][:1]
    return [i for i, t in enumerate(ids) if t == wid]


def test_sd_word_maps_equal_hand_sum(tiny_lens):
    lens = tiny_lens("sd")
    prompts = ["a red square", "a blue circle"]
    res = word_maps(lens, prompts, generator=_gen(), **KW)
    sites = lens.hook_points("unet.*.cross.pattern")
    _, cache = lens.generate(prompts, names=sites, generator=_gen(), progress=False, output_type="np", **KW)
    per_grid = {}
    for n in sites:
        for t in range(3):
            a = cache.get(n, step=t, branch="cond").float().sum(1)  # (b, q, k)
            side = int(a.shape[1] ** 0.5)
            m = a.transpose(1, 2).reshape(a.shape[0], a.shape[2], side, side)
            per_grid[side] = per_grid.get(side, 0) + m
    top = max(per_grid)
    total = sum(upsample(m, top) for m in per_grid.values())
    tok = lens.model.tokenizer
    assert res.labels == ["a", "red", "square", "blue", "circle"]
    for i, p in enumerate(prompts):
        for w in ("red", "square", "blue", "circle"):
            j = res.labels.index(w)
            if w in p:
                want = total[i, _token_positions(tok, p, w, tok.model_max_length)].sum(0)
                torch.testing.assert_close(res.maps[i, j], want, atol=1e-5, rtol=1e-5)
                assert res.present[i, j]
            else:
                assert not res.present[i, j] and res.maps[i, j].abs().sum() == 0
    assert res.maps.shape[-2:] == (top, top) and res.images.shape == (2, 32, 32, 3)
    assert res.steps == [0, 1, 2] and isinstance(res, WordMapResult)


def test_subsets_of_steps_heads_and_sites(tiny_lens):
    lens = tiny_lens("sd")
    (site,) = lens.hook_points("unet.mid.attn.0.cross.pattern")
    res = word_maps(lens, "a red square", ["red"], names=site, steps=[1], heads=[0], generator=_gen(), **KW)
    _, cache = lens.generate("a red square", names=[site], generator=_gen(), progress=False, output_type="np", **KW)
    a = cache.get(site, step=1, branch="cond")[:, 0].float()  # head 0: (b, q, k)
    pos = _token_positions(lens.model.tokenizer, "a red square", "red", lens.model.tokenizer.model_max_length)
    side = int(a.shape[1] ** 0.5)
    want = a[:, :, pos].sum(-1).reshape(1, side, side)
    torch.testing.assert_close(res.maps[:, 0], want, atol=1e-6, rtol=1e-5)
    assert res.steps == [1]


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_value_weighted_maps_equal_hand_weighting(tiny_lens, name):
    """mode='value': every head's attention to a token times ||W_O^h v_h(token)||, from the cached values and the
    output projection's weight by hand (one site, one step, heads 0 and 1)."""
    lens = tiny_lens(name)
    (site,) = lens.hook_points("*.cross.pattern")[:1]
    block = site.rsplit(".", 1)[0]
    kw = dict(KW, guidance_scale=1.0, **({"use_resolution_binning": False} if name == "pixart" else {}))
    res = word_maps(lens, "a red square", ["red", "square"], names=site, steps=[1], heads=[0, 1], mode="value",
                    generator=_gen(), **kw)
    gen_kw = dict(kw, **({"clean_caption": False} if name == "pixart" else {}))
    _, cache = lens.generate("a red square", names=[site, block + ".v"], generator=_gen(), progress=False,
                             output_type="np", **gen_kw)
    a = cache.get(site, step=1).float()[:, :2]  # (b, heads 0-1, q, k)
    v = cache.get(block + ".v", step=1).float()  # (b, k, heads, d_head)
    w = lens.sites[block + ".out"].module.weight.detach().float()  # (d_model, heads * d_head)
    norms = torch.stack([(v[:, :, h] @ w[:, h * v.shape[-1]:(h + 1) * v.shape[-1]].T).norm(dim=-1)
                         for h in range(2)], 1)  # (b, 2, k)
    weighted = (a * norms[:, :, None, :]).sum(1)  # (b, q, k)
    plain = word_maps(lens, "a red square", ["red", "square"], names=site, steps=[1], heads=[0, 1],
                      generator=_gen(), **kw)
    side = int(a.shape[2] ** 0.5)
    assert (plain.maps.flatten(2) != 0).any(-1).all()  # both words have tokens
    tok = lens.model.tokenizer
    max_len = tok.model_max_length if name == "sd" else 120
    for j, word in enumerate(["red", "square"]):
        p = _token_positions(tok, "a red square", word, max_len)
        want = weighted[:, :, p].sum(-1).reshape(1, side, side)
        torch.testing.assert_close(res.maps[:, j], want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(res.maps, plain.maps)
    with pytest.raises(ValueError, match="mode='value' weights cross-attention"):
        word_maps(tiny_lens("sd3"), "a red square", mode="value", **KW)


def test_heads_chosen_per_site(tiny_lens):
    """heads={site: [...]}: the sum of each site's own head subset, equal to separate runs added up."""
    lens = tiny_lens("sd")
    mid, down = lens.hook_points("unet.mid.attn.0.cross.pattern")[0], lens.hook_points("unet.down.*.cross.pattern")[0]
    res = word_maps(lens, "a red square", ["red"], heads={mid: [0], down: [1]}, generator=_gen(), **KW)
    one = word_maps(lens, "a red square", ["red"], names=mid, heads=[0], generator=_gen(), **KW)
    two = word_maps(lens, "a red square", ["red"], names=down, heads=[1], generator=_gen(), **KW)
    # the two sites' grids differ (8x8, 16x16): the coarser one is upsampled onto the finer before summing
    top = max(one.maps.shape[-1], two.maps.shape[-1])
    torch.testing.assert_close(res.maps, upsample(one.maps, top) + upsample(two.maps, top), atol=1e-6, rtol=1e-5)
    assert sorted(res.names) == sorted([mid, down]) and res.meta["heads"] == {mid: [0], down: [1]}
    with pytest.raises(ValueError, match="leave names out"):
        word_maps(lens, "a red square", heads={mid: [0]}, names=mid, generator=_gen(), **KW)
    with pytest.raises(ValueError, match="heads=\\[99\\] at"):
        word_maps(lens, "a red square", heads={mid: [99]}, generator=_gen(), **KW)
    with pytest.raises(ValueError, match="empty dict"):
        word_maps(lens, "a red square", heads={}, generator=_gen(), **KW)


def test_segmentation_assigns_the_strongest_word(tiny_lens):
    lens = tiny_lens("sd")
    res = word_maps(lens, "a red square", ["red", "square"], generator=_gen(), **KW)
    seg = res.segmentation(threshold=0.0)
    up = torch.stack([res.upsampled("red")[:, 0], res.upsampled("square")[:, 0]], 1)
    from mmlens.methods.maps import normalise

    torch.testing.assert_close(seg, normalise(up).argmax(1))
    assert (res.segmentation(threshold=1.0) == -1).all()
    for bad in (1.5, "mean"):
        with pytest.raises(ValueError, match="fraction in"):
            res.segmentation(threshold=bad)


def test_pixart_and_img2img(tiny_lens):
    pix = tiny_lens("pixart")
    res = word_maps(pix, "a red square", ["red"], generator=_gen(), use_resolution_binning=False, **KW)
    assert res.maps.shape[:2] == (1, 1) and res.maps.sum() > 0
    sd = tiny_lens("sd")
    img = (torch.rand(1, 32, 32, 3, generator=_gen(1)).numpy() * 255).astype("uint8")[0]
    from PIL import Image

    res = word_maps(sd, "a red square", ["red"], image=Image.fromarray(img), strength=0.7, generator=_gen(),
                    num_inference_steps=3, guidance_scale=2.0)
    assert res.maps.sum() > 0 and res.images.shape == (1, 32, 32, 3)
    assert len(res.steps) == 2  # strength 0.7 of 3 steps runs the last 2


def test_sd3_pattern_and_concept_attention_output(tiny_lens):
    lens = tiny_lens("sd3")
    res = word_maps(lens, "a red square", ["red"], generator=_gen(), **KW)
    pats = lens.hook_points("dit.blocks.*.joint.pattern")
    _, cache = lens.generate("a red square", names=pats, generator=_gen(), progress=False, output_type="np", **KW)
    pos = _token_positions(lens.model.tokenizer, "a red square", "red", lens.model.tokenizer.model_max_length)
    n_img = (32 // (lens.model.vae_scale_factor * lens.model.transformer.config.patch_size)) ** 2
    total = sum(cache.get(n, step=t, branch="cond").float().sum(1)[:, :n_img, n_img:][:, :, pos].sum(-1)
                for n in pats for t in range(3))
    side = int(n_img ** 0.5)
    torch.testing.assert_close(res.maps[:, 0], total.reshape(1, side, side), atol=1e-5, rtol=1e-5)
    out = word_maps(lens, "a red square", ["red"], mode="output", generator=_gen(), **KW)
    # by hand: image-token z . text-token context_z, softmax over text tokens, summed over blocks and steps
    blocks = [n.rsplit(".", 1)[0] for n in lens.hook_points("dit.blocks.*.joint.context_z")]
    names = [b + ".z" for b in blocks] + [b + ".context_z" for b in blocks]
    _, cache = lens.generate("a red square", names=names, generator=_gen(), progress=False, output_type="np", **KW)
    pos = _token_positions(lens.model.tokenizer, "a red square", "red", lens.model.tokenizer.model_max_length)
    total = 0
    for b in blocks:
        for t in range(3):
            img, txt = cache.get(b + ".z", step=t, branch="cond"), cache.get(b + ".context_z", step=t, branch="cond")
            sims = torch.einsum("bnhd,bthd->bnt", img.float(), txt.float()).softmax(-1)
            total = total + sims[:, :, pos].sum(-1)
    side = int(total.shape[1] ** 0.5)
    torch.testing.assert_close(out.maps[:, 0], total.reshape(1, side, side), atol=1e-5, rtol=1e-5)


def test_errors(tiny_lens):
    sd = tiny_lens("sd")
    with pytest.raises(ValueError, match="in no prompt"):
        word_maps(sd, "a red square", ["purple"], **KW)
    with pytest.raises(ValueError, match="mode='output'"):
        word_maps(sd, "a red square", mode="output", **KW)
    with pytest.raises(ValueError, match="mode="):
        word_maps(sd, "a red square", mode="nope", **KW)
    with pytest.raises(ValueError, match="not cross/joint attention pattern"):
        word_maps(sd, "a red square", names="unet.mid.attn.0.self.pattern", **KW)
    with pytest.raises(TypeError, match="diffusion"):
        word_maps(tiny_lens("clip"), "a red square")
