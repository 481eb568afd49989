"""Edits through canonical names equal the same edit by a plain register_forward_hook; hooks never leak."""

from __future__ import annotations

import pytest
import torch

from mmlens.testing.tiny_models import sample_inputs
from tests.conftest import hook_counts


def plain_run(lens, inputs, module, hook, *, pre=False, field="logits"):
    """The reference: the model run with one plain torch hook, removed afterwards."""
    handle = module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)
    try:
        return getattr(lens(inputs), field)
    finally:
        handle.remove()


def test_output_edit_equals_plain_forward_hook(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    mlp = lens.model.model.language_model.layers[0].mlp
    ref = plain_run(lens, inputs, mlp, lambda m, a, out: out * 0.5 + 1.0)
    with lens.hooks({"lm.blocks.0.mlp.out": lambda x, ctx: x * 0.5 + 1.0}):
        out = lens(inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_edit_reaches_hidden_states_the_model_reads(tiny_lens):
    """LLaVA reads its image features from the vision tower's `hidden_states[vision_feature_layer]`, which
    transformers records with forward hooks of its own, installed once at the first forward. An edit of that layer's
    output must reach the features (the truth: a plain hook that runs before transformers' recorder)."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    base = lens(inputs).logits  # the recorders are installed by now
    n = len(lens.model.model.vision_tower.encoder.layers)
    i = lens.model.config.vision_feature_layer % (n + 1) - 1  # the block whose output is read
    layer = lens.model.model.vision_tower.encoder.layers[i]

    def edit(x):
        return x * 0.0 + 1.0

    handle = layer.register_forward_hook(lambda m, a, out: edit(out) if torch.is_tensor(out) else (edit(out[0]),) + out[1:],
                                         prepend=True)
    try:
        ref = lens(inputs).logits
    finally:
        handle.remove()
    assert not torch.allclose(ref, base)
    with lens.hooks({f"vision.blocks.{i}.resid_post": lambda x, ctx: edit(x)}):
        out = lens(inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(lens(inputs).logits, base, atol=0, rtol=0)  # and nothing stays behind


def test_input_edit_equals_plain_pre_hook(tiny_lens):
    """mlp.post is the input of down_proj: a pre-hook zeroing neuron 7 is the reference."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens)
    down = lens.model.model.language_model.layers[1].mlp.down_proj

    def pre(m, args):
        x = args[0].clone()
        x[..., 7] = 0
        return (x,)

    ref = plain_run(lens, inputs, down, pre, pre=True)

    def ablate(x, ctx):
        x = x.clone()
        x[..., 7] = 0
        return x

    with lens.hooks({"lm.blocks.1.mlp.post": ablate}):
        out = lens(inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert not torch.equal(out, lens(inputs).logits)


def test_head_view_edit_equals_flat_edit(tiny_lens):
    """Zeroing head 1 of attn.z equals zeroing columns 16:32 of o_proj's input."""
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    o = lens.model.vision_model.encoder.layers[0].self_attn.out_proj

    def pre(m, args):
        x = args[0].clone()
        x[..., 16:32] = 0
        return (x,)

    ref = plain_run(lens, inputs, o, pre, pre=True, field="image_embeds")

    def zero(z, ctx):
        assert z.shape[-2:] == (4, 16) and ctx.name == "vision.blocks.0.attn.z"
        z = z.clone()
        z[..., 1, :] = 0
        return z

    with lens.hooks({"vision.blocks.0.attn.z": zero}):
        out = lens(inputs).image_embeds
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_fused_qkv_edit_writes_only_its_slice(tiny_lens):
    lens = tiny_lens("blip2")
    inputs = sample_inputs("blip2", lens)
    qkv = lens.model.vision_model.encoder.layers[0].self_attn.qkv

    def post(m, a, out):
        out = out.clone()
        out[..., 64:128] *= 2  # the k third
        return out

    ref = plain_run(lens, inputs, qkv, post)
    with lens.hooks({"vision.blocks.0.attn.k": lambda k, ctx: k * 2}):
        out = lens(inputs).logits
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_hooks_chain_and_cache_sees_edit(tiny_lens):
    lens = tiny_lens("clip")
    inputs = sample_inputs("clip", lens)
    _, plain = lens.run_with_cache(inputs, names="vision.blocks.0.resid_post")
    _, edited = lens.run_with_cache(inputs, names="vision.blocks.0.resid_post",
                                    hooks={"vision.blocks.0.resid_post": [lambda x, c: x + 1, lambda x, c: x * 2]})
    torch.testing.assert_close(edited["vision.blocks.0.resid_post"], (plain["vision.blocks.0.resid_post"] + 1) * 2)


@pytest.mark.parametrize("name,site", [("llava", "lm.blocks.1.attn.pattern"), ("llava", "lm.blocks.0.resid_pre"),
                                       ("sd", "unet.mid.attn.0.cross.pattern"), ("clip", "vision.blocks.1.mlp.post")])
def test_no_hook_left_after_exception(tiny_lens, name, site):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    lens = tiny_lens(name)
    if name != "sd":
        lens(sample_inputs(name, lens))  # let transformers install its own permanent hooks first
    before = hook_counts(lens.adapter.root())
    table = dict(ALL_ATTENTION_FUNCTIONS._local_mapping)
    processors = dict(lens.model.unet.attn_processors) if name == "sd" else None

    def boom(x, ctx):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        if name == "sd":
            lens.generate("a red square", num_inference_steps=2, height=32, width=32, output_type="np",
                          hooks={site: boom}, names="unet.*.resid_post")
        else:
            lens.run_with_cache(sample_inputs(name, lens), names="*", hooks={site: boom})
    assert hook_counts(lens.adapter.root()) == before
    assert ALL_ATTENTION_FUNCTIONS._local_mapping == table
    if processors is not None:
        assert {k: type(v) for k, v in lens.model.unet.attn_processors.items()} == {k: type(v) for k, v in processors.items()}


def test_session_exception_in_with_block_removes_hooks(tiny_lens):
    lens = tiny_lens("siglip")
    lens(sample_inputs("siglip", lens))
    before = hook_counts(lens.model)
    with pytest.raises(KeyError):
        with lens.hooks({"vision.blocks.*.resid_post": lambda x, c: None, "vision.blocks.0.attn.pattern": lambda p, c: None}):
            assert hook_counts(lens.model) != before
            raise KeyError("inside")
    assert hook_counts(lens.model) == before


def test_wrong_shape_edit_is_an_error(tiny_lens):
    lens = tiny_lens("clip")
    with pytest.raises(ValueError, match="must keep the shape"):
        with lens.hooks({"vision.blocks.0.resid_post": lambda x, c: x[:, :1]}):
            lens(sample_inputs("clip", lens))
