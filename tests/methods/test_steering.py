"""Steering and task vectors against hand-written PyTorch: plain forward hooks doing the same arithmetic."""

from __future__ import annotations

import runpy
from pathlib import Path

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from mmlens.errors import UnknownNameError
from mmlens.methods.probes import LinearProbe
from mmlens.methods.result import Result
from mmlens.methods.steering import (MODES, SteeringSweepResult, SteeringVector, steer, steering, steering_sweep,
                                     task_vector)
from mmlens.organisms import available
from mmlens.testing.tiny_models import sample_inputs
from tests.conftest import hook_counts

matplotlib.use("Agg")
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GEN = dict(height=32, width=32)


def _module(lens, name):
    return lens.sites[name].module


def _arith(x, v, mode, alpha, sel):
    """The edit by hand on (batch, seq, d) x, at the (batch, seq) bool `sel`."""
    u = v / v.norm()
    if mode == "add":
        new = x + alpha * v
    elif mode == "scale":
        new = x + (alpha - 1) * (x @ u)[..., None] * u
    elif mode == "project_out":
        new = x - (x @ u)[..., None] * u
    else:
        new = v.expand_as(x)
    return torch.where(sel[..., None], new, x)


def _plain(lens, inputs, module, edit, field):
    """The model's output with one plain forward hook on `module` applying `edit` to its (first) output."""
    def hook(mod, args, out):
        if isinstance(out, torch.Tensor):
            return edit(out)
        return (edit(out[0]), *out[1:])

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            return getattr(lens(inputs), field)
    finally:
        h.remove()


def _vector(lens, tiny, site, inputs, seed=1):
    """A direction of the right shape with a realistic scale: a mean difference against other inputs."""
    other = sample_inputs(tiny, lens, batch=2, seed=seed)
    vec = SteeringVector.mean_difference(lens, inputs, other, names=site, positions="mean")
    if float(vec.direction.norm()) < 1e-6:  # the same texts in both (clip's sample texts): a random direction
        vec = SteeringVector({site: torch.randn(vec.direction.shape, generator=torch.Generator().manual_seed(seed))})
    return vec


# --------------------------------------------------------------------------------- equality with plain hooks
CASES = [("llava", "lm.blocks.1.resid_post", "logits"), ("llava", "lm.blocks.0.attn.v", "logits"),
         ("clip", "vision.blocks.1.resid_post", "logits_per_image"),
         ("clip", "text.blocks.0.mlp.out", "logits_per_image")]


@pytest.mark.parametrize("name,site,field", CASES)
@pytest.mark.parametrize("mode", MODES)
def test_equals_plain_torch_hooks(tiny_lens, name, site, field, mode):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    vec = _vector(lens, name, site, inputs)
    v = vec.direction.reshape(-1)
    module = _module(lens, site)
    with torch.no_grad():
        plain_out = getattr(lens(inputs), field)
    for positions in (None, -1, [0, 2], "mask"):
        seq = _module_out_seq(lens, inputs, module)
        if positions == "mask":
            positions = torch.zeros(2, seq, dtype=torch.bool)
            positions[0, 1], positions[1, [0, seq - 1]] = True, True
        sel = torch.ones(2, seq, dtype=torch.bool) if positions is None else positions if isinstance(
            positions, torch.Tensor) else torch.zeros(2, seq, dtype=torch.bool).index_fill_(
                1, torch.as_tensor([positions] if isinstance(positions, int) else positions) % seq, True)
        ref = _plain(lens, inputs, module, lambda x: _arith(x, v, mode, 2.5, sel), field)
        got = getattr(steer(lens, inputs, vec, mode=mode, alpha=2.5, positions=positions), field)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        if mode != "scale" and positions is None:
            assert (got - plain_out).abs().max() > 1e-4  # the edit did something


def test_half_precision_model(tiny_lens):
    """A bf16 model: the edit is computed in float32 and cast back, as a plain hook doing the same does."""
    lens = tiny_lens("llava", dtype=torch.bfloat16)
    inputs = sample_inputs("llava", lens, batch=2)
    site = "lm.blocks.1.resid_post"
    vec = SteeringVector(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    v = vec.direction
    for mode in MODES:
        sel = torch.zeros(2, _module_out_seq(lens, inputs, _module(lens, site)), dtype=torch.bool)
        sel[:, -1] = True
        ref = _plain(lens, inputs, _module(lens, site),
                     lambda x: _arith(x.float(), v, mode, 2.0, sel).to(x.dtype), "logits")
        got = steer(lens, inputs, vec, names=site, mode=mode, alpha=2.0, positions=-1).logits
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, ref, atol=0, rtol=0)


def _module_out_seq(lens, inputs, module):
    seen = {}

    def hook(m, a, o):
        seen["s"] = (o if isinstance(o, torch.Tensor) else o[0]).shape[1]

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            lens(inputs)
    finally:
        h.remove()
    return seen["s"]


def test_sd_cross_kv_equals_plain_hooks_at_one_step_and_branch(tiny_lens):
    """add at the cond half of cross-attention k, at position 2 and step 1 only, vs a plain hook counting UNet calls."""
    lens = tiny_lens("sd")
    site = "unet.up.1.attn.0.cross.k"
    vec = SteeringVector.mean_difference(lens, ["a red square"], ["a blue square"], names=site, positions=2,
                                         num_inference_steps=1, **GEN)
    v = vec.direction.reshape(-1)
    calls = []
    pre = lens.model.unet.register_forward_pre_hook(lambda m, a: calls.append(1))

    def edit(x):
        if len(calls) - 1 != 1:  # step index of the running UNet call
            return x
        x = x.clone()
        x[1, 2] += 1.5 * v  # CFG batch: [uncond, cond]
        return x

    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", **GEN)
    try:
        ref = _plain(lens, {"prompt": "a blue square", "generator": torch.Generator().manual_seed(0), **kw},
                     _module(lens, site), edit, "images")
    finally:
        pre.remove()
    got = steer(lens, "a blue square", vec, alpha=1.5, positions=2, steps=[1], branches=("cond",),
                generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    plain = steer(lens, "a blue square", vec, alpha=0.0, generator=torch.Generator().manual_seed(0), **kw).images
    assert (got - plain).abs().max() > 1e-5


def test_sd_kv_recipe_swaps_the_colour_token(tiny_lens):
    """The documented recipe: adding red - blue k/v at the colour word makes that token's k and v the red prompt's
    (on the conditional branch, at the steps chosen); other tokens and the uncond branch keep the blue prompt's."""
    lens = tiny_lens("sd")
    kv = lens.hook_points("unet.*.cross.[kv]")
    red = SteeringVector.mean_difference(lens, ["a red square"], ["a blue square"], names=kv, positions=2,
                                         num_inference_steps=1, **GEN)
    kw = dict(num_inference_steps=3, guidance_scale=5.0, output_type="latent", progress=False, **GEN)
    _, r = lens.generate("a red square", names=kv, **kw)
    _, b = lens.generate("a blue square", names=kv, **kw)
    with steering(lens, red, positions=2, steps=range(0, 2), branches=("cond",)):
        _, s = lens.generate("a blue square", names=kv, **kw)
    for n in kv:
        for t in (0, 1):
            got, want_red, want_blue = s.get(n, step=t, branch="cond"), r.get(n, step=t, branch="cond"), \
                b.get(n, step=t, branch="cond")
            torch.testing.assert_close(got[:, 2], want_red[:, 2], atol=1e-5, rtol=0)
            torch.testing.assert_close(got[:, 3:], want_blue[:, 3:], atol=1e-6, rtol=0)
            torch.testing.assert_close(s.get(n, step=t, branch="uncond"), b.get(n, step=t, branch="uncond"))
        torch.testing.assert_close(s.get(n, step=2), b.get(n, step=2))  # outside the step range: untouched


# ------------------------------------------------------------------------------------------ mode semantics
@pytest.mark.parametrize("name,site", [("llava", "lm.blocks.1.resid_post"), ("clip", "vision.blocks.0.resid_post"),
                                       ("llava", "lm.blocks.1.attn.k")])
def test_project_out_leaves_no_component_and_scale_one_is_identity(tiny_lens, name, site):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    vec = _vector(lens, name, site, inputs)
    u = (vec.direction / vec.direction.norm()).reshape(-1)
    _, clean = lens.run_with_cache(inputs, names=site)
    with steering(lens, vec, mode="project_out", positions=[0, -1]):
        _, cache = lens.run_with_cache(inputs, names=site)  # the capture sees the edited value
    x, x0 = cache[site].flatten(2), clean[site].flatten(2)
    assert (x[:, [0, -1]] @ u).abs().max() < 1e-5
    assert (x0[:, [0, -1]] @ u).abs().max() > 1e-2
    torch.testing.assert_close(x[:, 1:-1], x0[:, 1:-1])  # the other positions are untouched
    with steering(lens, vec, mode="scale", alpha=1.0):
        _, same = lens.run_with_cache(inputs, names=site)
    assert torch.equal(same[site], clean[site])
    with steering(lens, vec, mode="scale", alpha=0.0):  # alpha 0 scales the component away: project_out
        _, zero = lens.run_with_cache(inputs, names=site)
    with steering(lens, vec, mode="project_out", alpha=123.0):  # alpha is ignored
        _, proj = lens.run_with_cache(inputs, names=site)
    torch.testing.assert_close(zero[site], proj[site])
    with steering(lens, vec, mode="scale", alpha=3.0):
        _, triple = lens.run_with_cache(inputs, names=site)
    torch.testing.assert_close(triple[site].flatten(2) @ u, 3 * (x0 @ u), atol=1e-4, rtol=1e-5)


def test_replace_sets_the_task_vector(tiny_lens):
    lens = tiny_lens("llava")
    icl = [sample_inputs("llava", lens, batch=2, seed=s) for s in (0, 2)]
    site = "lm.blocks.0.resid_post"
    tv = task_vector(lens, icl, site)  # position -1
    last = task_vector(lens, icl, site, position="last")  # the last real token under the attention mask
    rows, real = [], []
    for batch in icl:
        _, c = lens.run_with_cache(batch, names=site)
        idx = torch.tensor([int(m.nonzero().max()) for m in batch["attention_mask"].bool()])
        rows.append(c[site][:, -1])
        real.append(c[site][torch.arange(len(idx)), idx])
    torch.testing.assert_close(tv.direction, torch.cat(rows).mean(0))
    torch.testing.assert_close(last.direction, torch.cat(real).mean(0))
    assert not torch.allclose(tv.direction, last.direction)  # these rows are padded
    assert tv.config.source == "task_vector" and tv.config.n_positive == 4
    zero_shot = sample_inputs("llava", lens, batch=2, seed=7)
    with steering(lens, tv, mode="replace", positions=-1):
        _, c = lens.run_with_cache(zero_shot, names=site)
    torch.testing.assert_close(c[site][:, -1], tv.direction.expand(2, -1))


# ----------------------------------------------------------------------------------------------- building
def test_mean_difference_equals_hand_computation(tiny_lens):
    lens = tiny_lens("llava")
    pos = [sample_inputs("llava", lens, batch=2, seed=s) for s in (0, 4)]
    neg = sample_inputs("llava", lens, batch=2, seed=9)
    names = ["lm.blocks.0.resid_post", "lm.blocks.1.attn.v", "vision.blocks.1.resid_post"]

    def acts(batches, name):
        return [lens.run_with_cache(b, names=name)[1][name].flatten(2) for b in batches]

    for name in names:
        P, N = acts(pos, name), acts([neg], name)
        shape = lens.run_with_cache(neg, names=name)[1][name].shape[2:]
        # int and list of ints
        got = SteeringVector.mean_difference(lens, pos, neg, names=name, positions=3)[name]
        want = torch.cat([p[:, 3] for p in P]).mean(0) - N[0][:, 3].mean(0)
        torch.testing.assert_close(got, want.reshape(shape))
        got = SteeringVector.mean_difference(lens, pos, neg, names=name, positions=[1, -2])[name]
        want = torch.cat([p[:, [1, -2]].mean(1) for p in P]).mean(0) - N[0][:, [1, -2]].mean(1).mean(0)
        torch.testing.assert_close(got, want.reshape(shape))
        # bool masks: one per batch, the negative set its own; a row with an empty mask is no sample
        masks = [torch.zeros(p.shape[:2], dtype=torch.bool) for p in P]
        masks[0][0, [2, 5]], masks[1][1, 4] = True, True
        nmask = torch.zeros(N[0].shape[:2], dtype=torch.bool)
        nmask[:, 0] = True
        got = SteeringVector.mean_difference(lens, pos, neg, names=name, positions=masks, negative_positions=nmask)
        want = torch.stack([P[0][0, [2, 5]].mean(0), P[1][1, 4]]).mean(0) - N[0][:, 0].mean(0)
        torch.testing.assert_close(got[name], want.reshape(shape))
        assert got.config.n_positive == 2 and got.config.n_negative == 2
    # "mean" and "last" follow the attention mask on LM sites (these rows are padded)
    name = names[0]
    P = acts(pos, name)
    m = [b["attention_mask"].bool() for b in pos]
    assert not all(mm.all() for mm in m)
    mean = torch.cat([(p * mm[..., None]).sum(1) / mm.sum(1, keepdim=True) for p, mm in zip(P, m)]).mean(0)
    last = torch.cat([p[torch.arange(2), torch.tensor([int(r.nonzero().max()) for r in mm])] for p, mm in zip(P, m)])
    n_acts = acts([neg], name)[0]
    nm = neg["attention_mask"].bool()
    n_mean = ((n_acts * nm[..., None]).sum(1) / nm.sum(1, keepdim=True)).mean(0)
    n_last = n_acts[torch.arange(2), torch.tensor([int(r.nonzero().max()) for r in nm])].mean(0)
    torch.testing.assert_close(SteeringVector.mean_difference(lens, pos, neg, names=name, positions="mean")[name],
                               mean - n_mean)
    torch.testing.assert_close(SteeringVector.mean_difference(lens, pos, neg, names=name)[name],
                               last.mean(0) - n_last)


def test_from_probe_direction():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(2, 200, 6, generator=g) * torch.tensor([1.0, 5.0, 0.2, 1.0, 3.0, 1.0])
    noise = torch.randn(200, generator=g) * 3  # labels that no direction separates: bounded weights
    y = (X[1, :, 1] + X[1, :, 4] + noise > 0).long()
    probe = LinearProbe(steps=200).fit(X, y)
    vec = SteeringVector.from_probe(probe, layer=1, name="lm.blocks.1.resid_post")
    W, std = probe.weight_[1], probe.std_[1]
    want = (W[:, 1] - W.mean(1)) / std
    torch.testing.assert_close(vec["lm.blocks.1.resid_post"], want)
    # adding alpha * d moves the probe's centred target logit by alpha |d|^2 (d is its gradient in activation space)
    d = vec.direction
    before = probe.decision(X)[1]
    after = probe.decision(X + torch.stack([torch.zeros(6), 0.5 * d])[:, None])[1]
    centred = lambda z: z[:, 1] - z.mean(1)  # noqa: E731
    torch.testing.assert_close(centred(after) - centred(before), torch.full((200,), 0.5 * float(d @ d)),
                               atol=1e-4, rtol=1e-4)
    z = (d * std).abs()  # the direction in the probe's standardised space: the informative features lead
    assert (z[[1, 4]] > z[[0, 2, 3, 5]].max()).all()
    assert vec.config.source == "probe" and vec.config.detail == {"layer": 1, "target": 1}
    # multi-class needs a target; an unknown one is refused
    probe3 = LinearProbe(steps=50).fit(X, (X[0, :, 0] > 0).long() + (X[0, :, 3] > 0).long())
    with pytest.raises(ValueError, match=r"3 classes \[0, 1, 2\]; pass target="):
        SteeringVector.from_probe(probe3, 0)
    with pytest.raises(ValueError, match="target=7 is not one of the probe's classes"):
        SteeringVector.from_probe(probe3, 0, target=7)
    W3 = probe3.weight_[0]
    torch.testing.assert_close(SteeringVector.from_probe(probe3, 0, target=2).direction,
                               (W3[:, 2] - W3.mean(1)) / probe3.std_[0])
    with pytest.raises(ValueError, match="layer=5; the probe has 2 layers"):
        SteeringVector.from_probe(probe3, 5)
    with pytest.raises(RuntimeError, match="not fitted"):
        SteeringVector.from_probe(LinearProbe(), 0)


def test_diffusion_steps_gating(tiny_lens):
    """An edit at step 1 of 3: the latents entering step 1 equal the unsteered run's, those after it differ."""
    lens = tiny_lens("sd")
    site = "unet.mid.out"  # a feature map (batch, C, h, w): steered per pixel
    vec = SteeringVector(torch.ones(lens.model.unet.config.block_out_channels[-1]))

    plain = _latents(lens, vec, site, 0.0, None)
    gated = _latents(lens, vec, site, 3.0, [1])
    always = _latents(lens, vec, site, 3.0, None)
    torch.testing.assert_close(gated[0], plain[0])  # after step 0 = before step 1
    assert (gated[1] - plain[1]).abs().max() > 1e-4
    assert (always[0] - plain[0]).abs().max() > 1e-4
    cond_only = _latents(lens, vec, site, 3.0, [1], branches=("cond",))
    assert (cond_only[1] - gated[1]).abs().max() > 1e-6  # the uncond half was left alone
    torch.testing.assert_close(cond_only[0], plain[0])


def _latents(lens, vec, site, alpha, steps, **kw):
    seen = []

    def keep(pipe, i, t, k):
        seen.append(k["latents"].clone())
        return k

    steer(lens, "a red square", vec, names=site, alpha=alpha, steps=steps, num_inference_steps=3, guidance_scale=4.0,
          output_type="latent", generator=torch.Generator().manual_seed(0), callback_on_step_end=keep, **GEN, **kw)
    return seen


# ------------------------------------------------------------------------------------- save, load, arithmetic
def test_save_load_round_trip(tmp_path, tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    vec = SteeringVector.mean_difference(lens, inputs, sample_inputs("llava", lens, batch=2, seed=3),
                                         names=["lm.blocks.1.resid_post", "lm.blocks.0.attn.k"], positions=[1, 2])
    back = SteeringVector.load(vec.save(tmp_path / "v"))
    assert back.names == vec.names and back.config == vec.config
    for n in vec.names:
        assert torch.equal(back[n], vec[n])
    assert (tmp_path / "v" / "weights.safetensors").exists() and not list((tmp_path / "v").glob("*.pkl"))
    bare = SteeringVector.load(SteeringVector(torch.arange(4.0)).save(tmp_path / "bare"))
    assert bare.names == [] and torch.equal(bare.direction, torch.arange(4.0))
    with pytest.raises(ValueError, match="holds a 'SteeringVector', not a LinearProbe"):
        LinearProbe.load(tmp_path / "v")
    # arithmetic keeps the names and shapes
    both = vec - 0.5 * vec
    torch.testing.assert_close(both["lm.blocks.0.attn.k"], 0.5 * vec["lm.blocks.0.attn.k"])
    assert (-vec).names == vec.names and torch.equal((vec + vec)[vec.names[0]], 2 * vec[vec.names[0]])
    unit = vec.unit()
    assert all(abs(v - 1) < 1e-5 for v in unit.norm().values())


# ------------------------------------------------------------------------------------------------- sweeps
def test_steering_sweep(tmp_path, tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    names = ["lm.blocks.0.resid_post", "lm.blocks.1.resid_post"]
    vec = SteeringVector.mean_difference(lens, inputs, sample_inputs("llava", lens, batch=2, seed=5), names=names)

    def top_logit(out):
        return out.logits[:, -1, 7]

    res = steering_sweep(lens, inputs, vec, alphas=[0, 1, 4], metric=top_logit, positions=-1)
    assert isinstance(res, SteeringSweepResult) and res.values.shape == (2, 3, 2) and res.names == names
    torch.testing.assert_close(res.values[:, 0], res.baseline.expand(2, -1))  # alpha 0: the unsteered run
    for i, n in enumerate(names):
        for j, a in enumerate([0, 1, 4]):
            one = steer(lens, inputs, vec, names=n, alpha=a, positions=-1)
            torch.testing.assert_close(res.values[i, j], top_logit(one))
    back = Result.load(res.save(tmp_path / "sweep"))
    assert isinstance(back, SteeringSweepResult) and torch.equal(back.values, res.values) and back.alphas == [0, 1, 4]
    assert isinstance(res.plot(), Figure) and "<img" in res._repr_html_()
    assert res.meta["metric"] == "top_logit"


def test_sweep_on_diffusion_reuses_the_generator(tiny_lens):
    lens = tiny_lens("sd")
    vec = SteeringVector(torch.ones(lens.model.unet.config.block_out_channels[-1]))
    res = steering_sweep(lens, "a red square", vec, names="unet.mid.out", alphas=[0.0, 2.0],
                         metric=lambda out: torch.as_tensor(out.images).float().mean(), num_inference_steps=2,
                         output_type="latent", generator=torch.Generator().manual_seed(0), **GEN)
    assert res.values.shape == (1, 2, 1)
    torch.testing.assert_close(res.values[0, 0], res.baseline)  # the same noise in every run
    assert (res.values[0, 1] - res.baseline).abs().max() > 1e-6


# -------------------------------------------------------------------------------------------------- errors
def test_errors(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    site = "lm.blocks.1.resid_post"
    vec = SteeringVector({site: torch.randn(64)})
    with pytest.raises(UnknownNameError, match="lm.blocks.99.resid_post"):
        steer(lens, inputs, vec, names="lm.blocks.99.resid_post")
    with pytest.raises(ValueError, match=r"the steering direction for 'lm.blocks.1.resid_post' has 32 features .*"
                                         r"the activation there has 64"):
        steer(lens, inputs, SteeringVector({site: torch.randn(32)}))
    with pytest.raises(ValueError, match=r"mode='shift'; allowed: \('add', 'scale', 'project_out', 'replace'\)"):
        steer(lens, inputs, vec, mode="shift")
    with pytest.raises(ValueError, match=r"positions \[99\] are out of range for 'lm.blocks.1.resid_post', which has"):
        steer(lens, inputs, vec, positions=99)
    with pytest.raises(ValueError, match="a mask of shape"):
        steer(lens, inputs, vec, positions=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="positions must be None, 'last', an int"):
        steer(lens, inputs, vec, positions=1.5)
    with pytest.raises(ValueError, match="positions='first'; allowed"):
        steer(lens, inputs, vec, positions="first")
    with pytest.raises(ValueError, match="steps: denoising steps exist only in diffusion pipelines"):
        steer(lens, inputs, vec, steps=[1])
    with pytest.raises(ValueError, match="branches: classifier-free-guidance branches exist only in diffusion"):
        steer(lens, inputs, vec, branches=("cond",))
    with pytest.raises(ValueError, match="is an attention pattern"):
        steer(lens, inputs, vec, names="lm.blocks.1.attn.pattern")
    with pytest.raises(ValueError, match="has norm 0"):
        steer(lens, inputs, SteeringVector({site: torch.zeros(64)}), mode="project_out")
    with pytest.raises(ValueError, match="bound to no hook point; pass names="):
        steer(lens, inputs, SteeringVector(torch.randn(64)))
    with pytest.raises(ValueError, match="holds no direction for 'lm.blocks.0.resid_post'"):
        steer(lens, inputs, SteeringVector({site: torch.randn(64), "lm.blocks.2.resid_post": torch.randn(64)}),
              names="lm.blocks.0.resid_post")
    with pytest.raises(TypeError, match="alpha must be a finite number"):
        steer(lens, inputs, vec, alpha=float("nan"))
    with pytest.raises(ValueError, match=r"positions \[80\] are out of range"):
        SteeringVector.mean_difference(lens, inputs, inputs, names=site, positions=80)
    with pytest.raises(TypeError, match="must be a processor output"):
        SteeringVector.mean_difference(lens, "a red square", inputs, names=site)
    sd = tiny_lens("sd")
    with pytest.raises(ValueError, match=r"branches=\('both',\); choose a non-empty subset"):
        steer(sd, "a red square", SteeringVector(torch.ones(64)), names="unet.mid.out", branches=("both",))
    clip = tiny_lens("clip")
    with pytest.raises(ValueError, match=r"'vision.ln_post' has no sequence axis \(shape \(2, 64\)\); steer it"):
        steer(clip, sample_inputs("clip", clip, batch=2), SteeringVector(torch.ones(64)), names="vision.ln_post",
              positions=0)


def test_hooks_removed_after_an_exception(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)
    lens(inputs)  # transformers installs its own permanent hooks on the first forward
    before = hook_counts(lens.model)
    with torch.no_grad():
        clean = lens(inputs).logits
    vec = SteeringVector(torch.randn(64))
    with pytest.raises(RuntimeError, match="boom"):
        with steering(lens, vec, names="lm.blocks.*.resid_post", alpha=5.0):
            assert hook_counts(lens.model) != before
            raise RuntimeError("boom")
    assert hook_counts(lens.model) == before
    with pytest.raises(ValueError, match="has 32 features"):  # an error inside the forward, too
        with steering(lens, SteeringVector(torch.randn(32)), names="lm.blocks.0.resid_post"):
            lens(inputs)
    assert hook_counts(lens.model) == before
    with torch.no_grad():
        torch.testing.assert_close(lens(inputs).logits, clean)


def test_steering_during_generate(tiny_lens):
    """model.generate inside the block: -1 steers the prompt's last position, then every new token."""
    lens = tiny_lens("llava")
    inputs = lens.prepare(sample_inputs("llava", lens, batch=1))
    vec = SteeringVector(torch.randn(64, generator=torch.Generator().manual_seed(0)) * 50)
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        plain = lens.model.generate(**inputs, **kw)
        with steering(lens, vec, names="lm.blocks.0.resid_post", positions=-1):
            steered = lens.model.generate(**inputs, **kw)
        # the same by hand: a plain hook adding at the last position of every call
        v = vec.direction

        def hook(mod, args, out):
            x = (out if isinstance(out, torch.Tensor) else out[0]).clone()
            x[:, -1] += v
            return x if isinstance(out, torch.Tensor) else (x, *out[1:])

        h = _module(lens, "lm.blocks.0.resid_post").register_forward_hook(hook)
        try:
            ref = lens.model.generate(**inputs, **kw)
        finally:
            h.remove()
    assert torch.equal(steered, ref) and not torch.equal(steered, plain)


# ------------------------------------------------------------------------------------------------- example
@pytest.mark.skipif(not {"clip", "vlm"} <= set(available()), reason="needs the shipped clip and vlm organisms")
def test_steering_example(capsys):
    result = runpy.run_path(str(EXAMPLES / "steering.py"))["main"]()
    for ps in result["vlm"]["p_red"].values():
        assert ps[0] < 0.05 and ps[-1] > 0.9  # no red without the vector, red with it
        assert all(b >= a - 1e-3 for a, b in zip(ps, ps[1:]))  # the dose-response climbs
    assert set(result["vlm"]["steered"]) == {"red"} and "red" not in result["vlm"]["plain"]
    clip = result["clip"]
    assert clip["none"]["red_colour_acc"] == 1.0 and clip["random direction"]["red_colour_acc"] == 1.0
    for erased in ("colour direction", "colour, block -2"):  # red erased, shape kept
        assert clip[erased]["red_colour_acc"] <= 0.5 and clip[erased]["shape_acc"] >= 0.95, clip[erased]
    assert "P('red') at the answer" in capsys.readouterr().out
