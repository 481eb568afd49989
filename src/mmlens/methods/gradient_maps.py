"""Gradient and perturbation maps over the input pixels (saliency, integrated gradients, Grad-CAM, occlusion): which
pixels a CLIP / SigLIP image-text logit, or a VLM's answer logit, depends on.

    res = gradient_map(vlm, inputs, "red")                                    # IG, black baseline, 32 steps
    res = gradient_map(clip, inputs, 0, method="saliency")                    # |d logit / d pixels|
    res = gradient_map(clip, inputs, 0, method="smoothgrad", samples=32)      # saliency averaged over noisy copies
    res = gradient_map(clip, inputs, 0, method="grad_cam", name="vision.blocks.2.resid_post")
    res = gradient_map(vlm, inputs, "red", method="occlusion")                # one window per patch
    res.maps; res.pointing_game(masks, "red"); res.delta                      # a MapResult; IG's completeness gap

Why wire it here: Captum computes these, but on a VLM the forward it needs (pixels in, one target logit per example
out, input_ids and the rest held fixed and repeated for each batch of perturbed images) is what users write by hand
(Captum issue #1494). The targets mean what they mean in `relevancy`.

Pixel methods sum the attribution over colour channels (IG keeps its sign, so the map sums to f(x) - f(baseline)
up to `delta`); Grad-CAM lives on a site's token grid and occlusion on its windows (patch-aligned by default).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ._grad import frozen as _frozen
from .maps import MapResult
from .relevancy import (Target, answer_positions, check_contrastive, contrastive_logits, image_features,
                        parse_targets, patch_grid, pixel_images, text_features, to_device,
                        used_vision_blocks)
from .result import provenance, require_family

METHODS = ("integrated_gradients", "saliency", "smoothgrad", "grad_cam", "occlusion")
BASELINES = ("black", "zeros", "blur")


@dataclasses.dataclass(repr=False)
class GradientMapResult(MapResult):
    """MapResult plus `targets[label][image]` (token id / text index explained, -1 for an embedding), `scores`
    (images, labels) the target logit on the inputs, and for integrated gradients / occlusion `baseline_scores` the
    logit on the baseline image and `delta` (IG only) = map sum - (score - baseline score), Captum's convergence
    delta; empty tensors otherwise."""

    targets: list
    scores: Tensor
    baseline_scores: Tensor
    delta: Tensor

    def summary(self) -> str:
        return super().summary().replace("MapResult(", "GradientMapResult(", 1)


# --------------------------------------------------------------------------------------------------- forward
def _logit_fn(lens, prepared: dict, pos: Tensor | None, txt: Tensor | None
              ) -> Callable[[Tensor, Target, Tensor | None], Tensor]:
    """f(pixels, target, ids) -> (rows,) target logits; `pixels` may hold several copies of the batch (Captum stacks
    perturbed copies along the batch: copy-major), and every other input is repeated to match."""
    b = prepared["pixel_values"].shape[0]
    fixed = {k: v for k, v in prepared.items() if k != "pixel_values"}

    def tile(v, r):
        return torch.cat([v] * r) if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b and r > 1 else v

    def f(pix: Tensor, target: Target, ids: Tensor | None) -> Tensor:
        r = pix.shape[0] // b
        rows = torch.arange(pix.shape[0], device=pix.device)
        if lens.family == "generative":
            out = lens.model(pixel_values=pix, **{k: tile(v, r) for k, v in fixed.items()})
            return out.logits[rows, pos.to(pix.device).repeat(r), ids.to(pix.device).repeat(r)].float()
        img = image_features(lens, pix)
        if target.embed is not None:
            return contrastive_logits(lens, img, target.embed.to(img.device)[None])[:, 0]
        return contrastive_logits(lens, img, txt)[rows, ids.to(pix.device).repeat(r)]

    return f


def _example_major(fk: Callable[[Tensor], Tensor], b: int) -> Callable[[Tensor], Tensor]:
    """`fk` (copies stacked copy-major, as IG and occlusion stack them) for NoiseTunnel's example-major stacking
    (each example's noisy copies together): rows reordered in, and the logits back out."""
    def g(x: Tensor) -> Tensor:
        n = x.shape[0] // b
        order = torch.arange(x.shape[0], device=x.device).view(b, n).T.reshape(-1)  # copy-major <- example-major
        return fk(x[order])[torch.argsort(order)]
    return g


def _patch_size(lens) -> int | None:
    cfg = lens.model.config
    vc = getattr(cfg, "vision_config", cfg)
    p = getattr(vc, "patch_size", None)
    return int(p) if isinstance(p, int) else None


def _blur(x: Float[Tensor, "b c h w"], sigma: float) -> Float[Tensor, "b c h w"]:
    """Separable Gaussian blur with reflected borders."""
    r = max(1, min(int(math.ceil(3 * sigma)), x.shape[-1] - 1, x.shape[-2] - 1))
    t = torch.arange(-r, r + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).to(x.dtype)
    c = x.shape[1]
    y = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def make_baseline(lens, pixel_values: Tensor, baseline, blur_sigma: float | None = None) -> Tensor:
    """The reference image in the model's input space: 'black' (pixel value 0 through the processor's
    normalisation), 'zeros' (0 after normalisation: the mean colour), 'blur' (Gaussian, sigma `blur_sigma` pixels,
    default one patch), or a tensor broadcastable to pixel_values."""
    if isinstance(baseline, Tensor):
        try:
            return baseline.to(pixel_values.device, pixel_values.dtype).expand_as(pixel_values).contiguous()
        except RuntimeError:
            raise ValueError(f"baseline of shape {tuple(baseline.shape)} does not broadcast to pixel_values "
                             f"{tuple(pixel_values.shape)}") from None
    if baseline == "zeros":
        return torch.zeros_like(pixel_values)
    if baseline == "black":
        ip = getattr(lens.processor, "image_processor", None)
        mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
        if mean is None or std is None:
            raise ValueError("baseline='black' needs the processor's image_mean and image_std; give the baseline as a "
                             "tensor in the model's input space")
        c = pixel_values.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1).expand(c)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1).expand(c)
        return (-mean / std).reshape(1, c, 1, 1).to(pixel_values.device, pixel_values.dtype).expand_as(
            pixel_values).contiguous()
    if baseline == "blur":
        sigma = blur_sigma if blur_sigma is not None else float(_patch_size(lens) or pixel_values.shape[-1] / 16)
        if not sigma > 0:
            raise ValueError(f"blur_sigma must be > 0 pixels; got {blur_sigma}")
        return _blur(pixel_values.float(), sigma).to(pixel_values.dtype)
    raise ValueError(f"baseline={baseline!r}; allowed: {BASELINES} or a tensor broadcastable to pixel_values")


# ------------------------------------------------------------------------------------------------- technique
def gradient_map(lens, inputs: Mapping[str, Any], target=None, *, method: str = "integrated_gradients",
                 baseline=None, steps: int | None = None, name: str | None = None, window: int | None = None,
                 blur_sigma: float | None = None, internal_batch_size: int | None = None,
                 position: str | int = "answer", images=None, samples: int | None = None,
                 noise: float | None = None, seed: int = 0) -> GradientMapResult:
    """Pixel-space attribution of a target logit, through Captum, with pixel_values the only input varied.

    `target`, `position`: as in `relevancy` (a VLM's token id / word at the answer position, or a CLIP / SigLIP text
    index, string or embedding; None: the model's own answer / best text; a list: one map each).
    `method`: "integrated_gradients" (Sundararajan et al. 2017; `baseline` default 'black', `steps` default 32,
    Gauss-Legendre; maps at pixel resolution, signed), "saliency" (|d logit / d pixels| summed over channels, pixel
    resolution), "smoothgrad" (Smilkov et al. 2017: the saliency map averaged over `samples` copies, default 16, of
    the pixels plus Gaussian noise of std `noise` x the batch's pixel range, default 0.15; the paper's remedy for
    saliency's speckle; `seed` fixes the draws), "grad_cam" (Selvaraju et al. 2017 on ViT tokens: relu(sum_d
    mean_tokens(grad_d) * act_d) over the patch tokens of site `name`, a (batch, seq, d) residual or block output of
    the vision tower or, for VLMs, of the LM at its image tokens; default: the input of CLIP / SigLIP's last block,
    the output of a VLM's last vision block that feeds the LM), "occlusion" (Zeiler & Fergus 2014: f(x) - f(x with one
    `window` x `window` square at the baseline), windows tiling the image, default one patch; maps on the window
    grid).
    `internal_batch_size`: rows per forward for IG, SmoothGrad and occlusion (default: IG's steps and SmoothGrad's
    samples all at once, occlusion 64).
    `images`: what to draw the maps over (default: pixel_values un-normalised).
    """
    require_family(lens, ("contrastive", "generative"), "gradient_map")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    for arg, val, owner in (("baseline", baseline, ("integrated_gradients", "occlusion")),
                            ("steps", steps, ("integrated_gradients",)), ("name", name, ("grad_cam",)),
                            ("window", window, ("occlusion",)), ("blur_sigma", blur_sigma, ("integrated_gradients",
                                                                                            "occlusion")),
                            ("samples", samples, ("smoothgrad",)), ("noise", noise, ("smoothgrad",))):
        if val is not None and method not in owner:
            raise ValueError(f"{arg} applies to method {' / '.join(owner)}, not {method!r}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict (processor output); got {type(inputs).__name__}")
    pv = inputs.get("pixel_values")
    if not isinstance(pv, Tensor) or pv.dim() != 4:
        raise ValueError(f"gradient_map varies the pixels: inputs need (images, channels, H, W) pixel_values; got "
                         f"{tuple(pv.shape) if isinstance(pv, Tensor) else type(pv).__name__} ({lens.architecture} "
                         "passes flattened patches?)")
    if internal_batch_size is not None and (isinstance(internal_batch_size, bool) or not isinstance(
            internal_batch_size, int) or internal_batch_size < 1):
        raise ValueError(f"internal_batch_size must be None or an int >= 1; got {internal_batch_size!r:.40}")
    n_steps = 32 if steps is None else steps
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"steps must be an int >= 1; got {steps!r:.40}")
    n_samples = 16 if samples is None else samples
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"samples must be an int >= 1; got {samples!r:.40}")
    sd_frac = 0.15 if noise is None else noise
    if isinstance(sd_frac, bool) or not isinstance(sd_frac, (int, float)) or not sd_frac > 0:
        raise ValueError(f"noise must be a number > 0 (a fraction of the pixel range); got {noise!r:.40}")
    w = window if window is not None else _patch_size(lens)
    if method == "occlusion":
        if w is None or isinstance(w, bool) or not isinstance(w, int) or w < 1:
            raise ValueError(f"window must be an int >= 1 (pixels per side); got {w!r:.40}")
        if pv.shape[-2] % w or pv.shape[-1] % w:
            raise ValueError(f"window={w} does not tile the {pv.shape[-2]}x{pv.shape[-1]} image; give a divisor of "
                             "both sides")
    inputs = dict(inputs)
    b = pv.shape[0]
    pos = None
    if lens.family == "generative":
        ids_in = inputs.get("input_ids")
        if not isinstance(ids_in, Tensor) or ids_in.shape[0] != b:
            raise ValueError(f"gradient_map needs one image per batch row: input_ids "
                             f"{tuple(ids_in.shape) if isinstance(ids_in, Tensor) else None}, {b} images")
        pos = answer_positions(lens, inputs, position, b, ids_in.shape[1])
    else:
        check_contrastive(lens, "gradient_map")
        if position != "answer":
            raise ValueError("position applies to generative VLMs; CLIP / SigLIP explain the image-text logit")
    targets = parse_targets(lens, inputs, target, b)
    prepared = lens.prepare(inputs, where="gradient_map") if lens.family == "generative" else to_device(lens, inputs)
    pix = prepared["pixel_values"]

    txt = None
    with torch.no_grad():
        if lens.family == "contrastive" and any(t.embed is None for t in targets):
            if not isinstance(prepared.get("input_ids"), Tensor):
                raise ValueError("target: a text index or None (best text) needs texts in the inputs (input_ids)")
            txt = text_features(lens, prepared)
        f = _logit_fn(lens, prepared, pos, txt)
        pred = None
        if any(t.predicted for t in targets):
            if lens.family == "generative":
                out = lens.model(**prepared).logits
                pred = out[torch.arange(b, device=out.device), pos.to(out.device)].argmax(-1).cpu()
            else:
                pred = contrastive_logits(lens, image_features(lens, pix), txt).argmax(-1).cpu()
        ids = [None if t.embed is not None else (pred if t.predicted else t.ids) for t in targets]
        scores = torch.stack([f(pix, t, i) for t, i in zip(targets, ids)], 1).float().cpu()

    bl_scores, delta = torch.zeros(0), torch.zeros(0)
    extra: dict[str, Any] = {}
    if method in ("integrated_gradients", "occlusion"):
        base = make_baseline(lens, pix, "black" if baseline is None else baseline, blur_sigma)
        with torch.no_grad():
            bl_scores = torch.stack([f(base, t, i) for t, i in zip(targets, ids)], 1).float().cpu()
        extra["baseline"] = baseline if isinstance(baseline, str) else "black" if baseline is None else "tensor"
    noise_sd = float(sd_frac) * float(pix.max() - pix.min()) if method == "smoothgrad" else None
    maps, deltas = [], []
    with _frozen(lens.model):
        for t, i in zip(targets, ids):
            fk = lambda x, t=t, i=i: f(x, t, i)  # noqa: E731
            if method == "saliency":
                from captum.attr import Saliency

                maps.append(Saliency(fk).attribute(pix, abs=True).float().sum(1).cpu())
            elif method == "smoothgrad":
                from captum.attr import NoiseTunnel, Saliency

                per = None if internal_batch_size is None else max(1, internal_batch_size // b)
                with torch.random.fork_rng(devices=[pix.device] if pix.device.type == "cuda" else []):
                    torch.manual_seed(seed)
                    attr = NoiseTunnel(Saliency(_example_major(fk, b))).attribute(
                        pix, nt_type="smoothgrad", nt_samples=n_samples,
                        nt_samples_batch_size=per, stdevs=noise_sd, abs=True)
                maps.append(attr.float().sum(1).cpu())
                extra.update(samples=n_samples, noise=float(sd_frac), seed=seed)
            elif method == "integrated_gradients":
                from captum.attr import IntegratedGradients

                attr, d = IntegratedGradients(fk).attribute(pix, baselines=base, n_steps=n_steps,
                                                            internal_batch_size=internal_batch_size,
                                                            return_convergence_delta=True)
                maps.append(attr.float().sum(1).cpu())
                deltas.append(d.float().cpu())
                extra["steps"] = n_steps
            elif method == "occlusion":
                from captum.attr import Occlusion

                c = pix.shape[1]
                attr = Occlusion(fk).attribute(pix, sliding_window_shapes=(c, w, w), strides=(c, w, w),
                                               baselines=base,
                                               perturbations_per_eval=max(1, (internal_batch_size or 64) // b))
                maps.append(attr[:, 0, ::w, ::w].float().cpu())
                extra["window"] = w
            else:
                site = _cam_site(lens, name)
                extra["name"] = site
                maps.append(_grad_cam(lens, inputs, pix, site, fk))
    if deltas:
        delta = torch.stack(deltas, 1)
    meta = provenance(lens, [extra["name"]] if "name" in extra else [], method=method, **extra,
                      position=position if isinstance(position, str) else int(position))
    return GradientMapResult(meta=meta, maps=torch.stack(maps, 1), images=pixel_images(lens, inputs, images),
                             labels=[t.label for t in targets], method=method.replace("_", " "),
                             targets=[i.tolist() if i is not None else [-1] * b for i in ids], scores=scores,
                             baseline_scores=bl_scores, delta=delta)


def _cam_site(lens, name: str | None) -> str:
    """The Grad-CAM site: `name` checked (one site, not an attention map), else the default (see gradient_map)."""
    if name is None:
        n = 1 + max(int(x.split(".")[2]) for x in lens.hook_points("vision.blocks.*.resid_post"))
        if lens.family == "contrastive":
            return f"vision.blocks.{n - 1}.resid_pre"
        used = used_vision_blocks(lens, n)
        return f"vision.blocks.{used - 1}.resid_post"
    if not isinstance(name, str):
        raise TypeError(f"name must be one hook-point name (str); got {type(name).__name__}")
    found = lens.resolve(name, arg="name")
    if len(found) != 1:
        raise ValueError(f"name={name!r} matches {len(found)} sites; Grad-CAM reads one")
    site = found[0]
    if not (site.startswith("vision.") or site.startswith("lm.")) or lens.sites[site].row.read == "pattern":
        raise ValueError(f"name={site!r}: Grad-CAM reads a (batch, seq, d) activation of the vision tower or of the LM "
                         "(e.g. vision.blocks.3.resid_post)")
    return site


def _grad_cam(lens, inputs: dict, pix: Tensor, site: str, f) -> Tensor:
    """relu(sum_d mean_patches(grad_d) * act_d) at every patch token of `site` -> (b, rows, cols)."""
    store: list[Tensor] = []
    # pixels as the leaf (not the site: transformers may read a block's output through its own recording hooks, so
    # a replaced value would not be the one used downstream); the captured activation is the tensor the model used
    with lens.hooks(captures={site: [lambda v, ctx: store.append(v)]}), torch.enable_grad():
        s = f(pix.detach().requires_grad_())
    if len(store) != 1:
        raise ValueError(f"name={site!r} ran {len(store)} times in one forward; Grad-CAM reads one call")
    act = store[0]
    if act.dim() != 3:
        raise ValueError(f"name={site!r} holds a {tuple(act.shape)} value; Grad-CAM needs (batch, seq, d) tokens")
    (g,) = torch.autograd.grad(s.sum(), act, allow_unused=True)
    g = torch.zeros_like(act) if g is None else g
    act, g = act.detach().float().cpu(), g.float().cpu()
    b = pix.shape[0]
    if site.startswith("lm."):
        tm = lens.token_map(inputs)
        out = []
        for r in range(b):
            p = tm.positions("image", batch=r)
            cell = p[tm.row[r, p] >= 0]
            w = g[r, cell].mean(0)
            cam = torch.relu(act[r] @ w)  # (seq,): only the cells are laid out
            out.append(tm.to_grid(cam, batch=r))
        return torch.stack(out)
    off, side = patch_grid(act.shape[1])
    a, gg = act[:, off:], g[:, off:]
    cam = torch.relu((a * gg.mean(1, keepdim=True)).sum(-1))
    return cam.reshape(b, side, side)


__all__ = ["GradientMapResult", "gradient_map", "make_baseline"]
