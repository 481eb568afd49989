"""The diffusion organism's grounding objective (the reason its cross-attention maps carry the layout, issue 12):
the probabilities it trains on are the real ones, and the loss is the formula its docstring gives."""

from __future__ import annotations

import math

import pytest
import torch

from mmlens.organisms import diffusion


@pytest.fixture(scope="module")
def lens():
    """A tiny pipeline of the organism's architecture (random weights), wrapped as the recipe wraps it."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    import mmlens
    from mmlens.organisms.vocab import world_tokenizer

    torch.manual_seed(0)
    tok = world_tokenizer(16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))
    pipe = StableDiffusionPipeline(vae=diffusion.make_vae(), text_encoder=text, tokenizer=tok,
                                   unet=diffusion.make_unet(cross_dim=32), scheduler=diffusion.make_scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return mmlens.load(pipe)


def _inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 4, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(batch, 16, 32, generator=g))


def test_kept_probabilities_equal_a_plain_softmax_and_leave_the_output_alone(lens):
    unet = lens.model.unet
    x, t, text = _inputs()
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, kw, n=n: seen.__setitem__(n, (a[0], kw)), with_kwargs=True)
             for n, m in unet.named_modules() if n.endswith("attn2")]
    try:
        with torch.no_grad():
            plain = unet(x, t, encoder_hidden_states=text).sample
            with diffusion.cross_attention_probs(lens) as probs:
                kept_out = unet(x, t, encoder_hidden_states=text).sample
    finally:
        for h in hooks:
            h.remove()
    torch.testing.assert_close(kept_out, plain, atol=1e-5, rtol=1e-5)
    assert len(probs) == len(seen) == 4  # down.1, mid, up.0 (x2): every cross-attention at 8x8
    for p, (name, (hidden, kw)) in zip(probs, seen.items()):
        m = unet.get_submodule(name)
        q = m.to_q(hidden).unflatten(-1, (m.heads, -1)).transpose(1, 2)
        k = m.to_k(kw["encoder_hidden_states"]).unflatten(-1, (m.heads, -1)).transpose(1, 2)
        ref = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1)
        assert p.shape == (2, m.heads, 64, 16)
        torch.testing.assert_close(p, ref, atol=1e-5, rtol=1e-5)
    with diffusion.cross_attention_probs(lens) as probs:
        pass
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
    assert probs == []  # nothing kept after the block


def test_nothing_is_kept_after_a_raising_forward(lens):
    unet = lens.model.unet
    x, t, text = _inputs()
    with pytest.raises(RuntimeError), diffusion.cross_attention_probs(lens) as probs:
        unet(x, t, encoder_hidden_states=text[..., :5])  # wrong text width
    n = len(probs)
    with torch.no_grad():
        unet(x, t, encoder_hidden_states=text)
    assert len(probs) == n


def test_grounding_loss_by_hand():
    # one site, 2 heads, 4 cells, 3 tokens; token 1 grounded on cell 0, token 2 on cells 0-1 (half cover on 1)
    p = torch.zeros(1, 2, 4, 3)
    p[0, :, :, 0] = 0.5
    p[0, 0, :, 1] = torch.tensor([0.5, 0.5, 0.0, 0.0])
    p[0, 1, :, 1] = torch.tensor([0.5, 0.0, 0.5, 0.0])  # mean over heads: [0.5, 0.25, 0.25, 0]
    p[0, :, :, 2] = torch.tensor([0.0, 0.25, 0.25, 0.5])
    cells = torch.zeros(1, 3, 4)
    cells[0, 1, 0] = 1.0
    cells[0, 2, :2] = torch.tensor([1.0, 0.5])
    words = torch.tensor([[0.0, 1.0, 1.0]])
    # token 1: share 0.5 -> 0.25; KL([1,0,0,0] || [.5,.25,.25,0]) = log 2
    # token 2: share (0.25*0.5)/1 = 0.125 -> 0.875^2; target [2/3, 1/3, 0, 0], a [0, .25, .25, .5] (0 clamped to 1e-8)
    t = torch.tensor([2 / 3, 1 / 3])
    kl2 = float((t * (t.log() - torch.tensor([1e-8, 0.25]).log())).sum())
    want = (0.25 + math.log(2) + 0.875 ** 2 + kl2) / 2
    got = diffusion.grounding_loss([p], cells, words)
    assert got.item() == pytest.approx(want, rel=1e-5)
    # attention spread evenly over a fully covered object is the optimum: zero loss
    full = cells.clone()
    full[0, 2, 1] = 1.0
    q = torch.zeros(1, 1, 4, 3)
    q[0, 0, :2, 2] = 0.5
    q[0, 0, 0, 1] = 1.0
    assert diffusion.grounding_loss([q], full, words).item() == pytest.approx(0.0, abs=1e-6)
    # ungrounded tokens do not count (token 0 differs between p and p2), and the loss averages over sites
    p2 = p.clone()
    p2[0, :, :, 0] = 0.25
    assert diffusion.grounding_loss([p, p2], cells, words).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="queries"):
        diffusion.grounding_loss([torch.zeros(1, 2, 9, 3)], cells, words)


def test_grounding_gradient_reaches_the_keys(lens):
    unet = lens.model.unet
    x, t, text = _inputs()
    cells = torch.zeros(2, 16, 64)
    cells[:, 3, :8] = 1.0  # token 3 on the top row
    words = torch.zeros(2, 16)
    words[:, 3] = 1.0
    unet.zero_grad()
    with diffusion.cross_attention_probs(lens) as probs:
        unet(x, t, encoder_hidden_states=text)
    diffusion.grounding_loss(probs, cells, words).backward()
    for n, m in unet.named_modules():
        if n.endswith("attn2"):
            assert m.to_k.weight.grad is not None and m.to_k.weight.grad.abs().sum() > 0
    unet.zero_grad()


def test_object_cells_cover_each_object():
    from mmlens.world import make_scene

    s = make_scene(5, size=32, n_objects=2, background="plain")
    cells = diffusion.object_cells([s])
    assert cells.shape == (1, 2, 64)
    for j, m in enumerate(s.masks):
        # each cell's cover times its area (16 pixels) sums to the mask's pixel count
        assert float(cells[0, j].sum() * 16) == pytest.approx(float(m.sum()), rel=1e-6)
        assert cells[0, j].max() <= 1.0
