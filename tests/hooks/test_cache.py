"""Cache options, persistence, and hooks coexisting with accelerate's offload hooks."""

from __future__ import annotations

import pytest
import torch

import mmlens
from mmlens import ActivationCache
from mmlens.testing.tiny_models import sample_inputs


def test_cache_dtype_and_device(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    _, full = lens.run_with_cache(inputs, names="vision.blocks.*.resid_post")
    _, half = lens.run_with_cache(inputs, names="vision.blocks.*.resid_post", cache_device="cpu",
                                  cache_dtype=torch.float16)
    for k in full:
        assert half[k].dtype == torch.float16 and half[k].device.type == "cpu"
        torch.testing.assert_close(half[k].float(), full[k], atol=2e-3, rtol=1e-3)
    assert half.nbytes() * 2 == full.nbytes()


def test_cache_is_detached_and_keeps_no_graph(tiny_lens):
    lens = tiny_lens("clip")
    _, cache = lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post", grad=True)
    assert not cache["vision.blocks.0.resid_post"].requires_grad


def test_cache_save_load_roundtrip(tiny_lens, tmp_path):
    lens = tiny_lens("llava")
    _, cache = lens.run_with_cache(sample_inputs("llava", lens), names=["lm.blocks.*.resid_post", "logits"])
    path = cache.save(tmp_path / "c.safetensors")
    back = ActivationCache.load(path)
    assert list(back) == list(cache)
    for k in cache:
        torch.testing.assert_close(back[k], cache[k], atol=0, rtol=0)
    assert "lm.blocks.0.resid_post" in cache._repr_html_()
    stacked = cache.stack("lm.blocks.*.resid_post")
    assert stacked.shape[0] == 2


def test_cache_unknown_name(tiny_lens):
    lens = tiny_lens("clip")
    _, cache = lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post")
    with pytest.raises(ValueError, match="only the names asked for are recorded"):
        cache["vision.blocks.1.resid_post"]


def test_hooks_work_with_accelerate_disk_offload(tiny_lens, tiny_folder, tmp_path):
    """device_map='auto' with a tiny memory budget offloads most weights to disk (accelerate's own hooks)."""
    ref = tiny_lens("llava")
    inputs = sample_inputs("llava", ref, batch=2)
    _, expected = ref.run_with_cache(inputs, names="*")
    lens = mmlens.load(tiny_folder("llava"), device_map="auto", max_memory={"cpu": "300KB"}, offload_folder=tmp_path)
    assert "disk" in set(lens.model.hf_device_map.values())
    assert any(hasattr(m, "_hf_hook") for m in lens.model.modules())

    def double(x, ctx):
        return x * 2

    _, got = lens.run_with_cache(inputs, names="*")
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=0, msg=k)
    with lens.hooks({"lm.blocks.0.mlp.out": double}):
        edited = lens(inputs).logits
    with ref.hooks({"lm.blocks.0.mlp.out": double}):
        torch.testing.assert_close(edited, ref(inputs).logits, atol=1e-6, rtol=0)
