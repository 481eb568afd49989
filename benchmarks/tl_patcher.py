"""TransformerLens's patch loop: its `TransformerBridge` (TransformerLens 3+, which wraps the HF LLaVA class) with one
`run_with_hooks` per patch, the clean block input written at one position of `blocks.{i}.hook_resid_pre`, as its
activation-patching tutorial does. The bridge needs a tokenizer even when given token ids, and sets the model's
attention to eager, so it wraps a copy (values then differ from the SDPA runs by kernel rounding, ~1e-6 in fp32)."""

from __future__ import annotations

import copy
import tempfile

import torch


def make_tl_loop(model, clean, corrupt, targets, src, metric):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoTokenizer

    from mmlens.organisms.vocab import world_tokenizer

    twin = copy.deepcopy(model)
    twin.config.architectures = [type(model).__name__]
    with tempfile.TemporaryDirectory() as d:  # the bridge reloads the tokenizer from its name_or_path while booting
        world_tokenizer().save_pretrained(d)
        tok = AutoTokenizer.from_pretrained(d)
        bridge = TransformerBridge.boot_transformers(type(model).__name__, hf_model=twin, tokenizer=tok)
    ids = corrupt["input_ids"]
    extra = {k: v for k, v in corrupt.items() if k != "input_ids"}

    def run():
        out = torch.empty(len(targets))
        for k, (i, p) in enumerate(targets):
            def hook(x, hook, i=i, p=p):
                x[:, p] = src[i][:, p]
                return x
            with torch.no_grad():
                logits = bridge.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.hook_resid_pre", hook)], **extra)
            out[k] = metric({"logits": logits})[0].float().cpu()
        return out

    return run
