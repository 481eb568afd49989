"""`data` items -> batches: which kind each item is, which rank runs it, which example ids its rows get.

Kinds: 'image' (PIL image, uint8 array or tensor), 'text' (a string: a caption, a text-only prompt, a diffusion
prompt), 'conversation' ({'image': img or 'images': [imgs], 'text': prompt}: a VLM turn) and 'processed' (a dict of
processor outputs, which may hold several rows: it runs as its own batch, each row one example). Consecutive raw
items of one kind are batched together, `batch_size` at a time.

Example ids count rows of the whole stream (raw items are one row each, so for them `example` is the item's index
in `data`). Under several ranks each rank runs the items with `index % world_size == rank`, but reads every item to
number the examples.

`batch_digest` hashes what a batch holds (image pixels, strings, processor tensors): the writer records one per
batch, so a resumed run can tell that the items it skips are the items the store was written from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("image", "text", "conversation", "processed")
_PROCESSED_KEYS = ("input_ids", "pixel_values", "inputs_embeds")
_CONVERSATION_KEYS = {"image", "images", "text"}


@dataclass
class Batch:
    kind: str
    items: list
    examples: torch.Tensor  # (rows,) int64 global example ids
    local_end: int  # how many of this rank's items are done once this batch is
    skipped: bool = False  # done by an earlier run (yielded only when asked for, to check its digest)


def _is_image(item) -> bool:
    try:
        from PIL import Image
        if isinstance(item, Image.Image):
            return True
    except ImportError:  # pragma: no cover
        pass
    return isinstance(item, (np.ndarray, torch.Tensor))


def item_kind(item, index: int) -> str:
    if isinstance(item, str):
        return "text"
    if isinstance(item, Mapping):
        if any(k in item for k in _PROCESSED_KEYS):
            return "processed"
        if "text" in item and set(item) <= _CONVERSATION_KEYS:
            return "conversation"
        raise TypeError(f"data[{index}] is a dict with keys {sorted(map(str, item))}; a dict item is either processor "
                        f"output (holding one of {_PROCESSED_KEYS}) or a conversation {{'image' or 'images', 'text'}}")
    if _is_image(item):
        return "image"
    raise TypeError(f"data[{index}] is a {type(item).__name__}; items are PIL images, uint8 arrays, strings, dicts of "
                    "processor outputs or conversations {'image': ..., 'text': ...}")


def as_image(item, index: int):
    """PIL images pass; uint8 (H, W, 3) / (H, W) arrays or tensors (also (3, H, W)) become PIL images."""
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    a = item.detach().cpu().numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
    if a.dtype != np.uint8:
        raise TypeError(f"data[{index}]: image arrays must be uint8 (0..255); got {a.dtype}. Convert, or pass PIL "
                        "images or processor outputs")
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"data[{index}]: an image array must be (H, W), (H, W, 3) or (3, H, W); got {a.shape}")
    return Image.fromarray(a)


def rows_of(item: Mapping, index: int) -> int:
    for key in _PROCESSED_KEYS:
        v = item.get(key)
        if isinstance(v, torch.Tensor):
            return 1 if v.dim() <= 1 else int(v.shape[0])
    raise ValueError(f"data[{index}] is processor output without a tensor under {_PROCESSED_KEYS}; pass what the "
                     "processor returns with return_tensors='pt'")


def check_data(data) -> None:
    if isinstance(data, (str, bytes, Mapping)) or _is_image(data) and not isinstance(data, (list, tuple)):
        raise TypeError(f"data must be a sequence or iterable of items, not one {type(data).__name__}; wrap a single "
                        "item in a list")
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be a sequence or iterable of items; got {type(data).__name__}")
    if hasattr(data, "__len__") and len(data) == 0:
        raise ValueError("data is empty: nothing to record")


def iter_batches(data: Iterable, batch_size: int, rank: int = 0, world: int = 1, skip: int = 0, *,
                 skipped: bool = False) -> Iterator[Batch]:
    """This rank's batches, after its first `skip` items (a resumed run); with `skipped=True` also the batches of
    those first items (marked `skipped`), batched as the run that did them batched them. Raises if `data` holds no
    item."""
    pending: list = []
    pending_ex: list[int] = []
    kind = None
    example = local = 0
    seen = False

    def flush():
        nonlocal pending, pending_ex, kind
        out = Batch(kind, pending, torch.tensor(pending_ex, dtype=torch.int64), local, local <= skip)
        pending, pending_ex, kind = [], [], None
        return out

    for i, item in enumerate(data):
        seen = True
        k = item_kind(item, i)
        rows = rows_of(item, i) if k == "processed" else 1
        mine = i % world == rank
        if mine and (local >= skip or skipped):
            if pending and local == skip:  # the skipped part ends at a batch boundary of the run that wrote it
                yield flush()
            if k == "processed":
                if pending:
                    yield flush()
                local += 1
                yield Batch(k, [dict(item)], torch.arange(example, example + rows), local, local <= skip)
            else:
                if pending and k != kind:
                    yield flush()
                kind = k
                pending.append(item)
                pending_ex.append(example)
                local += 1
                if len(pending) == batch_size:
                    yield flush()
        elif mine:
            local += 1
        example += rows
    if pending:
        yield flush()
    if not seen:
        raise ValueError("data is empty: nothing to record")


# ---------------------------------------------------------------------------------------------- digests
def batch_digest(batch: Batch) -> str:
    """A short sha256 of the batch's content (its kind, example ids and every item's bytes): equal batches give
    equal digests, and another pixel, prompt or token id gives another. Images hash by their pixels, so a PIL image
    and the uint8 array (or tensor) it was made from hash alike."""
    h = hashlib.sha256(f"{batch.kind}|{batch.examples.tolist()}".encode())
    for item, e in zip(batch.items, batch.examples.tolist()):
        _hash_item(h, np.asarray(as_image(item, e)) if batch.kind == "image" else item)
    return h.hexdigest()[:16]


def _hash_item(h, item) -> None:
    if isinstance(item, str):
        h.update(b"s%d|" % len(item.encode()) + item.encode())
    elif isinstance(item, Mapping):
        h.update(b"d%d|" % len(item))
        for key in sorted(item, key=str):
            h.update(str(key).encode() + b"=")
            _hash_item(h, item[key])
    elif isinstance(item, (list, tuple)):
        h.update(b"l%d|" % len(item))
        for x in item:
            _hash_item(h, x)
    elif isinstance(item, torch.Tensor):
        t = item.detach().cpu().contiguous()
        h.update(f"t{t.dtype}{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(item, np.ndarray) and item.dtype != object:
        a = np.ascontiguousarray(item)
        h.update(f"a{a.dtype.str}{a.shape}|".encode())
        h.update(a.tobytes())
    elif _is_image(item):  # a PIL image: its pixels, as the array it converts to
        _hash_item(h, np.asarray(item))
    else:
        h.update(f"r{type(item).__name__}|{item!r}".encode())
