"""TRAK on diffusion pipelines (D-TRAK): the examples are the VAE latents, the pipeline's text states and seeded
(t, noise) draws; the output functions equal a plain diffusers computation; TRAK's features are projected
per-example gradients of the denoiser; a training example used as a target ranks itself first."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from mmlens.methods._diffusion_tda import diffusion_examples, diffusion_loss, diffusion_square
from mmlens.methods._trak_ensemble import TRAKEnsemble
from mmlens.methods.data_attribution import TRAK, TRAKConfig

PROMPTS = ["a red square", "a blue circle", "a green square", "a red circle", "a blue square", "a green circle"]
SD_PARAMS = "up_blocks.1.attentions.0.proj_out.*"  # the tiny UNet's up_blocks.0 has no attention


def _images(n: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def sd(tiny_lens):
    return tiny_lens("sd")


@pytest.fixture(scope="module")
def sd_ex(sd):
    return diffusion_examples(sd, _images(), PROMPTS, timesteps=3, seed=5)


def _rows(ex, sl):
    return {k: v[sl] for k, v in ex.items()}


def test_examples_are_vae_latents_text_states_and_seeded_draws(sd, sd_ex):
    pipe, imgs = sd.model, _images()
    with torch.no_grad():
        x = imgs.permute(0, 3, 1, 2).float() / 127.5 - 1
        lat = pipe.vae.encode(x).latent_dist.mean * pipe.vae.config.scaling_factor
        emb, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    torch.testing.assert_close(sd_ex["latents"], lat)
    torch.testing.assert_close(sd_ex["encoder_hidden_states"], emb)
    t, noise = sd_ex["timesteps"], sd_ex["noise"]
    assert t.dtype == torch.int64 and t.shape == (6, 3) and 0 <= t.min() and t.max() < 1000
    assert noise.shape == (6, 3, 4, 16, 16) and len(set(t.flatten().tolist())) > 9  # not one draw repeated
    # the same example gets the same draws whatever the batching: a slice with its start, PIL input, small chunks
    part = diffusion_examples(sd, [Image.fromarray(a) for a in imgs[2:5].numpy()], PROMPTS[2:5], timesteps=3,
                              seed=5, start=2, batch_size=2)
    for k in sd_ex:
        torch.testing.assert_close(part[k], sd_ex[k][2:5], atol=1e-5, rtol=1e-5)
    other = diffusion_examples(sd, imgs[:2].numpy(), PROMPTS[:2], timesteps=3, seed=6)
    assert not torch.equal(other["noise"], sd_ex["noise"][:2])
    with pytest.raises(ValueError, match="got 6 images and 5 prompts"):
        diffusion_examples(sd, imgs, PROMPTS[:5])
    with pytest.raises(ValueError, match=r"images must be \(n, 32, 32, 3\) uint8 \(the pipeline's resolution\)"):
        diffusion_examples(sd, torch.zeros(2, 16, 16, 3, dtype=torch.uint8), PROMPTS[:2])
    with pytest.raises(ValueError, match="images must be uint8"):
        diffusion_examples(sd, imgs.float(), PROMPTS)
    with pytest.raises(ValueError, match="timesteps must be an int >= 1"):
        diffusion_examples(sd, imgs, PROMPTS, timesteps=0)


def _reference(pipe, ex, what: str, prediction_type: str = "epsilon") -> torch.Tensor:
    """Example by example and draw by draw, with the scheduler's own add_noise / get_velocity."""
    out = []
    for i in range(len(ex["latents"])):
        vals = []
        for j in range(ex["timesteps"].shape[1]):
            x0, eps, t = ex["latents"][i:i + 1], ex["noise"][i, j][None], ex["timesteps"][i, j:j + 1]
            noisy = pipe.scheduler.add_noise(x0, eps, t)
            pred = pipe.unet(noisy, t, encoder_hidden_states=ex["encoder_hidden_states"][i:i + 1]).sample
            target = eps if prediction_type == "epsilon" else pipe.scheduler.get_velocity(x0, eps, t)
            vals.append(pred.pow(2).mean() if what == "square" else (target - pred).pow(2).mean())
        out.append(torch.stack(vals).mean())
    return torch.stack(out)


def test_output_functions_equal_a_plain_diffusers_computation(sd, sd_ex):
    ex = _rows(sd_ex, slice(0, 3))
    with torch.no_grad():
        torch.testing.assert_close(diffusion_square(sd, ex), _reference(sd.model, ex, "square"), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(diffusion_loss(sd, ex), _reference(sd.model, ex, "loss"), atol=1e-5, rtol=1e-4)
        sched = sd.model.scheduler
        sched.register_to_config(prediction_type="v_prediction")
        try:
            torch.testing.assert_close(diffusion_loss(sd, ex), _reference(sd.model, ex, "loss", "v_prediction"),
                                       atol=1e-5, rtol=1e-4)
        finally:
            sched.register_to_config(prediction_type="epsilon")
    assert diffusion_square.weighting is False and diffusion_loss.weighting is False
    assert diffusion_square.example_keys(sd, ex) == ["latents", "encoder_hidden_states", "timesteps", "noise"]
    with pytest.raises(ValueError, match=r"reads \['noise'\]"):
        diffusion_square.validate(sd, {k: v for k, v in ex.items() if k != "noise"})
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        diffusion_square.validate(sd, {**ex, "timesteps": ex["timesteps"] + 1000})


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_features_are_projected_per_example_gradients_of_the_denoiser(sd, sd_ex, per_example):
    unet = sd.model.unet
    batches = [_rows(sd_ex, slice(0, 2)), _rows(sd_ex, slice(2, 4))]
    trak = TRAK(TRAKConfig(proj_dim=40, seed=1, params=SD_PARAMS, weighting=False, per_example=per_example))
    trak.fit(sd, batches, diffusion_square, progress=False)
    assert not trak._vmap_failed
    named = dict(unet.named_parameters())
    names = [n for n in named if n.startswith("up_blocks.1.attentions.0.proj_out.")]
    assert trak.param_names_ == names
    rows = []
    for i in range(4):  # autograd, one example at a time, of the hand-computed Square output
        f = _reference(sd.model, _rows(sd_ex, slice(i, i + 1)), "square")[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, [named[n] for n in names])]))
    G = torch.stack(rows)
    torch.testing.assert_close(trak.features_, G @ trak.projection_matrix(), atol=1e-5, rtol=1e-3)
    torch.testing.assert_close(trak.outputs_, _reference(sd.model, _rows(sd_ex, slice(0, 4)), "square").detach())
    assert all(p.grad is None for p in unet.parameters())


def test_fit_attribute_self_attribution_and_weighting(sd, sd_ex, tmp_path):
    ex = diffusion_examples(sd, _images(8, seed=3), PROMPTS + PROMPTS[:2], timesteps=2, seed=0)
    batches = [_rows(ex, slice(0, 4)), _rows(ex, slice(4, 8))]
    trak = TRAK(TRAKConfig(proj_dim=512, params="up_blocks.1.attentions.*", weighting=False))
    trak.fit(sd, batches, diffusion_square, store=tmp_path / "s", progress=False)
    targets = _rows(ex, [1, 3, 4, 6])
    res = trak.attribute(sd, targets, diffusion_square)
    assert res.scores.shape == (4, 8) and res.method == "trak" and res.meta["weighting"] is False
    assert (res.top(1)[1][:, 0] == torch.tensor([1, 3, 4, 6])).float().mean() >= 0.75
    # resumed from the store: identical features
    again = TRAK(trak.config).fit(sd, batches, diffusion_square, store=tmp_path / "s", progress=False)
    torch.testing.assert_close(again.features_, trak.features_)
    # the default weighting=True is skipped for a non-margin output, with a warning saying so
    trak.config.weighting = True
    with pytest.warns(UserWarning, match="not a logit margin"):
        weighted = trak.attribute(sd, targets, diffusion_square)
    torch.testing.assert_close(weighted.scores, res.scores)
    # an ensemble over denoiser checkpoints; the UNet gets its own weights back
    unet = sd.model.unet
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    name = "up_blocks.1.attentions.0.proj_out.weight"
    ckpt = {name: before[name] * 1.5}
    ens = TRAKEnsemble(TRAKConfig(proj_dim=64, params="up_blocks.1.attentions.0.proj_out.*", weighting=False))
    ens.fit(sd, batches, diffusion_square, checkpoints=[None, ckpt], progress=False)
    out = ens.attribute(sd, targets, diffusion_square, checkpoints=[None, ckpt])
    assert out.scores.shape == (4, 8) and ens.n_models_ == 2
    assert not torch.allclose(ens.members_[0].features_, ens.members_[1].features_)
    assert all(torch.equal(p, before[n]) for n, p in unet.named_parameters())


@pytest.mark.parametrize("arch,params", [("pixart", "transformer_blocks.1.attn2.*"),
                                         ("sd3", "transformer_blocks.1.attn.*")])
def test_transformer_pipelines(tiny_lens, arch, params):
    lens = tiny_lens(arch)
    ex = diffusion_examples(lens, _images(4), PROMPTS[:4], timesteps=2, seed=0)
    extra = {"pixart": "encoder_attention_mask", "sd3": "pooled_projections"}[arch]
    assert extra in ex and ex[extra].shape[0] == 4
    trak = TRAK(TRAKConfig(proj_dim=256, params=params, weighting=False))
    trak.fit(lens, [_rows(ex, slice(0, 2)), _rows(ex, slice(2, 4))], diffusion_loss, progress=False)
    assert not trak._vmap_failed and trak.features_.shape == (4, 256)
    res = trak.attribute(lens, ex, diffusion_loss)
    assert (res.scores.argmax(1) == torch.arange(4)).float().mean() >= 0.75
    loop = TRAK(TRAKConfig(proj_dim=256, params=params, weighting=False, per_example="loop"))
    loop.fit(lens, [_rows(ex, slice(0, 2))], diffusion_loss, progress=False)
    torch.testing.assert_close(loop.features_, trak.features_[:2], atol=1e-5, rtol=1e-3)


def test_unsupported(tiny_lens, sd):
    clip = tiny_lens("clip")
    with pytest.raises(TypeError, match="applies to diffusion pipelines \\(sd_unet, pixart, sd3"):
        diffusion_examples(clip, np.zeros((1, 32, 32, 3), np.uint8), ["x"])
    with pytest.raises(TypeError, match="or the denoiser of a diffusion pipeline"):
        TRAK().fit(SimpleNamespace(model=object(), architecture="kandinsky", adapter=SimpleNamespace(denoiser="unet")),
                   [{}], diffusion_square)
    with pytest.raises(ValueError, match="matches none of the unet's \\(the denoiser's\\)"):
        TRAK(params="text_model.*").fit(sd, [{}], diffusion_square)
