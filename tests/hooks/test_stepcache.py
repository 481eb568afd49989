"""StepCache: save/load keeps steps, timesteps and branches; globs and unknown names on a diffusion cache."""

from __future__ import annotations

import pytest
import torch

from mmlens import ActivationCache, StepCache
from mmlens.errors import UnknownNameError
from mmlens.hooks.names import natural_sorted

NAMES = ["unet.out", "text_encoder.blocks.0.resid_post", "unet.mid.attn.0.cross.pattern"]
DENOISER = ["unet.out", "unet.mid.attn.0.cross.pattern"]


@pytest.fixture(scope="module")
def sd_cache(tiny_lens):
    lens = tiny_lens("sd")
    torch.manual_seed(0)
    _, cache = lens.generate("a red square", num_inference_steps=3, guidance_scale=3.0, height=32, width=32,
                             output_type="np", names=NAMES)
    return cache


def _same(a, b):
    assert type(a) is type(b) and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("loader", [StepCache.load, ActivationCache.load])
def test_stepcache_save_load_keeps_steps_and_branches(sd_cache, tmp_path, loader):
    back = loader(sd_cache.save(tmp_path / "steps.safetensors"))
    assert type(back) is StepCache
    assert list(back) == list(sd_cache) == natural_sorted(NAMES)
    assert back.steps == sd_cache.steps == [0, 1, 2]
    assert back.timesteps == sd_cache.timesteps and len(set(back.timesteps.values())) == 3
    for n in DENOISER:
        assert [m.branches for m in back._meta[n]] == [("uncond", "cond")] * 3
        _same(back[n], sd_cache[n])
        assert back[n].shape[0] == 3  # stacked over steps, not "fired 3 times"
        for branch in (None, "cond", "uncond"):
            _same(back.stack(n, branch=branch), sd_cache.stack(n, branch=branch))
            for t in back.steps:
                _same(back.get(n, step=t, branch=branch), sd_cache.get(n, step=t, branch=branch))
        for a, b in zip(back.calls(n), sd_cache.calls(n), strict=True):
            _same(a, b)
    te = "text_encoder.blocks.0.resid_post"
    assert len(back.calls(te)) == len(sd_cache.calls(te)) == 2
    for branch in ("cond", "uncond"):
        _same(back.get(te, branch=branch), sd_cache.get(te, branch=branch))
    _same(back[te], sd_cache[te])
    assert not torch.equal(back.get(te, branch="cond"), back.get(te, branch="uncond"))
    with pytest.raises(KeyError, match="no value at step 7"):
        back.get("unet.out", step=7)


def test_stepcache_load_rejects_plain_cache_and_unknown_format(tiny_lens, tmp_path):
    from safetensors.torch import save_file

    plain = ActivationCache()
    plain.record("a", torch.ones(2))
    path = plain.save(tmp_path / "plain.safetensors")
    assert type(ActivationCache.load(path)) is ActivationCache
    with pytest.raises(ValueError, match="plain.safetensors holds a mmlens.ActivationCache, not a mmlens.StepCache"):
        StepCache.load(path)
    save_file({"a": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "pt"})
    save_file({"a": torch.ones(2)}, str(tmp_path / "bare.safetensors"))
    for f in ("other", "bare"):
        with pytest.raises(ValueError, match=f"{f}.safetensors: format tag .* is not an mmlens cache"):
            ActivationCache.load(tmp_path / f"{f}.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors: not a safetensors file"):
        ActivationCache.load(tmp_path / "junk.safetensors")


def test_stepcache_globs_and_unknown_names(sd_cache):
    got = sd_cache["unet.*"]
    assert list(got) == ["unet.mid.attn.0.cross.pattern", "unet.out"]
    for n, v in got.items():
        _same(v, sd_cache[n])
    cond = sd_cache.get("unet.*", step=1, branch="cond")
    _same(cond["unet.out"], sd_cache.get("unet.out", step=1, branch="cond"))
    stacked = sd_cache.stack("unet.ou*", branch="cond")  # names, then steps
    assert stacked.shape[:2] == (1, 3) and torch.equal(stacked[0], sd_cache.stack("unet.out", branch="cond"))
    for call in (lambda: sd_cache["unet.ou"], lambda: sd_cache.get("unet.ou", step=0),
                 lambda: sd_cache.stack("unet.ou"), lambda: sd_cache.calls("unet.ou")):
        with pytest.raises(UnknownNameError, match=r"'unet\.ou'.*only the names asked for are recorded.*unet\.out"):
            call()
    with pytest.raises(UnknownNameError, match="glob 'vae.*'"):
        sd_cache["vae.*"]
    with pytest.raises(ValueError, match="once per prompt encoding"):
        sd_cache.stack("text_encoder.blocks.0.resid_post")
    assert "steps" in sd_cache._repr_html_() and sd_cache.summary()[-1]["steps"] == [0, 1, 2]
