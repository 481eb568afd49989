"""How good is an SAE: reconstruction at its site, sparsity, and what the model loses when it runs on the SAE's
reconstruction instead of its own activation.

    m = sae_metrics(vlm, sae, batches)                 # processor outputs; the site is sae.cfg.hook_name
    m.explained_variance, m.l0, m.dead_fraction        # 1 - SSE / total variance, active features per token, ...
    m.downstream                                       # {"metric": "cross_entropy", "clean": 2.1, "spliced": 2.4,
                                                       #  "zero": 7.9, "recovered": 0.95, ...}
    sae_metrics(clip, sae, batches, classes=["a red square", ...], labels=y)   # zero-shot accuracy
    sae_metrics(sd, sae, ["a red square", ...], timesteps=[100, 500, 900])     # denoising loss
    sae_metrics(clip, sae, store)                      # reconstruction and sparsity over an ActivationStore

Reconstruction (over every token at the site: real tokens under the attention mask for `lm.`/`text.` sites, every
patch and CLS token of a vision tower, every pixel of a diffusion feature map):
    explained variance  1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2   (mean over all tokens, per dimension)
    mse                 mean of (x - x_hat)^2 over tokens and dimensions
    cosine              mean over tokens of cos(x, x_hat)
    l0                  mean number of non-zero features per token
    dead / dense        the fraction of features that never fire / fire on more than `dense_threshold` of tokens

Downstream, the model run three ways, clean, with the SAE spliced in at its site (`sae_spliced`) and with the site
zero-ablated, per family:
    generative    cross-entropy of the next text token (targets: text tokens under the attention mask, their
                  predecessor real too; image placeholders and special tokens are not predicted); a batch that
                  holds `labels` (HF's convention: the target ids, -100 where no loss) is scored on those only,
                  e.g. the answers of a model fine-tuned on answers, whose prompt tokens it never learned to predict
    contrastive   zero-shot accuracy over `classes` (class texts) with `labels` (one class index per image)
    diffusion     denoising loss: the MSE of the denoiser's prediction (epsilon, v or x0 as the scheduler is trained;
                  flow velocity for SD3) on `latents` noised at `timesteps` (noise from `seed`), conditioned on the
                  prompts; without `latents`, the pipeline's own samples for the prompts are the clean latents
and `recovered = (zero - spliced) / (zero - clean)`: SAELens's "CE loss recovered" (1: as good as the model, 0: as
bad as deleting the site), the same formula for accuracy.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from ..hooks.tokens import MODALITIES
from ..store import ActivationStore
from ._denoising import Denoising
from .result import Result, provenance
from .sae_splice import _sae_input, sae_spliced, site_names
from .splice import image_embeddings
from .steering import _batches, _to_tokens
from .textspan import encode_texts

_TEXT_TOWERS = ("lm.", "text.")
STORE_BATCH = 8192


# ------------------------------------------------------------------------------------------------ result
@dataclass(repr=False)
class SAEMetricsResult(Result):
    """Reconstruction and sparsity of an SAE at `name` over `n_tokens` tokens (see the module docstring for each
    number); `fire_rate` (d_sae,) the fraction of tokens each feature fired on; `downstream` the model's metric
    clean / spliced / zero-ablated and `recovered` (None without downstream inputs), plus per-family detail."""

    name: str
    n_tokens: int
    explained_variance: float
    mse: float
    cosine: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    fire_rate: Tensor
    downstream: dict | None

    @property
    def dead_features(self) -> Tensor:
        return (self.fire_rate == 0).nonzero().flatten()

    @property
    def dense_features(self) -> Tensor:
        return (self.fire_rate > self.dense_threshold).nonzero().flatten()

    @property
    def recovered(self) -> float | None:
        """(zero - spliced) / (zero - clean) of the downstream metric (CE loss recovered for a VLM)."""
        return None if self.downstream is None else self.downstream["recovered"]

    def table(self) -> list[dict]:
        rows = [{"metric": k, "value": _fmt(getattr(self, k))} for k in
                ("n_tokens", "explained_variance", "mse", "cosine", "l0", "dead_fraction", "dense_fraction")]
        if self.downstream is not None:
            d = self.downstream
            rows += [{"metric": f"{d['metric']} ({k})", "value": _fmt(d[k])} for k in
                     ("clean", "spliced", "zero", "recovered")]
        return rows

    def summary(self) -> str:
        down = ""
        if self.downstream is not None:
            d = self.downstream
            down = (f"; {d['metric']} clean {d['clean']:.4g}, spliced {d['spliced']:.4g}, zero {d['zero']:.4g}, "
                    f"recovered {_fmt(d['recovered'])}")
        return (f"SAEMetricsResult({self.meta.get('architecture', '?')} {self.name}: {self.n_tokens} tokens, "
                f"EV {self.explained_variance:.3f}, L0 {self.l0:.1f}, cos {self.cosine:.3f}, mse {self.mse:.3g}, "
                f"dead {self.dead_fraction:.1%}, dense {self.dense_fraction:.1%}{down})")

    def plot(self):
        """Feature density (log10 of each live feature's firing rate; dead ones counted in the title) and the
        downstream metric clean / spliced / zero-ablated."""
        import matplotlib.pyplot as plt

        panels = 2 if self.downstream is not None else 1
        fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 2.6), squeeze=False)
        ax = axes[0, 0]
        live = self.fire_rate[self.fire_rate > 0]
        if len(live):
            ax.hist(live.log10().numpy(), bins=40, color="tab:blue")
        ax.axvline(math.log10(self.dense_threshold), color="tab:red", ls="--", lw=1, label="dense")
        ax.set_xlabel("log10 firing rate", fontsize=8)
        ax.set_ylabel("features", fontsize=8)
        ax.set_title(f"{self.name}: {len(self.dead_features)} dead of {len(self.fire_rate)}", fontsize=8)
        ax.legend(fontsize=6)
        if self.downstream is not None:
            d, ax = self.downstream, axes[0, 1]
            keys = ["clean", "spliced", "zero"]
            ax.bar(keys, [d[k] for k in keys], color=["tab:green", "tab:blue", "tab:gray"])
            ax.set_ylabel(d["metric"], fontsize=8)
            ax.set_title(f"recovered {_fmt(d['recovered'])}", fontsize=8)
        for a in axes.flat:
            a.tick_params(labelsize=7)
        fig.tight_layout()
        return fig

    def _repr_html_(self) -> str:
        import html

        body = "".join(f"<tr><td>{html.escape(r['metric'])}</td><td>{html.escape(r['value'])}</td></tr>"
                       for r in self.table())
        return super()._repr_html_() + f"<table>{body}</table>"

    def to_report(self, report, title: str | None = None, **plot_kw) -> None:
        super().to_report(report, title, **plot_kw)
        report.table(self.table())


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    return str(v) if isinstance(v, int) else f"{v:.4g}"


# ------------------------------------------------------------------------------------- reconstruction stats
class ReconstructionStats:
    """Running sums over tokens, float64, centred on the first batch's mean (so the total variance does not
    cancel catastrophically when activations sit far from the origin)."""

    def __init__(self, sae, site):
        self.sae, self.site = sae, site
        self.n = 0
        self.centre: Tensor | None = None
        self.s1 = self.s2 = self.sse = self.cos = self.l0 = 0.0
        self.fires = torch.zeros(sae.cfg.d_sae, dtype=torch.long)

    @torch.no_grad()
    def add(self, x: Float[Tensor, "tokens d"]) -> None:
        if x.shape[0] == 0:
            return
        xs = _sae_input(x, self.sae, self.site).float()
        f = self.sae.encode(xs.to(self.sae.W_enc.dtype))
        x_hat = self.sae.decode(f).float()
        xd = xs.double()
        if self.centre is None:
            self.centre = xd.mean(0)
        c = xd - self.centre
        self.s1 = c.sum(0) + self.s1
        self.s2 += float((c * c).sum())
        self.sse += float(((xd - x_hat.double()) ** 2).sum())
        self.cos += float(torch.nn.functional.cosine_similarity(xs, x_hat, dim=-1).double().sum())
        active = f != 0
        self.l0 += float(active.sum())
        self.fires += active.sum(0).cpu()
        self.n += x.shape[0]

    def result(self) -> dict:
        if self.n == 0:
            raise ValueError(f"no tokens reached {self.site.name!r}: nothing to measure")
        d = self.sae.cfg.d_in
        total = self.s2 - float((self.s1 * self.s1).sum()) / self.n
        return {"n_tokens": self.n, "explained_variance": 1.0 - self.sse / total if total > 0 else float("nan"),
                "mse": self.sse / (self.n * d), "cosine": self.cos / self.n, "l0": self.l0 / self.n,
                "fire_rate": self.fires.double().div(self.n).float()}


def _token_rows(value: Tensor, site, mask: Tensor | None) -> Tensor:
    """A site's value as (tokens, d): padding dropped for text towers when the attention mask fits."""
    x, _ = _to_tokens(value, site)
    if x.dim() == 3:
        if mask is not None and site.name.startswith(_TEXT_TOWERS) and tuple(mask.shape) == tuple(x.shape[:2]):
            return x[mask.to(x.device).bool()]
        return x.reshape(-1, x.shape[-1])
    return x


# ------------------------------------------------------------------------------------------------ technique
@torch.no_grad()
def sae_metrics(lens, sae, inputs=None, *, store=None, name: str | None = None, classes=None, labels=None,
                latents: Tensor | None = None, timesteps: Sequence[int] | None = None, seed: int = 0,
                dense_threshold: float = 0.1, batch_size: int = 8, generate_kwargs: Mapping | None = None,
                downstream: bool = True, progress: bool = True) -> SAEMetricsResult:
    """Reconstruction, sparsity and downstream loss of `sae` at its site (module docstring).

    `inputs`: processor outputs (a dict or a list of them) for generative and contrastive models, prompts (a string
    or a list) for diffusion, or an ActivationStore holding the site (reconstruction and sparsity only). `store`:
    an ActivationStore to measure reconstruction on while `inputs` give the downstream loss. `name`: the site
    (default `sae.cfg.hook_name`). Contrastive: `classes` (list of texts or dict label -> prompts) and `labels`
    (one class index per image, over all batches) for the zero-shot accuracy. Diffusion: `latents` (prompts, C,
    h, w) the clean latents (default: generated from the prompts with `generate_kwargs` and `seed`), `timesteps`
    (default 10%, 50%, 90% of the training schedule), `batch_size` prompts per denoiser call.
    `downstream=False` skips the three model runs.
    """
    if isinstance(inputs, ActivationStore):
        if store is not None:
            raise ValueError("inputs is an ActivationStore and store= is given too; pass one store")
        inputs, store = None, inputs
    if inputs is None and store is None:
        raise ValueError("nothing to measure on: pass inputs (processor outputs, or prompts for diffusion) and/or "
                         "store (an ActivationStore of the SAE's site)")
    if not isinstance(dense_threshold, (int, float)) or isinstance(dense_threshold, bool) \
            or not 0 < dense_threshold <= 1:
        raise ValueError(f"dense_threshold={dense_threshold!r}; allowed: a fraction of tokens in (0, 1]")
    site_name = site_names(lens, sae, name, one=True)[0]
    site = lens.sites[site_name]
    _check_family_args(lens, classes, labels, latents, timesteps, generate_kwargs)
    stats = ReconstructionStats(sae, site)
    if store is not None:  # first: a store that does not fit fails before any model run
        _from_store(store, site_name, sae, stats, progress)
    down = None
    if inputs is not None:
        run = {"generative": _generative, "contrastive": _contrastive, "diffusion": _diffusion}[lens.family]
        down = run(lens, sae, site, inputs, None if store is not None else stats, downstream=downstream,
                   progress=progress, classes=classes, labels=labels, latents=latents, timesteps=timesteps,
                   seed=seed, batch_size=batch_size, generate_kwargs=dict(generate_kwargs or {}))
    rec = stats.result()
    rate = rec.pop("fire_rate")
    meta = provenance(lens, [site_name], sae=_sae_desc(sae), source="store" if store is not None else "inputs")
    return SAEMetricsResult(meta=meta, name=site_name, **rec, dead_fraction=float((rate == 0).float().mean()),
                            dense_fraction=float((rate > dense_threshold).float().mean()),
                            dense_threshold=float(dense_threshold), fire_rate=rate, downstream=down)


def _sae_desc(sae) -> dict:
    c = sae.cfg
    return {"architecture": c.architecture, "d_in": c.d_in, "d_sae": c.d_sae, "k": c.k, "hook_name": c.hook_name}


def _from_store(store, site_name: str, sae, stats: ReconstructionStats, progress: bool) -> None:
    if site_name not in store.names:
        raise ValueError(f"the store holds {store.names}, not the SAE's site {site_name!r}; pass name= or a store "
                         "written at that site")
    width = store.d[site_name]
    if width != sae.cfg.d_in:
        raise ValueError(f"{site_name!r} has {width} features per token in the store; this SAE reads d_in="
                         f"{sae.cfg.d_in}")
    bar = tqdm(total=len(store), desc=f"sae_metrics {site_name}", unit="tok", disable=not progress)
    for x in store.batches(site_name, STORE_BATCH, shuffle=False, rank=0, world_size=1):  # all tokens, every rank
        stats.add(x)
        bar.update(len(x))
    bar.close()


def _check_family_args(lens, classes, labels, latents, timesteps, generate_kwargs) -> None:
    fam = lens.family
    given = [k for k, v in (("classes", classes), ("labels", labels)) if v is not None]
    if given and fam != "contrastive":
        raise ValueError(f"{', '.join(given)}: zero-shot accuracy is for contrastive models; {lens.architecture} is "
                         f"a {fam} model")
    if fam == "contrastive" and (classes is None) != (labels is None):
        raise ValueError("zero-shot accuracy needs both classes (the class texts) and labels (a class index per "
                         "image); give both or neither")
    given = [k for k, v in (("latents", latents), ("timesteps", timesteps), ("generate_kwargs", generate_kwargs))
             if v is not None]
    if given and fam != "diffusion":
        raise ValueError(f"{', '.join(given)}: the denoising loss is for diffusion pipelines; {lens.architecture} is "
                         f"a {fam} model")


def _zero(value: Tensor, ctx) -> Tensor:
    return torch.zeros_like(value)


def _variants(lens, sae, site_name: str, capture: Callable | None) -> dict[str, Callable]:
    """Context factories: the clean run (recording the site into the stats when asked), spliced, zero-ablated."""
    caps = {site_name: [capture]} if capture is not None else None
    return {"clean": lambda: lens.hooks(captures=caps) if caps else contextlib.nullcontext(),
            "spliced": lambda: sae_spliced(lens, sae, names=site_name),
            "zero": lambda: lens.hooks({site_name: _zero})}


def _summary(metric: str, values: dict[str, float], **detail) -> dict:
    clean, spliced, zero = values["clean"], values["spliced"], values["zero"]
    rec = (zero - spliced) / (zero - clean) + 0.0 if zero != clean else None  # + 0.0: no "-0"
    return {"metric": metric, "clean": clean, "spliced": spliced, "zero": zero, "recovered": rec, **detail}


# ---------------------------------------------------------------------------------------------- generative
def _generative(lens, sae, site, inputs, stats, *, downstream, progress, **_) -> dict | None:
    batches = _batches(inputs, "inputs")
    text = MODALITIES.index("text")
    sums = {k: 0.0 for k in ("clean", "spliced", "zero")}
    count = 0
    for batch in tqdm(batches, desc="sae_metrics", disable=not progress):
        mask = batch.get("attention_mask") if isinstance(batch.get("attention_mask"), Tensor) else None
        variants = _variants(lens, sae, site.name, None if stats is None else
                             lambda v, ctx: stats.add(_token_rows(v, site, mask)))
        keep = None
        labels = batch.get("labels")
        model_batch = {k: v for k, v in batch.items() if k != "labels"}
        for key in ("clean", "spliced", "zero") if downstream else ("clean",):
            with variants[key]():
                logits = lens(model_batch).logits
            if not downstream:
                break
            if keep is None:
                keep = _targets(lens, batch, text)
            nll = _nll(logits, batch["input_ids"] if labels is None else torch.as_tensor(labels).clamp(min=0))
            sums[key] += float(nll[keep.to(nll.device)].double().sum())
        if keep is not None:
            count += int(keep.sum())
    if not downstream:
        return None
    if count == 0:
        raise ValueError("inputs hold no next-token targets that are text tokens (every target is an image, "
                         "special or padding token); give prompts with text")
    return _summary("cross_entropy", {k: v / count for k, v in sums.items()}, tokens=count)


def _targets(lens, batch, text_code: int) -> Tensor:
    """(batch, seq - 1) bool: position t predicts token t + 1, a text token, both real under the attention mask;
    with `labels` in the batch, where they are not -100."""
    ids = batch["input_ids"]
    if batch.get("labels") is not None:
        labels = torch.as_tensor(batch["labels"])
        if labels.shape != ids.shape:
            raise ValueError(f"labels have shape {tuple(labels.shape)}; they must match input_ids "
                             f"{tuple(ids.shape)} (-100 where no loss)")
        return labels[:, 1:] != -100
    am = batch.get("attention_mask")
    am = torch.ones_like(ids, dtype=torch.bool) if am is None else torch.as_tensor(am).bool()
    is_text = lens.token_map(batch).modality == text_code
    return am[:, 1:] & am[:, :-1] & is_text[:, 1:]


def _nll(logits: Tensor, input_ids: Tensor) -> Tensor:
    ids = input_ids.to(logits.device)
    s = ids.shape[1]
    if logits.shape[1] < s:
        raise ValueError(f"the model returned logits for {logits.shape[1]} positions but input_ids has {s}")
    logits = logits[:, -s:]  # models that prepend tokens the input_ids do not hold (older BLIP-2) put them first
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


# --------------------------------------------------------------------------------------------- contrastive
def _contrastive(lens, sae, site, inputs, stats, *, downstream, progress, classes, labels, **_) -> dict | None:
    batches = _batches(inputs, "inputs")
    if stats is not None:
        cap = {site.name: [lambda v, ctx: stats.add(_token_rows(v, site, mask))]}
        for batch in tqdm(batches, desc="sae_metrics", disable=not progress):
            mask = batch.get("attention_mask") if isinstance(batch.get("attention_mask"), Tensor) else None
            with lens.hooks(captures=cap):
                _tower_forward(lens, batch, site.name)
    if not downstream or classes is None:
        return None
    y = torch.as_tensor(labels).long().cpu().flatten()
    n = sum(int(b["pixel_values"].shape[0]) for b in batches if "pixel_values" in b)
    if n != len(y):
        raise ValueError(f"labels: one class index per image; the batches hold {n} images, labels {len(y)}")
    acc = {}
    for key, ctx in _variants(lens, sae, site.name, None).items():
        with ctx():
            names, cls_emb = encode_texts(lens, classes)
            img = torch.cat([image_embeddings(lens, b) for b in batches if "pixel_values" in b])
        if int(y.min()) < 0 or int(y.max()) >= len(names):
            raise ValueError(f"labels must be class indices in [0, {len(names) - 1}]; got values from {int(y.min())} "
                             f"to {int(y.max())}")
        acc[key] = float(((img @ cls_emb.T).argmax(-1) == y).float().mean())
    return _summary("zero_shot_accuracy", acc, images=n, classes=names)


def _tower_forward(lens, batch: Mapping, site_name: str) -> None:
    """The forward that reaches the site: the whole model when the batch has images and texts, else the tower."""
    has_pix, has_ids = "pixel_values" in batch, "input_ids" in batch
    if has_pix and has_ids:
        lens(batch)
    elif has_pix and site_name.startswith("vision."):
        lens.model.get_image_features(pixel_values=torch.as_tensor(batch["pixel_values"]).to(lens.device, lens.dtype))
    elif has_ids and site_name.startswith("text."):
        kw = {k: torch.as_tensor(batch[k]).to(lens.device) for k in ("input_ids", "attention_mask") if k in batch}
        lens.model.get_text_features(**kw)
    else:
        raise ValueError(f"a batch with keys {sorted(batch)} does not reach {site_name!r}: give pixel_values for a "
                         "vision site, input_ids for a text site, or both")


# ----------------------------------------------------------------------------------------------- diffusion
def _diffusion(lens, sae, site, inputs, stats, *, downstream, progress, latents, timesteps, seed, batch_size,
               generate_kwargs, **_) -> dict | None:
    prompts = [inputs] if isinstance(inputs, str) else list(inputs) if isinstance(inputs, Sequence) else None
    if not prompts or any(not isinstance(p, str) for p in prompts):
        raise TypeError(f"inputs for a diffusion pipeline are prompts (a string or a non-empty list of strings); got "
                        f"{type(inputs).__name__}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    den = Denoising(lens)
    ts = den.timesteps(timesteps)
    chunks = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]
    x0 = _clean_latents(lens, chunks, latents, seed, generate_kwargs, progress)
    g = torch.Generator().manual_seed(seed)  # one draw per timestep over all prompts: batch_size changes nothing
    full = [torch.randn((sum(len(x) for x in x0), *x0[0].shape[1:]), generator=g).split([len(x) for x in x0])
            for _ in ts]
    noise = [[full[j][i] for j in range(len(ts))] for i in range(len(x0))]
    capture = None if stats is None else lambda v, ctx: stats.add(_token_rows(v, site, None))
    sums = {k: {t: 0.0 for t in ts} for k in ("clean", "spliced", "zero")}
    count = {t: 0 for t in ts}
    keys = ("clean", "spliced", "zero") if downstream else ("clean",)
    bar = tqdm(total=len(keys) * len(chunks), desc="sae_metrics", disable=not progress)
    for key in keys:
        make = _variants(lens, sae, site.name, capture)[key]
        for chunk, x, eps in zip(chunks, x0, noise):
            with make():
                cond = den.encode(chunk)
                for t, e in zip(ts, eps):
                    pred, target = den.predict(x, e, t, cond)
                    sums[key][t] += float(((pred.float() - target.float()) ** 2).double().sum())
                    if key == "clean":
                        count[t] += target.numel()
            bar.update()
        capture = None  # the stats come from the clean runs only
    bar.close()
    if not downstream:
        return None
    per_t = {str(t): {k: sums[k][t] / count[t] for k in keys} for t in ts}
    total = sum(count.values())
    values = {k: sum(sums[k].values()) / total for k in keys}
    return _summary("denoising_mse", values, timesteps=ts, per_timestep=per_t, target=den.target, seed=seed)


def _clean_latents(lens, chunks, latents, seed, generate_kwargs, progress) -> list[Tensor]:
    if latents is not None:
        lat = torch.as_tensor(latents).detach().float().cpu()
        n = sum(len(c) for c in chunks)
        if lat.dim() != 4 or lat.shape[0] != n:
            raise ValueError(f"latents must be (prompts, C, h, w) with one per prompt ({n}); got {tuple(lat.shape)}")
        return list(lat.split([len(c) for c in chunks]))
    bad = sorted(set(generate_kwargs) & {"prompt", "output_type", "generator", "names", "hooks"})
    if bad:
        raise ValueError(f"generate_kwargs: {bad} are set by sae_metrics; give the others (num_inference_steps, "
                         "guidance_scale, height, width, ...)")
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in tqdm(chunks, desc="sae_metrics: clean latents", disable=not progress):
        res, _ = lens.generate(chunk, names=[], output_type="latent", generator=g, progress=False, **generate_kwargs)
        out.append(res.images.detach().float().cpu())
    return out


__all__ = ["Denoising", "ReconstructionStats", "SAEMetricsResult", "sae_metrics"]
