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


def test_cache_glob_returns_dict_in_natural_order():
    cache = ActivationCache()
    for i in (10, 2, 0):
        cache.record(f"lm.blocks.{i}.resid_post", torch.full((2,), float(i)))
    cache.record("lm.blocks.2.attn.out", torch.zeros(2))
    got = cache["lm.blocks.*.resid_post"]
    assert list(got) == ["lm.blocks.0.resid_post", "lm.blocks.2.resid_post", "lm.blocks.10.resid_post"]
    assert [v[0].item() for v in got.values()] == [0.0, 2.0, 10.0]
    assert cache.stack("lm.blocks.*.resid_post")[:, 0].tolist() == [0.0, 2.0, 10.0]


def test_cache_unknown_names_are_clear_and_mapping_get_works():
    from mmlens.errors import UnknownNameError

    cache = ActivationCache()
    cache.record("lm.blocks.0.resid_post", torch.zeros(2))
    cache.record("lm.blocks.0.mlp.out", torch.zeros(2))
    cache.record("lm.blocks.0.mlp.out", torch.ones(2))
    assert cache.get("missing") is None and "missing" not in cache
    for call in (lambda: cache["lm.blocks.0.resid_pos"], lambda: cache.calls("lm.blocks.0.resid_pos"),
                 lambda: cache.select("lm.blocks.0.resid_pos"), lambda: cache.stack("lm.blocks.0.resid_pos")):
        with pytest.raises(UnknownNameError, match=r"'lm\.blocks\.0\.resid_pos'.*only the names asked for are "
                                                   r"recorded.*Closest recorded names: lm\.blocks\.0\.resid_post"):
            call()
    with pytest.raises(KeyError, match=r"glob 'vision\.\*'"):
        cache["vision.*"]
    with pytest.raises(ValueError, match="fired 2 times"):  # not a KeyError: get() must not hide it as None
        cache.get("lm.blocks.0.mlp.out")
    assert [t[0].item() for t in cache.calls("lm.blocks.0.mlp.out")] == [0.0, 1.0]


@pytest.mark.parametrize("dtype,err", [(torch.int8, ValueError), ("int8", ValueError), ("float17", ValueError),
                                       (object(), TypeError), (8, TypeError)])
def test_cache_dtype_must_be_floating(tiny_lens, dtype, err):
    with pytest.raises(err, match="cache_dtype.*allowed: None, torch.float16, torch.bfloat16"):
        ActivationCache(dtype=dtype)
    lens = tiny_lens("clip")
    with pytest.raises(err, match="cache_dtype"):
        lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post", cache_dtype=dtype)


def test_cache_dtype_strings_and_device_errors():
    assert ActivationCache(dtype="bfloat16").dtype is torch.bfloat16
    assert ActivationCache(dtype="torch.float16", device="cpu").device == torch.device("cpu")
    cache = ActivationCache(dtype="float16")
    cache.record("x", torch.tensor([1.5, 2.0], dtype=torch.float64))
    assert cache["x"].dtype == torch.float16 and cache["x"].tolist() == [1.5, 2.0]
    with pytest.raises(ValueError, match="cache_device.*'gpu0'"):
        ActivationCache(device="gpu0")
    with pytest.raises(TypeError, match="cache_device"):
        ActivationCache(device=object())


def test_cache_copies_even_when_device_move_is_a_no_op():
    """`.to(same device)` returns the input itself; the model may then overwrite it in place."""
    cache = ActivationCache(device="cpu", dtype=torch.float32)
    x = torch.zeros(3)
    cache.record("x", x)
    cache.record("y", x)  # one tensor under two names (resid_post i is resid_pre i+1)
    x.add_(1)
    assert cache["x"].tolist() == [0.0, 0.0, 0.0]


def test_cache_keep_graph_records_the_tensor_itself(tmp_path):
    w = torch.randn(3, requires_grad=True)
    y = w * 2
    cache = ActivationCache(keep_graph=True)
    cache.record("y", y)
    cache.record("y2", y)
    assert cache["y"] is y and cache["y"].requires_grad and cache["y"].grad_fn is y.grad_fn
    cache["y"].sum().backward()
    torch.testing.assert_close(w.grad, torch.full((3,), 2.0))
    back = ActivationCache.load(cache.save(tmp_path / "g.safetensors"))
    assert not back["y"].requires_grad and torch.equal(back["y"], y.detach()) and torch.equal(back["y2"], y.detach())
    for kw in ({"device": "cpu"}, {"dtype": torch.float16}):
        with pytest.raises(ValueError, match="keep_graph.*autograd graph"):
            ActivationCache(keep_graph=True, **kw)
    default = ActivationCache()
    default.record("y", y)
    assert not default["y"].requires_grad and default["y"].grad_fn is None
