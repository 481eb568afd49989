"""Training-data attribution for diffusion models: D-TRAK's examples and output functions (Zheng et al. 2024).

    ex = diffusion_examples(sd, images, prompts, timesteps=8, seed=0)     # dict of CPU tensors, one row per example
    batches = [{k: v[i:i + 16] for k, v in ex.items()} for i in range(0, len(prompts), 16)]
    trak = TRAK(TRAKConfig(proj_dim=512, params="up_blocks.1.attentions.*", weighting=False))
    trak.fit(sd, batches, diffusion_square)                               # params: the denoiser's own names
    res = trak.attribute(sd, target_ex, diffusion_square)

Why these pieces. A diffusion model's "output" for an example is a noisy expectation over timesteps and noise, so
each example carries K fixed (t, noise) draws, seeded from `seed` and the example's index: the gradient of one
example is then the same whichever batch it lands in, and a training image and a target share nothing but their
content. The latents are the VAE posterior mean (no sampling noise), the text states the pipeline's own
`encode_prompt` without guidance.

Output functions, both (batch,), the mean over the example's K draws:

- `diffusion_loss`: the training loss, the mean over latent elements of (target - prediction)^2, target as the
  scheduler's `prediction_type` says (epsilon, v_prediction or sample; SD3: the flow target noise - latents).
- `diffusion_square`: the mean over latent elements of prediction^2, D-TRAK's "Square" output (||eps_theta||^2 up
  to a constant factor, to which TRAK scores are invariant), which attributes better than the loss in their study.

Neither is a logit margin, so TRAK's weighting (1 - sigmoid(f)) is meaningless for them: they declare
`weighting = False` and TRAK skips the weighting for them (with a warning if the config asks for it).

Pipelines: Stable Diffusion 1/2 UNets (`pipe.unet`), PixArt and SD3 (`pipe.transformer`). The forward is
`_denoising.Denoising`, the one `sae_metrics`' denoising loss runs: the scheduler's `add_noise` (x_t = sqrt(a_t) x_0 +
sqrt(1 - a_t) eps, computed from `alphas_cumprod` so that `torch.func.vmap` can batch it); SD3 is rectified flow,
x_t = (1 - s) x_0 + s eps with s = t / num_train_timesteps.
PixArt's extra `encoder_attention_mask` and SD3's `pooled_projections` travel in the examples dict as further
per-example keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ._denoising import Denoising

SUPPORTED = ("sd_unet", "pixart", "sd3")
BASE_KEYS = ("latents", "encoder_hidden_states", "timesteps", "noise")
EXTRA_KEYS = ("encoder_attention_mask", "pooled_projections")


def _check_pipeline(lens, where: str) -> Denoising:
    """The pipeline's `Denoising` (the forward both output functions run); anything else is a TypeError."""
    arch = getattr(lens, "architecture", None)
    if getattr(lens, "family", None) != "diffusion" or arch not in SUPPORTED:
        raise TypeError(f"{where} applies to diffusion pipelines ({', '.join(SUPPORTED)}: Stable Diffusion UNet, "
                        f"PixArt, SD3); got {arch!r}")
    try:
        return Denoising(lens)
    except ValueError as err:  # an SDXL-style UNet, a scheduler predicting something else
        raise TypeError(f"{where}: {err}") from err


def _images(images, size: int) -> Float[Tensor, "n 3 h w"]:
    """(n, H, W, 3) uint8 array/tensor or PIL images -> (n, 3, H, W) float in [-1, 1]."""
    if isinstance(images, (list, tuple)):
        arrays = [np.asarray(im.convert("RGB") if hasattr(im, "convert") else im) for im in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes {sorted(shapes)}; all must be ({size}, {size}, 3)")
        x = torch.as_tensor(np.stack(arrays)) if arrays else torch.zeros(0, size, size, 3, dtype=torch.uint8)
    else:
        x = torch.as_tensor(np.asarray(images) if not isinstance(images, Tensor) else images)
    if x.dim() != 4 or tuple(x.shape[1:]) != (size, size, 3):
        raise ValueError(f"images must be (n, {size}, {size}, 3) uint8 (the pipeline's resolution) or a list of "
                         f"{size}x{size} PIL images; got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0-255); got {x.dtype}")
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def diffusion_examples(lens, images, prompts: Sequence[str], *, timesteps: int = 8, seed: int = 0, start: int = 0,
                       batch_size: int = 16) -> dict[str, Tensor]:
    """Training (or target) examples for TRAK on a diffusion pipeline: a dict of CPU float32 tensors, one row per
    example, `latents` (n, C, h, w) the VAE posterior mean (minus its shift factor) times its scaling factor,
    `encoder_hidden_states` (n, T, D) from `encode_prompt` without guidance (plus PixArt's
    `encoder_attention_mask`, SD3's `pooled_projections`), `timesteps` (n, K) int64 uniform over the scheduler's
    training range and `noise` (n, K, C, h, w). Example i's draws come from a generator seeded by (`seed`,
    `start` + i): pass `start` when encoding a slice of a larger set to get the draws the whole set would give.
    `images`: (n, H, W, 3) uint8 array/tensor or PIL images at the pipeline's resolution."""
    den = _check_pipeline(lens, "diffusion_examples")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings, one per image")
    for name, v, low in (("timesteps", timesteps, 1), ("seed", seed, 0), ("start", start, 0),
                         ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}; got {v!r}")
    pipe = lens.model
    x = _images(images, den.resolution())
    if len(x) != len(prompts):
        raise ValueError(f"got {len(x)} images and {len(prompts)} prompts; give one prompt per image")
    if len(x) == 0:
        raise ValueError("no examples: give at least one image and prompt")
    vae, dev = pipe.vae, lens.device
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    n_train = int(pipe.scheduler.config.num_train_timesteps)
    out: dict[str, list[Tensor]] = {}
    for s in range(0, len(x), batch_size):
        chunk = x[s:s + batch_size].to(dev, vae.dtype)
        lat = (vae.encode(chunk).latent_dist.mean.float() - shift) * scale
        rows = {"latents": lat.cpu(), **{k: v.float().cpu() for k, v in
                                         den.encode(list(prompts[s:s + batch_size])).items()}}
        ts, ns = [], []
        for i in range(len(chunk)):
            g = torch.Generator().manual_seed(seed * 1_000_003 + start + s + i)
            ts.append(torch.randint(0, n_train, (timesteps,), generator=g))
            ns.append(torch.randn((timesteps, *lat.shape[1:]), generator=g))
        rows["timesteps"], rows["noise"] = torch.stack(ts), torch.stack(ns)
        for k, v in rows.items():
            out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


def _check_examples(lens, inputs: Mapping, where: str) -> None:
    _check_pipeline(lens, where)
    missing = [k for k in BASE_KEYS if k not in inputs]
    extra = {"pixart": ["encoder_attention_mask"], "sd3": ["pooled_projections"]}.get(lens.architecture, [])
    missing += [k for k in extra if k not in inputs]
    if missing:
        raise ValueError(f"{where} reads {missing} of the inputs (keys: {sorted(inputs)}); build them with "
                         "diffusion_examples(lens, images, prompts)")
    lat, t, noise = inputs["latents"], inputs["timesteps"], inputs["noise"]
    n = lat.shape[0]
    if lat.dim() != 4 or t.dim() != 2 or t.shape[0] != n or tuple(noise.shape) != (n, t.shape[1], *lat.shape[1:]):
        raise ValueError(f"{where}: latents (n, C, h, w), timesteps (n, K) and noise (n, K, C, h, w) must agree; got "
                         f"{tuple(lat.shape)}, {tuple(t.shape)}, {tuple(noise.shape)}")
    if t.dtype.is_floating_point:
        raise ValueError(f"{where}: timesteps must be integers; got {t.dtype}")
    n_train = int(lens.model.scheduler.config.num_train_timesteps)
    if t.numel() and (t.min() < 0 or t.max() >= n_train):
        raise ValueError(f"{where}: timesteps must lie in [0, {n_train}); got {t.min().item()}..{t.max().item()}")


def denoise(lens, inputs: Mapping) -> tuple[Float[Tensor, "n k c h w"], Float[Tensor, "n k c h w"]]:
    """(prediction, training target) of the denoiser for every example's K draws, in one batched forward (each
    example repeated K times, example-major like the draws). Float32."""
    x0, t, eps = inputs["latents"], inputs["timesteps"], inputs["noise"]
    n, k = t.shape

    def rep(v: Tensor) -> Tensor:  # (n, ...) -> (n * k, ...)
        return v[:, None].expand(n, k, *v.shape[1:]).reshape(n * k, *v.shape[1:])

    cond = {key: rep(inputs[key]) for key in ("encoder_hidden_states", *EXTRA_KEYS) if key in inputs}
    pred, target = Denoising(lens).predict(rep(x0), eps.reshape(n * k, *x0.shape[1:]), t.reshape(n * k), cond)
    return pred.float().reshape(n, k, *x0.shape[1:]), target.reshape(n, k, *x0.shape[1:])


class _DiffusionOutput:
    weighting = False  # not a logit margin: TRAK's (1 - sigmoid(f)) weighting does not apply

    def example_keys(self, lens, inputs: Mapping):
        return [k for k in (*BASE_KEYS, *EXTRA_KEYS) if k in inputs]

    def validate(self, lens, inputs: Mapping) -> None:
        _check_examples(lens, inputs, repr(self))


class _DiffusionLoss(_DiffusionOutput):
    """`diffusion_loss(lens, inputs) -> (batch,)`: per example, the mean over its K (t, noise) draws of the
    training loss, the mean over latent elements of (target - prediction)^2."""

    def __call__(self, lens, inputs: Mapping) -> Float[Tensor, "batch"]:
        pred, target = denoise(lens, inputs)
        return (target - pred).pow(2).flatten(2).mean(-1).mean(-1)

    def __repr__(self) -> str:
        return "diffusion_loss"


class _DiffusionSquare(_DiffusionOutput):
    """`diffusion_square(lens, inputs) -> (batch,)`: per example, the mean over its K draws of the mean over latent
    elements of prediction^2 (D-TRAK's "Square" output function)."""

    def __call__(self, lens, inputs: Mapping) -> Float[Tensor, "batch"]:
        pred, _ = denoise(lens, inputs)
        return pred.pow(2).flatten(2).mean(-1).mean(-1)

    def __repr__(self) -> str:
        return "diffusion_square"


diffusion_loss = _DiffusionLoss()
diffusion_square = _DiffusionSquare()

__all__ = ["diffusion_examples", "diffusion_loss", "diffusion_square", "denoise"]
