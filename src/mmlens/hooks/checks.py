"""Validation at the boundary: what users pass to `Lens` calls, checked before any hook or model runs, with
errors that name the argument, what was passed and what is allowed."""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

# Inputs a processor returns as tensors; a list, string, array or image under one of these keys is a mistake.
TENSOR_KEYS = frozenset({
    "input_ids", "attention_mask", "pixel_values", "token_type_ids", "position_ids", "image_grid_thw",
    "mm_token_type_ids", "pixel_attention_mask", "inputs_embeds", "labels", "decoder_input_ids",
    "decoder_attention_mask", "pixel_values_videos", "video_grid_thw", "image_sizes",
})
# Keyword arguments every transformers model accepts through **kwargs (besides TransformersKwargs).
_GENERIC_KWARGS = {"return_dict", "use_cache", "past_key_values", "cache_position", "output_attentions",
                   "output_hidden_states"}
PROCESSOR_HINT = "lens.processor(text=..., images=..., return_tensors='pt')"


def _describe(x: Any) -> str:
    mod = type(x).__module__.split(".")[0]
    return f"{mod}.{type(x).__name__}" if mod not in ("builtins",) else type(x).__name__


def _is_image(x: Any) -> bool:
    return type(x).__module__.startswith("PIL.")


def check_hook_map(fns: Any, arg: str) -> Mapping:
    """`hooks=`/`fns=`: a mapping {name or glob: fn or [fn, ...]} of callables."""
    if fns is None:
        return {}
    if not isinstance(fns, Mapping):
        raise TypeError(f"{arg} must be a dict {{hook-point name or glob: fn(value, ctx)}}; got {_describe(fns)}")
    for key, value in fns.items():
        if not isinstance(key, str):
            raise TypeError(f"{arg}: keys must be hook-point names or globs (str); got {_describe(key)} {key!r:.60}")
        chain = list(value) if isinstance(value, (list, tuple)) else [value]
        if not chain:
            raise ValueError(f"{arg}[{key!r}] is an empty list; give a function fn(value, ctx) or drop the key")
        for fn in chain:
            if not callable(fn):
                raise TypeError(f"{arg}[{key!r}] must be a function fn(value, ctx) -> Tensor | None, or a list of them; "
                                f"got {_describe(fn)} {fn!r:.60}")
    return fns


def check_steps(steps: Iterable[int] | None, arg: str, n_steps: int | None = None) -> set[int] | None:
    """Step indices (0-based; negatives count from the end when the number of steps is known)."""
    if steps is None:
        return None
    if isinstance(steps, (int, str, bytes)) or not isinstance(steps, Iterable):
        raise TypeError(f"{arg} must be an iterable of step indices (e.g. range(3, 8) or [0, 5]); got {_describe(steps)} "
                        f"{steps!r:.60}")
    out = set()
    for s in steps:
        if isinstance(s, bool) or not hasattr(s, "__index__") or isinstance(s, torch.Tensor) and (
                s.dim() or s.is_floating_point()):
            raise TypeError(f"{arg} must hold ints (denoising step indices); got {_describe(s)} {s!r:.60}")
        s = int(s)
        if n_steps is None:
            if s < 0:
                raise ValueError(f"{arg}: negative step {s} needs the number of steps; pass it to lens.generate "
                                 "(num_inference_steps), or give non-negative indices")
        else:
            if not -n_steps <= s < n_steps:
                raise ValueError(f"{arg}: step {s} is out of range for num_inference_steps={n_steps} "
                                 f"(allowed: 0 to {n_steps - 1}, or -{n_steps} to -1)")
            s %= n_steps
        out.add(s)
    if not out:
        raise ValueError(f"{arg} is empty: no step would fire; pass None for every step")
    return out


def reject_unknown(unknown: Mapping, allowed: Iterable[str], where: str) -> None:
    """Keyword arguments a method does not take: a clear error with the close matches, not Python's bare one."""
    if unknown:
        k = next(iter(unknown))
        close = difflib.get_close_matches(k, sorted(allowed), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TypeError(f"{where}: unknown keyword argument {k!r}.{hint} Allowed: {', '.join(sorted(allowed))}")


@functools.lru_cache(maxsize=64)
def _accepted(fn: Callable) -> tuple[frozenset[str], bool]:
    """(named parameters, has **kwargs) of a forward / __call__."""
    params = inspect.signature(fn).parameters
    named = frozenset(n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self")
    return named, any(p.kind == p.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=1)
def _transformers_kwargs() -> frozenset[str]:
    try:
        from transformers.utils.generic import TransformersKwargs

        return frozenset(TransformersKwargs.__annotations__) | _GENERIC_KWARGS
    except ImportError:  # pragma: no cover - older transformers
        return frozenset(_GENERIC_KWARGS)


def check_keywords(keys: Iterable[str], fn: Callable, owner: str, extra: Iterable[str] = (), where: str = "",
                   suggest: Iterable[str] = ()) -> None:
    """Every key must be a parameter `fn` really uses: a misspelt keyword (`hook=` for `hooks=`) must not vanish
    into a model's **kwargs. `suggest`: the calling method's own parameters, offered as corrections too."""
    named, _ = _accepted(fn)
    allowed = named | frozenset(extra)
    bad = [k for k in keys if k not in allowed]
    if bad:
        k = bad[0]
        close = difflib.get_close_matches(str(k), sorted(allowed | frozenset(suggest)), n=4, cutoff=0.6)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise TypeError(f"{where}unknown keyword argument {k!r} for {owner}.{hint} Allowed: {', '.join(sorted(allowed))}")


def check_model_inputs(lens, inputs: Any, kwargs: dict, where: str, suggest: Iterable[str] = (), *,
                       for_forward: bool = True) -> dict:
    """Processor output (or keyword tensors) for a transformers model: a mapping of tensors the forward accepts.
    `for_forward=False` checks only the form (the token map reads input_ids alone)."""
    if inputs is not None and not isinstance(inputs, Mapping):
        what = _describe(inputs)
        if _is_image(inputs) or isinstance(inputs, str):
            hint = f"pass it through the processor first: {PROCESSOR_HINT}"
        elif isinstance(inputs, torch.Tensor):
            hint = "pass a dict naming it, e.g. {'pixel_values': x} or {'input_ids': ids}"
        else:
            hint = f"use what the processor returns: {PROCESSOR_HINT}"
        raise TypeError(f"{where}: inputs must be a mapping of tensors (processor output); got {what}; {hint}")
    merged = {**dict(inputs or {}), **kwargs}
    for key, value in merged.items():
        if not isinstance(key, str):
            raise TypeError(f"{where}: input names must be strings; got {_describe(key)} {key!r:.60}")
        if value is None or isinstance(value, torch.Tensor):
            continue
        if _is_image(value) or (isinstance(value, (list, tuple)) and value and _is_image(value[0])):
            raise TypeError(f"{where}: inputs[{key!r}] is an image ({_describe(value)}); images go through the "
                            f"processor first: {PROCESSOR_HINT}")
        if key in TENSOR_KEYS and (isinstance(value, (list, tuple, str)) or hasattr(value, "__array__")):
            raise TypeError(f"{where}: inputs[{key!r}] is a {_describe(value)}, not a torch.Tensor; call the processor "
                            "with return_tensors='pt'")
    if for_forward:
        model = lens.model
        check_keywords(merged, type(model).forward, type(model).__name__, _transformers_kwargs(), f"{where}: ", suggest)
        _check_content(lens, merged, where)
    return merged


def _check_content(lens, x: dict, where: str) -> None:
    """Family rules the model would otherwise break on deep inside, or silently run without."""
    model, cfg = lens.model, lens.model.config
    ids, pix = x.get("input_ids"), x.get("pixel_values")
    mask = x.get("attention_mask")
    if ids is not None and mask is not None and tuple(ids.shape) != tuple(mask.shape):
        raise ValueError(f"{where}: input_ids has shape {tuple(ids.shape)} but attention_mask {tuple(mask.shape)}; "
                         "they must match")
    vcfg = getattr(cfg, "vision_config", None) if hasattr(cfg, "vision_config") else (
        cfg if hasattr(cfg, "image_size") and hasattr(cfg, "patch_size") else None)
    if pix is not None and vcfg is not None and hasattr(vcfg, "image_size") and lens.architecture != "qwen2_vl":
        size = vcfg.image_size
        if pix.dim() != 4 or pix.shape[1] != getattr(vcfg, "num_channels", 3):
            raise ValueError(f"{where}: pixel_values has shape {tuple(pix.shape)}; expected (batch, "
                             f"{getattr(vcfg, 'num_channels', 3)}, {size}, {size}) as {PROCESSOR_HINT} returns")
        if tuple(pix.shape[-2:]) != (size, size) and not x.get("interpolate_pos_encoding"):
            raise ValueError(f"{where}: images of {pix.shape[-2]}x{pix.shape[-1]} pixels; {type(model).__name__} takes "
                             f"{size}x{size} (resize through the processor, or pass interpolate_pos_encoding=True "
                             "where the model supports it)")
    if lens.architecture == "qwen2_vl" and pix is not None:
        vc = cfg.vision_config
        width = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        if pix.dim() != 2 or pix.shape[-1] != width:
            raise ValueError(f"{where}: pixel_values has shape {tuple(pix.shape)}; Qwen2-VL takes flattened patches "
                             f"(patches, {width}) as {PROCESSOR_HINT} returns")
        if x.get("image_grid_thw") is None:
            raise ValueError(f"{where}: pixel_values without image_grid_thw (each image's (t, h, w) patch grid); "
                             f"pass both, as {PROCESSOR_HINT} returns them")
    if lens.family == "contrastive" and hasattr(model, "vision_model") and hasattr(model, "text_model"):
        if (ids is None) != (pix is None) or ids is None:
            have = "pixel_values only" if ids is None and pix is not None else "input_ids only" if pix is None and \
                ids is not None else "neither input_ids nor pixel_values"
            raise ValueError(f"{where}: {type(model).__name__} compares images with texts and needs both input_ids and "
                             f"pixel_values; got {have}. For one side, hook the same names through "
                             "lens.model.get_image_features(...) / get_text_features(...) inside `with lens.hooks(...)`, "
                             "or load the tower alone (e.g. CLIPVisionModelWithProjection)")
    if lens.family == "generative" and ids is not None:
        token = getattr(cfg, "image_token_id", None)
        token = getattr(cfg, "image_token_index", None) if token is None else token
        n_tokens = int((ids == token).sum()) if token is not None else 0
        if n_tokens and pix is None and x.get("inputs_embeds") is None:
            raise ValueError(f"{where}: input_ids hold {n_tokens} image tokens but no pixel_values were given; the model "
                             f"would run without the image. Build inputs with {PROCESSOR_HINT}")
        per_image = lens.adapter.tokens_per_image()
        if pix is not None and per_image and pix.dim() == 4 and n_tokens != pix.shape[0] * per_image:
            raise ValueError(f"{where}: {pix.shape[0]} image(s) of {per_image} tokens each need {pix.shape[0] * per_image} "
                             f"image tokens in input_ids; found {n_tokens}. Let the processor expand the image "
                             f"placeholder: {PROCESSOR_HINT}")


def check_pipeline_kwargs(lens, kwargs: dict, where: str, suggest: Iterable[str] = ()) -> None:
    """Keyword arguments of a diffusers pipeline call must be parameters of its __call__."""
    call = type(lens.model).__call__
    check_keywords(kwargs, call, type(lens.model).__name__, ("callback", "callback_steps"), f"{where}: ", suggest)


def _default(lens, kwargs: dict, name: str):
    """A pipeline call's argument: given, else the default of its __call__ signature (None if it has none)."""
    if name in kwargs:
        return kwargs[name]
    p = inspect.signature(type(lens.model).__call__).parameters.get(name)
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def default_guidance(lens, kwargs: dict) -> bool | None:
    """Whether a pipeline call runs classifier-free guidance (its guidance_scale > 1), None if it cannot be told."""
    scale = _default(lens, kwargs, "guidance_scale")
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"guidance_scale must be a number; got {scale!r:.40}")
    return scale > 1


def default_steps(lens, kwargs: dict) -> int | None:
    """The number of denoising steps a pipeline call will run (its argument, else its signature's default)."""
    n = _default(lens, kwargs, "num_inference_steps")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"num_inference_steps must be a positive int; got {n!r}")
    return n


def check_grad(grad: Any) -> None:
    if not isinstance(grad, bool):
        raise TypeError(f"grad must be True or False; got {_describe(grad)} {grad!r:.40}")


def check_cache_options(grad: bool, cache_device, cache_dtype, attn_rows, attn_heads) -> None:
    check_grad(grad)
    if grad and (cache_device is not None or cache_dtype is not None):
        raise ValueError("grad=True keeps the recorded tensors in the autograd graph; cache_device/cache_dtype would "
                         "record copies outside it. Move or cast the values after computing gradients")
    if grad and (attn_rows is not None or attn_heads is not None):
        raise ValueError("grad=True records full attention maps in the graph; attn_rows/attn_heads select copies "
                         "outside it. Drop them, and index the recorded map after computing gradients")
