"""SpLiCE (Bhalla, Oesterling, Srinivas, Calmon and Lakkaraju 2024, "Interpreting CLIP with sparse linear concept
embeddings"): each image embedding written as a sparse, non-negative combination of concept texts' embeddings.

    sp = splice(clip, images, concepts=["red", "blue", "square", "circle", ...], l1=0.2)
    sp.weights                         # (images, concepts), mostly zeros, >= 0
    sp.top(0)                          # [('red', 0.61), ('square', 0.44)]
    sp.cosine                          # (images,) how well the sparse code rebuilds each embedding
    sp = splice(clip, images, concepts, classes=PROMPTS, labels=y)
    sp.accuracy, sp.accuracy_reconstructed   # zero-shot accuracy with the original vs the rebuilt embedding

Why centre first. Image and text embeddings of a contrastive model live in two cones far apart (the modality gap):
every image is closer to every image than to any text. Decomposed as they are, the code would spend its weight on
whatever concept points at the image cone's centre. SpLiCE therefore subtracts each modality's mean (images: the
mean image embedding, by default of the images given; concepts: the mean of the concept embeddings), normalises,
and only then solves, per image z,

    min_w  1/2 ||z - w C||^2 + l1 ||w||_1   subject to  w >= 0,

C the centred, normalised concepts (concepts, d). Non-negative: a concept is present or absent, never "anti-red";
the l1 penalty sets how many survive (a concept enters only while its correlation with the unexplained part of z
exceeds l1). The rebuilt embedding is `normalise(r * normalise(w C) + image_mean)`, r the mean norm of the images'
centred embeddings (SpLiCE's rule with the centred scale put back), so it can replace the image embedding in a
zero-shot classifier.

The solver is FISTA (Beck and Teboulle 2009) on the whole batch at once: a gradient step on the quadratic with step
1 / ||C C^T||_2, then the non-negative soft threshold max(0, w - l1 * step), with Nesterov momentum and restarts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn

from .result import Result, provenance, require_family
from .textspan import _features, _text_side, pixel_inputs


# ------------------------------------------------------------------------------------------------- the solver
def nonneg_lasso(z: Float[Tensor, "n d"], dictionary: Float[Tensor, "m d"], l1: float, *, max_iter: int = 2000,
                 tol: float = 1e-7) -> Float[Tensor, "n m"]:
    """argmin_{w >= 0} 1/2 ||z - w D||^2 + l1 * sum(w), for every row of z at once (FISTA with adaptive restart).

    Stops when no weight moved by more than `tol` (relative to the largest weight) in an iteration, or after
    `max_iter`. Float64 inside; returns float32."""
    if not isinstance(l1, (int, float)) or isinstance(l1, bool) or l1 < 0:
        raise ValueError(f"l1 must be a number >= 0; got {l1!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int; got {max_iter!r}")
    z = torch.as_tensor(z).detach().double().cpu()
    d = torch.as_tensor(dictionary).detach().double().cpu()
    if z.dim() != 2 or d.dim() != 2 or z.shape[1] != d.shape[1]:
        raise ValueError(f"z (n, d) and dictionary (m, d) must share d; got {tuple(z.shape)} and {tuple(d.shape)}")
    gram = d @ d.T  # (m, m)
    zd = z @ d.T  # (n, m)
    lip = float(torch.linalg.eigvalsh(gram)[-1])
    if lip <= 0:
        return torch.zeros(z.shape[0], d.shape[0])
    step = 1.0 / lip
    w = torch.zeros_like(zd)
    y, t = w.clone(), torch.ones(z.shape[0], 1, dtype=torch.float64)
    for _ in range(max_iter):
        w_new = (y - step * (y @ gram - zd) - step * l1).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t).sqrt()) / 2
        moved = w_new - w
        # restart the momentum of rows where it points uphill (O'Donoghue and Candes 2015)
        uphill = ((y - w_new) * moved).sum(1, keepdim=True) > 0
        y = torch.where(uphill, w_new, w_new + ((t - 1) / t_new) * moved)
        w, t = w_new, torch.where(uphill, torch.ones_like(t_new), t_new)
        if float(moved.abs().max()) <= tol * max(float(w.abs().max()), 1e-12):
            break
    return w.float()


def _centred(x: Tensor, mean: Tensor) -> Tensor:
    return nn.functional.normalize(x - mean, dim=-1)


# -------------------------------------------------------------------------------------------------- result
@dataclass(repr=False)
class SpliceResult(Result):
    """`weights` (images, concepts) >= 0: each image's sparse code over `concepts`; `dictionary` (concepts, d) the
    centred, normalised concept embeddings the code is over; `image_mean` (d,) and `concept_mean` (d,) what was
    subtracted; `scale` the mean norm of the centred image embeddings (the rebuild's radius); `cosine` (images,)
    the cosine of each centred embedding with its code `w C`. With classes: `accuracy` and `accuracy_reconstructed`
    zero-shot over `classes` (else None), `labels` (images,) the class index per image (empty without)."""

    concepts: list[str]
    weights: Tensor
    dictionary: Tensor
    image_mean: Tensor
    concept_mean: Tensor
    scale: float
    cosine: Tensor
    l1: float
    classes: list[str] | None
    labels: Tensor
    accuracy: float | None
    accuracy_reconstructed: float | None

    def reconstruct(self) -> Float[Tensor, "images d_embed"]:
        """The rebuilt, normalised image embeddings `normalise(scale * normalise(w C) + image_mean)`."""
        code = nn.functional.normalize(self.weights @ self.dictionary, dim=-1)
        return nn.functional.normalize(self.scale * code + self.image_mean, dim=-1)

    def l0(self) -> Float[Tensor, "images"]:
        """Number of non-zero concepts per image."""
        return (self.weights > 0).sum(1).float()

    def top(self, image: int, k: int = 5) -> list[tuple[str, float]]:
        """The image's k heaviest concepts with their weights (zeros left out)."""
        if not -self.weights.shape[0] <= image < self.weights.shape[0]:
            raise IndexError(f"image {image} out of range for {self.weights.shape[0]} images")
        w = self.weights[image]
        order = w.argsort(descending=True)[:k]
        return [(self.concepts[j], float(w[j])) for j in order.tolist() if w[j] > 0]

    def summary(self) -> str:
        acc = ("" if self.accuracy is None else
               f"; zero-shot {self.accuracy:.2f} -> {self.accuracy_reconstructed:.2f} rebuilt")
        return (f"SpliceResult({self.meta.get('architecture')}: {self.weights.shape[0]} images over "
                f"{len(self.concepts)} concepts, l1={self.l1}, mean l0 {float(self.l0().mean()):.1f}, "
                f"mean cosine {float(self.cosine.mean()):.2f}{acc})")

    def plot(self, images: Sequence[int] | None = None, k: int = 5):
        """Per image (first 6 by default), its k heaviest concepts as bars; the rebuild's cosine in the title."""
        import matplotlib.pyplot as plt

        rows = list(images) if images is not None else list(range(min(6, self.weights.shape[0])))
        fig, axes = plt.subplots(1, len(rows), figsize=(1.9 * len(rows) + 0.4, 2.2), squeeze=False)
        for ax, i in zip(axes[0], rows):
            top = self.top(i, k)
            ax.barh(range(len(top)), [v for _, v in top], color="tab:green")
            ax.set_yticks(range(len(top)), [c for c, _ in top], fontsize=7)
            ax.invert_yaxis()
            ax.tick_params(axis="x", labelsize=6)
            ax.set_title(f"image {i} (cos {float(self.cosine[i]):.2f})", fontsize=7)
        fig.suptitle(f"SpLiCE: sparse non-negative concept weights (l1={self.l1})", fontsize=8)
        fig.tight_layout()
        return fig


# ----------------------------------------------------------------------------------------------- technique
@torch.no_grad()
def image_embeddings(lens, images_or_inputs, *, batch_size: int = 64) -> Float[Tensor, "images d_embed"]:
    """The model's L2-normalised image embeddings (float32, CPU) of images or processor output."""
    require_family(lens, "contrastive", "image_embeddings")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    pv = pixel_inputs(lens, images_or_inputs)["pixel_values"]
    out = [_features(lens.model.get_image_features(pixel_values=pv[i:i + batch_size].to(lens.device, lens.dtype)))
           .float().cpu() for i in range(0, len(pv), batch_size)]
    return nn.functional.normalize(torch.cat(out), dim=-1)


def splice(lens, images_or_inputs, concepts, *, l1: float = 0.2, classes=None, labels=None,
           concept_embeds: Tensor | None = None, image_mean: Tensor | None = None, max_iter: int = 2000,
           batch_size: int = 64) -> SpliceResult:
    """SpLiCE: sparse non-negative concept codes of a CLIP / SigLIP model's image embeddings (module docstring).

    `concepts`: list of strings or dict label -> prompts (ensembled); `concept_embeds` (concepts, d) instead of
    encoding them. `image_mean` (d,): the mean normalised image embedding to centre with (SpLiCE uses a large
    image set's; default: the images given, then at least 2 are needed). `classes` (list or dict, as concepts)
    with `labels` (one class index per image): zero-shot accuracy with the original and the rebuilt embeddings.
    """
    require_family(lens, "contrastive", "splice")
    if (classes is None) != (labels is None):
        raise ValueError("zero-shot accuracy needs both classes (the class texts) and labels (a class index per "
                         "image); give both or neither")
    names, emb = _text_side(lens, concepts, concept_embeds)
    x = image_embeddings(lens, images_or_inputs, batch_size=batch_size)
    if emb.shape[1] != x.shape[1]:
        raise ValueError(f"concept embeddings have {emb.shape[1]} dims; the image embedding has {x.shape[1]}")
    if image_mean is None:
        if x.shape[0] < 2:
            raise ValueError("with one image the image mean is the image itself: pass image_mean (d,) from a "
                             "larger set, or more images")
        mu_img = x.mean(0)
    else:
        mu_img = torch.as_tensor(image_mean).detach().float().cpu().reshape(-1)
        if mu_img.shape[0] != x.shape[1]:
            raise ValueError(f"image_mean must have {x.shape[1]} entries; got {mu_img.shape[0]}")
    mu_txt = emb.mean(0)
    dictionary = _centred(emb, mu_txt)
    z = _centred(x, mu_img)
    w = nonneg_lasso(z, dictionary, l1, max_iter=max_iter)
    cos = nn.functional.cosine_similarity(w @ dictionary, z, dim=-1)
    cos = torch.where((w > 0).any(1), cos, torch.zeros_like(cos))
    scale = float((x - mu_img).norm(dim=-1).mean())
    res = SpliceResult(meta=provenance(lens, [], n_images=int(x.shape[0])), concepts=names, weights=w,
                       dictionary=dictionary, image_mean=mu_img, concept_mean=mu_txt, scale=scale, cosine=cos,
                       l1=float(l1), classes=None, labels=torch.zeros(0, dtype=torch.long), accuracy=None,
                       accuracy_reconstructed=None)
    if classes is not None:
        cnames, cemb = _text_side(lens, classes, None)
        y = torch.as_tensor(labels).long().cpu()
        if y.shape != (x.shape[0],) or int(y.min()) < 0 or int(y.max()) >= len(cnames):
            raise ValueError(f"labels must be one class index in [0, {len(cnames) - 1}] per image ({x.shape[0]}); "
                             f"got shape {tuple(y.shape)}")
        res.classes, res.labels = cnames, y
        res.accuracy = float(((x @ cemb.T).argmax(-1) == y).float().mean())
        res.accuracy_reconstructed = float(((res.reconstruct() @ cemb.T).argmax(-1) == y).float().mean())
    return res


__all__ = ["SpliceResult", "image_embeddings", "nonneg_lasso", "splice"]
