"""Where each word of a prompt acts in the image: cross-attention word maps (DAAM, Tang et al. 2023) for Stable
Diffusion UNets and PixArt, and for SD3's joint attention either the image->text block of the attention pattern or
ConceptAttention's output-space similarity (Helbling et al. 2025).

    res = word_maps(sd, "a red square", num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    res.iou(judged_mask, "square")               # a MapResult: maps (images, words, h, w) over the images made
    res.segmentation(["red", "square"])          # zero-shot segmentation: per pixel the strongest word, or -1
    word_maps(sd, "a red square", image=photo, strength=0.6)   # img2img: maps over an existing image

A word's map is the attention its tokens receive from every image position, summed over the chosen heads, layers
(sites) and denoising steps of the conditional branch, each layer's map upsampled to the finest layer's grid
(upsampling is linear, so summing per resolution first is exact). Maps accumulate inside the hooks: nothing per
step is kept, so a 50-step SD run at 512 px costs a few (words, 64, 64) buffers, not the attention maps.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..hooks.steps import branch_rows
from ._denoising import Denoising
from .maps import MapResult, images_uint8, normalise, upsample
from .result import provenance, require_family

MODES = ("pattern", "value", "output")
_WORD = re.compile(r"[\w'-]+")


@dataclasses.dataclass(repr=False)
class WordMapResult(MapResult):
    """MapResult plus the prompts, which words each prompt holds (`present`, (images, labels) bool: a word missing
    from an image's prompt has an all-zero map), and the sites and steps summed."""

    prompts: list[str]
    present: Tensor
    names: list[str]
    steps: list[int]

    def segmentation(self, labels: Sequence[str] | None = None, threshold: float = 0.4
                     ) -> Tensor:
        """(images, H, W) int: per pixel the index (into `labels`) of the word whose normalised map is highest
        there, -1 where none reaches `threshold` (DAAM's 0.4) or the word is absent from that image's prompt."""
        if isinstance(threshold, str) or not 0.0 <= threshold <= 1.0:  # words compete on one scale: no "mean"
            raise ValueError(f"threshold={threshold!r}; allowed: a fraction in [0, 1] of each map's range")
        labels = list(labels) if labels is not None else list(self.labels)
        idx = [self._index(lb)[0] for lb in labels]
        up = normalise(upsample(self.maps[:, idx], self.size))
        up = torch.where(self.present[:, idx, None, None], up, torch.zeros_like(up))
        best, arg = up.max(1)
        return torch.where(best > threshold, arg, torch.full_like(arg, -1))


def _prompt_words(prompt: str) -> list[str]:
    return _WORD.findall(prompt.lower())


def _positions(tok, prompt: str, words: Sequence[str], max_length: int) -> dict[str, list[int]]:
    """Token positions of each word in the padded token sequence the pipeline builds: the word's own tokens found
    as a run in the prompt's ids, in order (a repeated word gets all its occurrences)."""
    ids = tok(prompt, padding="max_length", max_length=max_length, truncation=True)["input_ids"]
    out: dict[str, list[int]] = {}
    for w in dict.fromkeys(words):
        cands = []
        for form in (w, " " + w):
            piece = list(tok(form, add_special_tokens=False)["input_ids"])
            if piece and piece not in cands:
                cands.append(piece)
        hits: list[int] = []
        for piece in cands:
            n = len(piece)
            for s in range(len(ids) - n + 1):
                if ids[s:s + n] == piece:
                    hits.extend(range(s, s + n))
            if hits:
                break
        out[w] = sorted(set(hits))
    return out


def _text_streams(lens) -> list[tuple[object, int, int]]:
    """(tokenizer, max_length, offset of its tokens in the text sequence the denoiser attends to) per stream."""
    pipe = lens.model
    arch = lens.architecture
    if arch == "sd3":
        clip_len = pipe.tokenizer.model_max_length
        streams = [(pipe.tokenizer, clip_len, 0)]
        if getattr(pipe, "tokenizer_3", None) is not None and getattr(pipe, "text_encoder_3", None) is not None:
            streams.append((pipe.tokenizer_3, None, clip_len))
        return streams
    if arch == "pixart":
        return [(pipe.tokenizer, None, 0)]
    return [(pipe.tokenizer, pipe.tokenizer.model_max_length, 0)]


def _grid(q: int, height: int, width: int) -> tuple[int, int]:
    h = max(1, round((q * height / width) ** 0.5))
    if q % h:
        raise ValueError(f"{q} query tokens do not form a grid with the image's aspect {height}x{width}")
    return h, q // h


def _cond(value: Tensor, ctx) -> Tensor:
    """The conditional branch's rows of a guidance batch (the whole batch when there is no guidance)."""
    return branch_rows(value, ctx.branches, "cond") if ctx.branches and "cond" in ctx.branches else value


def _default_names(lens, mode: str) -> str:
    if lens.architecture == "sd3":
        return "dit.blocks.*.joint.pattern" if mode == "pattern" else "dit.blocks.*.joint.z"
    if mode == "output":
        raise ValueError(f"mode='output' (ConceptAttention) needs joint attention (SD3); {lens.architecture} has "
                         "cross-attention: use mode='pattern' or 'value'")
    return "dit.blocks.*.cross.pattern" if lens.architecture == "pixart" else "unet.*.cross.pattern"


def word_maps(lens, prompt: str | Sequence[str], words: Sequence[str] | None = None, *,
              names: str | Sequence[str] | None = None, steps: Sequence[int] | None = None,
              heads: Sequence[int] | Mapping[str, Sequence[int]] | None = None, mode: str = "pattern", image=None,
              progress: bool = False,
              **generate_kwargs) -> WordMapResult:
    """Per word, the cross-attention it receives at every image position, over the images the call generates.

    `prompt`: one or several (one image each; `num_images_per_prompt` is not supported). `words`: which words to
    map (default: every word of the prompts, in order); a word absent from a prompt gets a zero map there.
    `names`: attention-pattern sites to sum (default: every cross-attention; SD3: every joint attention's
    image->text block), `steps`: denoising step indices (default: all), `heads`: head indices (default: all), or a
    dict site (name or glob) -> head indices that chooses heads per site, the sites being its keys (then leave
    `names` out): on the diffusion organism one head of one layer localises the shape word at ~0.5 mIoU while the
    sum over every head (DAAM's default) gives ~0.26 (benchmarks/scores/word_maps.py).
    `mode="value"` (cross-attention: UNets, PixArt): each head's attention to a token weighted by the norm of what
    that token writes through the head, ||W_O^h v_h(token)|| (Kobayashi et al. 2020, "Attention is not only a
    weight"): heads and tokens that attend but write little (padding, end-of-text) count for less.
    `mode="output"` (SD3): ConceptAttention's map, softmax over text tokens of image-token . text-token attention
    outputs (`dit.blocks.*.joint.z` with the paired `joint.context_z`; a block without a text output is skipped).
    `image` (+ `strength`): img2img on an existing image (the pipeline is re-used through diffusers' `from_pipe`).
    Other keywords go to the pipeline (num_inference_steps, guidance_scale, generator, height, width).
    """
    require_family(lens, "diffusion", "word_maps")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {MODES}")
    if "num_images_per_prompt" in generate_kwargs and generate_kwargs["num_images_per_prompt"] != 1:
        raise ValueError("word_maps: num_images_per_prompt is not supported; repeat the prompt in a list instead")
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompt: give a non-empty string or a list of them")
    if image is not None:
        lens = _img2img(lens)
        generate_kwargs["image"] = image
    elif "image" in generate_kwargs:
        raise TypeError("pass the img2img image as word_maps(..., image=...)")
    if lens.architecture == "pixart":
        generate_kwargs.setdefault("clean_caption", False)  # token positions must be those of the prompt as given
    labels = list(dict.fromkeys(w.lower() for w in words)) if words is not None else \
        list(dict.fromkeys(w for p in prompts for w in _prompt_words(p)))
    if not labels:
        raise ValueError("words: nothing to map")
    per_site: dict[str, list[int]] | None = None
    if isinstance(heads, Mapping):
        if names is not None:
            raise ValueError("heads as a dict names the sites (its keys); leave names out")
        if not heads:
            raise ValueError("heads: an empty dict selects no site")
        per_site = {}
        for key, hs in heads.items():
            for n in lens.resolve(key, arg="heads"):
                per_site[n] = [int(h) for h in hs]
        names, heads = list(per_site), None
    sites = lens.resolve(names if names is not None else _default_names(lens, mode), arg="names")
    want = "z" if mode == "output" else "pattern"
    if mode == "value" and lens.architecture == "sd3":
        raise ValueError("mode='value' weights cross-attention by its value norms; SD3's joint attention: use "
                         "mode='pattern' or 'output'")
    bad = [n for n in sites if not n.endswith("." + want) or (".self." in n)]
    if bad:
        raise ValueError(f"names: {bad[:3]} are not {'joint-attention z' if want == 'z' else 'cross/joint attention pattern'} "
                         f"sites; allowed: {lens.hook_points(_default_names(lens, mode))[:4]} ...")

    # token positions of every label in every prompt, in the text sequence the denoiser attends to
    pos: list[dict[str, list[int]]] = []
    for p in prompts:
        merged: dict[str, list[int]] = {w: [] for w in labels}
        for tok, max_len, offset in _text_streams(lens):
            if max_len is None:
                max_len = generate_kwargs.get("max_sequence_length",
                                              120 if lens.architecture == "pixart" else 256)
            for w, ps in _positions(tok, p, labels, max_len).items():
                merged[w] += [offset + q for q in ps]
        pos.append(merged)
    present = torch.tensor([[bool(pp[w]) for w in labels] for pp in pos])
    if words is not None and not present.any(0).all():
        missing = [w for w, ok in zip(labels, present.any(0)) if not ok]
        raise ValueError(f"words {missing} are in no prompt's tokens; the prompts' words: "
                         f"{sorted({w for p in prompts for w in _prompt_words(p)})}")

    height = generate_kwargs.get("height") or Denoising(lens).resolution()
    width = generate_kwargs.get("width") or height
    head_idx = [int(h) for h in heads] if heads is not None else None
    sums: dict[tuple[int, int], Tensor] = {}  # grid -> (prompts, text_tokens, h, w)
    used_steps: set[int] = set()
    pending: dict[tuple[str, str], Tensor] = {}

    def add(img_to_text: Tensor, step: int) -> None:
        """(batch, queries, text_tokens) for one site and step -> the running sum at its grid."""
        b, q, t = img_to_text.shape
        h, w = _grid(q, height, width)
        m = img_to_text.float().transpose(1, 2).reshape(b, t, h, w).cpu()
        sums[(h, w)] = sums[(h, w)] + m if (h, w) in sums else m
        used_steps.add(step)

    def heads_of(x: Tensor, dim: int, site: str) -> Tensor:
        chosen = per_site[site] if per_site is not None else head_idx
        if chosen is None:
            return x
        if not chosen or max(chosen) >= x.shape[dim] or min(chosen) < -x.shape[dim]:
            raise ValueError(f"heads={chosen} at {site}: the attention has {x.shape[dim]} heads")
        return x.index_select(dim, torch.tensor(chosen, device=x.device))

    def on_value(value: Tensor, ctx):
        """(batch, keys, heads, d_head) values -> pending (batch, heads, keys) norms of W_O^h v for the pattern."""
        block = ctx.name.rsplit(".", 1)[0]
        out = lens.sites[block + ".out"].module.weight  # W_O: attention output -> residual
        v = _cond(value, ctx).float()
        w = out.detach().float().view(out.shape[0], v.shape[2], v.shape[3])  # (d_model, heads, d_head)
        pending[(block + ".pattern", "norms")] = torch.einsum("bthd,mhd->bthm", v, w).norm(dim=-1).transpose(1, 2)

    def on_pattern(value: Tensor, ctx):
        a = _cond(value, ctx)
        if mode == "value":
            a = a * pending.pop((ctx.name, "norms")).to(a.device, a.dtype)[:, :, None, :]
        a = heads_of(a, 1, ctx.name).sum(1)  # (batch, queries, keys)
        if lens.architecture == "sd3":
            n_img = _image_tokens(lens, height, width)
            a = a[:, :n_img, n_img:]
        add(a, ctx.step)

    def pair(value: Tensor, ctx, side: str):
        """Image z and text z of one attention call arrive as two hooks, in an order the processor decides
        (diffusers' joint processor projects the text stream first): the second one computes the map."""
        block = ctx.name.rsplit(".", 1)[0]
        pending[(block, side)] = heads_of(_cond(value, ctx), 2, block + ".z")
        img, txt = pending.get((block, "image")), pending.get((block, "text"))
        if img is None or txt is None:
            return
        del pending[(block, "image")], pending[(block, "text")]
        sims = torch.einsum("bnhd,bthd->bnt", img.float(), txt.float())
        add(sims.softmax(-1), ctx.step)

    if mode == "pattern":
        hooks = {n: on_pattern for n in sites}
    elif mode == "value":
        hooks = {n: on_pattern for n in sites}
        hooks.update({n.rsplit(".", 1)[0] + ".v": on_value for n in sites})
    else:
        paired = [n for n in sites if n.rsplit(".", 1)[0] + ".context_z" in lens.sites]
        hooks = {n: lambda v, ctx: pair(v, ctx, "image") for n in paired}
        hooks.update({n.rsplit(".", 1)[0] + ".context_z": lambda v, ctx: pair(v, ctx, "text") for n in paired})
    generate_kwargs.setdefault("output_type", "np")
    out, _ = lens.generate(prompts, names=[], hooks=hooks, steps=steps, progress=progress, **generate_kwargs)
    if not sums:
        raise ValueError(f"no attention was recorded at {sites[:3]} (steps={steps}); nothing to map")
    hm, wm = max(sums, key=lambda g: g[0] * g[1])
    total = sum(upsample(s, (hm, wm)) for s in sums.values())  # (prompts, text_tokens, hm, wm)
    maps = torch.zeros(len(prompts), len(labels), hm, wm)
    for i, pp in enumerate(pos):
        for j, w in enumerate(labels):
            if pp[w]:
                maps[i, j] = total[i, pp[w]].sum(0)
    chosen = per_site if per_site is not None else head_idx
    return WordMapResult(meta=provenance(lens, sites, mode=mode, heads=chosen), maps=maps,
                         images=images_uint8(list(out.images)), labels=labels, method=f"word_maps ({mode})",
                         prompts=prompts, present=present, names=list(sites), steps=sorted(used_steps))


def _image_tokens(lens, height: int, width: int) -> int:
    """How many image tokens lead SD3's joint sequence (the text tokens follow)."""
    pipe = lens.model
    f = getattr(pipe, "vae_scale_factor", 8) * pipe.transformer.config.patch_size
    return (height // f) * (width // f)


def _img2img(lens):
    """The img2img twin of a text-to-image pipeline (same modules), as a lens; an img2img lens is kept."""
    if "Img2Img" in type(lens.model).__name__:
        return lens
    from diffusers import AutoPipelineForImage2Image

    from ..loading import load

    try:
        twin = AutoPipelineForImage2Image.from_pipe(lens.model)
    except Exception as err:  # noqa: BLE001  diffusers raises ValueError/KeyError for pipelines without a twin
        raise TypeError(f"word_maps(image=...): {type(lens.model).__name__} has no img2img pipeline in diffusers "
                        f"({err})") from err
    return load(twin, processor=lens.processor)

