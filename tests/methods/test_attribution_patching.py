"""Attribution patching: the hand-written gradient x difference, and agreement with exact patching for small edits."""

from __future__ import annotations

import pytest
import torch

from mmlens import metrics
from mmlens.methods import PatchResult, attribution_patching, patch
from mmlens.testing.tiny_models import sample_inputs


def _pair(name, lens, eps=None):
    clean = sample_inputs(name, lens, batch=2, seed=0)
    pv = sample_inputs(name, lens, batch=2, seed=1)["pixel_values"] if eps is None else \
        clean["pixel_values"] + eps * torch.randn(clean["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    return clean, {**clean, "pixel_values": pv}


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "clip"])
def test_equals_plain_gradient_times_difference(tiny_lens, name):
    lens = tiny_lens(name)
    clean, corrupt = _pair(name, lens)
    prefix = "lm" if lens.family == "generative" else "vision"
    metric = metrics.logit_diff(3, 5) if prefix == "lm" else metrics.logit_diff(0, 1)
    block = lens.model.get_submodule(lens.sites[f"{prefix}.blocks.1.resid_pre"].path)
    store = {}

    def grab(m, a):  # the block input as a leaf that wants its gradient
        store["x"] = a[0].detach().clone().requires_grad_()
        return (store["x"],) + a[1:]
    h = block.register_forward_pre_hook(grab)
    grads_on = [p.requires_grad for p in lens.model.parameters()]
    try:
        with torch.no_grad():
            lens.model(**lens.prepare(clean))
        src = store["x"].detach().clone()
        with torch.enable_grad():
            out = lens.model(**lens.prepare(corrupt))
            (g,) = torch.autograd.grad(metric(out).sum(), store["x"])
        want_full = ((src - store["x"].detach()) * g).sum(-1)  # (batch, seq)
        base = metric(out).detach()
    finally:
        h.remove()
    regions = {"a": [0, 1], "b": [2]}
    res = attribution_patching(lens, clean, corrupt, f"{prefix}.blocks.1.resid_pre", positions=regions, metric=metric)
    assert isinstance(res, PatchResult) and res.method == "attribution"
    torch.testing.assert_close(res.per_example[0, 0], base + want_full[:, [0, 1]].sum(-1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(res.per_example[0, 1], base + want_full[:, 2], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None for p in lens.model.parameters()), "parameter gradients must stay off"
    assert [p.requires_grad for p in lens.model.parameters()] == grads_on, "requires_grad is restored"


def test_matches_exact_patching_for_small_corruptions(tiny_lens):
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens, eps=2e-2)
    m = metrics.logit_diff(3, 5)
    seq = clean["input_ids"].shape[1]
    kw = dict(positions={"img": list(range(1, 5)), "last": [seq - 1]}, metric=m)
    for names, extra in (("lm.blocks.*.resid_pre", {}), ("lm.blocks.*.attn.z", {"heads": [0, 1]}),
                         ("lm.blocks.*.mlp.out", {})):
        est = attribution_patching(lens, clean, corrupt, names, **kw, **extra)
        exact = patch(lens, clean, corrupt, names, **kw, **extra)
        assert est.per_example.shape == exact.per_example.shape
        gap = (exact.per_example - exact.corrupt).abs().max()
        err = ((est.per_example - exact.per_example).abs().max())
        assert gap > 1e-4 and err < 0.05 * gap, (names, float(err), float(gap))
        torch.testing.assert_close(est.clean, exact.clean)
        torch.testing.assert_close(est.corrupt, exact.corrupt)


def test_errors(tiny_lens):
    lens = tiny_lens("llava")
    clean, corrupt = _pair("llava", lens)
    with pytest.raises(TypeError, match="generative and contrastive"):
        attribution_patching(tiny_lens("sd"), clean, corrupt, "unet.mid.out", metric=metrics.prob(1))
    with pytest.raises(ValueError, match="one value per example"):
        attribution_patching(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=lambda o: o.logits.sum())
    with pytest.raises(ValueError, match="no head dim"):
        attribution_patching(lens, clean, corrupt, "lm.blocks.0.resid_pre", metric=metrics.prob(1), heads=[0])
