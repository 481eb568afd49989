"""SAELens 6's saved format, both ways: `cfg.json` (the inference config: architecture, d_in, d_sae, dtype,
apply_b_dec_to_input, normalize_activations, metadata{hook_name, ...}, k for TopK) beside `sae_weights.safetensors`
(W_enc, b_enc, W_dec, b_dec, and `threshold` for JumpReLU), plus `sparsity.safetensors` (log10 firing frequency)
when the SAE was fitted. Read from SAELens's own code (sae_lens/saes/*.py, `SAE.save_model`, `load_from_disk`).

Mapping: our ReLU = "standard", TopK = "topk", JumpReLU = "jumprelu". SAELens has no BatchTopK inference class: its
trainer saves a BatchTopK SAE as "jumprelu" with the global threshold in every entry and
metadata.training_architecture = "batchtopk"; we write the same and read such a file back as BatchTopK. Matryoshka
widths are training-only: SAELens saves its MatryoshkaBatchTopK as that same JumpReLU with training_architecture
"matryoshka_batchtopk" and training_architecture_details.matryoshka_widths; we write the same ("matryoshka_" + the
training architecture for the others, which SAELens has no trainer for) and read the widths back into the config. Our
`input_scale` is folded into the weights on export (W_enc * s, W_dec / s, b_dec / s: the same function), and on
import SAELens's `apply_b_dec_to_input=False` is folded into b_enc, `rescale_acts_by_decoder_norm` into the weights
(as SAELens folds it), and an `expected_average_only_in` scaling factor from `activation_scaler.json` becomes
`input_scale`. Per-token normalisations (layer_norm, constant_norm_rescale, covariance_whitening) are refused."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from ..io import atomic_path, atomic_write_text

CFG, WEIGHTS, SPARSITY, SCALER = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "activation_scaler.json"
FORMAT_VERSION = "6.54.12"  # the SAELens release whose format this writes (>= 6.0 skips its pre-6 conversion)
TO_SAELENS = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
READABLE = ("standard", "topk", "jumprelu")
DTYPES = {"float32", "float64", "float16", "bfloat16"}


def save_saelens(sae, folder: str | os.PathLike, *, model_name: str | None = None) -> Path:
    from safetensors.torch import save_file

    from .. import __version__

    cfg = sae.cfg
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg.architecture == "batchtopk" and float(sae.batch_threshold) <= 0:
        raise ValueError("save_saelens: this BatchTopK SAE has no inference threshold yet (fit it first); SAELens "
                         "stores BatchTopK as a JumpReLU with that threshold")
    with torch.no_grad():
        s = sae.input_scale.float()
        dtype = getattr(torch, cfg.dtype)
        w = {"W_enc": sae.W_enc.float() * s, "b_enc": sae.b_enc.float(), "W_dec": sae.W_dec.float() / s,
             "b_dec": sae.b_dec.float() / s}
        if cfg.architecture in ("jumprelu", "batchtopk"):
            w["threshold"] = sae.threshold.float().clone()
        w = {k: v.to(dtype).detach().cpu().contiguous() for k, v in w.items()}
    arch = TO_SAELENS[cfg.architecture]
    training = cfg.architecture if cfg.architecture != "relu" else "standard"
    details = {"k": cfg.k} if cfg.architecture == "batchtopk" else {}
    if cfg.matryoshka_widths:  # training-only: SAELens's trainer records them the same way
        training = "matryoshka_" + training
        details["matryoshka_widths"] = list(cfg.matryoshka_widths)
        details["use_matryoshka_aux_loss"] = bool(cfg.matryoshka_aux)
    metadata = {"sae_lens_version": FORMAT_VERSION, "sae_lens_training_version": FORMAT_VERSION,
                "hook_name": cfg.hook_name, "model_name": model_name, "written_by": f"mmlens {__version__}",
                "training_architecture": training, "training_architecture_details": details}
    doc = {"d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype, "device": "cpu", "apply_b_dec_to_input": True,
           "normalize_activations": "none", "reshape_activations": "none", "metadata": metadata,
           "architecture": arch}
    if arch == "topk":
        doc.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file(w, str(tmp))
    stats = sae._fit_state
    if stats is not None and int(stats.tokens) > 0:
        freq = stats.fire_count.double() / int(stats.tokens)
        with atomic_path(folder / SPARSITY) as tmp:
            save_file({"sparsity": torch.log10(freq + 1e-10).float()}, str(tmp))
    atomic_write_text(folder / CFG, json.dumps(doc))
    return folder


def from_saelens(sae_cls, config_cls, folder: str | os.PathLike, *, hook_name: str | None = None):
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / CFG).exists() or not (folder / WEIGHTS).exists():
        raise FileNotFoundError(f"{folder} is not a SAELens SAE folder: it needs {CFG} and {WEIGHTS}")
    doc = json.loads((folder / CFG).read_text())
    meta = doc.get("metadata") or {}
    version = str(meta.get("sae_lens_version") or doc.get("sae_lens_version") or "0")
    arch = doc.get("architecture")
    if arch is None or int(version.split(".")[0] or 0) < 6:  # SAELens < 6: ReLU unless its activation says topk
        arch = "topk" if doc.get("activation_fn") == "topk" or doc.get("activation_fn_str") == "topk" else \
            (arch or "standard")
        if arch == "topk" and "k" not in doc:
            doc["k"] = (doc.get("activation_fn_kwargs") or {}).get("k")
    if arch not in READABLE:
        raise ValueError(f"{folder}: SAELens architecture {arch!r} has no mmlens counterpart; readable: {READABLE}")
    norm = doc.get("normalize_activations", "none") or "none"
    scale = 1.0
    if norm == "expected_average_only_in":
        if (folder / SCALER).exists() and json.loads((folder / SCALER).read_text()).get("scaling_factor"):
            scale = float(json.loads((folder / SCALER).read_text())["scaling_factor"])
        else:
            warnings.warn(f"{folder}: normalize_activations='expected_average_only_in' without a scaling factor "
                          f"({SCALER}); loading unscaled, as SAELens's load_from_disk does")
    elif norm != "none":
        raise ValueError(f"{folder}: normalize_activations={norm!r} is a per-token normalisation mmlens SAEs do not "
                         f"have; readable: 'none', 'expected_average_only_in'")
    if doc.get("reshape_activations", "none") not in ("none", None):
        warnings.warn(f"{folder}: reshape_activations={doc['reshape_activations']!r}; inputs must be given "
                      f"flattened to d_in={doc['d_in']}")
    w = {k: v.double() for k, v in load_file(str(folder / WEIGHTS)).items()}
    missing = {"W_enc", "W_dec", "b_dec"} - set(w)
    if missing:
        raise ValueError(f"{folder / WEIGHTS}: missing {sorted(missing)} (has {sorted(w)})")
    d_in, d_sae = int(doc["d_in"]), int(doc["d_sae"])
    b_enc = w.get("b_enc", torch.zeros(d_sae, dtype=torch.float64))
    W_enc, W_dec, b_dec = w["W_enc"], w["W_dec"], w["b_dec"]
    if doc.get("apply_b_dec_to_input", True) is False:
        b_enc = b_enc + b_dec @ W_enc
    threshold = w.get("threshold")
    if arch == "topk" and doc.get("rescale_acts_by_decoder_norm"):
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * n, b_enc * n, W_dec / n[:, None]
    ours = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[arch]
    k = int(doc.get("k") or 32)
    details = meta.get("training_architecture_details") or {}
    if arch == "jumprelu" and meta.get("training_architecture") in ("batchtopk", "matryoshka_batchtopk") \
            and threshold is not None and bool((threshold == threshold[0]).all()):
        ours = "batchtopk"
        k = int(details.get("k") or k)
    dtype = str(doc.get("dtype", "float32")).replace("torch.", "")
    kw = dict(d_in=d_in, d_sae=d_sae, architecture=ours, k=min(k, d_sae), normalize="none",
              hook_name=hook_name or meta.get("hook_name") or doc.get("hook_name"),
              dtype=dtype if dtype in DTYPES else "float32")
    cfg = config_cls(**kw)
    widths = details.get("matryoshka_widths")
    if widths:  # training-only: kept so that fine-tuning goes on with the same nested loss
        widths = list(widths) + ([d_sae] if list(widths)[-1] != d_sae else [])  # SAELens appends d_sae too
        try:
            cfg = config_cls(**kw, matryoshka_widths=widths,
                             matryoshka_aux=bool(details.get("use_matryoshka_aux_loss", False)))
        except ValueError as e:
            warnings.warn(f"{folder}: ignoring its training detail matryoshka_widths ({e})")
    sae = sae_cls(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(b_dec)
        sae.input_scale.fill_(scale)  # SAELens's scaler: encode(x * s), decode(f) / s; ours exactly
        if ours == "jumprelu":
            sae.log_threshold.copy_(threshold.clamp_min(0).log() if threshold is not None else
                                    torch.full((d_sae,), -math.inf))
        elif ours == "batchtopk":
            sae.batch_threshold.fill_(float(threshold[0]))
    return sae
