"""`tuned_lens` scored against the organisms' ground truth (see benchmarks/groundtruth.py)."""

from __future__ import annotations

from ._common import line, vlm_binding_scenes


def score(n_train: int = 96, n_eval: int = 48) -> list[dict]:
    """vlm: KL from each layer's read-out to the model's final distribution, tuned lens vs logit lens, on scenes
    the translators never saw (every text position of the organism's prompts)."""
    import mmlens.organisms as organisms
    from mmlens.methods import TunedLens, logit_lens
    from mmlens.methods.tuned_lens import kl_to_final, text_positions
    from mmlens.organisms.prompts import vlm_inputs

    vlm = organisms.load("vlm")
    tok = vlm.processor.tokenizer
    scenes, questions, _ = vlm_binding_scenes(n_train + n_eval, tok)

    def batches(lo, hi):
        return [vlm_inputs(vlm, scenes[i:min(i + 16, hi)], questions[i:min(i + 16, hi)]) for i in range(lo, hi, 16)]

    tuned = TunedLens(steps=300, lr=1e-3, batch_tokens=512).fit(vlm, batches(0, n_train))
    kl_t, kl_l, n_tok = 0.0, 0.0, 0
    for inputs in batches(n_train, n_train + n_eval):
        keep = text_positions(vlm, inputs)
        t, lg = tuned.transform(vlm, inputs).logits, logit_lens(vlm, inputs).logits
        kl_t = kl_t + kl_to_final(t, keep) * keep.sum()
        kl_l = kl_l + kl_to_final(lg, keep) * keep.sum()
        n_tok += int(keep.sum())
    out = []
    for k, name in enumerate(tuned.names_[:-1]):  # the last block is the model's output: both lenses read it exactly
        out.append(line("tuned_lens", "vlm", f"kl_to_final@{name}", kl_t[k] / n_tok, round(float(kl_l[k] / n_tok), 4),
                        higher_is_better=False, layer=name, tokens=n_tok, logit_lens_kl=round(float(kl_l[k] / n_tok), 4),
                        source="Belrose et al. 2023: the tuned lens's KL is below the logit lens's at every layer; "
                               "threshold = the logit lens's KL on the same held-out tokens"))
    return out
