"""Diffusion text-encoder sites are stored from prompts with only the pipeline's prompt encoding run (the denoiser
never runs): one token per real text position, the rows equal to plain HF calls of the tokenizer and text encoder,
padding dropped (SD: up to and including the end-of-text token, the tokenizer's own attention mask; PixArt: the mask
its T5 is given), readable as SAE batches; stores mixing sites of different token rows are refused."""

from __future__ import annotations

import pytest
import torch

from mmlens.store import MODALITIES, ActivationStore, write_activations
from mmlens.store.text_encoder import real_tokens
from mmlens.testing.tiny_models import sample_image

TEXT, SPECIAL = MODALITIES.index("text"), MODALITIES.index("special")
PROMPTS = ["a red square", "a blue circle on the left", "red", "a square"]


def _never(module, args, kwargs):
    raise AssertionError("the denoiser ran")


def test_sd_text_encoder_tokens_equal_plain_hf_calls(tiny_lens, tmp_path):
    lens = tiny_lens("sd")
    names = ["text_encoder.blocks.1.resid_post", "text_encoder.ln_final", "text_encoder.blocks.0.attn.q"]
    handle = lens.model.unet.register_forward_pre_hook(_never, with_kwargs=True)
    try:
        store = write_activations(lens, PROMPTS, names, tmp_path / "te", dtype="float32", batch_size=3,
                                  shard_tokens=8, progress=False)
    finally:
        handle.remove()
    tok, te = lens.model.tokenizer, lens.model.text_encoder
    enc = tok(PROMPTS, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():  # as the pipeline: padded to model_max_length, no attention mask
        out = te(enc["input_ids"], output_hidden_states=True)
    keep = enc["attention_mask"].bool()  # the tokenizer's mask: real tokens, end-of-text included
    assert torch.equal(real_tokens(enc["input_ids"], None, tok.eos_token_id), keep) and not keep.all()
    m = store.meta
    assert len(store) == int(keep.sum()) and store.d == {names[0]: 32, names[1]: 32, names[2]: 32}
    torch.testing.assert_close(store.tensor(names[0]), out.hidden_states[2][keep], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(store.tensor(names[1]), out.last_hidden_state[keep], atol=1e-6, rtol=1e-6)
    ex, pos = m["example"], m["position"].long()
    assert torch.equal(ex, torch.arange(4)[:, None].expand_as(keep)[keep])
    assert torch.equal(pos, torch.arange(keep.shape[1]).expand_as(keep)[keep])
    assert torch.equal(m["token"], enc["input_ids"][keep])
    special = torch.isin(m["token"], torch.tensor(tok.all_special_ids))
    assert torch.equal(m["modality"].long(), torch.where(special, SPECIAL, TEXT))
    assert int((m["token"] == tok.eos_token_id).sum()) == 4  # each prompt's end-of-text kept, its padding not
    for col in ("step", "branch", "image", "row", "col"):
        assert (m[col] == -1).all(), col
    assert m["timestep"].isnan().all()
    assert store.token_strings[int(m["token"][1])] == "a"
    reopened = ActivationStore(tmp_path / "te")  # SAE-able: shuffled batches hold every token once
    got = torch.cat(list(reopened.batches(names[0], 5, seed=0, buffer_tokens=16)))
    ref = store.tensor(names[0])
    assert got.shape == ref.shape and torch.equal(got[torch.argsort(got[:, 0])], ref[torch.argsort(ref[:, 0])])
    text = reopened.tensor(names[0], where={"modality": "text"})
    assert len(text) == int((~special).sum()) > 0


def test_pixart_t5_uses_its_attention_mask_and_options(tiny_lens):
    from mmlens.store import stream_activations

    lens = tiny_lens("pixart")
    name = "text_encoder.ln_final"
    (acts, meta), = list(stream_activations(lens, ["A Red Square", "blue"], name, max_sequence_length=12))
    tok, te = lens.model.tokenizer, lens.model.text_encoder
    enc = tok(["a red square", "blue"], padding="max_length", max_length=12, truncation=True,  # PixArt lower-cases
              add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        ref = te(enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    keep = enc["attention_mask"].bool()
    torch.testing.assert_close(acts[name], ref[keep], atol=1e-6, rtol=1e-6)
    assert torch.equal(meta["token"], enc["input_ids"][keep]) and int(meta["position"].max()) < 12


def test_text_encoder_stores_refuse_what_does_not_fit(tiny_lens, tmp_path):
    sd, sd3 = tiny_lens("sd"), tiny_lens("sd3")
    with pytest.raises(ValueError, match="mix denoiser sites and text-encoder sites.*token rows differ"):
        write_activations(sd, PROMPTS, ["text_encoder.blocks.0.resid_post", "unet.mid.out"], tmp_path / "a",
                          progress=False)
    with pytest.raises(ValueError, match="span the text encoders"):
        write_activations(sd3, PROMPTS, ["text_encoder.blocks.0.resid_post", "text_encoder_2.blocks.0.resid_post"],
                          tmp_path / "a", progress=False)
    with pytest.raises(TypeError, match="num_inference_steps.*prompt encoding"):
        write_activations(sd, PROMPTS, "text_encoder.blocks.0.resid_post", tmp_path / "a", num_inference_steps=2,
                          progress=False)
    with pytest.raises(TypeError, match="items must be strings"):
        write_activations(sd, [sample_image(0)], "text_encoder.blocks.0.resid_post", tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="same token rows"):  # a pooled vector and per-token values
        write_activations(sd3, PROMPTS, ["text_encoder.text_embeds", "text_encoder.ln_final"], tmp_path / "c",
                          progress=False)
    pooled = write_activations(sd3, PROMPTS, "text_encoder_2.text_embeds", tmp_path / "d", progress=False)
    assert len(pooled) == 4 and (pooled.meta["position"] == -1).all() and (pooled.meta["modality"] == SPECIAL).all()
