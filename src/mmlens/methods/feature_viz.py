"""Feature visualization by optimisation (Olah, Mordvintsev & Schubert 2017, "Feature Visualization", Distill;
lucid / lucent): the image that most excites a unit, a direction or any function of an activation, found by gradient
ascent on the pixels of an image tower, beside the dataset images that excite it most.

    obj = unit("vision.blocks.3.mlp.post", 17)                     # a neuron, averaged over positions
    obj = direction("vision.proj", text_embed)                     # image embedding . a text direction
    obj = custom("vision.blocks.2.resid_post", lambda a: sae.encode(a)[..., j])   # an SAE feature
    res = visualize(clip, obj, steps=256, n=4, diversity=1.0)      # res.images (4, H, W, 3) uint8
    res.trace                                                      # (steps, n): the objective while optimising
    top = dataset_examples(clip, obj, pool_images, k=8)            # or visualize(..., dataset=pool_images)
    res.plot(); res.html(); res.save("out/viz")

Why this parametrisation. Gradient ascent on raw pixels finds high-frequency patterns the model reacts to but a
person cannot read. Following lucid, the image is a spectrum (`torch.fft.irfft2`) whose coefficients are scaled by
1/frequency, so each step moves low frequencies as much as high ones (a preconditioner, not a constraint); colours
are decorrelated by a fixed 3x3 matrix (the square root of ImageNet's colour covariance), and a sigmoid keeps pixels
in [0, 1]. Random jitter, scale and rotation at every step (transformation robustness) keep what survives small
shifts. The image then goes through the processor's mean/std normalisation inside the graph, as pixel_values, so
nothing passes through PIL or uint8 before the model sees it.

A generator prior (Nguyen et al. 2016, "Synthesizing the preferred inputs for neurons via deep generator networks"):
`param="generator"` optimises the latent of a decoder trained on the data (`vae_decoder(vae)`, starting latents
from `vae_latents(vae, images)`), so the image stays on the data's manifold and shows objects rather than textures.

Which forward runs. Objectives on `vision.*` sites (and a contrastive model's `vision.proj` / `vision.head.out`) run
the image tower alone (`get_image_features` for CLIP / SigLIP), and the forward stops once every site the objective
reads has been recorded, so a unit in block 1 costs blocks 0-1 only. Sites beyond the tower (`projector.out`,
`lm.*`, `image_embeds`, `logits`) need the rest of the model's inputs: pass `inputs=` (processor output of one
prompt; its pixel_values are replaced by the optimised images).
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from .result import Result, provenance, require_family

# Square root of ImageNet's colour covariance (lucid's `color_correlation_svd_sqrt`), columns scaled so the largest
# has norm 1: decorrelated parameters x map to colours C @ x.
COLOUR_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
COLOUR_MATRIX = COLOUR_SQRT / COLOUR_SQRT.norm(dim=0).max()
MAGIC = 4.0  # lucid divides the inverse FFT by 4 so that sigmoid's input starts in a useful range
PARAMS = ("fourier", "pixel", "generator")


# ----------------------------------------------------------------------------------------- parametrisations
def frequencies(h: int, w: int) -> Float[Tensor, "h w2"]:
    """|f| of every coefficient of a real (h, w) image's rfft2 (w2 = w // 2 + 1), in cycles per pixel."""
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return (fx * fx + fy * fy).sqrt()


def spectrum_scale(h: int, w: int, decay_power: float = 1.0) -> Float[Tensor, "h w2"]:
    """lucid's 1/f scaling: `1 / max(|f|, 1 / max(h, w)) ** decay_power` (the DC term is capped at the lowest
    non-zero frequency so it does not blow up). With the unitary (ortho) inverse FFT this is lucid's
    `sqrt(h w) / max(...)` with TensorFlow's 1 / (h w) inverse: an image of any size moves at the same rate."""
    return 1.0 / frequencies(h, w).clamp_min(1.0 / max(h, w)) ** decay_power


def spectrum_to_image(spectrum: Float[Tensor, "*batch 2 h w2"], h: int, w: int, decay_power: float = 1.0
                      ) -> Float[Tensor, "*batch h w"]:
    """Real and imaginary parts (stacked on dim -3) -> the real image `irfft2(scale * spectrum, ortho) / 4`."""
    c = torch.complex(spectrum[..., 0, :, :], spectrum[..., 1, :, :])
    scale = spectrum_scale(h, w, decay_power).to(spectrum.device)
    return torch.fft.irfft2(c * scale, s=(h, w), norm="ortho") / MAGIC


def image_to_spectrum(image: Float[Tensor, "*batch h w"], decay_power: float = 1.0) -> Float[Tensor, "*batch 2 h w2"]:
    """The inverse of `spectrum_to_image`: `spectrum_to_image(image_to_spectrum(x), h, w) == x` for real x."""
    h, w = image.shape[-2:]
    c = torch.fft.rfft2(image.float() * MAGIC, norm="ortho") / spectrum_scale(h, w, decay_power).to(image.device)
    return torch.stack([c.real, c.imag], -3)


def correlate_colours(x: Float[Tensor, "n 3 h w"]) -> Float[Tensor, "n 3 h w"]:
    """Decorrelated parameters -> colour channels: `COLOUR_MATRIX @ x` per pixel."""
    return torch.einsum("ij,njhw->nihw", COLOUR_MATRIX.to(x.device, x.dtype), x)


def decorrelate_colours(x: Float[Tensor, "n 3 h w"]) -> Float[Tensor, "n 3 h w"]:
    """The inverse of `correlate_colours`."""
    inv = torch.linalg.inv(COLOUR_MATRIX.double()).float()
    return torch.einsum("ij,njhw->nihw", inv.to(x.device, x.dtype), x)


class ImageParam(nn.Module):
    """A batch of images (n, 3, h, w) in [0, 1] made from free parameters: `raw()` (pre-colour, pre-sigmoid) ->
    optional `correlate_colours` -> sigmoid. Subclasses say how `raw` is parametrised and invert it (`set_images`)."""

    def __init__(self, n: int, h: int, w: int, decorrelate: bool = True):
        super().__init__()
        self.n, self.h, self.w, self.decorrelate = n, h, w, decorrelate

    def raw(self) -> Tensor:
        raise NotImplementedError

    def _set_raw(self, raw: Tensor) -> None:
        raise NotImplementedError

    def forward(self) -> Float[Tensor, "n 3 h w"]:
        x = self.raw()
        return torch.sigmoid(correlate_colours(x) if self.decorrelate else x)

    @torch.no_grad()
    def set_images(self, images: Float[Tensor, "n 3 h w"], eps: float = 1e-3) -> None:
        """Parameters that reproduce `images` (values in [0, 1], clamped to [eps, 1 - eps] for the logit)."""
        if tuple(images.shape) != (self.n, 3, self.h, self.w):
            raise ValueError(f"init images: expected ({self.n}, 3, {self.h}, {self.w}); got {tuple(images.shape)}")
        x = torch.logit(images.float().clamp(eps, 1 - eps))
        self._set_raw(decorrelate_colours(x) if self.decorrelate else x)


class FourierImage(ImageParam):
    """lucid's `fft_image`: `spectrum` (n, 3, 2, h, w // 2 + 1) real/imaginary parts, normal(0, sd) at start."""

    def __init__(self, n: int, h: int, w: int, *, decorrelate: bool = True, sd: float = 0.01, decay_power: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__(n, h, w, decorrelate)
        self.decay_power = decay_power
        self.spectrum = nn.Parameter(torch.randn(n, 3, 2, h, w // 2 + 1, generator=generator) * sd)

    def raw(self) -> Tensor:
        return spectrum_to_image(self.spectrum, self.h, self.w, self.decay_power)

    def _set_raw(self, raw: Tensor) -> None:
        self.spectrum.copy_(image_to_spectrum(raw.to(self.spectrum.device), self.decay_power))


class PixelImage(ImageParam):
    """Plain pixels (n, 3, h, w), normal(0, sd) at start (lucid's `pixel_image`)."""

    def __init__(self, n: int, h: int, w: int, *, decorrelate: bool = True, sd: float = 0.01,
                 generator: torch.Generator | None = None):
        super().__init__(n, h, w, decorrelate)
        self.pixels = nn.Parameter(torch.randn(n, 3, h, w, generator=generator) * sd)

    def raw(self) -> Tensor:
        return self.pixels

    def _set_raw(self, raw: Tensor) -> None:
        self.pixels.copy_(raw.to(self.pixels.device))


class GeneratorImage(nn.Module):
    """Images `decode(latent)` (n, 3, h, w) in [0, 1] of a free `latent` (n, ...): the generator prior. The decoder
    is held outside the module's parameters and buffers, so optimising or moving the image never touches it."""

    def __init__(self, decode: Callable[[Tensor], Tensor], latent: Tensor):
        super().__init__()
        self.__dict__["decode"] = decode
        self.latent = nn.Parameter(latent.detach().clone().float())

    def forward(self) -> Float[Tensor, "n 3 h w"]:
        return self.decode(self.latent)


def vae_decoder(vae) -> Callable[[Tensor], Tensor]:
    """A diffusers `AutoencoderKL` as a generator: latents (scaled by `scaling_factor`, as a pipeline's) -> images
    in [0, 1]."""
    scale = getattr(vae.config, "scaling_factor", 1.0)

    def decode(z: Tensor) -> Tensor:
        x = vae.decode(z.to(vae.device, vae.dtype) / scale).sample.float()
        return ((x + 1) / 2).clamp(0, 1)
    return decode


@torch.no_grad()
def vae_latents(vae, images) -> Tensor:
    """The scaled posterior means of `images` (n, H, W, 3) uint8: starting latents for `param="generator"`."""
    x = _pool(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mean
    return (z * getattr(vae.config, "scaling_factor", 1.0)).float().cpu()


# ------------------------------------------------------------------------------------------------ transforms
def _pick(values: Sequence[float], n: int, gen: torch.Generator) -> Tensor:
    return torch.as_tensor(values, dtype=torch.float32)[torch.randint(len(values), (n,), generator=gen)]


@dataclass(frozen=True)
class Jitter:
    """Shift each image by a random whole number of pixels in [-pixels, pixels] along each axis (lucid's jitter)."""

    pixels: int

    def theta(self, n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
        d = torch.randint(-self.pixels, self.pixels + 1, (n, 2), generator=gen).float()
        t = torch.eye(3).repeat(n, 1, 1)
        t[:, 0, 2], t[:, 1, 2] = 2 * d[:, 0] / w, 2 * d[:, 1] / h  # normalised coordinates span 2 over the side
        return t


@dataclass(frozen=True)
class Scale:
    """Zoom each image about its centre by a factor drawn from `factors` (> 1 enlarges)."""

    factors: tuple[float, ...] = tuple(1 + (i - 5) / 50 for i in range(11))

    def theta(self, n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
        s = _pick(self.factors, n, gen)
        t = torch.eye(3).repeat(n, 1, 1)
        t[:, 0, 0], t[:, 1, 1] = 1 / s, 1 / s
        return t


@dataclass(frozen=True)
class Rotate:
    """Rotate each image about its centre by an angle (degrees) drawn from `degrees`."""

    degrees: tuple[float, ...] = tuple(range(-10, 11)) + (0,) * 5

    def theta(self, n: int, h: int, w: int, gen: torch.Generator) -> Tensor:
        a = _pick(self.degrees, n, gen) * math.pi / 180
        c, s = a.cos(), a.sin()
        t = torch.eye(3).repeat(n, 1, 1)
        # a rotation in pixel units, written in normalised coordinates (x spans w / 2 per unit, y spans h / 2)
        t[:, 0, 0], t[:, 0, 1], t[:, 1, 0], t[:, 1, 1] = c, -s * h / w, s * w / h, c
        return t


AFFINE = (Jitter, Scale, Rotate)


def default_transforms(size: int) -> list:
    """lucid's standard robustness for a `size`-pixel image: jitter, scale 0.9-1.1, rotate -10..10 degrees, jitter;
    lucid's 8 and 4 pixels at 224 scaled to `size` (at least 1)."""
    return [Jitter(max(1, round(8 * size / 224))), Scale(), Rotate(), Jitter(max(1, round(4 * size / 224)))]


def apply_transforms(x: Float[Tensor, "n 3 h w"], transforms: Sequence, gen: torch.Generator,
                     fill: str | float = "reflection") -> Float[Tensor, "n 3 h w"]:
    """Each transform in order, each image its own random draw. Consecutive `Jitter` / `Scale` / `Rotate` are
    composed into one affine map and resampled once (bilinear); any other callable `t(x) -> x` runs as given and
    must keep the shape. `fill`: what is seen beyond the border: 'reflection', 'border' or a constant in [0, 1]."""
    n, _, h, w = x.shape
    pending: Tensor | None = None

    def flush(x, pending):
        if pending is None:
            return x
        grid = F.affine_grid(pending[:, :2].to(x.device, x.dtype), list(x.shape), align_corners=False)
        if isinstance(fill, str):
            return F.grid_sample(x, grid, mode="bilinear", padding_mode=fill, align_corners=False)
        return F.grid_sample(x - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill

    for t in transforms:
        if isinstance(t, AFFINE):
            th = t.theta(n, h, w, gen)
            pending = th if pending is None else pending @ th  # output -> input coordinates: earlier maps first
            continue
        x, pending = flush(x, pending), None
        y = t(x)
        if not isinstance(y, Tensor) or y.shape != x.shape:
            raise ValueError(f"transform {t!r} returned {getattr(y, 'shape', type(y).__name__)}; transforms must keep "
                             f"the shape {tuple(x.shape)}")
        x = y
    return flush(x, pending)


def _check_transforms(transforms, size: int) -> list:
    if transforms is None:
        return []
    if isinstance(transforms, str):
        if transforms != "default":
            raise ValueError(f"transforms={transforms!r}; allowed: 'default', None (none) or a list of transforms")
        return default_transforms(size)
    out = list(transforms)
    bad = [t for t in out if not (isinstance(t, AFFINE) or callable(t))]
    if bad:
        raise TypeError(f"transforms must be Jitter / Scale / Rotate or callables x -> x; got {bad[0]!r:.60}")
    return out


# ------------------------------------------------------------------------------------------------ objectives
class Objective:
    """What to maximise: `fn(values) -> (n,)`, one value per image, from `values[name]` (n, ...) float32 at the
    sites `names`. Objectives add, subtract and scale: `unit(a, 3) + 0.5 * direction(b, v)`."""

    def __init__(self, names: Sequence[str], fn: Callable[[dict[str, Tensor]], Tensor], label: str):
        self.names, self.fn, self.label = list(dict.fromkeys(names)), fn, label

    def __call__(self, values: dict[str, Tensor]) -> Float[Tensor, "n"]:
        return self.fn(values)

    def __repr__(self) -> str:
        return f"Objective({self.label})"

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        if not isinstance(other, Objective):
            return NotImplemented
        return Objective(self.names + other.names, lambda v: self(v) + other(v), f"{self.label} + {other.label}")

    __radd__ = __add__

    def __mul__(self, k):
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            return NotImplemented
        return Objective(self.names, lambda v: k * self(v), f"{k:g} * ({self.label})")

    __rmul__ = __mul__

    def __neg__(self):
        return -1 * self

    def __sub__(self, other):
        return self + (-other) if isinstance(other, Objective) else NotImplemented


def _check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"an objective's site must be a hook-point name (str); got {name!r:.60}")
    if any(c in name for c in "*?["):
        raise ValueError(f"{name!r}: an objective reads one site; give an exact name, not a glob")
    return name


def _check_position(position):
    if position is None or isinstance(position, int) and not isinstance(position, bool):
        return position
    raise TypeError(f"position must be None (mean over positions) or an int; got {position!r:.40}")


def _at(v: Tensor, name: str, position: int | None) -> Tensor:
    if position is None:
        return v
    if v.dim() < 3:
        raise ValueError(f"{name} has shape {tuple(v.shape)} (one vector per image, no positions); use position=None")
    if not -v.shape[1] <= position < v.shape[1]:
        raise ValueError(f"position {position} is out of range for {name} ({v.shape[1]} positions; allowed "
                         f"{-v.shape[1]} to {v.shape[1] - 1})")
    return v[:, position]


def _mean_rest(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).mean(1) if v.dim() > 1 else v


def unit(name: str, index: int | Sequence[int], position: int | None = None) -> Objective:
    """Unit `index` of site `name`: a channel / neuron (an int, into the last dim), or a tuple into the last
    len(index) dims (e.g. `(head, dim)` of `attn.z`). Averaged over every position (dims between batch and the
    unit's), or read at `position` (an index into dim 1, e.g. 0 = CLIP's class token)."""
    name, position = _check_name(name), _check_position(position)
    idx = (index,) if not isinstance(index, (tuple, list)) else tuple(index)
    if not idx or any(isinstance(i, bool) or not isinstance(i, int) for i in idx):
        raise TypeError(f"unit index must be an int or a tuple of ints; got {index!r:.40}")

    def fn(values):
        v = _at(values[name], name, position)
        if v.dim() < 1 + len(idx):
            raise ValueError(f"unit {index}: {name} has shape {tuple(v.shape)}, too few dims for a "
                             f"{len(idx)}-part index")
        dims = v.shape[v.dim() - len(idx):]
        for i, d in zip(idx, dims):
            if not -d <= i < d:
                raise ValueError(f"unit index {index} is out of range for {name}, whose unit dims are {tuple(dims)}")
        return _mean_rest(v[(Ellipsis, *idx)])

    where = "" if position is None else f" at position {position}"
    return Objective([name], fn, f"unit {name}[{index}]{where}")


def direction(name: str, vector, position: int | None = None, *, cosine: bool = False) -> Objective:
    """`value . vector` along the last dim of site `name` (e.g. `vision.proj` against a text embedding), averaged
    over positions or at `position`; `cosine=True` divides by |value| (only the angle counts, not the norm)."""
    name, position = _check_name(name), _check_position(position)
    vec = (vector.detach().float().cpu() if isinstance(vector, Tensor) else
           torch.as_tensor(np.asarray(vector), dtype=torch.float32)).flatten()
    if vec.numel() == 0 or not torch.isfinite(vec).all():
        raise ValueError("direction: the vector must be non-empty and finite")

    def fn(values):
        v = _at(values[name], name, position)
        if v.shape[-1] != vec.numel():
            raise ValueError(f"direction: {name} has {v.shape[-1]} dims in its last axis; the vector has {vec.numel()}")
        d = v @ vec.to(v.device)
        if cosine:
            d = d / (v.norm(dim=-1) * vec.norm()).clamp_min(1e-12)
        return _mean_rest(d)

    where = "" if position is None else f"[{position}]"
    return Objective([name], fn, f"{'cosine ' if cosine else ''}direction {name}{where}")


def custom(name: str, fn: Callable[[Tensor], Tensor], position: int | None = None, label: str | None = None
           ) -> Objective:
    """Any differentiable function of site `name`'s value (n, ...) (at `position` if given), e.g. an SAE feature
    `lambda acts: sae.encode(acts)[..., j]`; what it returns beyond (n,) is averaged."""
    name, position = _check_name(name), _check_position(position)
    if not callable(fn):
        raise TypeError(f"custom: fn must be callable; got {type(fn).__name__}")

    def run(values):
        out = fn(_at(values[name], name, position))
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != values[name].shape[0]:
            raise ValueError(f"custom objective on {name} returned {getattr(out, 'shape', type(out).__name__)}; "
                             f"expected a tensor (n, ...) with one row per image ({values[name].shape[0]})")
        return _mean_rest(out)

    return Objective([name], run, label or f"custom({getattr(fn, '__name__', 'fn')}) on {name}")


def _objective(objective) -> Objective:
    if isinstance(objective, Objective):
        return objective
    if isinstance(objective, tuple) and len(objective) == 2 and isinstance(objective[0], str) \
            and callable(objective[1]):
        return custom(*objective)
    if callable(objective):
        raise TypeError("a plain callable does not say which site it reads: wrap it as custom(name, fn) or pass "
                        "(name, fn)")
    raise TypeError(f"objective must be an Objective (unit, direction, custom) or a (name, fn) pair; got "
                    f"{type(objective).__name__}")


def diversity_term(acts: Float[Tensor, "n ..."]) -> Float[Tensor, ""]:
    """lucid's diversity: the mean over images of the summed cosine similarity of its Gram matrix (channels x
    channels, over positions) with every other image's. Subtracted from the objective, it pushes the batch apart."""
    n = acts.shape[0]
    if n < 2:
        return acts.new_zeros(())
    flat = acts.reshape(n, -1, acts.shape[-1]) if acts.dim() > 2 else acts[:, None]
    g = F.normalize((flat.transpose(1, 2) @ flat).reshape(n, -1), dim=1, eps=1e-10)
    sim = g @ g.T
    return (sim.sum() - sim.diagonal().sum()) / n


# ------------------------------------------------------------------------------------------------ the forward
class _Done(Exception):
    """Raised from a capture once every wanted site is recorded: the rest of the forward is not needed."""


def _image_processor(lens):
    p = lens.processor
    ip = getattr(p, "image_processor", p)
    if ip is not None and hasattr(ip, "image_mean"):
        return ip
    path = getattr(lens.model, "name_or_path", None)
    if path:
        try:
            from transformers import AutoImageProcessor

            return AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except Exception:  # noqa: BLE001  a bare checkpoint without a preprocessor config: mean/std must be given
            return None
    return None


def _vision_config(model):
    cfg = model.config
    return getattr(cfg, "vision_config", None) or cfg


@dataclass
class _Pre:
    """How the lens turns [0, 1] images into pixel_values: mean/std, the model's input size, Qwen2-VL patching."""

    mean: Tensor
    std: Tensor
    size: tuple[int, int]
    qwen: dict | None = None  # patch_size, merge_size, temporal_patch_size

    def pixel_values(self, img: Float[Tensor, "n 3 h w"]) -> tuple[Tensor, Tensor | None]:
        if tuple(img.shape[-2:]) != self.size:
            img = F.interpolate(img, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (img - self.mean.to(img.device)[:, None, None]) / self.std.to(img.device)[:, None, None]
        if self.qwen is None:
            return x, None
        return qwen_patchify(x, **self.qwen)


def qwen_patchify(x: Float[Tensor, "n c h w"], patch_size: int, merge_size: int, temporal_patch_size: int
                  ) -> tuple[Float[Tensor, "patches dim"], Tensor]:
    """Qwen2-VL's flat pixel_values (n * gh * gw, c * t * p * p) and image_grid_thw (n, 3), as its image processor
    lays them out (`Qwen2VLImageProcessor.patchify`), in torch so gradients pass."""
    n, c, h, w = x.shape
    gh, gw = h // patch_size, w // patch_size
    p = x.reshape(n, c, gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size, patch_size)
    p = p.permute(0, 2, 5, 3, 6, 1, 4, 7)
    p = p.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    flat = p.reshape(n * gh * gw, c * temporal_patch_size * patch_size * patch_size)
    return flat, torch.tensor([[1, gh, gw]] * n, dtype=torch.long)


def _as_pair(size, what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise ValueError(f"{what} must be a positive int or an (h, w) pair; got {size!r:.40}")
    return int(size[0]), int(size[1])


def preprocessing(lens, mean=None, std=None) -> _Pre:
    """The lens's image normalisation and input size, read from its processor (or `mean`/`std` given)."""
    ip = _image_processor(lens)
    if mean is None or std is None:
        if ip is None:
            raise ValueError(f"{lens.architecture}: the lens has no image processor to read mean/std from; pass "
                             "mean=[...] and std=[...] (per channel, on [0, 1] pixels)")
        if getattr(ip, "do_normalize", True) is False:
            mean = [0.0] * 3 if mean is None else mean
            std = [1.0] * 3 if std is None else std
        mean = ip.image_mean if mean is None else mean
        std = ip.image_std if std is None else std
    mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten().expand(3).clone()
    std_t = torch.as_tensor(std, dtype=torch.float32).flatten().expand(3).clone()
    if (std_t <= 0).any():
        raise ValueError(f"std must be positive; got {std_t.tolist()}")
    vcfg = _vision_config(lens.model)
    if lens.architecture == "qwen2_vl":
        q = dict(patch_size=int(vcfg.patch_size), merge_size=int(vcfg.spatial_merge_size),
                 temporal_patch_size=int(vcfg.temporal_patch_size))
        factor = q["patch_size"] * q["merge_size"]
        lo, hi = 56 * 56, 28 * 28 * 1280
        sz = getattr(ip, "size", None) or {}
        lo = (sz.get("shortest_edge") if isinstance(sz, dict) else getattr(sz, "shortest_edge", None)) or lo
        hi = (sz.get("longest_edge") if isinstance(sz, dict) else getattr(sz, "longest_edge", None)) or hi
        side = min(max(224, math.isqrt(lo)), math.isqrt(hi))
        side = max(factor, side // factor * factor)
        return _Pre(mean_t, std_t, (side, side), q)
    side = getattr(vcfg, "image_size", None)
    if side is None and ip is not None:
        crop = getattr(ip, "crop_size", None) or getattr(ip, "size", None) or {}
        get = crop.get if isinstance(crop, dict) else lambda k: getattr(crop, k, None)
        side = (get("height"), get("width")) if get("height") else get("shortest_edge")
    if side is None:
        raise ValueError(f"{lens.architecture}: cannot tell the image tower's input size; pass size=")
    return _Pre(mean_t, std_t, _as_pair(side if not isinstance(side, (list, tuple)) else tuple(side), "image size"))


class _Runner:
    """Runs the model on [0, 1] images and returns the values at `names`, laid out (n, ...) in float32."""

    def __init__(self, lens, pre: _Pre, inputs=None):
        self.lens, self.pre = lens, pre
        self.inputs = None if inputs is None else dict(inputs)
        if self.inputs is not None and "pixel_values" not in self.inputs:
            raise ValueError("inputs must be processor output with pixel_values (they are replaced by the images)")
        thw = None if self.inputs is None else self.inputs.get("image_grid_thw")
        if pre.qwen is not None and isinstance(thw, Tensor):  # the prompt's image tokens fix the image's size
            rows = {tuple(r) for r in thw.tolist()}
            if len(rows) != 1 or next(iter(rows))[0] != 1:
                raise ValueError(f"inputs: image_grid_thw {thw.tolist()}: give one image (t = 1) per prompt")
            _, gh, gw = next(iter(rows))
            pre.size = (gh * pre.qwen["patch_size"], gw * pre.qwen["patch_size"])

    def _call(self, pv: Tensor, thw: Tensor | None, n: int):
        lens, model = self.lens, self.lens.model
        pv = pv.to(lens.device, lens.dtype)
        if self.inputs is not None:
            x = dict(self.inputs)
            x["pixel_values"] = pv
            if thw is not None:
                x["image_grid_thw"] = thw
            if lens.family == "generative":  # one prompt's rows repeated per image
                for k, v in x.items():
                    if k not in ("pixel_values", "image_grid_thw") and isinstance(v, Tensor) and v.dim() >= 1:
                        if v.shape[0] == 1:
                            x[k] = v.expand(n, *v.shape[1:])
                        elif v.shape[0] != n:
                            raise ValueError(f"inputs[{k!r}] has {v.shape[0]} rows; give one prompt (1 row) or one "
                                             f"per image ({n})")
            return model(**lens.prepare(x, where="visualize"))
        if lens.family == "contrastive":
            if hasattr(model, "get_image_features"):
                return model.get_image_features(pixel_values=pv)
            if not any(nm.startswith("vision.") for nm in lens.hook_points()):
                raise TypeError(f"{type(model).__name__} has no image tower")
            return model(pixel_values=pv)
        embed = lens.sites.get("vision.embed")
        if embed is None:
            raise TypeError(f"{lens.architecture}: no vision.embed site to find the image tower by; pass inputs=")
        root = embed.path.rsplit(".", 1)[0] if "." in embed.path else ""
        tower = model.get_submodule(root) if root else model
        if thw is not None:
            return tower(pv, grid_thw=thw.to(lens.device))
        return tower(pixel_values=pv)

    def __call__(self, img: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        n = img.shape[0]
        pv, thw = self.pre.pixel_values(img)
        got: dict[str, Tensor] = {}
        wanted = set(names)

        def grab(v, ctx):
            if ctx.name not in got:
                got[ctx.name] = v
            if wanted <= set(got):
                raise _Done

        try:
            with self.lens.hooks(captures={nm: [grab] for nm in wanted}):
                self._call(pv, thw, n)
        except _Done:
            pass
        missing = [nm for nm in names if nm not in got]
        if missing and self.inputs is None:
            raise ValueError(f"{missing}: not reached when the image tower alone ran; sites beyond the image tower "
                             "need inputs= (processor output of one prompt)")
        if missing:
            raise ValueError(f"{missing}: not reached when the model ran on these inputs")
        return {nm: _per_image(got[nm], n, nm).float() for nm in names}


def _per_image(v: Tensor, n: int, name: str) -> Tensor:
    """(n, ...): values laid out without a batch dim (Qwen2-VL's vision tower: (patches, d)) are split per image."""
    if v.shape[0] == n:
        return v
    if v.shape[0] % n == 0:
        return v.reshape(n, v.shape[0] // n, *v.shape[1:])
    raise ValueError(f"{name} has shape {tuple(v.shape)}; cannot split it into {n} images")


def _check_names(lens, obj: Objective) -> None:
    for nm in obj.names:
        lens.resolve(nm, arg="objective")  # unknown names raise UnknownNameError with the closest valid ones


# ------------------------------------------------------------------------------------------------ results
def _to_uint8(img: Float[Tensor, "n 3 h w"]) -> Tensor:
    return (img.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _png_uri(image: np.ndarray, scale: int = 1) -> str:
    import base64
    import io

    from PIL import Image

    im = Image.fromarray(np.asarray(image))
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass(repr=False)
class DatasetExamples(Result):
    """The k images of a pool that score highest on `objective`, best first: `images` (k, H, W, 3) uint8,
    `values` (k,) their objective, `indices` (k,) their index in the pool; `all_values` (pool,) every score."""

    objective: str
    images: Tensor
    values: Tensor
    indices: Tensor
    all_values: Tensor

    def summary(self) -> str:
        k = self.images.shape[0]
        return (f"DatasetExamples({self.meta.get('architecture')}: top {k} of {self.all_values.numel()} by "
                f"{self.objective}; values {self.values.min().item() if k else float('nan'):.3g}.."
                f"{self.values.max().item() if k else float('nan'):.3g})")

    def plot(self):
        import matplotlib.pyplot as plt

        k = max(1, self.images.shape[0])
        fig, axes = plt.subplots(1, k, figsize=(1.4 * k, 1.7), squeeze=False)
        for j, ax in enumerate(axes[0]):
            if j < self.images.shape[0]:
                ax.imshow(self.images[j].numpy())
                ax.set_title(f"#{int(self.indices[j])}: {float(self.values[j]):.3g}", fontsize=7)
            ax.axis("off")
        fig.suptitle(f"dataset examples: {self.objective}", fontsize=8)
        fig.tight_layout()
        return fig


@dataclass(repr=False)
class FeatureVizResult(Result):
    """`images` (n, H, W, 3) uint8: the optimised images; `values` (n,) the objective on each, untransformed;
    `trace` (steps, n) float32: the objective at each step (under that step's random transforms); `examples`
    (k, h, w, 3) uint8 with `example_values` / `example_indices`: the pool's top-k by the same objective (k = 0
    when no pool was given); `objective` its label; `settings` how the images were made."""

    objective: str
    images: Tensor
    values: Tensor
    trace: Tensor
    examples: Tensor
    example_values: Tensor
    example_indices: Tensor
    settings: dict

    def pil(self, i: int = 0):
        from PIL import Image

        return Image.fromarray(self.images[i].numpy())

    def summary(self) -> str:
        n, h, w, _ = self.images.shape
        ex = f", {self.examples.shape[0]} dataset examples" if self.examples.shape[0] else ""
        return (f"FeatureVizResult({self.meta.get('architecture')}: {n} images {h}x{w} for {self.objective} after "
                f"{self.trace.shape[0]} steps; objective {self.values.mean().item():.4g}{ex})")

    def plot(self, max_examples: int = 8):
        """The visualisations, then the top dataset examples (values in titles), and the objective over steps."""
        import matplotlib.pyplot as plt

        n = self.images.shape[0]
        k = min(max_examples, self.examples.shape[0])
        cols = n + k + 1
        fig, axes = plt.subplots(1, cols, figsize=(1.6 * cols + 0.8, 1.9), squeeze=False,
                                 gridspec_kw={"width_ratios": [1] * (n + k) + [1.6]})
        for i in range(n):
            axes[0, i].imshow(self.images[i].numpy())
            axes[0, i].set_title(f"viz {i}: {float(self.values[i]):.3g}", fontsize=7)
        for j in range(k):
            axes[0, n + j].imshow(self.examples[j].numpy())
            axes[0, n + j].set_title(f"data #{int(self.example_indices[j])}: {float(self.example_values[j]):.3g}",
                                     fontsize=7)
        for ax in axes[0, : n + k]:
            ax.axis("off")
        ax = axes[0, -1]
        ax.plot(self.trace.numpy(), lw=0.8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("objective", fontsize=7)
        ax.tick_params(labelsize=6)
        fig.suptitle(self.objective, fontsize=8)
        fig.tight_layout()
        return fig

    def html(self, scale: int | None = None) -> str:
        """A self-contained HTML fragment: the images at `scale`x (nearest, default: to about 160 px), the dataset
        examples beside them, the objective values and the settings."""
        h = int(self.images.shape[1])
        scale = scale or max(1, 160 // max(h, 1))

        def cell(img, caption):
            return (f"<figure style='display:inline-block;margin:4px'><img style='image-rendering:pixelated' "
                    f"src='{_png_uri(img.numpy(), scale)}'/><figcaption style='font-size:11px'>{html.escape(caption)}"
                    "</figcaption></figure>")

        viz = "".join(cell(self.images[i], f"viz {i}: {float(self.values[i]):.4g}")
                      for i in range(self.images.shape[0]))
        ex = "".join(cell(self.examples[j], f"#{int(self.example_indices[j])}: {float(self.example_values[j]):.4g}")
                     for j in range(self.examples.shape[0]))
        rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in self.settings.items())
        return (f"<div><b>{html.escape(self.summary())}</b><div>{viz}</div>"
                + (f"<div><i>dataset examples</i><br/>{ex}</div>" if ex else "")
                + f"<table style='font-size:11px'>{rows}</table></div>")

    def _repr_html_(self) -> str:
        return self.html()


# ------------------------------------------------------------------------------------------------ techniques
def _pool(images) -> Tensor:
    from .maps import images_uint8

    if isinstance(images, Tensor) and images.dtype == torch.uint8 and images.dim() == 4 and images.shape[-1] == 3:
        return images.cpu()
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4:
        return torch.from_numpy(images)
    if isinstance(images, Tensor) and images.is_floating_point():
        raise TypeError("images: pass uint8 images (n, H, W, 3), PIL images or uint8 arrays, not float tensors")
    return images_uint8(images)


@torch.no_grad()
def _scores(runner: _Runner, obj: Objective, pool: Tensor, batch_size: int) -> Tensor:
    out = []
    for i in range(0, pool.shape[0], batch_size):
        img = pool[i:i + batch_size].permute(0, 3, 1, 2).float().to(runner.lens.device) / 255
        out.append(obj(runner(img, obj.names)).float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def dataset_examples(lens, objective, images, k: int = 8, *, batch_size: int = 64, inputs=None, mean=None, std=None
                     ) -> DatasetExamples:
    """The `k` images of `images` (uint8 (N, H, W, 3), a list of PIL images or arrays) on which `objective` is
    highest, computed through the same preprocessing as `visualize` (resized bilinearly to the model's input size
    when they differ). Feature visualisation shows what a unit *can* respond to; these show what it does respond to
    in data, and the two should agree (Olah et al. 2017)."""
    require_family(lens, ("contrastive", "generative"), "dataset_examples")
    obj = _objective(objective)
    _check_names(lens, obj)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive int; got {k!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    pool = _pool(images)
    if pool.shape[0] == 0:
        raise ValueError("images: the pool is empty")
    runner = _Runner(lens, preprocessing(lens, mean, std), inputs)
    scores = _scores(runner, obj, pool, batch_size)
    top = scores.topk(min(k, scores.numel()))
    return DatasetExamples(meta=provenance(lens, obj.names), objective=obj.label, images=pool[top.indices],
                           values=top.values, indices=top.indices, all_values=scores)


def visualize(lens, objective, *, steps: int = 256, size: int | tuple[int, int] | None = None, n: int = 1,
              param: str = "fourier", decorrelate: bool = True, decay_power: float = 1.0, transforms="default",
              lr: float = 0.05, seed: int = 0, diversity: float = 0.0, diversity_site: str | None = None,
              fill: str | float = "reflection", init=None, inputs=None, dataset=None, k: int = 8, mean=None, std=None,
              generator: Callable[[Tensor], Tensor] | None = None, latent: Tensor | None = None,
              progress: bool = False) -> FeatureVizResult:
    """Images that maximise `objective` (`unit`, `direction`, `custom`, sums of them, or a (name, fn) pair) by
    `steps` of Adam (`lr`) on a `param` ('fourier': lucid's 1/f-scaled spectrum; 'pixel': raw pixels) image of
    `size` (default: the model's input size; other sizes are resized to it, bilinearly, inside the graph), `n` at
    once, from noise drawn with `seed` (or from `init`, n uint8 images, through the exact inverse of the
    parametrisation). `decorrelate`: lucid's colour decorrelation; `decay_power`: the spectrum's 1/f^p scaling (larger
    p: smoother images). Each step the batch goes through `transforms` ('default': `default_transforms(size)`;
    None: none; or a list; `fill`: what shows beyond the border), then the processor's normalisation and the model.

    `param="generator"`: the images are `generator(latent)` ((n, 3, h, w) in [0, 1], e.g. `vae_decoder(vae)`) and
    the n starting latents `latent` are optimised (`size`, `decorrelate`, `decay_power`, `init` do not apply).

    `diversity` > 0 adds lucid's diversity term (`diversity_term` at `diversity_site`, default the objective's first
    site) so the n images differ. `inputs`: processor output of one prompt, for objectives beyond the image tower.
    `dataset`: a pool of images whose top-`k` by the same objective are stored beside the visualisation
    (`dataset_examples`). Deterministic for a seed on one device. The model's weights get no gradients and it is
    put in eval mode for the call.
    """
    require_family(lens, ("contrastive", "generative"), "visualize")
    obj = _objective(objective)
    _check_names(lens, obj)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int; got {steps!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int; got {n!r}")
    if param not in PARAMS:
        raise ValueError(f"param={param!r}; allowed: {PARAMS}")
    if not isinstance(decay_power, (int, float)) or decay_power < 0:
        raise ValueError(f"decay_power must be a number >= 0 (1: lucid's 1/f; larger: smoother); got {decay_power!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number; got {lr!r}")
    if not isinstance(diversity, (int, float)) or diversity < 0:
        raise ValueError(f"diversity must be a number >= 0; got {diversity!r}")
    fill_ok = fill in ("reflection", "border") if isinstance(fill, str) else \
        isinstance(fill, (int, float)) and not isinstance(fill, bool) and 0 <= fill <= 1
    if not fill_ok:
        raise ValueError(f"fill={fill!r}; allowed: 'reflection', 'border' or a constant in [0, 1]")
    pre = preprocessing(lens, mean, std)
    runner = _Runner(lens, pre, inputs)  # with Qwen2-VL inputs, sets the size their image tokens need
    if param == "generator":
        image, (h, w) = _generator_image(generator, latent, n, init)
    elif generator is not None or latent is not None:
        raise ValueError(f"generator= and latent= go with param='generator'; got param={param!r}")
    else:
        h, w = pre.size if size is None else _as_pair(size, "size")
    tf = _check_transforms(transforms, min(h, w))
    div_site = diversity_site or obj.names[0]
    if diversity > 0:
        _check_name(div_site)
        lens.resolve(div_site, arg="diversity_site")
    names = list(dict.fromkeys(obj.names + ([div_site] if diversity > 0 else [])))
    device = lens.device

    gen = torch.Generator().manual_seed(seed)
    if param == "fourier":
        image = FourierImage(n, h, w, decorrelate=decorrelate, decay_power=decay_power, generator=gen)
    elif param == "pixel":
        image = PixelImage(n, h, w, decorrelate=decorrelate, generator=gen)
    if init is not None:
        start = _pool(init)
        if start.shape[0] != n:
            raise ValueError(f"init holds {start.shape[0]} images; n={n}")
        x0 = start.permute(0, 3, 1, 2).float() / 255
        if tuple(x0.shape[-2:]) != (h, w):
            x0 = F.interpolate(x0, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        image.set_images(x0)
    image.to(device)
    params = list(image.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    trace = torch.zeros(steps, n)

    from tqdm.auto import tqdm

    model = lens.model
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    try:
        with torch.enable_grad():
            for step in tqdm(range(steps), desc="visualize", disable=not progress):
                img = image()
                x = apply_transforms(img, tf, gen, fill)
                vals = runner(x, names)
                score = obj(vals)
                if step == 0 and not score.requires_grad:
                    raise ValueError(f"{obj.label} does not depend differentiably on the image (attention patterns "
                                     "and outputs after argmax carry no gradient); choose another site")
                loss = -score.sum()
                if diversity > 0:
                    loss = loss + diversity * diversity_term(vals[div_site])
                grads = torch.autograd.grad(loss, params)
                for p, g in zip(params, grads):
                    p.grad = g
                opt.step()
                opt.zero_grad(set_to_none=True)
                trace[step] = score.detach().float().cpu()
        with torch.no_grad():
            final = image()
            values = obj(runner(final, obj.names)).float().cpu()
    finally:
        if was_training:
            model.train()
    images = _to_uint8(final)
    if dataset is not None:
        ex = dataset_examples(lens, obj, dataset, k, inputs=inputs, mean=mean, std=std)
        examples, ex_values, ex_idx = ex.images, ex.values, ex.indices
    else:
        examples = torch.zeros(0, h, w, 3, dtype=torch.uint8)
        ex_values, ex_idx = torch.zeros(0), torch.zeros(0, dtype=torch.long)
    settings = {"steps": steps, "size": [h, w], "n": n, "param": param, "decorrelate": decorrelate,
                "decay_power": decay_power if param == "fourier" else None, "lr": lr,
                "seed": seed, "diversity": diversity, "diversity_site": div_site if diversity > 0 else None,
                "transforms": [repr(t) for t in tf], "fill": fill, "init": init is not None,
                "model_input_size": list(pre.size), "mean": pre.mean.tolist(), "std": pre.std.tolist()}
    return FeatureVizResult(meta=provenance(lens, names), objective=obj.label, images=images, values=values,
                            trace=trace, examples=examples, example_values=ex_values, example_indices=ex_idx,
                            settings=settings)


def _generator_image(generator, latent, n: int, init) -> tuple[GeneratorImage, tuple[int, int]]:
    """The image module and its (h, w), from one checked decoding of the start latents."""
    if not callable(generator) or not isinstance(latent, Tensor):
        raise ValueError("param='generator' needs generator= (latents -> images (n, 3, h, w) in [0, 1], e.g. "
                         "vae_decoder(vae)) and latent= (the n starting latents, e.g. vae_latents(vae, images))")
    if init is not None:
        raise ValueError("init= sets a Fourier or pixel image; with param='generator' pass the starting latent=")
    if latent.shape[0] != n:
        raise ValueError(f"latent holds {latent.shape[0]} rows; n={n}")
    image = GeneratorImage(generator, latent)
    with torch.no_grad():
        out = image()
    if out.dim() != 4 or out.shape[:2] != (n, 3):
        raise ValueError(f"generator(latent) gave shape {tuple(out.shape)}; expected (n={n}, 3, h, w) images in "
                         "[0, 1]")
    return image, (int(out.shape[-2]), int(out.shape[-1]))


__all__ = ["DatasetExamples", "FeatureVizResult", "FourierImage", "GeneratorImage", "ImageParam", "Jitter",
           "Objective", "PixelImage", "Rotate", "Scale", "apply_transforms", "correlate_colours", "custom",
           "dataset_examples", "decorrelate_colours", "default_transforms", "direction", "diversity_term",
           "frequencies", "image_to_spectrum", "preprocessing", "qwen_patchify", "spectrum_scale", "spectrum_to_image",
           "unit", "vae_decoder", "vae_latents", "visualize"]
