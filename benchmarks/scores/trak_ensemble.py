"""`TRAKEnsemble` scored on the planted ground truth of `data_attribution` (see benchmarks/groundtruth.py).

The clip organism is fine-tuned as there (its training data plus planted marked images captioned `FACT`) once per
seed: the data are the same, the batch order and initial randomness differ, so the fine-tunes are the independently
trained models the TRAK paper ensembles over (Park et al. 2023 find the scores improve steadily with the number of
models). Only the last vision block, the pooling norm and the projection train, so each fine-tune is kept as the state
dict of those (a partial checkpoint) and swapped into one lens in turn: one model in memory at a time. The ensemble
and the first seed's model alone are both scored by precision at k = #planted on the held-out marked images.
"""

from __future__ import annotations

import tempfile

import torch

from ._common import line
from .data_attribution import FACT, PARAMS, finetune, trak_batches


def _trained_state(clip) -> dict[str, torch.Tensor]:
    """What `finetune` trains: the last vision block, the pooling norm, the projection (CPU copies)."""
    last = len(clip.model.vision_model.encoder.layers) - 1
    keep = (f"vision_model.encoder.layers.{last}.", "vision_model.post_layernorm.", "visual_projection.")
    return {k: v.detach().cpu().clone() for k, v in clip.model.state_dict().items() if k.startswith(keep)}


def score_ensemble(seeds: tuple[int, ...] = (0, 1, 2), n_normal: int = 400, n_planted: int = 8, n_test: int = 16,
                   steps: int = 100, lr: float = 2e-3, proj_dim: int = 512, damping: float = 0.1,
                   seed: int = 0) -> list[dict]:
    """Fine-tune once per seed in `seeds`, fit a TRAKEnsemble over the fine-tunes and a TRAK on the first alone
    (the first model's features are read back from the ensemble's store, not recomputed), attribute the planted
    fact on held-out marked images, and score each by precision at k = `n_planted` (as `data_attribution.score`)."""
    from mmlens.methods.data_attribution import TRAKConfig, TRAKEnsemble, contrastive_margin

    if len(seeds) < 2:
        raise ValueError(f"an ensemble needs at least two fine-tunes; got seeds={seeds!r}")
    ft, ckpts, rates, seconds = None, [], [], 0.0
    for s in seeds:
        one = finetune(n_normal, n_planted, n_test, steps, lr, s)
        ckpts.append(_trained_state(one.clip))
        rates.append(one.fact_rate)
        seconds += one.seconds
        ft = one if ft is None else ft  # the first fine-tune's lens receives every checkpoint in turn; the others are dropped

    train_batches, target = trak_batches(ft, n_test)
    n = len(ft.labels)
    cfg = TRAKConfig(proj_dim=proj_dim, seed=seed, params=PARAMS, damping=damping)
    with tempfile.TemporaryDirectory() as store:
        ens = TRAKEnsemble(cfg).fit(ft.clip, train_batches, contrastive_margin, checkpoints=ckpts, store=store,
                                    progress=False)
        single = TRAKEnsemble(cfg).fit(ft.clip, train_batches, contrastive_margin, checkpoints=ckpts[:1],
                                       store=store, progress=False)  # model-000's shards: read, not recomputed
    p_ens = ens.attribute(ft.clip, target, contrastive_margin, checkpoints=ckpts).precision_at_k(ft.is_planted)
    p_one = single.attribute(ft.clip, target, contrastive_margin, checkpoints=ckpts[:1]).precision_at_k(ft.is_planted)
    p_ens, p_one = p_ens.mean().item(), p_one.mean().item()
    common = dict(n_models=len(seeds), seeds=list(seeds), n_train=n, n_planted=n_planted, n_test=n_test, fact=FACT,
                  params=PARAMS, proj_dim=proj_dim, damping=damping, finetune_steps=steps,
                  finetune_seconds=round(seconds, 1), chance=round(n_planted / n, 4))
    src = (f"Park et al. 2023 (TRAK ensemble over {len(seeds)} fine-tunes with different seeds) on the planted ground "
           f"truth of data_attribution: {n_planted} marked images captioned '{FACT}' taught the fact")
    return [
        line("trak_ensemble", "clip", "planted_fact_learned_rate_min", min(rates), 0.8, n=n_test, fact=FACT,
             rates=[round(r, 4) for r in rates],
             source="sanity: every fine-tune names the planted colour on held-out marked images (0.8 = learned)"),
        line("trak_ensemble", "clip", "trak_ensemble_precision_at_k", p_ens, 0.5, **common,
             source=src + "; precision at k = #planted, mean over marked test images; 0.5 = most of the top-k"),
        line("trak_ensemble", "clip", "trak_single_precision_at_k", p_one, None, **common,
             source="reported, no bar: the first seed's model alone, same config (data_attribution's TRAK)"),
        line("trak_ensemble", "clip", "trak_ensemble_minus_single_precision_at_k", p_ens - p_one, 0.0, **common,
             source="the ensemble ranks the planted examples at least as well as one model (the paper: scores "
             "improve with the number of models)"),
    ]
