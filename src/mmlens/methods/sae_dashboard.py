"""What an SAE feature responds to, from an ActivationStore: its top-activating tokens with where they sit (example,
image, patch, modality, token, diffusion step), its activation histogram, the text tokens it fires on, its
per-patch activation over the top examples' images, and for diffusion the image regenerated with it clamped.

    store = write_activations(vlm, data, names="lm.blocks.10.resid_post", folder="acts/")
    dash = feature_dashboard(vlm, sae, store, [12, 345], images=pictures, prompts=questions)
    dash                                     # in Jupyter: one card per feature (tables, histogram, overlays)
    dash.top_tokens[0][:3]                   # [{'index': 88123, 'activation': 9.1, 'example': 41, 'row': 3, ...}]
    dash.save("dash/"); FeatureDashboard.load("dash/")
    feature_dashboard(sd, sae, sd_store, [7], images=generated, regenerate=dict(prompt="a square", value=10.0,
                      seed=0, num_inference_steps=20))   # the image with feature 7 held at 10, next to the plain one

Everything is read in one sequential pass over the store (plus one read of the rows of the top examples' images
for the overlays), so the store may be larger than memory. The per-feature activation values are kept only where
a feature fires (for the histogram).

`images[e]` is example e's image (a PIL image or a uint8 (H, W, 3) array; a list of them when an example holds
several, indexed by the store's `image` column); `prompts[e]` its text, shown beside its tokens.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..viz.report import figure_png
from .maps import images_uint8, upsample
from .result import Result, provenance
from .sae_splice import site_names, steer_features

THUMB = 128  # pixels per side of the overlay thumbnails kept in the result
STORE_BATCH = 8192
_META = ("example", "image", "row", "col", "modality", "position", "token", "step", "timestep", "branch")
_BRANCHES = {0: "uncond", 1: "cond"}


# ------------------------------------------------------------------------------------------------ result
@dataclass(repr=False)
class FeatureDashboard(Result):
    """Per feature `features[j]` (row j of every tensor):

    `top_values` / `top_index` (features, k): the k largest activations over the store's `n_tokens` tokens and
    their token indices (-1 and 0 past the tokens where the feature fired); `top_tokens[j]`: those tokens' metadata
    (example, image, row, col, modality, position, token string, step, timestep, branch, the example's text);
    `fire_count` (features,): tokens where the feature is non-zero; `hist_counts` (features, bins) over
    `hist_edges` (features, bins + 1): the histogram of its non-zero activations; `text_tokens[j]`: the text tokens
    it fires on most (token, id, count, mean activation); `overlay_maps` (features, overlays, rows, cols): its
    activation on each patch of the top examples' images (zero-padded; `overlays[j][o]` says which image and the
    grid's size), `overlay_images` (features, overlays, THUMB, THUMB, 3) uint8 those images (empty without
    `images`); `regen_base` (H, W, 3) and `regen_images` (features, H, W, 3) uint8: diffusion, the image without
    and with the feature clamped (empty without `regenerate`, whose settings are in `regenerate`)."""

    name: str
    features: list[int]
    k: int
    n_tokens: int
    top_values: Tensor
    top_index: Tensor
    top_tokens: list
    fire_count: Tensor
    hist_counts: Tensor
    hist_edges: Tensor
    text_tokens: list
    overlay_maps: Tensor
    overlay_images: Tensor
    overlays: list
    regen_base: Tensor
    regen_images: Tensor
    regenerate: dict | None

    def _row(self, feature: int) -> int:
        if feature not in self.features:
            raise KeyError(f"feature {feature} is not in this dashboard; it shows {self.features}")
        return self.features.index(feature)

    def top(self, feature: int) -> list[dict]:
        """The feature's top tokens with their metadata, highest first."""
        return self.top_tokens[self._row(feature)]

    def summary(self) -> str:
        rates = ", ".join(f"{f}: {int(c)}" for f, c in zip(self.features[:6], self.fire_count.tolist()))
        return (f"FeatureDashboard({self.meta.get('architecture', '?')} {self.name}: {len(self.features)} features "
                f"over {self.n_tokens} tokens, top {self.k}; tokens fired on {rates}"
                f"{', ...' if len(self.features) > 6 else ''})")

    # ----------------------------------------------------------------------------------------- rendering
    def overlay(self, feature: int, o: int, alpha: float = 0.5) -> np.ndarray:
        """(THUMB, THUMB, 3) uint8: overlay `o` of the feature, its activation (scaled by the feature's largest
        top activation) in the jet colour map over the image, or alone without images."""
        import matplotlib

        j = self._row(feature)
        info = self.overlays[j][o]
        grid = self.overlay_maps[j, o, : info["rows"], : info["cols"]]
        peak = float(self.top_values[j, 0]) or 1.0
        heat = upsample(grid[None], (THUMB, THUMB))[0].clamp(min=0) / peak
        rgb = matplotlib.colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3]
        if self.overlay_images.numel() == 0:
            return (rgb * 255).round().astype(np.uint8)
        img = self.overlay_images[j, o].numpy().astype(np.float64) / 255
        return ((1 - alpha) * img + alpha * rgb).clip(0, 1).__mul__(255).round().astype(np.uint8)

    def plot(self, features: Sequence[int] | None = None):
        """A row per feature: the activation histogram, then up to 4 overlays on the top examples' images."""
        import matplotlib.pyplot as plt

        feats = list(features) if features is not None else self.features[:6]
        n_over = min(4, max((len(self.overlays[self._row(f)]) for f in feats), default=0))
        fig, axes = plt.subplots(len(feats), 1 + n_over, figsize=(2.6 + 1.5 * n_over, 1.8 * len(feats)),
                                 squeeze=False)
        for r, f in enumerate(feats):
            j = self._row(f)
            ax = axes[r, 0]
            self._hist(ax, j)
            ax.set_title(f"feature {f}: {int(self.fire_count[j])} tokens", fontsize=7)
            for c in range(n_over):
                ax = axes[r, c + 1]
                ax.axis("off")
                if c < len(self.overlays[j]):
                    ax.imshow(self.overlay(f, c))
                    ax.set_title(_caption(self.overlays[j][c]), fontsize=6)
        fig.tight_layout()
        return fig

    def _hist(self, ax, j: int) -> None:
        edges = self.hist_edges[j].numpy()
        ax.bar(edges[:-1], self.hist_counts[j].numpy(), width=np.diff(edges), align="edge", color="tab:blue")
        ax.set_yscale("log" if int(self.hist_counts[j].max()) > 50 else "linear")
        ax.set_xlabel("activation (non-zero)", fontsize=6)
        ax.tick_params(labelsize=6)

    def html(self) -> str:
        """Self-contained markup: a card per feature with inline PNGs."""
        import matplotlib.pyplot as plt

        cards = []
        for j, f in enumerate(self.features):
            fig, ax = plt.subplots(figsize=(3.0, 1.8))
            self._hist(ax, j)
            fig.tight_layout()
            rate = int(self.fire_count[j]) / max(self.n_tokens, 1)
            parts = [f"<h4>feature {f}</h4><p>fires on {int(self.fire_count[j])} of {self.n_tokens} tokens "
                     f"({rate:.2%}); top activation {float(self.top_values[j, 0]):.4g}</p>",
                     f"<img src='{figure_png(fig)}' title='activation histogram'/>"]
            if self.overlays[j]:
                parts.append("<div>" + "".join(
                    f"<figure><img src='{_png(self.overlay(f, o))}'/><figcaption>{html.escape(_caption(info))}"
                    "</figcaption></figure>" for o, info in enumerate(self.overlays[j])) + "</div>")
            if self.regen_images.numel():
                v = self.regenerate["values"][j]
                parts.append("<div>" + "".join(
                    f"<figure><img src='{_png(img)}'/><figcaption>{html.escape(cap)}</figcaption></figure>"
                    for img, cap in ((self.regen_base.numpy(), "unclamped"),
                                     (self.regen_images[j].numpy(), f"feature {f} {self.regenerate['mode']} {v:.4g}")))
                             + "</div>")
            parts.append(_table(self.top_tokens[j], "top tokens"))
            if self.text_tokens[j]:
                parts.append(_table(self.text_tokens[j], "text tokens it fires on"))
            cards.append(f"<section class='mmlens-feature' id='feature-{f}'>{''.join(parts)}</section>")
        return f"<div class='mmlens-features'><b>{html.escape(self.summary())}</b>{''.join(cards)}</div>"

    def _repr_html_(self) -> str:
        return self.html()

    def to_report(self, report, title: str | None = None, **plot_kw) -> None:
        report.heading(title or "SAE features", level=3)
        report.fragment(self.html())


def _caption(info: Mapping) -> str:
    where = f"example {info['example']}" + (f" image {info['image']}" if info["image"] >= 0 else "")
    if info.get("step", -1) >= 0:
        where += f" step {info['step']}" + (f" {_BRANCHES.get(info['branch'], '')}" if info.get("branch", -1) >= 0
                                             else "")
    return where


def _png(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[dict], caption: str) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r.get(c)))}</td>" for c in cols) + "</tr>"
                   for r in rows)
    return f"<table><caption>{html.escape(caption)}</caption><tr>{head}</tr>{body}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


# ------------------------------------------------------------------------------------------------ technique
@torch.no_grad()
def feature_dashboard(lens, sae, store, features, *, name: str | None = None, k: int = 16, images=None,
                      prompts=None, bins: int = 30, regenerate: Mapping | None = None, overlays: int = 4,
                      text_tokens: int | None = None, progress: bool = True) -> FeatureDashboard:
    """Dashboard data for `features` (an int or a list of SAE feature indices) over `store` at the SAE's site
    (`name`, default `sae.cfg.hook_name`); see the module docstring.

    `k`: top tokens per feature; `bins`: histogram bins; `overlays`: how many distinct top examples' images get a
    per-patch overlay; `text_tokens` (default k): how many text tokens to list. `regenerate` (diffusion):
    dict(prompt=..., value=<number or "max">, seed=0, mode="clamp", steps=None, branches=None, positions=None,
    <other lens.generate keywords>): the image generated with the feature clamped (or added, mode="add") via
    `steer_features`, and without; value "max" uses the feature's top activation in the store.
    """
    feats = _check_features(features, sae.cfg.d_sae)
    for arg, v in (("k", k), ("bins", bins), ("overlays", overlays + 1)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{arg} must be a positive int; got {v!r}")
    n_text = k if text_tokens is None else text_tokens
    site = site_names(lens, sae, name, one=True)[0]
    if site not in store.names:
        raise ValueError(f"the store holds {store.names}, not {site!r}; pass name= or a store written at that site")
    if store.d[site] != sae.cfg.d_in:
        raise ValueError(f"{site!r} has {store.d[site]} features per token in the store; this SAE reads d_in="
                         f"{sae.cfg.d_in}")
    if regenerate is not None and lens.family != "diffusion":
        raise ValueError(f"regenerate: images are regenerated by diffusion pipelines; {lens.architecture} is a "
                         f"{lens.family} model")
    meta = {c: store.meta[c] for c in _META if c in store.meta}
    scan = _scan(store, site, sae, feats, k, bins, meta, progress)
    top_tokens = [[_token_record(int(i), float(v), meta, store, prompts) for v, i in zip(vals, idx) if i >= 0]
                  for vals, idx in zip(scan["values"].tolist(), scan["index"].tolist())]
    maps, thumbs, infos = _overlays(store, site, sae, feats, scan["index"], meta, images, overlays)
    base, regen, settings = _regenerate(lens, sae, site, feats, scan["values"], regenerate)
    return FeatureDashboard(
        meta=provenance(lens, [site], sae_hook_name=sae.cfg.hook_name), name=site, features=feats, k=k,
        n_tokens=scan["n"], top_values=scan["values"], top_index=scan["index"], top_tokens=top_tokens,
        fire_count=scan["fires"], hist_counts=scan["hist"][0], hist_edges=scan["hist"][1],
        text_tokens=[_text_rows(t, store, n_text) for t in scan["text"]], overlay_maps=maps, overlay_images=thumbs,
        overlays=infos, regen_base=base, regen_images=regen, regenerate=settings)


def _check_features(features, d_sae: int) -> list[int]:
    feats = [features] if isinstance(features, int) else list(features) if isinstance(features, (Sequence, Tensor,
                                                                                                  np.ndarray)) else None
    if feats is None or not feats:
        raise TypeError(f"features must be a feature index or a non-empty list of them; got {features!r:.60}")
    out = []
    for f in feats:
        if isinstance(f, bool) or not isinstance(f, (int, np.integer, Tensor)) or int(f) != f:
            raise TypeError(f"features must be ints; got {type(f).__name__} {f!r:.40}")
        if not 0 <= int(f) < d_sae:
            raise ValueError(f"feature {int(f)} is out of range: this SAE has d_sae={d_sae} (0 to {d_sae - 1})")
        out.append(int(f))
    if len(set(out)) != len(out):
        raise ValueError(f"features {out} repeat an index")
    return out


def _encode(sae, x: Tensor, feats: list[int]) -> Tensor:
    p = sae.W_enc
    return sae.encode(x.to(p.device, p.dtype))[:, feats].float().cpu()


def _merge_top(vals: Tensor, idx: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest values, ties to the lower token index (a brute-force stable argsort agrees)."""
    order = idx.argsort()
    vals, idx = vals[order], idx[order]
    keep = torch.argsort(-vals, stable=True)[:k]
    return vals[keep], idx[keep]


def _scan(store, site: str, sae, feats: list[int], k: int, bins: int, meta: dict, progress: bool) -> dict:
    """One sequential pass: top k per feature, every non-zero value (histograms), text-token tallies."""
    F = len(feats)
    tops = [(torch.zeros(0), torch.zeros(0, dtype=torch.long)) for _ in feats]
    nonzero: list[list[Tensor]] = [[] for _ in feats]
    text: list[dict[int, list[float]]] = [{} for _ in feats]
    text_code = _text_code()
    modality, token = meta.get("modality"), meta.get("token")
    offset = 0
    bar = tqdm(total=len(store), desc=f"feature_dashboard {site}", unit="tok", disable=not progress)
    for x in store.batches(site, STORE_BATCH, shuffle=False, rank=0, world_size=1):  # in order, all tokens
        a = _encode(sae, x, feats)  # (n, F)
        n = a.shape[0]
        rows = torch.arange(offset, offset + n)
        is_text = None
        if modality is not None and token is not None:
            is_text = (modality[offset:offset + n] == text_code) & (token[offset:offset + n] >= 0)
        for j in range(F):
            on = a[:, j] != 0
            vals, idx = a[on, j], rows[on]
            nonzero[j].append(vals)
            tops[j] = _merge_top(torch.cat([tops[j][0], vals]), torch.cat([tops[j][1], idx]), k)
            if is_text is not None:
                sel = on & is_text
                if sel.any():
                    ids, inv = token[offset:offset + n][sel].unique(return_inverse=True)
                    cnt = torch.bincount(inv, minlength=len(ids))
                    tot = torch.bincount(inv, weights=a[sel, j].double(), minlength=len(ids))
                    for t, c, s in zip(ids.tolist(), cnt.tolist(), tot.tolist()):
                        acc = text[j].setdefault(t, [0, 0.0])
                        acc[0] += c
                        acc[1] += s
        offset += n
        bar.update(n)
    bar.close()
    if offset != len(store):
        raise RuntimeError(f"the store yielded {offset} tokens of {site!r} but holds {len(store)}")
    values = torch.zeros(F, k)
    index = torch.full((F, k), -1, dtype=torch.long)
    for j, (v, i) in enumerate(tops):
        values[j, :len(v)], index[j, :len(i)] = v, i
    all_nz = [torch.cat(v) if v else torch.zeros(0) for v in nonzero]
    return {"n": offset, "values": values, "index": index, "fires": torch.tensor([len(v) for v in all_nz]),
            "hist": _histograms(all_nz, bins), "text": text}


def _histograms(values: list[Tensor], bins: int) -> tuple[Tensor, Tensor]:
    """Per feature, `bins` equal bins from min(0, smallest) to the largest non-zero activation."""
    counts, edges = [], []
    for v in values:
        lo = min(0.0, float(v.min())) if len(v) else 0.0
        hi = float(v.max()) if len(v) else 1.0
        hi = hi if hi > lo else lo + 1.0
        e = torch.linspace(lo, hi, bins + 1)
        c = torch.histogram(v.float(), bins=e).hist if len(v) else torch.zeros(bins)
        counts.append(c.round().long())
        edges.append(e)
    return torch.stack(counts), torch.stack(edges)


def _text_code() -> int:
    from ..store import MODALITIES

    return MODALITIES.index("text")


def _modality_name(code: int) -> str:
    from ..store import MODALITIES

    return MODALITIES[code] if 0 <= code < len(MODALITIES) else str(code)


def _token_record(i: int, value: float, meta: dict, store, prompts) -> dict:
    rec = {"index": i, "activation": value}
    for c in _META:
        if c not in meta:
            continue
        v = meta[c][i].item()
        if c == "modality":
            v = _modality_name(int(v))
        elif c == "timestep":
            v = None if v != v else float(v)  # nan: no timestep
        elif c == "branch":
            v = _BRANCHES.get(int(v))
        rec[c] = v
    if "token" in rec:
        rec["token_str"] = store.token_strings.get(rec["token"]) if rec["token"] >= 0 else None
    if prompts is not None:
        e = rec.get("example", -1)
        rec["text"] = str(prompts[e]) if 0 <= e < len(prompts) else None
    return rec


def _text_rows(tally: dict[int, list], store, n: int) -> list[dict]:
    """Text tokens by how often the feature fires on them (then by total activation)."""
    order = sorted(tally.items(), key=lambda kv: (-kv[1][0], -kv[1][1], kv[0]))[:n]
    return [{"token": store.token_strings.get(t, str(t)), "id": t, "count": c, "mean": s / c}
            for t, (c, s) in order]


# ------------------------------------------------------------------------------------------------ overlays
def _overlays(store, site, sae, feats, index: Tensor, meta: dict, images, n_over: int):
    """Per feature, the first `n_over` distinct images among its top tokens (patch tokens only): the feature's
    activation on every patch of that image (same example, image, step and branch), and the image itself."""
    need = ("example", "image", "row", "col")
    F = len(feats)
    if not all(c in meta for c in need):
        return torch.zeros(F, 0, 0, 0), torch.zeros(0, dtype=torch.uint8), [[] for _ in feats]
    keys_of = ["example", "image", "step", "branch"]
    keys_of = [c for c in keys_of if c in meta]
    chosen: list[list[tuple]] = []
    for j in range(F):
        seen: list[tuple] = []
        for i in index[j].tolist():
            if i < 0 or int(meta["row"][i]) < 0:
                continue
            key = tuple(int(meta[c][i]) for c in keys_of)
            if key not in seen:
                seen.append(key)
            if len(seen) == n_over:
                break
        chosen.append(seen)
    keys = sorted({key for ks in chosen for key in ks})
    if not keys:
        return torch.zeros(F, 0, 0, 0), torch.zeros(0, dtype=torch.uint8), [[] for _ in feats]
    member = torch.zeros(len(store), dtype=torch.bool)
    for key in keys:
        m = meta["row"] >= 0
        for c, v in zip(keys_of, key):
            m &= meta[c] == v
        member |= m
    rows = member.nonzero().flatten()
    acts = torch.cat([_encode(sae, x, feats) for x in _chunks(store.tensor(site, where=member))])
    grids: dict[tuple, tuple[Tensor, int, int]] = {}
    for key in keys:
        m = torch.ones(len(rows), dtype=torch.bool)
        for c, v in zip(keys_of, key):
            m &= meta[c][rows] == v
        r, c = meta["row"][rows][m].long(), meta["col"][rows][m].long()
        R, C = int(r.max()) + 1, int(c.max()) + 1
        g = torch.zeros(F, R, C)
        g[:, r, c] = acts[m].T
        grids[key] = (g, R, C)
    R = max(g[1] for g in grids.values())
    C = max(g[2] for g in grids.values())
    O = max(len(ks) for ks in chosen)
    maps = torch.zeros(F, O, R, C)
    thumbs = torch.zeros(F, O, THUMB, THUMB, 3, dtype=torch.uint8) if images is not None else torch.zeros(
        0, dtype=torch.uint8)
    infos = []
    for j, ks in enumerate(chosen):
        row_info = []
        for o, key in enumerate(ks):
            g, r, c = grids[key]
            maps[j, o, :r, :c] = g[j]
            info = dict(zip(keys_of, key), rows=r, cols=c)
            info.setdefault("image", -1)
            row_info.append(info)
            if images is not None:
                thumbs[j, o] = _thumb(_image_of(images, info["example"], info["image"]))
        infos.append(row_info)
    return maps, thumbs, infos


def _chunks(x: Tensor, n: int = STORE_BATCH):
    return x.split(n) if len(x) else [x]


def _image_of(images, example: int, image: int):
    if not 0 <= example < len(images):
        raise IndexError(f"images has {len(images)} entries; the store's example {example} has none (images[e] must "
                         "be example e's image)")
    item = images[example]
    if isinstance(item, (list, tuple)):
        if not 0 <= image < len(item):
            raise IndexError(f"images[{example}] holds {len(item)} images; the store asks for image {image}")
        item = item[image]
    return item


def _thumb(img) -> Tensor:
    from PIL import Image

    arr = images_uint8([img])[0].numpy()
    return torch.from_numpy(np.array(Image.fromarray(arr).resize((THUMB, THUMB), Image.BILINEAR)))


# ----------------------------------------------------------------------------------------------- regenerate
def _regenerate(lens, sae, site, feats, top_values: Tensor, regenerate):
    empty = torch.zeros(0, dtype=torch.uint8)
    if regenerate is None:
        return empty, empty, None
    if not isinstance(regenerate, Mapping):
        raise TypeError(f"regenerate must be a dict(prompt=..., value=..., ...); got {type(regenerate).__name__}")
    kw = dict(regenerate)
    missing = [k for k in ("prompt", "value") if k not in kw]
    if missing:
        raise ValueError(f"regenerate needs {missing}: the prompt to generate and the value to clamp the feature to "
                         "(a number, or 'max' for its top activation in the store)")
    prompt, value = kw.pop("prompt"), kw.pop("value")
    seed, mode = kw.pop("seed", 0), kw.pop("mode", "clamp")
    steer_kw = {a: kw.pop(a) for a in ("steps", "branches", "positions") if a in kw}
    bad = sorted(set(kw) & {"generator", "names", "hooks", "output_type"})
    if bad:
        raise ValueError(f"regenerate: {bad} are set by feature_dashboard (use seed= for the generator)")
    if value == "max":
        values = [float(v) for v in top_values[:, 0].tolist()]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * len(feats)
    else:
        raise TypeError(f"regenerate value must be a number or 'max'; got {value!r:.40}")

    def generate() -> Tensor:
        out, _ = lens.generate(prompt, names=[], generator=torch.Generator().manual_seed(seed), progress=False,
                               output_type="np", **kw)
        return images_uint8(list(out.images))[0]

    base = generate()
    regen = []
    for f, v in zip(feats, values):
        with steer_features(lens, sae, {f: v}, mode=mode, names=site, **steer_kw):
            regen.append(generate())
    settings = {"prompt": prompt, "values": values, "seed": seed, "mode": mode,
                **{k: _jsonable(v) for k, v in {**steer_kw, **kw}.items()}}
    return base, torch.stack(regen), settings


def _jsonable(v):
    """A setting as the result's JSON can hold it (a mask or an object: a short description)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, (range, list, tuple)) and all(isinstance(x, (int, float, str)) for x in v):
        return list(v)
    if isinstance(v, Tensor):
        return f"tensor {tuple(v.shape)} {v.dtype}"
    return type(v).__name__


__all__ = ["FeatureDashboard", "THUMB", "feature_dashboard"]
