"""Diffusion: per-step, per-guidance-branch recording; probabilities against an eager recomputation."""

from __future__ import annotations

import pytest
import torch

GEN = dict(height=32, width=32, output_type="np")


def _gen(lens, **kw):
    extra = {"use_resolution_binning": False} if lens.architecture == "pixart" else {}
    return lens.generate("a red square", **GEN, **extra, **kw)


@pytest.mark.parametrize("name,site,text_tokens", [
    ("sd", "unet.up.1.attn.0.cross.pattern", 16),
    ("pixart", "dit.blocks.1.cross.pattern", 16),
])
def test_cross_attention_sums_to_one_per_step_and_branch(tiny_lens, name, site, text_tokens):
    lens = tiny_lens(name)
    _, cache = _gen(lens, num_inference_steps=3, guidance_scale=5.0, names=site)
    assert cache.steps == [0, 1, 2]
    for t in cache.steps:
        for branch in ("cond", "uncond"):
            p = cache.get(site, step=t, branch=branch)
            assert p.shape[0] == 1 and p.shape[-1] >= text_tokens
            torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)
        both = cache.get(site, step=t)
        torch.testing.assert_close(both[1:], cache.get(site, step=t, branch="cond"))
    assert cache.stack(site, branch="cond").shape[0] == 3


def test_sd_probs_equal_classic_processor_and_manual_recomputation(tiny_lens, tiny_folder):
    """SDPA-tapped probabilities == diffusers' classic AttnProcessor (eager) == softmax(q k^T * scale)."""
    import mmlens
    from diffusers.models.attention_processor import AttnProcessor

    fast = tiny_lens("sd")
    eager = mmlens.load(tiny_folder("sd"))
    eager.model.unet.set_attn_processor(AttnProcessor())
    names = ["unet.down.0.attn.0.cross.pattern", "unet.down.0.attn.0.self.pattern", "unet.down.0.attn.0.cross.q",
             "unet.down.0.attn.0.cross.k"]
    kw = dict(num_inference_steps=2, guidance_scale=4.0, names=names, generator=None)
    torch.manual_seed(0)
    _, a = _gen(fast, **kw)
    torch.manual_seed(0)
    _, b = _gen(eager, **kw)
    for n in names:
        for t in (0, 1):
            torch.testing.assert_close(a.get(n, step=t), b.get(n, step=t), atol=1e-5, rtol=0, msg=n)
    q = a.get("unet.down.0.attn.0.cross.q", step=1).transpose(1, 2)  # (b, heads, hw, d)
    k = a.get("unet.down.0.attn.0.cross.k", step=1).transpose(1, 2)
    manual = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    torch.testing.assert_close(a.get("unet.down.0.attn.0.cross.pattern", step=1), manual, atol=1e-5, rtol=0)


def test_pixart_cross_attention_respects_text_mask(tiny_lens):
    """PixArt masks padded text tokens: their probability is ~0 (the model's own mask is applied)."""
    lens = tiny_lens("pixart")
    _, cache = _gen(lens, num_inference_steps=2, guidance_scale=1.0, names="dit.blocks.0.cross.pattern",
                    max_sequence_length=16)
    p = cache.get("dit.blocks.0.cross.pattern", step=0)
    n_real = len(lens.model.tokenizer("a red square")["input_ids"])
    assert p[..., n_real:].max() < 1e-6
    torch.testing.assert_close(p[..., :n_real].sum(-1), torch.ones_like(p[..., 0]), atol=1e-5, rtol=0)


def test_sd3_joint_attention(tiny_lens):
    lens = tiny_lens("sd3")
    _, cache = _gen(lens, num_inference_steps=2, guidance_scale=1.0,
                    names=["dit.blocks.0.joint.pattern", "dit.blocks.0.joint.q", "dit.blocks.0.joint.context_q"])
    p = cache.get("dit.blocks.0.joint.pattern", step=1)
    n_img = cache.get("dit.blocks.0.joint.q", step=1).shape[1]
    n_txt = cache.get("dit.blocks.0.joint.context_q", step=1).shape[1]
    assert p.shape == (1, 4, n_img + n_txt, n_img + n_txt)
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5, rtol=0)


def test_step_range_hooks_fire_only_on_those_steps(tiny_lens):
    lens = tiny_lens("sd")
    seen = []
    _, cache = _gen(lens, num_inference_steps=6, guidance_scale=3.0, steps=range(2, 4), record_steps=[1, 3],
                    hooks={"unet.mid.out": lambda x, ctx: seen.append((ctx.step, ctx.branches)) or None},
                    names=["unet.mid.out", "text_encoder.blocks.1.resid_post"])
    assert seen == [(2, ("uncond", "cond")), (3, ("uncond", "cond"))]
    assert cache.steps == [1, 3]
    # text-encoder hooks fire once per prompt encoding (prompt, then the negative prompt), not per step
    assert len(cache.calls("text_encoder.blocks.1.resid_post")) == 2


def test_text_encoder_fires_once_without_guidance(tiny_lens):
    lens = tiny_lens("sd")
    _, cache = _gen(lens, num_inference_steps=4, guidance_scale=1.0, names=["text_encoder.blocks.0.resid_post",
                                                                             "unet.out"])
    assert len(cache.calls("text_encoder.blocks.0.resid_post")) == 1
    assert len(cache.calls("unet.out")) == 4
    assert cache.get("unet.out", step=0).shape[0] == 1  # no uncond half


def test_step_range_edit_changes_only_later_steps(tiny_lens):
    """Zeroing the mid block at step 2 leaves steps 0-1 untouched and changes the result."""
    lens = tiny_lens("sd")
    kw = dict(num_inference_steps=4, guidance_scale=3.0, names="unet.out")
    torch.manual_seed(0)
    ref, a = _gen(lens, **kw)
    torch.manual_seed(0)
    out, b = _gen(lens, **kw, hooks={"unet.mid.out": lambda x, c: x * 0}, steps=[2])
    for t in (0, 1):
        torch.testing.assert_close(a.get("unet.out", step=t), b.get("unet.out", step=t))
    assert not torch.allclose(a.get("unet.out", step=2), b.get("unet.out", step=2))
    assert (abs(ref.images - out.images)).max() > 1e-4


def test_processors_restored_and_cache_missing_step_error(tiny_lens):
    lens = tiny_lens("sd")
    before = {k: type(v) for k, v in lens.model.unet.attn_processors.items()}
    _, cache = _gen(lens, num_inference_steps=2, guidance_scale=3.0, names="unet.*.pattern")
    assert {k: type(v) for k, v in lens.model.unet.attn_processors.items()} == before
    with pytest.raises(KeyError, match="no value at step 7"):
        cache.get("unet.mid.attn.0.cross.pattern", step=7)
    with pytest.raises(KeyError, match="branches"):
        cache.get("unet.mid.attn.0.cross.pattern", step=0, branch="other")
