"""SAE splicing and feature steering against plain PyTorch forward hooks doing the arithmetic by hand."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mmlens.errors import UnknownNameError
from mmlens.methods._grad import frozen
from mmlens.methods.sae import SAE, SAEConfig
from mmlens.methods.sae_splice import sae_spliced, steer_features
from mmlens.testing.tiny_models import sample_inputs
from tests.conftest import hook_counts

GEN = dict(height=32, width=32, num_inference_steps=3, guidance_scale=4.0, output_type="latent", progress=False,
           names=[])


# ------------------------------------------------------------------------------------ SAEs with set weights
def identity_sae(d: int, hook_name: str | None = None) -> SAE:
    """ReLU SAE with d_sae = 2d, W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x, exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, architecture="relu", hook_name=hook_name, normalize="none"))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def zero_sae(d: int, hook_name: str | None = None) -> SAE:
    """Decodes everything to 0 (zero decoder, zero bias): splicing it is zero-ablating the site."""
    sae = SAE(SAEConfig(d_in=d, d_sae=4, architecture="relu", hook_name=hook_name, normalize="none"))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int, d_sae: int = 32, hook_name: str | None = None, seed: int = 0, scale: float = 0.5) -> SAE:
    """A ReLU SAE with random weights, biases and an input scale != 1 (every term of the arithmetic matters)."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in=d, d_sae=d_sae, architecture="relu", hook_name=hook_name, normalize="none"))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d, d_sae, generator=g) / d ** 0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d, generator=g) / d_sae ** 0.5)
        sae.b_enc.copy_(torch.randn(d_sae, generator=g) * 0.1)
        sae.b_dec.copy_(torch.randn(d, generator=g) * 0.1)
        sae.input_scale.fill_(scale)
    return sae


def by_hand(x: torch.Tensor, sae: SAE) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, reconstruction) of a ReLU SAE from its raw parameters."""
    p = {k: v.detach() for k, v in sae.state_dict().items()}
    f = torch.relu((x * p["input_scale"] - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    return f, (f @ p["W_dec"] + p["b_dec"]) / p["input_scale"]


def steered_by_hand(x, sae, feats: dict, mode: str, error_term: bool):
    f, _ = by_hand(x, sae)
    g = f.clone()
    for i, v in feats.items():
        g[..., i] = v if mode == "clamp" else f[..., i] + v
    p = {k: v.detach() for k, v in sae.state_dict().items()}
    if error_term:
        return x + (g - f) @ p["W_dec"] / p["input_scale"]
    return (g @ p["W_dec"] + p["b_dec"]) / p["input_scale"]


# ------------------------------------------------------------------------------------- plain-torch reference
def plain(lens, inputs, module, edit, field):
    """The model's output with one plain forward hook on `module` applying `edit` to its (first) output."""
    def hook(mod, args, out):
        return edit(out) if isinstance(out, torch.Tensor) else (edit(out[0]), *out[1:])

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return getattr(lens(inputs), field)
    finally:
        h.remove()


def at(sel, new, x):
    return torch.where(sel[..., None], new, x)


CASES = [("llava", "lm.blocks.1.resid_post", "logits"), ("clip", "vision.blocks.0.resid_post", "logits_per_image"),
         ("clip", "text.blocks.1.resid_post", "logits_per_image")]


@pytest.mark.parametrize("tiny,site,field", CASES)
def test_splice_equals_plain_hook(tiny_lens, tiny, site, field):
    lens = tiny_lens(tiny)
    inputs = sample_inputs(tiny, lens, batch=2)
    sae = random_sae(64, hook_name=site)
    with torch.no_grad():
        clean = getattr(lens(inputs), field)
    ref = plain(lens, inputs, lens.sites[site].module, lambda x: by_hand(x, sae)[1], field)
    with torch.no_grad(), sae_spliced(lens, sae):
        got = getattr(lens(inputs), field)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - clean).abs().max() > 1e-3  # a random SAE changes the output
    # the error term gives the clean output to the bit; the identity SAE too
    with torch.no_grad(), sae_spliced(lens, sae, error_term=True):
        assert torch.equal(getattr(lens(inputs), field), clean)
    with torch.no_grad(), sae_spliced(lens, identity_sae(64, site)):
        assert torch.equal(getattr(lens(inputs), field), clean)
    # at chosen positions only: a bool mask (batch, seq) and ints
    seq = _seq(lens, inputs, site)
    mask = torch.zeros(2, seq, dtype=torch.bool)
    mask[0, 1], mask[1, [0, seq - 1]] = True, True
    ints = torch.zeros(2, seq, dtype=torch.bool)
    ints[:, [0, seq - 1]] = True
    for positions, sel in ((mask, mask), ([0, -1], ints)):
        ref = plain(lens, inputs, lens.sites[site].module, lambda x: at(sel, by_hand(x, sae)[1], x), field)
        with torch.no_grad(), sae_spliced(lens, sae, positions=positions):
            torch.testing.assert_close(getattr(lens(inputs), field), ref, atol=1e-5, rtol=1e-5)


def _seq(lens, inputs, site):
    _, cache = lens.run_with_cache(inputs, names=site)
    return cache[site].shape[1]


def test_error_term_keeps_the_graph_through_the_features(tiny_lens):
    """x + sae(x) - sae(x).detach(): the same value, and the gradient reaches the SAE's parameters."""
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    sae = random_sae(64, hook_name="lm.blocks.0.resid_post")
    with frozen(lens.model), sae_spliced(lens, sae, error_term=True):  # the shared model takes no gradient
        out = lens(inputs).logits
        out[0, -1].sum().backward()
    assert sae.W_dec.grad is not None and float(sae.W_dec.grad.abs().sum()) > 0
    assert all(p.grad is None for p in lens.model.parameters())


@pytest.mark.parametrize("mode", ["clamp", "add"])
@pytest.mark.parametrize("error_term", [True, False])
def test_steer_features_equals_plain_hook(tiny_lens, mode, error_term):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    site = "lm.blocks.0.resid_post"
    sae = random_sae(64, hook_name=site)
    feats = {3: 5.0, 17: 0.0}
    module = lens.sites[site].module
    with torch.no_grad():
        clean = lens(inputs).logits
    ref = plain(lens, inputs, module, lambda x: steered_by_hand(x, sae, feats, mode, error_term), "logits")
    with torch.no_grad(), steer_features(lens, sae, feats, mode=mode, error_term=error_term):
        got = lens(inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - clean).abs().max() > 1e-3
    sel = torch.zeros(2, inputs["input_ids"].shape[1], dtype=torch.bool)
    sel[:, -1] = True
    ref = plain(lens, inputs, module, lambda x: at(sel, steered_by_hand(x, sae, feats, mode, error_term), x),
                "logits")
    with torch.no_grad(), steer_features(lens, sae, feats, mode=mode, error_term=error_term, positions=-1):
        got = lens(inputs).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # with the error term, positions whose features are clamped to their own value keep their exact activation
    if error_term and mode == "add":
        with torch.no_grad(), steer_features(lens, sae, {3: 0.0}, mode="add"):
            assert torch.equal(lens(inputs).logits, clean)


def test_unet_feature_map_channels_last(tiny_lens):
    """A UNet site (batch, C, h, w): the SAE reads C channels per pixel; clamp and splice vs a plain hook."""
    lens = tiny_lens("sd")
    site = "unet.mid.out"
    module = lens.sites[site].module
    sae = random_sae(64, hook_name=site, seed=3)

    def cl(fn):  # a per-token edit applied to a (B, C, h, w) map with channels moved last and back
        return lambda x: fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def run(**hooks_kw):
        g = torch.Generator().manual_seed(0)
        return lens.generate("a red square", generator=g, **GEN, **hooks_kw)[0].images

    ref_h = module.register_forward_hook(lambda m, a, o: cl(lambda x: by_hand(x, sae)[1])(o))
    try:
        ref = run()
    finally:
        ref_h.remove()
    with sae_spliced(lens, sae):
        got = run()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    clean = run()
    with sae_spliced(lens, sae, error_term=True):
        assert torch.equal(run(), clean)
    feats = {5: 3.0}
    ref_h = module.register_forward_hook(
        lambda m, a, o: cl(lambda x: steered_by_hand(x, sae, feats, "clamp", True))(o))
    try:
        ref = run()
    finally:
        ref_h.remove()
    with steer_features(lens, sae, feats):
        got = run()
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got - clean).abs().max() > 1e-4


def test_diffusion_steps_and_branches(tiny_lens):
    """Clamping at step 1 only: latents after step 0 equal the clean run's, later ones differ; cond only differs
    from both branches."""
    lens = tiny_lens("sd")
    sae = random_sae(64, hook_name="unet.mid.out", seed=4)

    def trajectory(**kw):
        seen = []

        def keep(pipe, i, t, k):
            seen.append(k["latents"].clone())
            return k

        with steer_features(lens, sae, {1: 6.0, 9: 6.0}, **kw) if kw else contextlib.nullcontext():
            lens.generate("a red square", generator=torch.Generator().manual_seed(0), callback_on_step_end=keep,
                          **GEN)
        return seen

    clean = trajectory()
    gated = trajectory(steps=[1])
    torch.testing.assert_close(gated[0], clean[0], atol=0, rtol=0)
    assert (gated[1] - clean[1]).abs().max() > 1e-4
    cond = trajectory(steps=[1], branches="cond")
    assert (cond[1] - gated[1]).abs().max() > 1e-6
    torch.testing.assert_close(cond[0], clean[0], atol=0, rtol=0)


def test_hooks_removed_after_an_exception(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    lens(inputs)  # transformers installs its own permanent hooks on the first forward
    before = hook_counts(lens.model)
    sae = random_sae(64, hook_name="lm.blocks.0.resid_post")
    for ctx in (lambda: sae_spliced(lens, sae), lambda: steer_features(lens, sae, {0: 1.0})):
        with pytest.raises(RuntimeError, match="boom"):
            with ctx():
                assert hook_counts(lens.model) != before
                raise RuntimeError("boom")
        assert hook_counts(lens.model) == before
    # an error inside the forward (the SAE does not fit the site) also leaves no hook behind
    with pytest.raises(ValueError, match=r"'lm.blocks.0.resid_post' has 64 features per token; this SAE reads d_in=32"):
        with sae_spliced(lens, random_sae(32, hook_name="lm.blocks.0.resid_post")):
            lens(inputs)
    assert hook_counts(lens.model) == before


def test_errors(tiny_lens):
    lens = tiny_lens("llava")
    sae = random_sae(64, hook_name="lm.blocks.0.resid_post")
    with pytest.raises(UnknownNameError, match="lm.blocks.9.resid_post"):
        with sae_spliced(lens, sae, names="lm.blocks.9.resid_post"):
            pass
    with pytest.raises(ValueError, match="cfg.hook_name is None"):
        with sae_spliced(lens, random_sae(64)):
            pass
    with pytest.raises(ValueError, match="attention pattern"):
        with sae_spliced(lens, sae, names="lm.blocks.0.attn.pattern"):
            pass
    with pytest.raises(ValueError, match="feature 40 is out of range: this SAE has d_sae=32"):
        with steer_features(lens, sae, {40: 1.0}):
            pass
    with pytest.raises(ValueError, match="mode='scale'; allowed"):
        with steer_features(lens, sae, {1: 1.0}, mode="scale"):
            pass
    with pytest.raises(TypeError, match="non-empty dict"):
        with steer_features(lens, sae, [1, 2]):
            pass
    with pytest.raises(ValueError, match="steps"):
        with sae_spliced(lens, sae, steps=[0]):
            pass
