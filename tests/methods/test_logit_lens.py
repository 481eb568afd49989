"""Logit lens and joint lens against hand-written PyTorch on tiny models of each architecture."""

from __future__ import annotations

import matplotlib
import pytest
import torch

from mmlens.methods import JointLensResult, LogitLensResult, Result, joint_lens, logit_lens
from mmlens.testing.tiny_models import sample_inputs

matplotlib.use("Agg")

LM = {  # final norm, unembedding, (extra projection) in plain PyTorch
    "llava": lambda m: [m.model.language_model.norm, m.lm_head],
    "qwen2_vl": lambda m: [m.model.language_model.norm, m.lm_head],
    "paligemma": lambda m: [m.model.language_model.norm, m.lm_head],
    "blip2": lambda m: [m.language_model.model.decoder.final_layer_norm, m.language_model.lm_head],
}


@pytest.mark.parametrize("name", list(LM))
def test_logit_lens_equals_plain_pytorch(tiny_lens, name):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    mask = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"]))
    pos = torch.stack([mask.argmax(1), mask.shape[1] - 1 - mask.flip(1).argmax(1)], 1)  # first, last real token
    res = logit_lens(lens, inputs, positions=pos)
    out = lens.model(**inputs, output_hidden_states=True)
    hidden = out.hidden_states if name != "blip2" else out.language_model_outputs.hidden_states
    rows = torch.arange(2)[:, None]
    assert res.logits.shape == (len(res.names), 2, 2, out.logits.shape[-1]) and res.logits.dtype == torch.float32
    assert torch.equal(res.positions, pos)
    # the last layer is the model's own logits; earlier ones by hand (HF's last hidden state is already normed)
    torch.testing.assert_close(res.logits[-1], out.logits[rows, pos], atol=1e-5, rtol=1e-5)
    for k in range(len(res.names) - 1):
        x = hidden[k + 1][rows, pos]
        for mod in LM[name](lens.model):
            x = mod(x)
        torch.testing.assert_close(res.logits[k], x, atol=1e-5, rtol=1e-5)


def test_logit_lens_positions_answer_and_grid(tiny_lens):
    lens = tiny_lens("llava")
    inputs = sample_inputs("llava", lens, batch=2)  # right-padded, each row ends with </s>
    tm = lens.token_map(inputs)
    ans = logit_lens(lens, inputs, positions="answer")
    assert ans.positions[:, 0].tolist() == tm.answer_positions().tolist()
    full = logit_lens(lens, inputs)
    assert full.logits.shape[2] == inputs["input_ids"].shape[1]
    rows = torch.arange(2)
    torch.testing.assert_close(ans.logits[:, :, 0], full.logits[:, rows, tm.answer_positions()])
    grid = full.on_grid(full.token_probs("red")[:, 0], batch=0)  # (layers, 4, 4) over the image
    pos = tm.positions("image", batch=0)
    assert grid.shape == (2, 4, 4)
    torch.testing.assert_close(grid[:, 1, 2], full.token_probs("red")[:, 0, pos[1 * 4 + 2]])
    top = full.top_tokens(2)
    assert len(top) == 2 and len(top[0][0][0]) == 2 and all(isinstance(t, str) for t in top[0][0][0])
    with pytest.raises(ValueError, match="no image patch was read"):
        ans.on_grid(ans.token_probs("red")[:, 0])


@pytest.mark.parametrize("positions,match", [("last", "allowed: None"), ([99], "out of range"),
                                             ([-1], "position 26 is padding in batch row 0"),
                                             (torch.zeros(3, 1, dtype=torch.long), "batch=2")])
def test_logit_lens_bad_positions(tiny_lens, positions, match):
    lens = tiny_lens("llava")
    with pytest.raises(ValueError, match=match):
        logit_lens(lens, sample_inputs("llava", lens, batch=2), positions=positions)


def test_wrong_family_is_refused(tiny_lens):
    with pytest.raises(TypeError, match="logit_lens applies to generative models; clip is a contrastive"):
        logit_lens(tiny_lens("clip"), sample_inputs("clip", tiny_lens("clip")))
    with pytest.raises(TypeError, match="joint_lens applies to contrastive models; llava is a generative"):
        joint_lens(tiny_lens("llava"), sample_inputs("llava", tiny_lens("llava")))


def test_logit_lens_result_round_trip(tiny_lens, tmp_path):
    lens = tiny_lens("llava")
    res = logit_lens(lens, sample_inputs("llava", lens), positions=[-1, 3])
    back = Result.load(res.save(tmp_path / "ll"))
    assert type(back) is LogitLensResult and back.names == res.names and back.vocab == res.vocab
    for f in ("logits", "positions", "row", "col", "image"):
        assert torch.equal(getattr(back, f), getattr(res, f)), f
    assert back.meta == res.meta and back.meta["architecture"] == "llava"
    assert LogitLensResult.load(tmp_path / "ll").grids == res.grids
    with pytest.raises(ValueError, match="holds a LogitLensResult, not a JointLensResult"):
        JointLensResult.load(tmp_path / "ll")
    from matplotlib.figure import Figure

    assert isinstance(res.plot(), Figure) and isinstance(logit_lens(lens, sample_inputs("llava", lens)).plot_image("red"), Figure)
    assert "<img src='data:image/png;base64," in res._repr_html_()


@pytest.mark.parametrize("name", ["clip", "siglip"])
def test_joint_lens_equals_plain_pytorch(tiny_lens, name, tmp_path):
    lens = tiny_lens(name)
    inputs = sample_inputs(name, lens, batch=2)
    res = joint_lens(lens, inputs)
    m = lens.model
    out = m(**inputs, output_hidden_states=True)
    torch.testing.assert_close(res.logits[-1], out.logits_per_image, atol=1e-4, rtol=1e-4)
    h = out.vision_model_output.hidden_states[1]  # block 0's output, by hand
    if name == "clip":
        img = m.visual_projection(m.vision_model.post_layernorm(h[:, 0]))
        ref = torch.nn.functional.normalize(img, dim=-1) @ out.text_embeds.T * m.logit_scale.exp()
    else:
        img = m.vision_model.head(m.vision_model.post_layernorm(h))
        ref = torch.nn.functional.normalize(img, dim=-1) @ out.text_embeds.T * m.logit_scale.exp() + m.logit_bias
    torch.testing.assert_close(res.logits[0], ref, atol=1e-4, rtol=1e-4)
    acc = res.accuracy(out.logits_per_image.argmax(-1))
    assert acc[-1] == 1.0 and acc.shape == (len(res.names),)
    back = Result.load(res.save(tmp_path / "jl"))
    assert type(back) is JointLensResult and torch.equal(back.logits, res.logits)
    with pytest.raises(ValueError, match="one text index per image"):
        res.accuracy([0])
