"""Relevancy maps (Chefer, Gur & Wolf 2021, "Generic attention-model explainability") and attention rollout (Abnar &
Zuidema 2020): which image patches and which tokens a CLIP / SigLIP image-text logit, or a VLM's answer logit, comes
from, read off the attention maps.

    res = relevancy(clip, inputs, 0)                         # text 0's logit with each image; a RelevancyResult
    res = relevancy(vlm, inputs, "red")                       # the logit of 'red' at the answer position
    res = relevancy(vlm, inputs, method="rollout")            # attention alone, no gradient
    res.maps                                                  # (images, labels, rows, cols) on the patch grid
    res.pointing_game(masks, label="red"); res.iou(masks, "red")   # MapResult's evaluation
    res.token_scores(image=0, label="red")                    # [(token, relevancy), ...] over the text side

Chefer: R = I; for every attention layer, in order, R += mean_heads(relu(dlogit/dA * A)) @ R; the row of R at the
read-out position (CLS, EOS, the answer position) says how much each input token is relevant to that logit.
Rollout: R = prod over layers of rownorm(0.5 mean_heads(A) + 0.5 I), the same row read; it ignores the target.

Why these rules: attention alone says where a position reads, not whether that reading matters for this output
(rollout); weighting each attention entry by its gradient keeps the entries that push the logit up (Chefer), and the
identity term carries each token's own contribution through the residual stream.

Generative VLMs: the LM's relevancy row at the answer position gives a value per sequence position (text tokens:
`token_relevancy`); its entries at the image tokens (`lens.token_map`) are carried on through the vision tower's own
relevancy (the same rule on its attention, the same gradient), so the map is over the tower's input patches. Qwen2-VL
(through_vision=True): each LM image token is the merger MLP of a 2x2 window of tower tokens, which share its
relevancy equally before the tower's rule runs per image (`merged_through_vision`). BLIP-2:
its LM image positions are the Q-Former's learned queries, which have no patch cell; the LM row at the queries is
carried to the vision tokens by the paper's encoder-decoder rules through the Q-Former's self- and cross-attention
(`_relevancy_blip2`). CLIP / SigLIP: the vision tower's relevancy at CLS (CLIP) or through SigLIP's attention-pooling
probe, and the text tower's at the pooled token of the target text.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..hooks.attention import join_calls
from ._grad import frozen as _frozen, leaf as _leaf
from .maps import MapResult, images_uint8
from .result import provenance, require_family, token_id

METHODS = ("chefer", "rollout")
_EMBEDS = ("vision.embed", "text.embed", "lm.embed", "qformer.query_tokens")  # leaves: every map gets a gradient


@dataclasses.dataclass(repr=False)
class RelevancyResult(MapResult):
    """MapResult (maps: image patches' relevancy, (images, labels, rows, cols)) plus the text side.

    `token_relevancy` (images, labels, seq): each token's relevancy for map (image, label); the tokens are
    `tokens[token_rows[image, label]]` (the LM sequence of that batch row for VLMs; the target text's tokens for
    CLIP / SigLIP, zero-padded to the longest), token_rows -1 where no text took part (an embedding target).
    `targets[label][image]`: the token id (VLMs) or text index (CLIP / SigLIP) explained, -1 for an embedding.
    `scores` (images, labels): the target logit itself."""

    token_relevancy: Tensor
    tokens: list
    token_rows: Tensor
    targets: list
    scores: Tensor

    def token_scores(self, image: int = 0, label: str | int = 0) -> list[tuple[str, float]]:
        """(token, relevancy) over the text side of one map; [] where no text took part."""
        k = self._index(label)[0]
        row = int(self.token_rows[image, k])
        if row < 0:
            return []
        toks = self.tokens[row]
        return [(t, float(v)) for t, v in zip(toks, self.token_relevancy[image, k, :len(toks)])]

    def summary(self) -> str:
        return super().summary().replace("MapResult(", "RelevancyResult(", 1)


# ------------------------------------------------------------------------------------------------ targets
@dataclasses.dataclass
class Target:
    """One map's target: `ids` (images,) token ids / text indices, or `embed` (d,) a text embedding, or neither
    (`predicted`: filled from the model's own top answer / best text)."""

    label: str
    ids: Tensor | None = None
    embed: Tensor | None = None

    @property
    def predicted(self) -> bool:
        return self.ids is None and self.embed is None


def parse_targets(lens, inputs: Mapping, target, n: int) -> list[Target]:
    """`target` -> one Target per map. Generative: None (the top answer), a token id, a word, a (images,) long tensor
    (one id per image), or a list of ids / words. Contrastive: None (each image's best text), a text index into the
    inputs' texts, a string (encoded by the model's text tower), a float tensor (d,) or (k, d) of text embeddings,
    a (images,) long tensor (one text index per image), or a list of these."""
    gen = lens.family == "generative"
    if target is None:
        return [Target("predicted")]
    if isinstance(target, Tensor) and not target.is_floating_point():
        if target.dim() == 0:
            return parse_targets(lens, inputs, int(target), n)
        if target.shape != (n,):
            raise ValueError(f"target: a long tensor gives one {'token id' if gen else 'text index'} per image, "
                             f"shape ({n},); got {tuple(target.shape)}")
        ids = target.long().cpu()
        for v in ids.tolist():
            _check_id(lens, inputs, v)
        return [Target("target", ids=ids)]
    if isinstance(target, Tensor):
        if gen:
            raise TypeError("target: a float tensor is a text embedding, which applies to CLIP / SigLIP; give a token "
                            "id, a word or a (images,) long tensor of ids")
        emb = target.detach().float().cpu()
        if emb.dim() == 1:
            emb = emb[None]
        if emb.dim() != 2:
            raise ValueError(f"target: text embeddings must be (d,) or (k, d); got {tuple(target.shape)}")
        return [Target(f"embedding {i}", embed=e) for i, e in enumerate(emb)]
    if isinstance(target, (list, tuple)):
        if not target:
            raise ValueError("target: an empty list names no map")
        out = [t for item in target for t in parse_targets(lens, inputs, item, n)]
        emb = [t for t in out if t.embed is not None and t.label.startswith("embedding ")]
        for j, t in enumerate(emb):  # tensors given one by one: number them across the list
            t.label = f"embedding {j}"
        labels = [t.label for t in out]
        if len(set(labels)) != len(labels):
            raise ValueError(f"target: the labels {labels} repeat; give each target once")
        return out
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise TypeError(f"target must be None, an int, a str, a tensor or a list of them; got {type(target).__name__}")
    if gen:
        tok = _tokenizer(lens)
        tid = token_id(target, tok.get_vocab())
        _check_id(lens, inputs, tid)
        label = target if isinstance(target, str) else tok.convert_ids_to_tokens(tid)
        return [Target(label, ids=torch.full((n,), tid))]
    if isinstance(target, str):
        return [Target(target, embed=encode_text(lens, target))]
    _check_id(lens, inputs, target)
    return [Target(_decode(lens, inputs["input_ids"][target]), ids=torch.full((n,), target))]


def _tokenizer(lens):
    return getattr(lens.processor, "tokenizer", lens.processor)


def _check_id(lens, inputs, v: int) -> None:
    if lens.family == "generative":
        vocab = lens.model.get_output_embeddings().weight.shape[0]
        if not 0 <= v < vocab:
            raise ValueError(f"target: token id {v} is out of range for a vocabulary of {vocab}")
        return
    ids = inputs.get("input_ids")
    if not isinstance(ids, Tensor):
        raise ValueError("target: a text index needs texts in the inputs (input_ids); pass processor output with "
                         "text=..., or give the target as a string or a text embedding")
    if not 0 <= v < ids.shape[0]:
        raise ValueError(f"target: text index {v} is out of range for the {ids.shape[0]} texts in the inputs")


def _decode(lens, ids: Tensor) -> str:
    tok = _tokenizer(lens)
    return tok.decode(ids.tolist(), skip_special_tokens=True).strip() or f"text {ids.tolist()}"


@torch.no_grad()
def encode_text(lens, text: str) -> Float[Tensor, "d"]:
    """A text's embedding from the model's own text tower (unnormalised, as `get_text_features` returns it)."""
    kw = {"padding": "max_length"} if lens.architecture == "siglip" else {}
    enc = lens.processor(text=[text], return_tensors="pt", **kw)
    enc = {k: v.to(lens.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    return _features(lens.model.get_text_features(**enc))[0].float().cpu()


# ------------------------------------------------------------------------------------------ contrastive parts
def _features(out) -> Tensor:
    return out.pooler_output if hasattr(out, "pooler_output") else out


def siglip_pool(head, x: Float[Tensor, "b n d"]) -> tuple[Float[Tensor, "b d"], Float[Tensor, "b heads n"]]:
    """SigLIP's attention-pooling head written out (probe attends to every token, then a residual MLP), so that the
    probe's attention is a tensor in the graph; returns (image features, probe attention)."""
    mha = head.attention
    b, n, d = x.shape
    h = mha.num_heads
    w, bias = mha.in_proj_weight, mha.in_proj_bias
    bq, bk, bv = (None, None, None) if bias is None else bias.chunk(3)
    wq, wk, wv = w.chunk(3)
    q = F.linear(head.probe.expand(b, 1, d), wq, bq).view(b, 1, h, d // h).transpose(1, 2)
    k = F.linear(x, wk, bk).view(b, n, h, d // h).transpose(1, 2)
    v = F.linear(x, wv, bv).view(b, n, h, d // h).transpose(1, 2)
    a = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d // h), dim=-1)[:, :, 0]  # (b, h, n): one query
    o = mha.out_proj((a[:, :, None] @ v).transpose(1, 2).reshape(b, 1, d))  # from `a` itself: gradients reach it
    o = o + head.mlp(head.layernorm(o))
    return o[:, 0], a


def image_features(lens, pixel_values: Tensor, with_probe: bool = False):
    """(images, d) image features of a CLIP / SigLIP model (and SigLIP's probe attention when asked)."""
    model = lens.model
    if lens.architecture == "siglip" and with_probe:
        x = model.vision_model(pixel_values=pixel_values).last_hidden_state
        return siglip_pool(model.vision_model.head, x)
    feats = _features(model.get_image_features(pixel_values=pixel_values))
    return (feats, None) if with_probe else feats


def text_features(lens, prepared: Mapping) -> Tensor:
    kw = {k: prepared[k] for k in ("input_ids", "attention_mask") if isinstance(prepared.get(k), Tensor)}
    return _features(lens.model.get_text_features(**kw))


def contrastive_logits(lens, img: Tensor, txt: Tensor) -> Tensor:
    """The model's image-text logits (images, texts) from unnormalised features: scale * cosine (+ SigLIP's bias)."""
    model = lens.model
    if txt.shape[-1] != img.shape[-1]:
        raise ValueError(f"target: text embeddings of width {txt.shape[-1]}; the model's image features have "
                         f"{img.shape[-1]}")
    sims = F.normalize(img.float(), dim=-1) @ F.normalize(txt.float(), dim=-1).T
    out = sims * model.logit_scale.exp().float()
    if getattr(model, "logit_bias", None) is not None:
        out = out + model.logit_bias.float()
    return out


def check_contrastive(lens, technique: str) -> None:
    if lens.architecture not in ("clip", "siglip") or not hasattr(lens.model, "get_image_features") \
            or not hasattr(lens.model, "logit_scale"):
        raise TypeError(f"{technique} explains the image-text logit of a full CLIP / SigLIP model (both towers); got "
                        f"{type(lens.model).__name__}")


def target_logits(lens, targets: list[Target], logits: Tensor | None, img: Tensor | None,
                  pred: Tensor | None) -> Tensor:
    """(images, labels): each map's logit. `logits` (images, texts) for index targets, `img` features for embeddings."""
    cols = []
    n = img.shape[0] if img is not None else logits.shape[0]
    rows = torch.arange(n, device=(img if img is not None else logits).device)
    for t in targets:
        if t.embed is not None:
            cols.append(contrastive_logits(lens, img, t.embed.to(img.device)[None])[:, 0])
        else:
            ids = pred if t.predicted else t.ids
            cols.append(logits[rows, ids.to(rows.device)])
    return torch.stack(cols, 1)


# ------------------------------------------------------------------------------------------------- helpers
def pixel_images(lens, inputs: Mapping, images=None) -> Tensor:
    """(n, H, W, 3) uint8 images the maps are drawn over: `images` when given, else pixel_values un-normalised with
    the processor's mean and std."""
    if images is not None:
        return images_uint8(images)
    pv = inputs.get("pixel_values")
    if not isinstance(pv, Tensor) or pv.dim() != 4 or pv.shape[1] != 3:
        raise ValueError(f"pixel_values of shape {tuple(pv.shape) if isinstance(pv, Tensor) else None} are not "
                         "(images, 3, H, W) images (Qwen2-VL flattens patches); pass images= (what the processor got)")
    x = pv.detach().float().cpu()
    ip = getattr(lens.processor, "image_processor", None)
    mean, std = getattr(ip, "image_mean", None), getattr(ip, "image_std", None)
    if mean is None or std is None:
        return images_uint8(x)
    x = x * torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1) + \
        torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def to_device(lens, inputs: Mapping) -> dict:
    """Tensors on the model's device, floats in its dtype (one tower may be called alone, so no whole-model check)."""
    dev, dt = lens.device, lens.dtype
    return {k: v.to(dev, dt if v.is_floating_point() else v.dtype) if isinstance(v, Tensor) else v
            for k, v in inputs.items()}


def patch_grid(n_tokens: int) -> tuple[int, int]:
    """(offset, side) of a ViT's token sequence: a leading CLS (offset 1) when n - 1 is a square, else none."""
    for off in (0, 1):
        side = math.isqrt(n_tokens - off)
        if side * side == n_tokens - off and side > 0:
            return off, side
    raise ValueError(f"{n_tokens} vision tokens are neither a square grid nor CLS plus a square grid")


def answer_positions(lens, inputs: Mapping, position, b: int, seq: int) -> Tensor:
    if position == "answer":
        return lens.token_map(inputs).answer_positions().long().cpu()
    if isinstance(position, int) and not isinstance(position, bool) and -seq <= position < seq:
        return torch.full((b,), position % seq, dtype=torch.long)
    raise ValueError(f"position must be 'answer' or an int in [{-seq}, {seq - 1}]; got {position!r}")


def used_vision_blocks(lens, n_blocks: int) -> int:
    """How many vision blocks feed a generative VLM's LM: `vision_feature_layer` k reads hidden_states[k] (0 = the
    embeddings), so blocks 0..k-1 (k mod n+1); models without it read the last block."""
    fl = getattr(lens.model.config, "vision_feature_layer", -1)
    if isinstance(fl, (list, tuple)):
        return max(int(x) % (n_blocks + 1) for x in fl)
    return int(fl) % (n_blocks + 1)


def _propagate(v: Tensor, mats: Sequence[Tensor], method: str) -> Tensor:
    """Row vectors v (b, n) times the layers' relevancy factors, last layer first: v (I + Abar_L) ... (I + Abar_1)
    (chefer), or v Ahat_L ... Ahat_1 (rollout). The same as building R and reading its rows, in O(n^2) per layer."""
    for m in reversed(mats):
        step = torch.bmm(v[:, None], m)[:, 0]
        v = v + step if method == "chefer" else step
    return v


def _chefer(a: Tensor, g: Tensor | None) -> Tensor:
    """mean_heads(relu(grad * A)), float32 on CPU."""
    if g is None:
        return torch.zeros(a.shape[0], *a.shape[2:])
    return (g.detach().float() * a.detach().float()).clamp_min(0).mean(1).cpu()


def _rollout(a: Tensor) -> Tensor:
    """rownorm(0.5 mean_heads(A) + 0.5 I)."""
    m = a.detach().float().mean(1).cpu()
    m = 0.5 * m + 0.5 * torch.eye(m.shape[-1])
    return m / m.sum(-1, keepdim=True).clamp_min(1e-12)


def _single(store: dict, name: str) -> Tensor:
    calls = store.get(name, [])
    if len(calls) != 1:
        raise ValueError(f"{name} ran {len(calls)} attention calls in one forward; relevancy needs one per layer")
    return calls[0]


@contextlib.contextmanager
def _recording(lens, names: list[str], grad: bool, calls: dict | None = None, split: Sequence[str] = ()):
    """Attention maps of `names` into a dict (kept in the graph with grad; else float32 CPU copies); with grad the
    parameters are frozen and the embeddings made leaves, so only activations carry gradients. `split` (with
    `calls`): names recorded instead as each kernel call's own map, into `calls`, in the graph (a module running
    several calls, Qwen2-VL's tower one per image, records their join, which is built after the calls and so is no
    ancestor of the output: no gradient reaches it)."""
    store: dict[str, list[Tensor]] = {}

    def keep(v, ctx):
        store.setdefault(ctx.name, []).append(v if grad else v.detach().float().cpu())

    def keep_call(v, ctx):
        calls.setdefault(ctx.name, []).append(v)

    split = set(split) if calls is not None else set()
    fns = {e: _leaf for e in _EMBEDS if e in lens.sites} if grad else None
    if split:
        fns = {**(fns or {}), **{n: keep_call for n in split}}
    frozen = _frozen(lens.model) if grad else contextlib.nullcontext()
    with frozen, lens.hooks(fns, captures={n: [keep] for n in names if n not in split}), torch.set_grad_enabled(grad):
        yield store


# ------------------------------------------------------------------------------------------------ technique
def relevancy(lens, inputs: Mapping[str, Any], target=None, *, method: str = "chefer", position: str | int = "answer",
              through_vision: bool | None = None, images=None) -> RelevancyResult:
    """Relevancy maps of a target logit over the image patches, and over the tokens.

    `target`: generative VLMs, a token id or word whose logit at `position` ('answer': each row's last text position,
    `TokenMap.answer_positions`; or an int) is explained, a (batch,) long tensor of ids (one per row), None for the
    model's own top token, or a list (one map each). CLIP / SigLIP: a text index into the inputs' texts, a (images,)
    long tensor of indices, None for each image's best text, a string or float embedding (d,) / (k, d) for a text
    not in the inputs, or a list; the logit is the model's image-text logit.
    `method`: "chefer" (gradient-weighted, one backward per map) or "rollout" (attention only; the target just labels
    the maps). `through_vision` (VLMs): carry the LM's image-token relevancy through the vision tower (default: where
    LM image tokens are the tower's own tokens, LLaVA and PaliGemma; False gives the LM-level map on the token grid).
    Qwen2-VL takes through_vision=True (default False: its merged tokens are one step removed from the tower's, and
    the merger's split is an assumption, see `merged_through_vision`); the map is then on the full patch grid
    (image_grid_thw's h, w), one still image of one size per row.
    BLIP-2 (decoder LMs such as OPT; T5 attention is not hooked): the LM's relevancy at the query positions goes
    through the Q-Former (Chefer's encoder-decoder rules, eq. 6-11) to the vision tokens, and on through the vision
    tower's self-attention unless through_vision=False (then the map is over the tower's output tokens).
    `images`: what to draw the maps over (default: pixel_values un-normalised).

    One image per batch row for VLMs.
    """
    require_family(lens, ("contrastive", "generative"), "relevancy")
    if method not in METHODS:
        raise ValueError(f"method={method!r}; allowed: {METHODS}")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict (processor output); got {type(inputs).__name__}")
    if not isinstance(inputs.get("pixel_values"), Tensor):
        raise ValueError("relevancy maps an image: inputs hold no pixel_values tensor")
    inputs = dict(inputs)
    if lens.family == "generative":
        return _generative(lens, inputs, target, method, position, through_vision, images)
    if through_vision is not None:
        raise ValueError("through_vision applies to generative VLMs; CLIP / SigLIP maps are the vision tower's own")
    if position != "answer":
        raise ValueError("position applies to generative VLMs; CLIP / SigLIP explain the image-text logit")
    return _contrastive(lens, inputs, target, method, images)


def _contrastive(lens, inputs: dict, target, method: str, images) -> RelevancyResult:
    check_contrastive(lens, "relevancy")
    n = inputs["pixel_values"].shape[0]
    targets = parse_targets(lens, inputs, target, n)
    need_text = any(t.embed is None for t in targets)
    if need_text and not isinstance(inputs.get("input_ids"), Tensor):
        raise ValueError("target: a text index or None (best text) needs texts in the inputs (input_ids)")
    v_names = lens.hook_points("vision.blocks.*.attn.pattern")
    t_names = lens.hook_points("text.blocks.*.attn.pattern") if need_text else []
    grad = method == "chefer"
    prepared = to_device(lens, inputs)
    with _recording(lens, v_names + t_names, grad) as store:
        img, probe = image_features(lens, prepared["pixel_values"], with_probe=True)
        txt = text_features(lens, prepared) if need_text else None
        logits = contrastive_logits(lens, img, txt) if need_text else None
        pred = logits.detach().argmax(-1).cpu() if logits is not None else None
        scores = target_logits(lens, targets, logits, img, pred)  # (images, labels)
        va = [_single(store, nm) for nm in v_names]
        ta = [_single(store, nm) for nm in t_names]
        siglip = lens.architecture == "siglip"
        per_label_v, per_label_probe, per_label_t = [], [], []
        for k, t in enumerate(targets):
            if grad:
                gs = torch.autograd.grad(scores[:, k].sum(), va + ([probe] if siglip else []), retain_graph=True,
                                         allow_unused=True)
                per_label_v.append([_chefer(a, g) for a, g in zip(va, gs)])
                if siglip:  # the probe's one query row: (b, heads, n) -> (b, n)
                    gp = gs[-1][:, :, None] if gs[-1] is not None else None
                    per_label_probe.append(_chefer(probe[:, :, None], gp)[:, 0])
                if t.embed is None:
                    rows = []
                    for b in range(n):  # the text tower is shared by the images: one backward per image
                        ti = int((pred if t.predicted else t.ids)[b])
                        gt = torch.autograd.grad(scores[b, k], ta, retain_graph=True, allow_unused=True)
                        rows.append([_chefer(a[ti:ti + 1], g[ti:ti + 1] if g is not None else None)
                                     for a, g in zip(ta, gt)])
                    per_label_t.append(rows)
                else:
                    per_label_t.append(None)
    if not grad:
        vr = [_rollout(a) for a in va]
        tr = [_rollout(a) for a in ta]
        pr = probe.detach().float().mean(1).cpu() if probe is not None else None
    ids = [(pred if t.predicted else t.ids) if t.embed is None else torch.full((n,), -1) for t in targets]

    # image side: CLS row (CLIP) or the probe's attention (SigLIP) through the vision tower
    off, side = patch_grid(va[0].shape[-1])
    maps = []
    for k in range(len(targets)):
        if lens.architecture == "siglip":
            v0 = per_label_probe[k] if grad else pr
        else:
            v0 = torch.zeros(n, va[0].shape[-1])
            v0[:, 0] = 1.0
        v = _propagate(v0, per_label_v[k] if grad else vr, method)
        maps.append(v[:, off:].reshape(n, side, side))
    maps = torch.stack(maps, 1)

    # text side: the pooled token's row through the text tower, for the text each map explains
    tokens, tok_rel = [], torch.zeros(n, len(targets), 0)
    token_rows = torch.full((n, len(targets)), -1, dtype=torch.long)
    if need_text:
        in_ids = inputs["input_ids"]
        tokens = [_tokenizer(lens).convert_ids_to_tokens(r.tolist()) for r in in_ids]
        s = in_ids.shape[1]
        pool = _pooled_positions(lens, in_ids)
        tok_rel = torch.zeros(n, len(targets), s)
        for k, t in enumerate(targets):
            if t.embed is not None:
                continue
            for b in range(n):
                ti = int(ids[k][b])
                mats = per_label_t[k][b] if grad else [m[ti:ti + 1] for m in tr]
                e = torch.zeros(1, s)
                e[0, pool[ti]] = 1.0
                tok_rel[b, k] = _propagate(e, mats, method)[0]
                token_rows[b, k] = ti
    meta = provenance(lens, v_names + t_names, method=method)
    return RelevancyResult(meta=meta, maps=maps, images=pixel_images(lens, inputs, images),
                           labels=[t.label for t in targets], method=f"relevancy ({method})",
                           token_relevancy=tok_rel, tokens=tokens, token_rows=token_rows,
                           targets=[x.tolist() for x in ids], scores=scores.detach().float().cpu())


def _pooled_positions(lens, input_ids: Tensor) -> list[int]:
    """The text token each text's embedding is read from: CLIP's EOS (first eos id; the argmax id for configs with
    eos_token_id 2, as transformers does), SigLIP's last position."""
    if lens.architecture == "siglip":
        return [input_ids.shape[1] - 1] * input_ids.shape[0]
    eos = getattr(lens.model.text_model, "eos_token_id", None)
    if eos == 2 or eos is None:
        return input_ids.int().argmax(-1).tolist()
    return (input_ids == eos).int().argmax(-1).tolist()


def generative_setup(lens, inputs: dict, target, position) -> tuple:
    """Checks shared by the generative paths: (token map, batch, seq, answer positions (b,), targets)."""
    if not isinstance(inputs.get("input_ids"), Tensor):
        raise ValueError("relevancy: inputs hold no input_ids tensor; pass what the processor returns")
    tm = lens.token_map(inputs)
    b, seq = inputs["input_ids"].shape
    per_row = [tm.image[r][tm.image[r] >= 0].unique().tolist() for r in range(b)]
    if any(p != [r] for r, p in enumerate(per_row)):
        raise ValueError(f"relevancy needs exactly one image per batch row; rows hold images {per_row}")
    pos = answer_positions(lens, inputs, position, b, seq)
    return tm, b, seq, pos, parse_targets(lens, inputs, target, b)


def _generative(lens, inputs: dict, target, method: str, position, through_vision, images) -> RelevancyResult:
    if lens.architecture == "blip2":
        from ._relevancy_blip2 import blip2_relevancy

        return blip2_relevancy(lens, inputs, target, method, position, through_vision, images)
    tv = lens.architecture in ("llava", "paligemma") if through_vision is None else through_vision
    if not isinstance(tv, bool):
        raise TypeError(f"through_vision must be True, False or None; got {through_vision!r:.40}")
    if tv and lens.architecture not in ("llava", "paligemma", "qwen2_vl"):
        raise ValueError(f"through_vision=True: {lens.architecture}'s LM image tokens are not the vision tower's own "
                         "tokens (resampled), so its relevancy cannot be carried through; use False")
    tm, b, seq, pos, targets = generative_setup(lens, inputs, target, position)
    lm_names = lens.hook_points("lm.blocks.*.attn.pattern")
    v_names = lens.hook_points("vision.blocks.*.attn.pattern") if tv else []
    rows = torch.arange(b)
    ids, scores, atts, factors = target_factors(lens, inputs, lm_names + v_names, pos, targets, method,
                                                lambda i, a: _rollout(a),
                                                per_call=v_names if lens.architecture == "qwen2_vl" else ())
    n_lm = len(lm_names)
    va = atts[n_lm:]
    tok_rel, maps = [], []
    for k in range(len(targets)):
        e = torch.zeros(b, seq)
        e[rows, pos] = 1.0
        v = _propagate(e, factors[k][:n_lm], method)  # (b, seq): each position's relevancy for the answer
        tok_rel.append(v)
        if not tv:
            maps.append(torch.stack([tm.to_grid(v[r], batch=r) for r in range(b)]))
            continue
        used = used_vision_blocks(lens, len(va))
        if lens.architecture == "qwen2_vl":
            maps.append(merged_through_vision(lens, inputs, tm, v, factors[k][n_lm:n_lm + used], method))
            continue
        n_v = va[0].shape[-1]
        u = torch.zeros(b, n_v)
        side = None
        for r in range(b):
            p = tm.positions("image", batch=r)
            rr, cc = tm.row[r, p], tm.col[r, p]
            rows_, cols_ = tm.grids[r]
            off, side = patch_grid(n_v)
            if side * side != rows_ * cols_ or (rr < 0).any() and off == 0:
                raise ValueError(f"the vision tower's {n_v} tokens do not match the LM's {rows_}x{cols_} image grid")
            idx = torch.where(rr >= 0, off + rr * cols_ + cc, torch.zeros_like(rr))
            u[r].index_add_(0, idx, v[r, p])
        u = _propagate(u, factors[k][n_lm:n_lm + used], method)
        maps.append(u[:, off:].reshape(b, side, side))
    return generative_result(lens, inputs, images, lm_names + v_names, method, tv, position, tm, targets, ids, scores,
                             maps, tok_rel)


def merged_through_vision(lens, inputs: Mapping, tm, v: Float[Tensor, "batch seq"], mats: Sequence[Tensor],
                          method: str) -> Float[Tensor, "batch rows cols"]:
    """Qwen2-VL: the LM's relevancy `v` at the image tokens, carried through the vision tower onto the full patch grid.

    LM image token (R, C) is the patch merger's MLP of the merge x merge window of tower tokens under it. The MLP mixes
    the window's tokens by learned weights and has no attention to read shares from, so each window token gets an
    equal 1/merge**2 share: the total relevancy is conserved and no patch of the window is favoured without evidence.
    Then the tower's own rule (`mats`: one (images, n, n) factor per block; the tower attends within each image only,
    cu_seqlens, so the hook records one block per image, zero-padded to the largest) runs over that image's tower
    tokens, which come in merge-window order (`store.layout.merge_window_grid`) and are put back on the raster
    (h, w) patch grid of `image_grid_thw`."""
    from ..store.layout import merge_window_grid

    thw = inputs.get("image_grid_thw")
    if not isinstance(thw, Tensor):
        raise ValueError("through_vision=True for Qwen2-VL needs image_grid_thw in the inputs (the patch grid)")
    thw = thw.long().cpu()
    m = int(lens.model.config.vision_config.spatial_merge_size)
    b = v.shape[0]
    if thw.shape[0] != b or (thw[:, 0] != 1).any():
        raise ValueError(f"through_vision=True for Qwen2-VL needs one still image (t = 1) per batch row; "
                         f"image_grid_thw is {thw.tolist()} for {b} rows (video frames are not supported)")
    if len(set(map(tuple, thw[:, 1:].tolist()))) != 1:
        raise ValueError(f"through_vision=True for Qwen2-VL: the images' patch grids {thw[:, 1:].tolist()} differ; "
                         "maps are stacked over the batch, so give images of one size (or one per call)")
    _, h, w = thw[0].tolist()
    n = h * w
    if mats and (mats[0].shape[0] != b or mats[0].shape[-1] < n):
        raise ValueError(f"the vision tower's recorded attention has shape {tuple(mats[0].shape)}; relevancy needs "
                         f"one ({b} images, {n}, {n}) block per image (a varlen flash kernel gives one map over all "
                         "images: load the model with attn_implementation='sdpa' or 'eager')")
    rc = merge_window_grid(1, h, w, m)  # (n, 2): each tower token's (row, col) on the patch grid
    out = torch.zeros(b, h, w)
    for r in range(b):
        p = tm.positions("image", batch=r)
        rr, cc = tm.row[r, p], tm.col[r, p]
        if p.numel() != n // m**2 or (rr < 0).any():
            raise ValueError(f"row {r} has {p.numel()} LM image tokens; a {h}x{w} patch grid merged {m}x{m} gives "
                             f"{n // m**2}")
        merged = tm.to_grid(v[r].float(), batch=r)  # (h/m, w/m): the LM's image tokens on the merged grid
        u = merged[rc[:, 0] // m, rc[:, 1] // m] / m**2  # equal split over each window's tower tokens
        u = _propagate(u[None], [x[r:r + 1, :n, :n] for x in mats], method)[0]
        out[r, rc[:, 0], rc[:, 1]] = u
    return out


def _join(parts: list[Tensor]) -> Tensor:
    """Per-call maps joined as the hooks join them (`hooks.attention.join_calls`)."""
    if not parts:
        raise ValueError("a vision attention block ran no attention call in the forward")
    return join_calls(parts)


def target_factors(lens, inputs, names: list[str], pos: Tensor, targets, method: str, rollout_factor,
                   per_call: Sequence[str] = ()):
    """One forward with the attention maps at `names` recorded: the target ids and logits (batch, targets), the maps,
    and per target each map's factor: Chefer's gradient-weighted map (one backward per target) or, for rollout,
    `rollout_factor(index, map)` (the same for every target).

    `per_call`: names whose module runs one kernel call per image (Qwen2-VL's tower, cu_seqlens). The hooks join those
    calls' maps after the fact, so no gradient reaches the joined map: Chefer's gradients are taken at each call's
    own map and the factors joined per block afterwards, (images, n, n) zero-padded as the hooks join the maps."""
    grad = method == "chefer"
    split = set(per_call) if grad else set()
    rows = torch.arange(len(pos))
    calls: dict[str, list[Tensor]] = {}
    with _recording(lens, names, grad, calls, split) as store:
        out = lens.model(**lens.prepare(inputs, where="relevancy"))
        logits = out.logits[rows.to(out.logits.device), pos.to(out.logits.device)]  # (b, vocab)
        pred = logits.detach().argmax(-1).cpu()
        ids = [pred if t.predicted else t.ids for t in targets]
        scores = torch.stack([logits[rows.to(logits.device), i.to(logits.device)] for i in ids], 1)
        groups = [calls.get(nm, []) if nm in split else [_single(store, nm)] for nm in names]
        flat = [a for g in groups for a in g]
        factors = []
        for k in range(len(targets)):
            if grad:
                gs = torch.autograd.grad(scores[:, k].sum(), flat, retain_graph=k < len(targets) - 1,
                                         allow_unused=True)
                f, i = [_chefer(a, g) for a, g in zip(flat, gs)], 0
                joined = []
                for nm, g in zip(names, groups):
                    joined.append(_join(f[i:i + len(g)]) if nm in split else f[i])
                    i += len(g)
                factors.append(joined)
            elif k == 0:
                factors.append([rollout_factor(i, g[0]) for i, g in enumerate(groups)])
            else:
                factors.append(factors[0])
    atts = [_join([a.detach().float().cpu() for a in g]) if nm in split else g[0] for nm, g in zip(names, groups)]
    return ids, scores, atts, factors


def generative_result(lens, inputs, images, names, method, tv, position, tm, targets, ids, scores, maps,
                      tok_rel) -> RelevancyResult:
    """The `RelevancyResult` of a generative VLM: per-target maps over the image grid and relevancy per token."""
    b = scores.shape[0]
    meta = provenance(lens, names, method=method, through_vision=tv,
                      position=position if isinstance(position, str) else int(position))
    return RelevancyResult(meta=meta, maps=torch.stack(maps, 1), images=pixel_images(lens, inputs, images),
                           labels=[t.label for t in targets], method=f"relevancy ({method})",
                           token_relevancy=torch.stack(tok_rel, 1), tokens=[list(t) for t in tm.tokens],
                           token_rows=torch.arange(b)[:, None].expand(b, len(targets)).clone(),
                           targets=[i.tolist() for i in ids], scores=scores.detach().float().cpu())


__all__ = ["RelevancyResult", "relevancy"]
