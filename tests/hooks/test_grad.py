"""grad=True: the cache holds the tensors the model used, so autograd reaches them (defect 6)."""

from __future__ import annotations

import pytest
import torch

from mmlens.testing.tiny_models import sample_inputs


def _metric(out):
    return out.logits[:, -1].logsumexp(-1).sum()


def test_default_cache_is_detached(tiny_lens):
    lens = tiny_lens("clip")
    _, cache = lens.run_with_cache(sample_inputs("clip", lens), names="vision.blocks.0.resid_post")
    assert not cache["vision.blocks.0.resid_post"].requires_grad


def test_grad_reaches_resid_and_equals_plain_hook(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    layer = lens.model.model.language_model.layers[0]
    seen = {}
    handle = layer.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.enable_grad():
            ref = torch.autograd.grad(_metric(lens.model(**inputs)), seen["x"])[0]
    finally:
        handle.remove()
    out, cache = lens.run_with_cache(inputs, names=["lm.blocks.0.resid_post", "lm.blocks.1.attn.z"], grad=True)
    x = cache["lm.blocks.0.resid_post"]
    assert x.requires_grad
    g_x, g_z = torch.autograd.grad(_metric(out), [x, cache["lm.blocks.1.attn.z"]])
    torch.testing.assert_close(g_x, ref, atol=1e-6, rtol=1e-5)
    assert g_z.shape == cache["lm.blocks.1.attn.z"].shape and g_z.abs().sum() > 0


def test_grad_on_head_view_equals_grad_on_flat_input(tiny_lens):
    """attn.z is a (heads, d_head) view of o_proj's input: its gradient is the flat input's, unflattened."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    o = lens.model.model.language_model.layers[1].self_attn.o_proj
    seen = {}
    handle = o.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with torch.enable_grad():
            ref = torch.autograd.grad(_metric(lens.model(**inputs)), seen["x"])[0]
    finally:
        handle.remove()
    views = {}
    with lens.hooks({"lm.blocks.1.attn.z": lambda z, ctx: views.__setitem__("z", z)}), torch.enable_grad():
        metric = _metric(lens(inputs))
    (g,) = torch.autograd.grad(metric, views["z"])  # a hook's own view, read-only hook, still in the graph
    torch.testing.assert_close(g.flatten(-2), ref, atol=1e-6, rtol=1e-5)


def test_grad_on_fused_qkv_slice(tiny_lens):
    """BLIP-2's vision k is a third of a fused qkv output: its gradient is that third of the fused gradient."""
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens)
    qkv = lens.model.vision_model.encoder.layers[0].self_attn.qkv
    seen = {}
    handle = qkv.register_forward_hook(lambda m, a, out: seen.__setitem__("x", out))
    try:
        with torch.enable_grad():
            ref = torch.autograd.grad(_metric(lens.model(**inputs)), seen["x"])[0]
    finally:
        handle.remove()
    out, cache = lens.run_with_cache(inputs, names="vision.blocks.0.attn.k", grad=True)
    (g,) = torch.autograd.grad(_metric(out), cache["vision.blocks.0.attn.k"])
    torch.testing.assert_close(g.flatten(-2), ref.chunk(3, dim=-1)[1], atol=1e-6, rtol=1e-5)


def test_grad_reaches_attention_pattern_like_eager(tiny_lens):
    """Under SDPA the output is routed through the recorded probabilities: their gradient equals the gradient
    of transformers' own eager attention weights."""
    sdpa, eager = tiny_lens("llava"), tiny_lens("llava", attn_implementation="eager")
    inputs = sample_inputs("llava", sdpa, batch=2)
    with torch.enable_grad():
        ref_out = eager.model(**inputs, output_attentions=True)
        ref = torch.autograd.grad(_metric(ref_out), ref_out.attentions[1])[0]
    out, cache = sdpa.run_with_cache(inputs, names="lm.blocks.1.attn.pattern", grad=True)
    (g,) = torch.autograd.grad(_metric(out), cache["lm.blocks.1.attn.pattern"])
    torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=0)


def test_grad_options_that_would_leave_the_graph_are_refused(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    with pytest.raises(ValueError, match="cache_dtype"):
        lens.run_with_cache(inputs, names="vision.blocks.0.resid_post", grad=True, cache_dtype=torch.float16)
    with pytest.raises(ValueError, match="attn_rows"):
        lens.run_with_cache(inputs, names="vision.blocks.0.attn.pattern", grad=True, attn_rows=[0])
    with pytest.raises(TypeError, match="grad must be True or False"):
        lens.run_with_cache(inputs, names="vision.blocks.0.resid_post", grad="yes")


def test_recording_a_pattern_does_not_change_other_gradients(tiny_lens):
    """Routing gradients through the recorded map must not count q, k, v twice (kernel path + recomputed path)."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    names = ["lm.blocks.1.attn.q", "lm.blocks.1.attn.k", "lm.blocks.1.attn.v", "lm.blocks.0.resid_post"]
    out, plain = lens.run_with_cache(inputs, names=names, grad=True)
    ref = torch.autograd.grad(_metric(out), [plain[n] for n in names])
    out, both = lens.run_with_cache(inputs, names=[*names, "lm.blocks.1.attn.pattern"], grad=True)
    got = torch.autograd.grad(_metric(out), [both[n] for n in names])
    for n, g, r in zip(names, got, ref):
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5, msg=n)
