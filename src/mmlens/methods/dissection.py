"""Network dissection: name what each unit of a vision tower detects, from a set of probing images.

    res = clip_dissect(vit, images, ["red", "circle", ...], labeller=clip)     # CLIP-Dissect: no masks needed
    res = net_dissect(vit, images, {"red": red_px, "circle": circle_px})        # NetDissect: IoU with pixel masks
    res.labels_for("vision.blocks.3.mlp.post")     # one concept per unit
    res.top_ids, res.top_scores                     # (sites, units, top): the best concepts and their scores
    res.best_units("red")                           # [(site, unit, score), ...] the units labelled 'red', best first
    res.unit_maps(vit, images)                      # MapResult: where the best unit of each concept fires
    res.plot()                                      # share of units per concept, per layer

Two ways to label a unit (Bau et al. 2017, "Network Dissection"; Oikarinen & Weng 2023, "CLIP-Dissect"):

* `net_dissect` needs concept masks. Each unit's patch activations, laid on the patch grid and upsampled to the
  masks' resolution, are thresholded at the unit's top `quantile` over the whole dataset; the label is the concept
  whose masks overlap that binary map best (IoU summed over the dataset). It asks *where* a unit fires.
* `clip_dissect` needs only concept words and a contrastive labeller (CLIP, SigLIP). Each unit gives one activation
  per image (mean over patch tokens, CLS excluded), the labeller gives each image's cosine with each concept; a
  similarity function between a unit's activation vector (over images) and a concept's cosine vector picks the
  label. The paper's best function is soft-WPMI (`soft_wpmi`), a simpler one the cube-cosine (`cos3`).

Both work on any ViT image tower with per-token sites (CLIP, SigLIP, BLIP-2's tower, LLaVA's and PaliGemma's
`vision.blocks...`): the tower is run alone on the images (through the lens's own image processor), in batches.
Units are the last dim of each site (`mlp.post`: MLP neurons; `resid_post`: residual dims). Qwen2-VL's tower takes
flattened patches in merge-window order; its tokens are put back in raster order (`store.layout.merge_window_grid`);
`hooks` on its sites still see the tower's own (images x patches, units) values in merge-window order.
"""

from __future__ import annotations

import html
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Bool, Float
import torch.nn.functional as F
from torch import Tensor

from .maps import MapResult, grid_of, images_uint8
from .result import Result, provenance, require_family

DEFAULT_NAMES = "vision.blocks.*.mlp.post"
MAX_FLOATS = 1 << 24  # elements per chunk in the per-unit loops (64 MiB of float32)


# --------------------------------------------------------------------------------------------------- result
@dataclass(repr=False)
class DissectionResult(Result):
    """Per site `names[s]` (of `widths[s]` units) and unit u: its `top` best concepts `top_ids[s, u]` (indices into
    `concepts`, best first) with their scores `top_scores[s, u]` (float32; IoU for NetDissect, the similarity
    function's value for CLIP-Dissect). Id -1: no label, for padding (sites narrower than the widest; score NaN)
    and for units every concept scores alike (e.g. a dead unit's IoU of 0 with everything).
    `thresholds` (sites, units): NetDissect's activation threshold per unit (empty for CLIP-Dissect). `method`:
    'net_dissect' or 'clip_dissect/<similarity>'."""

    names: list[str]
    concepts: list[str]
    widths: list[int]
    top_ids: Tensor
    top_scores: Tensor
    thresholds: Tensor
    method: str

    # ------------------------------------------------------------------------------------------- lookups
    def _site(self, name: str | int) -> int:
        if isinstance(name, int):
            if not -len(self.names) <= name < len(self.names):
                raise IndexError(f"site index {name} out of range for {len(self.names)} sites")
            return name % len(self.names)
        if name not in self.names:
            raise KeyError(f"{name!r} was not dissected; sites: {self.names}")
        return self.names.index(name)

    @property
    def labels(self) -> Tensor:
        """(sites, units) concept index of each unit's label (-1: none, see the class docstring)."""
        return self.top_ids[..., 0]

    @property
    def scores(self) -> Tensor:
        """(sites, units) the label's score (NaN: padding)."""
        return self.top_scores[..., 0]

    def labels_for(self, name: str | int) -> list[str]:
        """The label of every unit of site `name` (canonical name or index), unit order; None where there is none."""
        s = self._site(name)
        return [self.concepts[i] if i >= 0 else None for i in self.labels[s, :self.widths[s]].tolist()]

    def scores_for(self, name: str | int) -> Float[Tensor, "units"]:
        s = self._site(name)
        return self.scores[s, :self.widths[s]]

    def top_concepts(self, name: str | int, unit: int) -> list[tuple[str, float]]:
        """The unit's best concepts with their scores, best first (empty for a unit with no label)."""
        s = self._site(name)
        if not 0 <= unit < self.widths[s]:
            raise IndexError(f"unit {unit} out of range: {self.names[s]} has {self.widths[s]} units")
        return [(self.concepts[i], float(v)) for i, v in zip(self.top_ids[s, unit].tolist(),
                                                             self.top_scores[s, unit].tolist()) if i >= 0]

    def best_units(self, concept: str, n: int | None = None, name: str | int | None = None
                   ) -> list[tuple[str, int, float]]:
        """(site, unit, score) of the units labelled `concept`, highest score first (all sites, or one)."""
        if concept not in self.concepts:
            raise KeyError(f"unknown concept {concept!r}; concepts: {self.concepts}")
        c = self.concepts.index(concept)
        sites = range(len(self.names)) if name is None else [self._site(name)]
        rows = [(self.names[s], u, float(self.scores[s, u])) for s in sites
                for u in (self.labels[s] == c).nonzero().flatten().tolist()]
        rows.sort(key=lambda r: -r[2])
        return rows if n is None else rows[:n]

    def counts(self, min_score: float | None = None) -> Tensor:
        """(sites, concepts) number of units labelled with each concept (only those scoring >= `min_score`)."""
        out = torch.zeros(len(self.names), len(self.concepts), dtype=torch.long)
        for s in range(len(self.names)):
            lab, sc = self.labels[s, :self.widths[s]], self.scores[s, :self.widths[s]]
            keep = lab >= 0
            if min_score is not None:
                keep &= sc >= min_score
            lab = lab[keep]
            out[s] = torch.bincount(lab, minlength=len(self.concepts))
        return out

    def table(self, n: int = 3) -> list[dict]:
        """Per concept its n best units: rows {concept, site, unit, score, top concepts}."""
        rows = []
        for c in self.concepts:
            for name, u, v in self.best_units(c, n):
                rows.append({"concept": c, "site": name, "unit": u, "score": round(v, 4),
                             "top": ", ".join(f"{k} {s:.3g}" for k, s in self.top_concepts(name, u))})
        return rows

    # -------------------------------------------------------------------------------------------- maps
    def unit_maps(self, lens, images, units: Mapping[str, Sequence[int]] | Sequence[tuple[str, int]] | None = None,
                  *, thresholded: bool = False, batch_size: int = 64, hooks=None) -> MapResult:
        """Where chosen units fire on `images`: `unit_maps(...)` with each map labelled by the unit's concept and
        score. Default units: the best unit of each concept that labels any. `thresholded=True` (NetDissect only):
        the binary maps NetDissect scored, upsampled activations >= the unit's threshold, at image resolution."""
        if units is None:
            units = [(nm, u) for c in self.concepts for nm, u, _ in self.best_units(c, 1)]
        pairs = _unit_pairs(units)
        for nm, u in pairs:
            self.top_concepts(nm, u)  # checks both
        if thresholded and not self.thresholds.numel():
            raise ValueError(f"thresholded=True needs NetDissect's thresholds; this result is {self.method}")
        res = unit_maps(lens, images, pairs, batch_size=batch_size, hooks=hooks)
        def label(nm: str, u: int) -> str:
            top = self.top_concepts(nm, u)
            what = f"{top[0][0]} {top[0][1]:.2f}" if top else "no label"
            return f"{nm.replace('vision.', '').replace('blocks.', 'b')}:{u} {what}"

        res.labels = [label(nm, u) for nm, u in pairs]
        if thresholded:
            t = torch.tensor([float(self.thresholds[self._site(nm), u]) for nm, u in pairs])
            res.maps = (_bilinear(res.maps, res.size) >= t[None, :, None, None]).float()
            res.method = f"{self.method}: activation >= the unit's threshold"
        res.meta = {**res.meta, "dissection": self.method}
        return res

    # ----------------------------------------------------------------------------------------- display
    def summary(self) -> str:
        c = self.counts().sum(0)
        order = c.argsort(descending=True)[:4].tolist()
        common = ", ".join(f"{self.concepts[i]} {int(c[i])}" for i in order if c[i] > 0)
        return (f"DissectionResult({self.method} on {self.meta.get('architecture', '?')}: {len(self.names)} sites x "
                f"{max(self.widths) if self.widths else 0} units, {len(self.concepts)} concepts; most labelled: "
                f"{common})")

    def plot(self, min_score: float | None = None):
        """Heat map sites (rows) x concepts (columns): the share of each site's units labelled with each concept
        (counted only where the label scores >= `min_score`), the unit count written in each cell."""
        import matplotlib.pyplot as plt

        counts = self.counts(min_score)
        share = counts.float() / torch.tensor(self.widths, dtype=torch.float).clamp_min(1)[:, None]
        s, c = share.shape
        fig, ax = plt.subplots(figsize=(0.55 * c + 2.6, 0.38 * s + 1.4))
        im = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0)
        for i in range(s):
            for j in range(c):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=6,
                        color="w" if share[i, j] < 0.6 * float(share.max() or 1) else "k")
        ax.set_yticks(range(s), [n.replace("vision.blocks.", "block ") for n in self.names], fontsize=7)
        ax.set_xticks(range(c), self.concepts, fontsize=7, rotation=45, ha="right")
        fig.colorbar(im, ax=ax, fraction=0.05, label="share of units")
        cut = "" if min_score is None else f", score >= {min_score:g}"
        ax.set_title(f"{self.method}: units per label{cut}", fontsize=8)
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        rows = self.table(1)
        cols = list(rows[0]) if rows else []
        body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[k]))}</td>" for k in cols) + "</tr>" for r in rows)
        head = "".join(f"<th>{html.escape(k)}</th>" for k in cols)
        return super()._repr_html_() + (f"<table><tr>{head}</tr>{body}</table>" if rows else "")

    def to_report(self, report, title: str | None = None, **plot_kw) -> None:
        super().to_report(report, title, **plot_kw)
        report.table(self.table(1))


# ------------------------------------------------------------------------------------ similarity functions
def _check_ap(A: Tensor, P: Tensor) -> tuple[Tensor, Tensor]:
    A, P = torch.as_tensor(A).float(), torch.as_tensor(P).float()
    if A.dim() != 2 or P.dim() != 2 or A.shape[0] != P.shape[0]:
        raise ValueError(f"expected activations (images, units) and similarities (images, concepts) over the same "
                         f"images; got {tuple(A.shape)} and {tuple(P.shape)}")
    return A, P


def cos_similarity(A: Float[Tensor, "images units"], P: Float[Tensor, "images concepts"]
                   ) -> Float[Tensor, "units concepts"]:
    """Cosine between each unit's activation vector and each concept's similarity vector, over images."""
    A, P = _check_ap(A, P)
    A = A / A.norm(dim=0, keepdim=True).clamp_min(1e-12)
    P = P / P.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return A.T @ P


def cos3(A: Float[Tensor, "images units"], P: Float[Tensor, "images concepts"], *, min_norm: float = 1e-3
         ) -> Float[Tensor, "units concepts"]:
    """CLIP-Dissect's cube-cosine: both centred over images, cubed (the largest values dominate), then cosine. A unit
    that equals a concept's similarity up to a positive scale and a shift scores exactly 1 with it.

    The paper's code clamps each cubed column's norm at `min_norm` (against dividing by ~0 for dead units); cosines
    have a spread of a few hundredths, so on a few hundred images that clamp would shrink some concepts' columns and
    not others. Here each column is first divided by its std (cosine is scale-free, so nothing else changes): the
    clamp then silences only constant columns."""
    A, P = _check_ap(A, P)
    a, p = ((X - X.mean(0, keepdim=True)) / X.std(0, keepdim=True).clamp_min(1e-12) for X in (A, P))
    a, p = a ** 3, p ** 3
    a = a / a.norm(dim=0, keepdim=True).clamp_min(min_norm)
    p = p / p.norm(dim=0, keepdim=True).clamp_min(min_norm)
    return a.T @ p


def _pmi(A: Tensor, P: Tensor, top_k: int, a: float, lam: float, min_prob: float, weights: Tensor | None) -> Tensor:
    """sum over each unit's top_k images of log(p(concept | image)) [soft: weighted], minus lam x its log-mean over
    units (the concept's prior)."""
    A, P = _check_ap(A, P)
    k = min(top_k, A.shape[0])
    prob = torch.softmax(a * P, dim=1)  # (images, concepts): p(concept | image) by the labeller
    idx = A.topk(k, dim=0).indices.T  # (units, k)
    w = None if weights is None else weights[:k, None]
    step = max(1, MAX_FLOATS // max(1, k * P.shape[1]))
    rows = []
    for i in range(0, idx.shape[0], step):
        pc = prob[idx[i:i + step]]  # (chunk, k, concepts)
        if w is not None:  # p(concept in image set | image) = 1 + p_in * (p(concept | image) - 1)
            pc = 1 + w * (pc - 1)
        rows.append(torch.log(pc + min_prob).sum(1))
    given = torch.cat(rows)  # (units, concepts): log p(concept | unit's top images)
    prior = torch.logsumexp(given, dim=0, keepdim=True) - math.log(given.shape[0])
    return given - lam * prior


def soft_wpmi(A: Float[Tensor, "images units"], P: Float[Tensor, "images concepts"], *, top_k: int = 100,
              a: float = 10.0, lam: float = 1.0, p_start: float = 0.998, p_end: float = 0.97,
              min_prob: float = 1e-7) -> Float[Tensor, "units concepts"]:
    """CLIP-Dissect's soft weighted pointwise mutual information (its best similarity; defaults as its code).

    p(c | image) = softmax over concepts of `a` x cosine. A unit's top_k images (by activation) form its example set,
    the i-th counted with weight p_in falling linearly from p_start to p_end; log p(c | set) = sum_i log(1 + p_in_i
    (p(c | image_i) - 1)). The score subtracts `lam` x log p(c), the mean of p(c | set) over all units (so it compares
    units with one another: a concept every unit's images show scores low)."""
    k = min(top_k, torch.as_tensor(A).shape[0])
    weights = p_start - torch.arange(k, dtype=torch.float) / k * (p_start - p_end)
    return _pmi(A, P, top_k, a, lam, min_prob, weights)


def wpmi(A: Float[Tensor, "images units"], P: Float[Tensor, "images concepts"], *, top_k: int = 28, a: float = 2.0,
         lam: float = 0.6, min_prob: float = 1e-7) -> Float[Tensor, "units concepts"]:
    """CLIP-Dissect's (hard) WPMI: `soft_wpmi` with every top image counted fully (weight 1)."""
    return _pmi(A, P, top_k, a, lam, min_prob, None)


SIMILARITIES: dict[str, Callable[..., Tensor]] = {"soft_wpmi": soft_wpmi, "wpmi": wpmi, "cos3": cos3,
                                                  "cos": cos_similarity}


# ---------------------------------------------------------------------------------------------- NetDissect
def unit_thresholds(acts: Float[Tensor, "images units h w"], quantile: float = 0.005) -> Float[Tensor, "units"]:
    """Each unit's activation threshold: the value its top `quantile` of cells (over all images and patch cells)
    reach, i.e. the k-th largest with k = ceil(quantile x cells) (at least 1)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile}; allowed: a fraction in (0, 1) (NetDissect uses 0.005)")
    n, u = acts.shape[:2]
    flat = acts.transpose(0, 1).reshape(u, -1).float()
    k = max(1, math.ceil(quantile * flat.shape[1]))
    return flat.kthvalue(flat.shape[1] - k + 1, dim=1).values


def iou_scores(acts: Float[Tensor, "images units h w"], masks: Bool[Tensor, "images concepts H W"],
               thresholds: Float[Tensor, "units"]) -> Float[Tensor, "units concepts"]:
    """NetDissect's IoU of every unit with every concept over the whole dataset: each activation map upsampled
    (bilinear) to the masks' size and thresholded (>= the unit's threshold), then sum of intersections over sum of
    unions across images. A unit whose threshold does not exceed its own minimum (a constant map, or one at its
    minimum almost everywhere) would select everything and scores 0."""
    n, u = acts.shape[:2]
    if masks.dim() != 4 or masks.shape[0] != n:
        raise ValueError(f"masks: expected (images={n}, concepts, H, W); got {tuple(masks.shape)}")
    size = tuple(masks.shape[-2:])
    t = torch.as_tensor(thresholds).float().reshape(1, u, 1, 1)
    lab = masks.bool().flatten(2).float()  # (images, concepts, H*W)
    inter = torch.zeros(u, masks.shape[1])
    area = torch.zeros(u)
    step = max(1, MAX_FLOATS // max(1, u * size[0] * size[1]))
    for i in range(0, n, step):
        up = _bilinear(acts[i:i + step].float(), size)
        on = torch.ge(up, t, out=up).flatten(2)  # (b, units, H*W) 0./1., in place
        inter += torch.bmm(on, lab[i:i + step].transpose(1, 2)).sum(0)
        area += on.sum((0, 2))
    union = area[:, None] + lab.sum((0, 2))[None] - inter
    out = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    dead = t.flatten() <= acts.transpose(0, 1).reshape(u, -1).float().min(1).values
    out[dead] = 0.0
    return out


def _bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """`maps.upsample` (bilinear, align_corners=False) as two small matmuls with PyTorch's own 1-D interpolation
    weights: the same values (to float rounding), several times faster on (images, units, h, w) stacks."""
    h, w = x.shape[-2:]
    rows = F.interpolate(torch.eye(h)[None], size=size[0], mode="linear", align_corners=False)[0].T  # (H, h)
    cols = F.interpolate(torch.eye(w)[None], size=size[1], mode="linear", align_corners=False)[0]  # (w, W)
    return torch.matmul(rows, x.float() @ cols)


# ------------------------------------------------------------------------------------------- the tower run
def _tower(lens, technique: str):
    """(the image tower module, the image processor, patch size) of a lens, or a TypeError saying why not."""
    if lens.family not in ("contrastive", "generative") or "vision.embed" not in lens.sites:
        raise TypeError(f"{technique} dissects an image tower; {lens.architecture} ({lens.family}) has none "
                        "(no vision.* hook points)")
    path = lens.sites["vision.embed"].path.rpartition(".")[0]
    proc = _image_processor(lens, technique)
    cfg = lens.model.config
    patch = getattr(getattr(cfg, "vision_config", None) or cfg, "patch_size", None)
    return lens.model.get_submodule(path), proc, patch


def _image_processor(lens, technique: str):
    """`lens.processor.image_processor` (or the processor itself), or a TypeError: a tokenizer is callable too (a
    Qwen2-VL folder whose processor could not be built loads its tokenizer alone) and would fail obscurely."""
    proc = getattr(lens.processor, "image_processor", lens.processor)
    if proc is None or not callable(proc) or "pixel_values" not in getattr(proc, "model_input_names", ["pixel_values"]):
        got = ("no processor" if lens.processor is None else f"{type(lens.processor).__name__}.image_processor is None"
               if proc is None else f"its processor is a {type(proc).__name__}")
        raise TypeError(f"{technique}: {lens.architecture} has no image processor ({got}); load it with its processor "
                        "(mmlens.load(folder, processor=...)) or set lens.processor to one with an image_processor")
    return proc


def _pixels(lens, proc, batch: Tensor, with_grid: bool = False):
    """pixel_values on the lens's device; with `with_grid`, also `image_grid_thw` (Qwen2-VL; None elsewhere)."""
    from PIL import Image

    out = proc(images=[Image.fromarray(im) for im in batch.numpy()], return_tensors="pt")
    pix = torch.as_tensor(out["pixel_values"]).to(lens.device, lens.dtype)
    return (pix, out.get("image_grid_thw")) if with_grid else pix


def _image_batches(images, batch_size: int) -> Iterable[Tensor]:
    """uint8 (b, H, W, 3) chunks of `images`: a sequence (list of PIL images / arrays, an (N, H, W, 3) array, an
    (N, 3, H, W) float tensor) or any iterable of single images."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    if isinstance(images, (np.ndarray, Tensor, list, tuple)):
        n = len(images)
        if n == 0:
            raise ValueError("no images given")
        for i in range(0, n, batch_size):
            yield images_uint8(images[i:i + batch_size])
        return
    it = iter(images)
    first = True
    while chunk := list(itertools.islice(it, batch_size)):
        first = False
        yield images_uint8(chunk)
    if first:
        raise ValueError("no images given")


def _layout(seq: int, pix: Tensor, patch: int | None, name: str) -> tuple[int, int, int]:
    """(rows, cols, first patch position) of a tower's token sequence: CLS first where seq = patches + 1."""
    if patch:
        rows, cols = pix.shape[-2] // patch, pix.shape[-1] // patch
    else:
        rows = cols = math.isqrt(seq - 1) if math.isqrt(seq - 1) ** 2 == seq - 1 else math.isqrt(seq)
    if seq == rows * cols + 1:
        return rows, cols, 1
    if seq == rows * cols:
        return rows, cols, 0
    raise ValueError(f"{name}: {seq} tokens are neither {rows}x{cols} patches nor those plus a class token")


def _run_tower(lens, tower, pix: Tensor, names: list[str], hooks, thw: Tensor | None = None) -> dict[str, Tensor]:
    got: dict[str, Tensor] = {}
    caps = {n: [lambda v, ctx: got.__setitem__(ctx.name, v.detach())] for n in names}
    with torch.no_grad(), lens.hooks(hooks, captures=caps):
        if thw is None:
            tower(pixel_values=pix)
        else:  # Qwen2-VL: flattened patches and each image's (t, h, w) patch grid
            tower(pix, grid_thw=thw.to(pix.device))
    missing = [n for n in names if n not in got]
    if missing:
        raise ValueError(f"{missing} did not fire when running the image tower alone; pass image-tower sites "
                         "(vision.*)")
    return got


def _resolve(lens, names, technique: str) -> list[str]:
    resolved = lens.resolve(names if names is not None else DEFAULT_NAMES)
    bad = [n for n in resolved if not n.startswith("vision.") or lens.sites[n].row.read == "pattern"]
    if bad:
        raise ValueError(f"{technique} labels units of image-tower sites (vision.*, not attention patterns); got {bad}")
    return resolved


def image_activations(lens, images, *, names: str | Sequence[str] | None = None, batch_size: int = 64,
                      hooks=None, progress: bool = False) -> dict[str, Float[Tensor, "images units"]]:
    """One activation per image and unit, site by site: the mean over patch tokens (the class token left out where
    the tower has one) of each per-token site, or the value itself for pooled sites (batch, units). The tower runs
    alone on `images` through the lens's image processor, `batch_size` at a time; `hooks` edit those runs."""
    return _activations(lens, images, _resolve(lens, names, "image_activations"), batch_size, hooks, progress,
                        "image_activations", None)[0]


def _activations(lens, images, resolved, batch_size, hooks, progress, desc, also, grids: bool = False):
    """Stream `images` through the tower; per site (images, units) means, or (images, units, rows, cols) grids.
    `also(batch_uint8)` runs on each chunk too (the labeller); its outputs are returned concatenated."""
    from tqdm.auto import tqdm

    tower, proc, patch = _tower(lens, desc)
    out: dict[str, list[Tensor]] = {n: [] for n in resolved}
    extra: list = []
    sizes: set = set()
    total = math.ceil(len(images) / batch_size) if hasattr(images, "__len__") else None
    for batch in tqdm(_image_batches(images, batch_size), desc=desc, total=total, disable=not progress):
        sizes.add(tuple(batch.shape[1:3]))
        if len(sizes) > 1:
            raise ValueError(f"images: all must have one size; got {sorted(sizes)}")
        if also is not None:
            extra.append(also(batch))
        pix, thw = _pixels(lens, proc, batch, with_grid=True)
        got = _run_tower(lens, tower, pix, resolved, hooks, thw)
        b = batch.shape[0]
        for n in resolved:
            v = got[n].float()
            if thw is not None:  # (b*h*w, units) in merge-window order -> (b, h*w, units) in raster order
                v = _raster_order(v, thw, int(lens.model.config.vision_config.spatial_merge_size), b)
            if v.shape[0] != b or v.dim() not in (2, 3) or (grids and v.dim() != 3):
                want = "(batch, seq, units)" if grids else "(batch, seq, units) or (batch, units)"
                raise ValueError(f"{n} has shape {tuple(v.shape)} for {b} images; units need {want}")
            if v.dim() == 3:
                rows, cols, start = _layout(v.shape[1], pix, patch, n) if thw is None else (*thw[0, 1:].tolist(), 0)
                v = grid_of(v[:, start:].transpose(1, 2), rows, cols) if grids else v[:, start:].mean(1)
            out[n].append(v.cpu())
    return {n: torch.cat(v) for n, v in out.items()}, extra, next(iter(sizes))


def _raster_order(v: Tensor, thw: Tensor, merge: int, b: int) -> Tensor:
    """Qwen2-VL tower values (b*t*h*w, ...) -> (b, h*w, units), each image's patches in raster order."""
    from ..store.layout import merge_window_grid

    t, h, w = thw[0].tolist()
    if t != 1 or v.shape[0] != b * h * w:
        raise ValueError(f"a Qwen2-VL tower value of shape {tuple(v.shape)} for {b} images of grid {(t, h, w)}")
    rc = merge_window_grid(t, h, w, merge)
    out = torch.empty_like(v.reshape(b, h * w, -1))
    out[:, rc[:, 0] * w + rc[:, 1]] = v.reshape(b, h * w, -1)
    return out


# --------------------------------------------------------------------------------------------- labeller
def _text_embeds(labeller, concepts: Mapping[str, Sequence[str]], template: str) -> Tensor:
    """(concepts, d) L2-normalised; a concept with several texts gets the normalised mean of theirs."""
    tok = getattr(labeller.processor, "tokenizer", labeller.processor)
    if tok is None:
        raise TypeError("labeller was loaded without a tokenizer; load it with its processor")
    texts = [template.format(t) for ts in concepts.values() for t in ts]
    pad = "max_length" if labeller.architecture == "siglip" else True
    enc = tok(texts, padding=pad, truncation=True, return_tensors="pt")
    enc = {k: v.to(labeller.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        emb = _features(labeller.model.get_text_features(**enc))
    emb = torch.nn.functional.normalize(emb, dim=-1)
    out, i = [], 0
    for ts in concepts.values():
        out.append(torch.nn.functional.normalize(emb[i:i + len(ts)].mean(0), dim=-1))
        i += len(ts)
    return torch.stack(out)


def _features(out) -> Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x a tensor."""
    return (out if isinstance(out, Tensor) else out.pooler_output).float().cpu()


def _check_labeller(labeller) -> None:
    require_family(labeller, "contrastive", "clip_dissect's labeller")
    model = labeller.model
    if not (hasattr(model, "get_image_features") and hasattr(model, "get_text_features")):
        raise TypeError(f"clip_dissect's labeller needs both towers (get_image_features and get_text_features); "
                        f"{type(model).__name__} has {'only one' if hasattr(model, 'config') else 'neither'}: load "
                        "the dual encoder (e.g. CLIPModel)")
    _image_processor(labeller, "clip_dissect's labeller")


def labeller_similarities(labeller, images, concepts: Sequence[str] | Mapping[str, Sequence[str]], *,
                          template: str = "{}", batch_size: int = 64) -> Float[Tensor, "images concepts"]:
    """The labeller's cosine between each image and each concept's text (CLIP-Dissect's P)."""
    _check_labeller(labeller)
    concepts = _concepts(concepts)
    text = _text_embeds(labeller, concepts, template)
    return torch.cat([_image_cos(labeller, b, text) for b in _image_batches(images, batch_size)])


def _image_cos(labeller, batch: Tensor, text: Tensor) -> Tensor:
    proc = _image_processor(labeller, "clip_dissect's labeller")
    with torch.no_grad():
        img = _features(labeller.model.get_image_features(pixel_values=_pixels(labeller, proc, batch)))
    return torch.nn.functional.normalize(img, dim=-1) @ text.T


def _concepts(concepts) -> dict[str, list[str]]:
    if isinstance(concepts, str):
        raise TypeError("concepts must be a list of concept words (or a dict concept -> texts), not one string")
    if isinstance(concepts, Mapping):
        out = {str(k): [v] if isinstance(v, str) else list(v) for k, v in concepts.items()}
    else:
        out = {str(c): [str(c)] for c in concepts}
    if not out or any(not v for v in out.values()):
        raise ValueError("concepts: give at least one concept, each with at least one text")
    if isinstance(concepts, Sequence) and len(out) != len(concepts):
        raise ValueError(f"concepts: duplicates in {list(concepts)}")
    return out


def _pack(scores: list[Tensor], top: int) -> tuple[Tensor, Tensor, list[int]]:
    """Per-site (units, concepts) scores -> padded (sites, units, top) ids and scores."""
    widths = [s.shape[0] for s in scores]
    c = scores[0].shape[1]
    k = min(top, c)
    ids = torch.full((len(scores), max(widths), k), -1, dtype=torch.long)
    vals = torch.full((len(scores), max(widths), k), float("nan"))
    for i, s in enumerate(scores):
        s = s.float().nan_to_num(float("-inf"))
        v, j = s.topk(k, dim=1)
        j[s.max(1).values == s.min(1).values] = -1  # every concept alike: no label
        ids[i, :s.shape[0]], vals[i, :s.shape[0]] = j, v
    return ids, vals, widths


# ------------------------------------------------------------------------------------------ techniques
def clip_dissect(lens, images, concepts: Sequence[str] | Mapping[str, Sequence[str]], *, labeller,
                 names: str | Sequence[str] | None = None, similarity: str | Callable = "soft_wpmi",
                 similarity_kwargs: Mapping | None = None, template: str = "{}", top: int = 3,
                 batch_size: int = 64, hooks=None, progress: bool = True) -> DissectionResult:
    """CLIP-Dissect (Oikarinen & Weng 2023): label every unit of `names` (default all image-tower MLP neurons,
    `vision.blocks.*.mlp.post`) with one of `concepts`, using a contrastive `labeller` (a CLIP or SigLIP Lens).

    The probing `images` stream through the target's tower and the labeller `batch_size` at a time. A (images,
    units): each unit's mean over patch tokens (`image_activations`). P (images, concepts): the labeller's cosine of
    each image with each concept's text (`template.format(concept)`; a dict concept -> texts averages their
    normalised embeddings, a prompt ensemble). `similarity(A, P) -> (units, concepts)`: 'soft_wpmi' (the paper's
    best), 'wpmi', 'cos3' (cube-cosine), 'cos', or a callable; `similarity_kwargs` go to it (e.g. top_k, a). A unit's
    label is the argmax; `top` concepts are kept per unit. soft-WPMI's top_k (100) should stay well below the number
    of images, or every unit shares most of its example set.
    """
    _check_labeller(labeller)
    resolved = _resolve(lens, names, "clip_dissect")
    if isinstance(similarity, str):
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; allowed: {sorted(SIMILARITIES)} or a callable (A, P) -> "
                             "(units, concepts)")
        fn, label = SIMILARITIES[similarity], similarity
    elif callable(similarity):
        fn, label = similarity, getattr(similarity, "__name__", "custom")
    else:
        raise TypeError(f"similarity must be a name or a callable; got {type(similarity).__name__}")
    if top < 1:
        raise ValueError(f"top must be >= 1; got {top}")
    concepts = _concepts(concepts)
    text = _text_embeds(labeller, concepts, template)
    acts, sims, _ = _activations(lens, images, resolved, batch_size, hooks, progress, "clip_dissect",
                                 lambda b: _image_cos(labeller, b, text))
    P = torch.cat(sims)
    scores = []
    for n in resolved:
        s = fn(acts[n], P, **dict(similarity_kwargs or {}))
        if tuple(s.shape) != (acts[n].shape[1], P.shape[1]):
            raise ValueError(f"similarity returned {tuple(s.shape)}; expected (units, concepts) = "
                             f"({acts[n].shape[1]}, {P.shape[1]})")
        scores.append(s)
    ids, vals, widths = _pack(scores, top)
    lab_path = getattr(labeller.model, "name_or_path", None)
    meta = provenance(lens, resolved, n_images=int(P.shape[0]), similarity=label,
                      similarity_kwargs=dict(similarity_kwargs or {}), template=template,
                      labeller={"architecture": labeller.architecture,
                                "model_path": str(lab_path) if lab_path else None},
                      concept_texts=concepts)
    return DissectionResult(meta=meta, names=resolved, concepts=list(concepts), widths=widths, top_ids=ids,
                            top_scores=vals, thresholds=torch.zeros(0), method=f"clip_dissect/{label}")


def net_dissect(lens, images, masks: Mapping[str, object], *, names: str | Sequence[str] | None = None,
                quantile: float = 0.005, top: int = 3, batch_size: int = 64, hooks=None,
                progress: bool = True) -> DissectionResult:
    """Network Dissection (Bau et al. 2017): label every unit of `names` (default `vision.blocks.*.mlp.post`) with
    the concept of `masks` its activation maps overlap best.

    `masks`: concept -> (images, H, W) bool, the pixels showing that concept in each image, at the images' own
    resolution. Each unit's patch tokens (class token left out) are laid on the patch grid (assumed to cover the
    whole image: the processor resizes, it does not crop), `unit_thresholds` picks the value its top `quantile` of
    cells reach over the dataset, and `iou_scores` scores every concept by the IoU of the bilinearly upsampled maps
    >= that threshold with the masks, summed over the dataset. Label = the best IoU; `top` concepts are kept.
    The activations of every site are held in memory ((images, units, rows, cols) float32 per site) between the
    threshold pass and the IoU pass.
    """
    resolved = _resolve(lens, names, "net_dissect")
    if top < 1:
        raise ValueError(f"top must be >= 1; got {top}")
    if not isinstance(masks, Mapping) or not masks:
        raise TypeError("masks must be a non-empty dict concept -> (images, H, W) bool masks")
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile={quantile}; allowed: a fraction in (0, 1) (NetDissect uses 0.005)")
    m = {str(c): torch.as_tensor(np.asarray(v)).bool() for c, v in masks.items()}
    shapes = {c: tuple(v.shape) for c, v in m.items()}
    if any(len(s) != 3 for s in shapes.values()) or len(set(shapes.values())) > 1:
        raise ValueError(f"masks: every concept needs one (images, H, W) array of one shape; got {shapes}")
    n, h, w = next(iter(shapes.values()))
    if hasattr(images, "__len__") and len(images) != n:
        raise ValueError(f"masks hold {n} images; {len(images)} images were given")
    size_ok: dict = {}

    def check(batch):
        if not size_ok and tuple(batch.shape[1:3]) != (h, w):
            raise ValueError(f"masks are {h}x{w}; the images are {batch.shape[1]}x{batch.shape[2]} (give masks at "
                             "the images' resolution)")
        size_ok["ok"] = True

    acts, _, _ = _activations(lens, images, resolved, batch_size, hooks, progress, "net_dissect", check, grids=True)
    got = next(iter(acts.values())).shape[0]
    if got != n:
        raise ValueError(f"masks hold {n} images; {got} images were given")
    stacked = torch.stack(list(m.values()), 1)  # (images, concepts, H, W)
    scores, thresholds = [], []
    for name in resolved:
        t = unit_thresholds(acts[name], quantile)
        thresholds.append(t)
        scores.append(iou_scores(acts[name], stacked, t))
    ids, vals, widths = _pack(scores, top)
    th = torch.full((len(resolved), max(widths)), float("nan"))
    for i, t in enumerate(thresholds):
        th[i, :len(t)] = t
    grid = list(next(iter(acts.values())).shape[-2:])
    meta = provenance(lens, resolved, n_images=int(n), quantile=quantile, grid=grid, mask_size=[h, w])
    return DissectionResult(meta=meta, names=resolved, concepts=list(m), widths=widths, top_ids=ids, top_scores=vals,
                            thresholds=th, method="net_dissect")


def _unit_pairs(units) -> list[tuple[str, int]]:
    if isinstance(units, Mapping):
        pairs = [(str(n), int(u)) for n, us in units.items() for u in (us if isinstance(us, Iterable) else [us])]
    else:
        pairs = [(str(n), int(u)) for n, u in units]
    if not pairs:
        raise ValueError("units: give at least one (site, unit)")
    return pairs


def unit_maps(lens, images, units: Mapping[str, Sequence[int]] | Sequence[tuple[str, int]], *,
              batch_size: int = 64, hooks=None, progress: bool = False) -> MapResult:
    """Where units fire: each chosen unit's patch-token activations on the patch grid (class token left out), as a
    MapResult (images, units, rows, cols) over `images`, labelled 'site:unit'. `units`: {site: [unit, ...]} or
    [(site, unit), ...]."""
    pairs = _unit_pairs(units)
    names = list(dict.fromkeys(n for n, _ in pairs))
    for n in names:
        if n not in lens.sites:
            lens.resolve([n], arg="units")  # an unknown name raises, listing the closest
            raise ValueError(f"units: give canonical site names, not globs; got {n!r}")
    _resolve(lens, names, "unit_maps")
    shown: list[Tensor] = []
    acts, _, _ = _activations(lens, images, names, batch_size, hooks, progress, "unit_maps",
                              lambda b: shown.append(b), grids=True)
    cols = []
    for n, u in pairs:
        width = acts[n].shape[1]
        if not 0 <= u < width:
            raise IndexError(f"unit {u} out of range: {n} has {width} units")
        cols.append(acts[n][:, u])
    return MapResult(meta=provenance(lens, names, units=[list(p) for p in pairs]), maps=torch.stack(cols, 1),
                     images=torch.cat(shown), labels=[f"{n}:{u}" for n, u in pairs], method="unit activations")


__all__ = ["DissectionResult", "SIMILARITIES", "clip_dissect", "cos3", "cos_similarity", "image_activations",
           "iou_scores", "labeller_similarities", "net_dissect", "soft_wpmi", "unit_maps", "unit_thresholds", "wpmi"]
