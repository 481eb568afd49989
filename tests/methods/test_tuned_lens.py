"""Tuned lens: identity translators are the logit lens; training lowers the KL to the final distribution; the
translators are what the result applies; save/load and resume keep them exactly."""

from __future__ import annotations

import pytest
import torch

from mmlens.methods import TunedLens, logit_lens
from mmlens.methods.tuned_lens import _identity_translators
from mmlens.testing.tiny_models import sample_inputs


def _kl_per_layer(logits):  # (layers, batch, positions, vocab) -> KL(last || layer) per layer
    p = logits[-1].log_softmax(-1)
    return torch.stack([(p.exp() * (p - lg.log_softmax(-1))).sum(-1).mean() for lg in logits])


@pytest.fixture(scope="module")
def fitted(tiny_lens, tmp_path_factory):
    lens = tiny_lens("llava")
    batches = [sample_inputs("llava", lens, batch=2, seed=s) for s in range(3)]
    work = tmp_path_factory.mktemp("tuned-work")
    return lens, batches, work, TunedLens(steps=40, lr=3e-3, batch_tokens=64).fit(lens, batches, work=work)


@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "paligemma", "blip2"])
def test_identity_translators_are_the_logit_lens(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens)
    tl = TunedLens()
    tl.names_, tl.translators_ = lens.resolve("lm.blocks.*.resid_post"), _identity_translators(2, 64)
    torch.testing.assert_close(tl.transform(lens, inputs).logits, logit_lens(lens, inputs).logits, atol=1e-6, rtol=0)
    shifted = _identity_translators(2, 64)
    with torch.no_grad():
        shifted[0].bias += 0.5
    tl.translators_ = shifted
    assert not torch.allclose(tl.transform(lens, inputs).logits[0], logit_lens(lens, inputs).logits[0])


def test_training_lowers_kl_and_keeps_the_last_layer(fitted):
    lens, batches, _, tl = fitted
    inputs = batches[0]
    tuned, plain = tl.transform(lens, inputs, positions="answer"), logit_lens(lens, inputs, positions="answer")
    kl_t, kl_l = _kl_per_layer(tuned.logits), _kl_per_layer(plain.logits)
    assert kl_t[0] < 0.8 * kl_l[0], (kl_t, kl_l)
    torch.testing.assert_close(tuned.logits[-1], plain.logits[-1], atol=1e-6, rtol=0)  # identity on the last block
    assert tuned.meta["lens_kind"] == "tuned" and plain.meta["lens_kind"] == "logit"
    # the result applies exactly the translator, then the model's own norm and unembedding
    _, cache = lens.run_with_cache(inputs, names="lm.blocks.0.resid_post")
    ans = lens.token_map(inputs).answer_positions()
    h = tl.translators_[0](cache["lm.blocks.0.resid_post"][torch.arange(len(ans)), ans][:, None])
    ref = lens.model.lm_head(lens.model.model.language_model.norm(h))
    torch.testing.assert_close(tuned.logits[0], ref, atol=1e-5, rtol=1e-5)
    assert all(p.grad is None for p in lens.model.parameters())  # the model took no gradient


def test_save_load_and_resume(fitted, tmp_path):
    lens, batches, work, tl = fitted
    back = TunedLens.load(tl.save(tmp_path / "tl"))
    torch.testing.assert_close(back.transform(lens, batches[0]).logits, tl.transform(lens, batches[0]).logits,
                               atol=0, rtol=0)
    again = TunedLens(steps=40, lr=3e-3, batch_tokens=64).fit(lens, batches, work=work)  # nothing left to do
    assert again.training_["resumed_from"] == 40
    for a, b in zip(again.translators_.parameters(), tl.translators_.parameters()):
        assert torch.equal(a, b)


def test_errors(tiny_lens):
    with pytest.raises(RuntimeError, match="not fitted"):
        TunedLens().transform(tiny_lens("llava"), sample_inputs("llava", tiny_lens("llava")))
    with pytest.raises(TypeError, match="TunedLens.fit applies to generative models"):
        TunedLens().fit(tiny_lens("clip"), [sample_inputs("clip", tiny_lens("clip"))])
    with pytest.raises(ValueError, match="steps and batch_tokens must be positive"):
        TunedLens(steps=0).fit(tiny_lens("llava"), [sample_inputs("llava", tiny_lens("llava"))])
