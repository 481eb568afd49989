"""Activation patching against a hand-written loop of plain PyTorch hooks (one forward per patch), every engine."""

from __future__ import annotations

import sys

import matplotlib
import pytest
import torch
from matplotlib.figure import Figure

from mmlens import metrics
from mmlens.methods import PatchResult, Result, gaussian_noise, patch
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")


def _pair(name, lens):
    clean = sample_inputs(name, lens, batch=2, seed=0)
    other = sample_inputs(name, lens, batch=2, seed=1)
    return clean, {**clean, "pixel_values": other["pixel_values"]}


def _block_inputs(model, blocks, inputs):
    """Each block's input hidden states by plain forward pre-hooks."""
    store = {}
    hs = [b.register_forward_pre_hook(lambda m, a, i=i: store.__setitem__(i, a[0].detach().clone()))
          for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hs:
            h.remove()
    return store, out


def _plain_loop(lens, prefix, clean, corrupt, regions, metric):
    """(layers, regions, batch): one forward per (layer, region), the region of block l's input replaced."""
    blocks = [lens.model.get_submodule(lens.sites[f"{prefix}.blocks.{i}.resid_pre"].path)
              for i in range(len(lens.hook_points(f"{prefix}.blocks.*.resid_pre")))]
    clean_p, corrupt_p = lens.prepare(clean), lens.prepare(corrupt)
    src, _ = _block_inputs(lens.model, blocks, clean_p)
    out = torch.empty(len(blocks), len(regions), src[0].shape[0])
    for i, block in enumerate(blocks):
        for j, pos in enumerate(regions):
            def pre(m, args, i=i, pos=pos):
                x = args[0].clone()
                x[:, pos] = src[i][:, pos]
                return (x,) + args[1:]
            h = block.register_forward_pre_hook(pre)
            try:
                with torch.no_grad():
                    out[i, j] = metric(lens.model(**corrupt_p)).float()
            finally:
                h.remove()
    return out


GEN = ["llava", "qwen2_vl", "paligemma", "blip2"]


@pytest.mark.parametrize("name", GEN + ["clip", "siglip"])
@pytest.mark.parametrize("engine", ["auto", "batched", "loop"])
def test_patch_equals_plain_hook_loop(tiny_lens, name, engine):
    lens = tiny_lens(name)
    clean, corrupt = _pair(name, lens)
    if lens.family == "generative":
        seq = clean["input_ids"].shape[1]
        regions, prefix, metric = [[1, 2], [seq - 3, seq - 1], [seq - 2]], "lm", metrics.logit_diff(3, 5)
    else:
        regions, prefix, metric = [[0], [1, 2, 3]], "vision", metrics.logit_diff(0, 1)
    want = _plain_loop(lens, prefix, clean, corrupt, regions, metric)
    res = patch(lens, clean, corrupt, f"{prefix}.blocks.*.resid_pre", metric=metric, engine=engine,
                positions={f"r{j}": r for j, r in enumerate(regions)}, batch_size=4)
    assert res.per_example.shape == want.shape
    torch.testing.assert_close(res.per_example, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(want[:, 0], want[:, 0].mean()), "the patches must change the metric for this test to bite"


@pytest.mark.parametrize("name", ["llava", "blip2"])
def test_replay_reuses_prefix_and_equals_loop_on_heads_and_windows(tiny_lens, name):
    lens = tiny_lens(name)
    clean, corrupt = _pair(name, lens)
    seq = clean["input_ids"].shape[1]
    m = metrics.prob(4)
    kw = dict(positions=[seq - 4, seq - 1], metric=m)
    for names, extra in (("lm.blocks.*.attn.z", {"heads": [0, 1]}), ("lm.blocks.*.mlp.out", {"window": 2}),
                         ("lm.blocks.*.attn.pattern", {"heads": [1]})):
        fast = patch(lens, clean, corrupt, names, engine="replay", **kw, **extra)
        slow = patch(lens, clean, corrupt, names, engine="loop", **kw, **extra)
        torch.testing.assert_close(fast.per_example, slow.per_example, atol=1e-6, rtol=1e-5)
        assert fast.per_example.shape[0] == len(lens.hook_points(names)) * len(extra.get("heads", [0]))


def test_patch_whole_activation_and_window_equal_hand_reference(tiny_lens):
    """positions=None replaces the whole value; window=2 replaces names i and i+1 together."""
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    m = metrics.logit_diff(7)
    res = patch(lens, clean, corrupt, "lm.blocks.*.resid_post", metric=m, window=2)
    _, cache = lens.run_with_cache(clean, names="lm.blocks.*.resid_post")
    want = []
    for i in range(2):
        names = [f"lm.blocks.{j}.resid_post" for j in (i, i + 1) if j < 2]
        with torch.no_grad(), lens.hooks({n: (lambda v, ctx: cache[ctx.name]) for n in names}):
            want.append(m(lens(corrupt)))
    torch.testing.assert_close(res.per_example[:, 0], torch.stack(want), atol=1e-5, rtol=1e-5)
    # patching the last block's whole output restores the clean metric exactly
    torch.testing.assert_close(res.per_example[-1, 0], res.clean, atol=1e-5, rtol=1e-5)
    assert res.window == 2 and res.columns == ["all"]


def test_noise_direction_and_gaussian_corruption(tiny_lens):
    lens = tiny_lens("llava")
    clean, _ = _pair("llava", lens)
    tm = lens.token_map(clean)
    img = tm.positions("image", batch=0).tolist()
    noisy = gaussian_noise(lens, clean, img, scale=3.0, seed=1)
    m = metrics.logit_diff(2, 9)
    # the corrupt run: clean inputs + the same noise at lm.blocks.0.resid_pre, by hand
    blocks0 = lens.model.get_submodule(lens.sites["lm.blocks.0.resid_pre"].path)
    h = blocks0.register_forward_pre_hook(
        lambda mod, a: (noisy.hooks["lm.blocks.0.resid_pre"](a[0], None),) + a[1:])
    try:
        with torch.no_grad():
            want_corrupt = m(lens.model(**lens.prepare(clean)))
    finally:
        h.remove()
    res = patch(lens, clean, noisy, "lm.blocks.*.resid_pre", positions={"image": img, "last": [-1]}, metric=m)
    torch.testing.assert_close(res.corrupt, want_corrupt, atol=1e-5, rtol=1e-5)
    loop = patch(lens, clean, noisy, "lm.blocks.*.resid_pre", positions={"image": img, "last": [-1]}, metric=m,
                 engine="loop")
    torch.testing.assert_close(res.per_example, loop.per_example, atol=1e-5, rtol=1e-5)
    # restoring block 0's whole image region undoes the noise exactly
    torch.testing.assert_close(res.per_example[0, 0], res.clean, atol=1e-5, rtol=1e-5)
    # noise direction: corrupt values into the clean run; at block 0's image region it reproduces the corrupt run
    back = patch(lens, clean, noisy, "lm.blocks.0.resid_pre", positions={"image": img}, metric=m, direction="noise")
    torch.testing.assert_close(back.per_example[0, 0], res.corrupt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(back.clean, res.clean)


def test_recovery_and_result_round_trip(tiny_lens, tmp_path):
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    res = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=[1, -1], metric=metrics.logit_diff(3, 5))
    r = res.recovery(per_example=True)
    torch.testing.assert_close(r, (res.per_example - res.corrupt) / (res.clean - res.corrupt))
    assert res.values.shape == (2, 2) and res.columns == ["1", "-1"]
    back = Result.load(res.save(tmp_path / "p"))
    assert isinstance(back, PatchResult) and back.names == res.names
    torch.testing.assert_close(back.per_example, res.per_example)
    assert isinstance(res.plot(), Figure) and "PatchResult" in res._repr_html_()


def test_metrics_against_hand_computation():
    logits = torch.randn(3, 4, 11)
    out = {"logits": logits}
    last = logits[:, -1]
    torch.testing.assert_close(metrics.logit_diff(2, 5)(out), last[:, 2] - last[:, 5])
    torch.testing.assert_close(metrics.logit_diff([1, 2, 3])(out), last[[0, 1, 2], [1, 2, 3]] - last.mean(-1))
    torch.testing.assert_close(metrics.prob(4, position=1)(out), logits[:, 1].softmax(-1)[:, 4])
    ref = torch.randn(3, 11)
    p = ref.softmax(-1)
    torch.testing.assert_close(metrics.kl(ref)(out), (p * (p.log() - last.log_softmax(-1))).sum(-1))
    r = metrics.recovery(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert r[0] == pytest.approx(1 / 3) and torch.isnan(r[1])
    with pytest.raises(ValueError, match="target ids"):
        metrics.logit_diff([1, 2])(out)


def test_errors(tiny_lens):
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    m = metrics.logit_diff(1)
    with pytest.raises(ValueError, match="same shapes"):
        patch(lens, clean, {**corrupt, "input_ids": corrupt["input_ids"][:, :-1]}, "lm.blocks.0.resid_pre", metric=m)
    with pytest.raises(ValueError, match="direction"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=m, direction="both")
    with pytest.raises(ValueError, match="out of range"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=m, positions=[999])
    with pytest.raises(ValueError, match="no head dim"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=m, heads=[0])
    with pytest.raises(ValueError, match="one value per example"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=lambda out: out.logits[0, -1, :3])
    with pytest.raises(ValueError, match="window"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=m, window=0)
    with pytest.raises(KeyError, match="resid_pre"):
        patch(lens, clean, corrupt, "lm.blocks.0.resid_pree", metric=m)
    with pytest.raises(ValueError, match="image tower"):
        patch(tiny_lens("clip"), *_pair("clip", tiny_lens("clip")), "text.blocks.0.resid_pre", metric=m)


# ------------------------------------------------------------------------------------------------- diffusion
DIFF = dict(num_inference_steps=3, guidance_scale=2.0, height=32, width=32)


def _image_metric(out):
    return torch.as_tensor(out.images).float().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("name", ["sd", "pixart", "sd3"])
def test_diffusion_patch_equals_hand_loop(tiny_lens, name):
    """Step-range patches of the source prompt's values equal one hand-hooked generation per patch from the same
    latents, batched or not; every branch or the cond half only."""
    lens = tiny_lens(name)
    extra = {"use_resolution_binning": False} if name == "pixart" else {}
    clean = {"prompt": ["a red square", "a blue circle"], **DIFF, **extra}
    corrupt = {**clean, "prompt": ["a green star", "a red circle"]}
    site = {"sd": "unet.mid.attn.0.cross.out", "pixart": "dit.blocks.1.cross.out", "sd3": "dit.blocks.1.joint.out"}[name]
    (site,) = lens.resolve(site)
    cols = {"first": [0], "late": [1, 2]}
    for branches in (None, ("cond",)):
        res = patch(lens, clean, corrupt, [site], positions=cols, metric=_image_metric, branches=branches, seed=3)
        loop = patch(lens, clean, corrupt, [site], positions=cols, metric=_image_metric, branches=branches, seed=3,
                     engine="loop")
        torch.testing.assert_close(res.per_example, loop.per_example, atol=1e-5, rtol=1e-4)
    # by hand: the clean run's values at step 0 written into the corrupt run (all branches)
    from mmlens.methods._patch_diffusion import _latents

    lat = _latents(lens, clean, 2, 3)
    _, cache = lens.generate(clean["prompt"], names=[site], latents=lat, progress=False,
                             **{k: v for k, v in clean.items() if k != "prompt"} | {"output_type": "np"})
    hook = {site: lambda v, ctx: cache.get(site, step=ctx.step) if ctx.step == 0 else None}
    out, _ = lens.generate(corrupt["prompt"], names=[], hooks=hook, latents=lat, progress=False,
                           **{k: v for k, v in corrupt.items() if k != "prompt"} | {"output_type": "np"})
    res = patch(lens, clean, corrupt, [site], positions=cols, metric=_image_metric, seed=3)
    torch.testing.assert_close(res.per_example[0, 0], _image_metric(out), atol=1e-5, rtol=1e-4)
    clean_out, _ = lens.generate(clean["prompt"], names=[], latents=lat, progress=False,
                                 **{k: v for k, v in clean.items() if k != "prompt"} | {"output_type": "np"})
    torch.testing.assert_close(res.clean, _image_metric(clean_out), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(res.clean, res.corrupt)


def test_diffusion_groups_and_errors(tiny_lens):
    lens = tiny_lens("sd")
    clean = {"prompt": "a red square", **DIFF}
    corrupt = {**clean, "prompt": "a blue circle"}
    res = patch(lens, clean, corrupt, {"cross k/v": "unet.*.cross.[kv]"}, positions={"all": range(3)},
                metric=_image_metric)
    # every cross-attention key and value from the clean prompt at every step: the text reaches the UNet only there
    torch.testing.assert_close(res.per_example[0, 0], res.clean, atol=1e-5, rtol=1e-4)
    assert res.names == ["cross k/v"] and res.columns == ["all"]
    with pytest.raises(ValueError, match="step 3 is not an int"):
        patch(lens, clean, corrupt, "unet.mid.out", positions=[3], metric=_image_metric)
    with pytest.raises(ValueError, match="outside the unet"):
        patch(lens, clean, corrupt, "text_encoder.blocks.0.resid_post", metric=_image_metric)
    with pytest.raises(ValueError, match="branches"):
        patch(lens, clean, corrupt, "unet.mid.out", metric=_image_metric, branches=("both",))
    with pytest.raises(ValueError, match="branches: guidance branches exist only"):
        vlm = tiny_lens("llava")
        c, k = _pair("llava", vlm)
        patch(vlm, c, k, "lm.blocks.0.resid_pre", metric=metrics.prob(1), branches=("cond",))


def test_symmetric_token_replacement(tiny_lens):
    from mmlens.methods import replace_tokens

    lens = tiny_lens("llava")
    clean, _ = _pair("llava", lens)
    seq = clean["input_ids"].shape[1]
    corrupt = replace_tokens(clean, {seq - 2: 7, seq - 3: [8, 9]})
    assert corrupt["input_ids"][:, seq - 2].tolist() == [7, 7] and corrupt["input_ids"][:, seq - 3].tolist() == [8, 9]
    assert torch.equal(corrupt["input_ids"][:, : seq - 3], clean["input_ids"][:, : seq - 3])
    m = metrics.logit_diff(3, 5)
    res = patch(lens, clean, corrupt, "lm.blocks.0.resid_pre", positions={"replaced": [seq - 3, seq - 2]}, metric=m)
    torch.testing.assert_close(res.per_example[0, 0], res.clean, atol=1e-5, rtol=1e-5)  # restoring them all undoes it
    with pytest.raises(ValueError, match="out of range"):
        replace_tokens(clean, {seq: 1})
    with pytest.raises(ValueError, match="one per example"):
        replace_tokens(clean, {1: [1, 2, 3]})


def test_out_of_memory_splits_the_chunk(tiny_lens, monkeypatch):
    """A chunk that runs out of GPU memory is retried in halves, with the same values."""
    from mmlens.methods import _replay

    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    m = metrics.logit_diff(3, 5)
    want = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=[1, 2, -1], metric=m)
    real = _replay.run_from
    sizes = []

    handling = []

    def flaky(lens_, stack, ref, start, rows, p0, hooks):
        sizes.append(len(rows))
        handling.append(sys.exc_info()[0])  # a retry inside `except` would keep the failed attempt's tensors alive
        if len(rows) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lens_, stack, ref, start, rows, p0, hooks)

    monkeypatch.setattr("mmlens.methods.patching.run_from", flaky)
    monkeypatch.setattr("torch.cuda.empty_cache", lambda: None)
    got = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=[1, 2, -1], metric=m)
    torch.testing.assert_close(got.per_example, want.per_example)
    assert max(sizes) > 4 and sizes[-1] <= 4
    assert handling == [None] * len(handling)
    failed = [n for n in sizes if n > 4]  # once a size fails, no later chunk tries it (or anything larger) again
    assert failed == sorted(set(failed), reverse=True) and len(sizes) - len(failed) > 1


@pytest.mark.parametrize("where", ["after", "before"])
def test_metric_at_a_positive_position_equals_loop(tiny_lens, where):
    """A metric reading position p (counted from the start) sees p's logits under replay, whether p lies after the
    patched positions (unembedded from the replay) or before them (the reference's logits)."""
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    seq = clean["input_ids"].shape[1]
    read, patched = (seq - 2, [seq - 4, seq - 3]) if where == "after" else (seq - 5, [seq - 2])
    m = metrics.logit_diff(3, 5, position=read)
    fast = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=patched, metric=m, engine="replay")
    slow = patch(lens, clean, corrupt, "lm.blocks.*.resid_pre", positions=patched, metric=m, engine="loop")
    torch.testing.assert_close(fast.per_example, slow.per_example, atol=1e-5, rtol=1e-5)
    if where == "before":  # a patch after the read position cannot change it
        torch.testing.assert_close(fast.per_example, fast.corrupt.expand_as(fast.per_example))
