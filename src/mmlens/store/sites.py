"""What the store can record for a model, and the checks and helpers every family's collector shares."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .layout import Tokens

Acts = dict[str, Tensor]
Meta = dict[str, Tensor]


def check_names(lens, names) -> list[str]:
    """Canonical names the store can hold for this model (unknown names list the close ones: lens.resolve)."""
    if names is None:
        raise ValueError("names is required: the hook point(s) to store, e.g. 'vision.blocks.2.resid_post' (globs "
                         "allowed); see lens.hook_points()")
    resolved = lens.resolve(names)
    if not resolved:
        raise ValueError(f"names={names!r} matches no hook point")
    maps = [n for n in resolved if lens.sites[n].row.read == "pattern"]
    if maps:
        raise ValueError(f"{maps}: attention maps are (heads, queries, keys) per example, not one vector per token; "
                         "store the q/k/v/z or out sites instead")
    if lens.family == "contrastive":
        towers = {tower_of(n) for n in resolved}
        if len(towers) > 1:
            raise ValueError(f"names span the {sorted(towers)} towers; one store holds one token sequence per "
                             "example, so write one store per tower")
    if lens.family == "diffusion":
        _check_diffusion_names(lens, resolved)
    return resolved


def component(lens, name: str) -> str:
    """The pipeline component a diffusion site lies in ('unet', 'transformer', 'text_encoder_2', ...)."""
    return lens.sites[name].path.split(".", 1)[0]


def text_encoder_of(lens, names: list[str]) -> str | None:
    """The text encoder a diffusion store's names lie in, or None for denoiser names (check_names made them one)."""
    if lens.family != "diffusion":
        return None
    comp = component(lens, names[0])
    return comp if comp in getattr(lens.adapter, "text_encoders", ()) else None


def _check_diffusion_names(lens, resolved: list[str]) -> None:
    den, encoders = lens.adapter.denoiser, tuple(getattr(lens.adapter, "text_encoders", ()))
    comps = {n: component(lens, n) for n in resolved}
    off = [n for n, c in comps.items() if c != den and c not in encoders]
    if off:
        raise ValueError(f"{off} are neither denoiser ({den}) nor text-encoder ({', '.join(encoders)}) sites: the "
                         f"store records the {den}'s latent tokens at every denoising step, or one text encoder's "
                         "prompt tokens")
    used = sorted(set(comps.values()))
    if den in used and len(used) > 1:
        te = [n for n, c in comps.items() if c != den]
        raise ValueError(f"names mix denoiser sites and text-encoder sites ({te[:3]}{'...' if len(te) > 3 else ''}): "
                         f"their token rows differ (the {den}'s latent cells at every step and guidance branch, the "
                         "text encoder's prompt tokens once), so one store cannot hold both; write one store each")
    if len(used) > 1:
        raise ValueError(f"names span the text encoders {used}: each has its own tokenizer and token rows; write one "
                         "store per text encoder")


def tower_of(name: str) -> str:
    head = name.split(".", 1)[0]
    if head in ("vision", "text"):
        return head
    raise ValueError(f"{name!r}: a contrastive store reads vision.* or text.* tower sites (one tower runs per "
                     "batch); for the embeddings use vision.proj / text.proj")


def tokenizer(lens):
    return getattr(lens.processor, "tokenizer", lens.processor)


def store_tokenizer(lens, names: list[str]):
    """The tokenizer whose ids a store of `names` holds: a pipeline text encoder's own (text_encoder_2 ->
    tokenizer_2), else the lens processor's."""
    enc = text_encoder_of(lens, names)
    if enc is not None:
        return getattr(lens.model, "tokenizer" + enc.removeprefix("text_encoder"), None)
    return tokenizer(lens)


def special_ids(lens) -> Tensor:
    return tokenizer_special_ids(tokenizer(lens))


def tokenizer_special_ids(tok) -> Tensor:
    """A tokenizer's special token ids (BOS, EOS, padding, ...), int64; none for a tokenizer that lists none."""
    return torch.tensor(sorted(getattr(tok, "all_special_ids", None) or []), dtype=torch.int64)


def same_layout(acts: dict[str, Tokens], names: list[str]) -> None:
    first = acts[names[0]]
    for n in names[1:]:
        t = acts[n]
        spatial = {t.kind, first.kind} == {"map", "seq"}  # a feature map and a token sequence in raster order
        if t.x.shape[:2] != first.x.shape[:2] or t.kind != first.kind and not spatial:
            raise ValueError(f"{names[0]} gives {first.kind} tokens of shape {tuple(first.x.shape[:2])} (rows, tokens) "
                             f"but {n} gives {t.kind} {tuple(t.x.shape[:2])}; one store holds names with the same "
                             "token rows: write one store per layout")


def pack(names, toks: dict[str, Tokens], keep: Tensor) -> Acts:
    k = keep.to(toks[names[0]].x.device)
    return {n: toks[n].x[k] for n in names}


def attention_keep(inputs: Mapping, ids: Tensor) -> Tensor:
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and mask.shape == ids.shape:
        return mask.bool().cpu()
    return torch.ones(ids.shape, dtype=torch.bool)


def once(got: dict[str, list[Tensor]], name: str) -> Tensor:
    vals = got.get(name)
    if not vals:
        raise ValueError(f"{name} did not fire: this run does not reach it (for a contrastive model one tower runs "
                         "at a time, so joint outputs such as image_embeds or logits never do; use vision.proj / "
                         "text.proj)")
    if len(vals) > 1:
        raise ValueError(f"{name} fired {len(vals)} times in one forward; the store takes sites that fire once")
    return vals[0]


def check_run_kwargs(lens, run_kwargs: dict, names: list[str] | None = None) -> None:
    if run_kwargs and lens.family != "diffusion":
        raise TypeError(f"unexpected keywords {sorted(run_kwargs)}: run keywords go to lens.generate for diffusion "
                        f"prompts; {lens.architecture} is a {lens.family} model")
    if run_kwargs and names and text_encoder_of(lens, names) is not None:
        from .text_encoder import encode_options

        allowed = encode_options(lens)
        bad = sorted(set(run_kwargs) - set(allowed))
        if bad:
            raise TypeError(f"unexpected keywords {bad}: a text-encoder store runs only the pipeline's prompt "
                            f"encoding (no denoising), which takes {allowed or 'no options'}")
