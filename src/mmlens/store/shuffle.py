"""Shuffled reading at disk speed: shards read whole, in a seeded order, by a prefetching thread, into a buffer
from which random batches are drawn (each token once per epoch); stratified subsampling; slices per rank.

Per token the buffer costs one contiguous copy in, one gather out and, for about half the tokens, one move when the
buffer is compacted: no Python work per token, and the disk read of the next piece overlaps the shuffling."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

from .ranks import rank_world
from .schema import act_key, code


PIECE_BYTES = 16 * 2**20  # one read: long enough for sequential disk speed, short enough to reuse its memory


def _positive(v, arg: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{arg} must be a positive int; got {v!r}")
    return v


def _generator(*keys: int) -> torch.Generator:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k) + 1) % 2**62
    return torch.Generator().manual_seed(s)


def stratified(store, mask: Tensor | None, stratify: Mapping, gen: torch.Generator) -> Tensor:
    """A mask holding, of each listed value of one column, its share of the epoch's tokens (see batches)."""
    if not isinstance(stratify, Mapping) or len(stratify) != 1:
        raise ValueError(f"stratify must name one metadata column with shares, e.g. {{'modality': {{'image': 0.5, "
                         f"'text': 0.5}}}}; got {stratify!r:.80}")
    (column, shares), = stratify.items()
    if not isinstance(shares, Mapping) or not shares:
        raise ValueError(f"stratify[{column!r}] must map values to shares; got {shares!r:.60}")
    col = store.meta[column]
    weights = {v: float(p) for v, p in shares.items()}
    if any(not p > 0 for p in weights.values()):
        raise ValueError(f"stratify[{column!r}]: shares must be positive; got {shares}")
    total = sum(weights.values())
    pools = {}
    for v, p in weights.items():
        hit = col == code(column, v)
        if mask is not None:
            hit &= mask
        idx = hit.nonzero().flatten()
        if not len(idx):
            raise ValueError(f"stratify: no selected token has {column}={v!r}")
        pools[v] = (idx, p / total)
    n_epoch = min(int(len(idx) / p + 1e-9) for idx, p in pools.values())
    out = torch.zeros(len(store), dtype=torch.bool)
    for idx, p in pools.values():
        k = min(len(idx), round(n_epoch * p))
        out[idx[torch.randperm(len(idx), generator=gen)[:k]]] = True
    return out


def _plan(store, mask: Tensor | None, order: Tensor, rank: int, world: int, piece: int) -> list[tuple]:
    """This rank's reads in order: (shard, lo, hi, rows or None): rows [lo, hi) of the shard, then (if given) the
    shard-local `rows` among them. Pieces hold at most `piece` tokens."""
    sel = []
    for j in order.tolist():
        lo, n = int(store._offsets[j]), store._tokens[j]
        sel.append((j, None if mask is None else mask[lo:lo + n].nonzero().flatten()))
    counts = [store._tokens[j] if s is None else len(s) for j, s in sel]
    total = sum(counts)
    a, b = total * rank // world, total * (rank + 1) // world
    plan, start = [], 0
    for (j, rows), c in zip(sel, counts):
        lo, hi = max(a - start, 0), min(b - start, c)
        start += c
        for p in range(lo, hi, piece):
            q = min(p + piece, hi)
            if rows is None:
                plan.append((j, p, q, None))
            else:
                r = rows[p:q]
                first, last = int(r[0]), int(r[-1]) + 1
                plan.append((j, first, last, None if last - first == len(r) else r - first))
    return plan


def iterate(store, name: str, batch_size: int, *, shuffle: bool, seed: int, buffer_tokens: int, where,
            stratify, epochs: int, dtype: torch.dtype, with_meta: bool, rank, world_size,
            pin_memory: bool = False) -> Iterator:
    _positive(batch_size, "batch_size")
    _positive(epochs, "epochs")
    _positive(buffer_tokens, "buffer_tokens")
    if shuffle and buffer_tokens < batch_size:
        raise ValueError(f"buffer_tokens={buffer_tokens} is smaller than batch_size={batch_size}")
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch dtype; got {dtype!r:.40}")
    if pin_memory and not torch.cuda.is_available():
        raise ValueError("pin_memory=True needs CUDA (page-locked host memory is for fast copies to a GPU)")
    r, w = rank_world(rank, world_size)
    base = store._mask(where)
    if base is not None and not bool(base.any()):
        raise ValueError(f"where={where if not isinstance(where, Tensor) else 'mask'} selects no token of this store")
    return _background(lambda: _epochs(store, name, batch_size, shuffle, seed, buffer_tokens, base, stratify,
                                       epochs, dtype, with_meta, r, w, pin_memory))


_END = object()


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


def _background(make: Callable[[], Iterator], depth: int = 4) -> Iterator:
    """Run a generator in a thread, `depth` items ahead of the consumer (its gathers and conversions release the
    GIL, so they overlap the consumer's own work); errors are re-raised here; closing this iterator stops it."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for item in make():
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.05)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:  # handed to the consumer
            q.put(_Failed(e))

    thread = threading.Thread(target=work, name="ActivationStore.batches", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get(timeout=0.05)
            except queue.Empty:
                pass


def _epochs(store, name, batch_size, shuffle, seed, buffer_tokens, base, stratify, epochs, dtype, with_meta, r, w,
            pin_memory):
    key = act_key(name)
    row_bytes = store.d[name] * torch.empty((), dtype=store.dtype).element_size() if name in store.d else 1
    piece = max(1, min(buffer_tokens // 2, max(batch_size, PIECE_BYTES // row_bytes)))  # large reads, no giant ones
    meta = {c: store.meta[c] for c in store.meta} if with_meta else None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for epoch in range(epochs):
            gen = _generator(seed, epoch)  # the same on every rank: one selection and shard order for all
            mask = base if stratify is None else stratified(store, base, stratify, gen)
            n = len(store._files)
            order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
            plan = _plan(store, mask, order, r, w, piece)
            chunks = _prefetch(pool, store, key, plan, with_meta)
            if shuffle:
                emit = _shuffled(chunks, batch_size, buffer_tokens, _generator(seed, epoch, r + 1), piece)
            else:
                emit = _sequential(chunks, batch_size)
            for x, g in emit:
                if pin_memory:
                    x = torch.empty(x.shape, dtype=dtype, pin_memory=True).copy_(x)
                else:
                    x = x.to(dtype)
                yield (x, {c: v[g] for c, v in meta.items()}) if with_meta else x


def _prefetch(pool, store, key, plan, with_meta) -> Iterator[tuple[Tensor, Tensor | None]]:
    """(rows, global row ids or None) per planned piece; the next piece is read while this one is used."""
    def read(step):
        j, lo, hi, rows = step
        x = store._read(j, key, lo, hi)
        g = torch.arange(lo, hi) + int(store._offsets[j]) if with_meta else None
        if rows is not None:
            x = x[rows]
            g = g[rows] if g is not None else None
        return x, g

    ahead = pool.submit(read, plan[0]) if plan else None
    for k in range(len(plan)):
        cur = ahead.result()
        ahead = pool.submit(read, plan[k + 1]) if k + 1 < len(plan) else None
        yield cur


def _sequential(chunks, batch_size) -> Iterator[tuple[Tensor, Tensor | None]]:
    rest_x, rest_g = None, None
    for x, g in chunks:
        if rest_x is not None:
            x = torch.cat([rest_x, x])
            g = torch.cat([rest_g, g]) if g is not None else None
        full = len(x) // batch_size * batch_size
        for i in range(0, full, batch_size):
            yield x[i:i + batch_size], (g[i:i + batch_size] if g is not None else None)
        rest_x, rest_g = x[full:], (g[full:] if g is not None else None)
    if rest_x is not None and len(rest_x):
        yield rest_x, rest_g


def _raw(t: Tensor) -> np.ndarray:
    """A numpy view of a tensor's rows as same-width integers (numpy knows no bfloat16): gathers and moves in numpy
    run on one core at memory speed, where torch's would split 4 MB copies across busy cores."""
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).numpy()


def _shuffled(chunks, batch_size, buffer_tokens, gen, piece: int) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Fill a buffer to `buffer_tokens`, emit random batches until about half of it is left, refill the slots they
    freed, repeat; at the end emit everything left in random order. Rows never move inside the buffer: each token
    is copied once in and gathered once out."""
    buf = raw = graw = None
    used = np.empty(0, dtype=np.int64)  # slots holding a token, in no particular order
    free = np.empty(0, dtype=np.int64)  # slots below `top` free again
    top = 0  # slots [top, capacity) were never used
    chunks = iter(chunks)
    done = False
    while not done:
        while len(used) < buffer_tokens:
            nxt = next(chunks, None)
            if nxt is None:
                done = True
                break
            x, g = nxt
            m = len(x)
            if buf is None:
                cap = buffer_tokens + piece  # fewer than buffer_tokens are held when a piece (<= piece) comes
                buf = torch.empty(cap, *x.shape[1:], dtype=x.dtype)
                raw = _raw(buf)
                graw = np.empty(cap, dtype=np.int64) if g is not None else None
            k = min(m, len(free))
            if top + m - k > len(raw):  # cannot happen: holes are filled first, so top <= max(len(used))
                raise RuntimeError(f"shuffle buffer overflow ({top} + {m - k} > {len(raw)}); please report")
            slots = np.concatenate([free[:k], np.arange(top, top + m - k)])
            xr = _raw(x.contiguous())
            if k:
                raw[free[:k]] = xr[:k]
            raw[top:top + m - k] = xr[k:]
            if graw is not None:
                graw[slots] = g.numpy()
            free, top = free[k:], top + m - k
            used = np.concatenate([used, slots])
        if not len(used):
            return
        keep = 0 if done else min(buffer_tokens // 2, len(used) - batch_size)
        n_emit = len(used) if done else (len(used) - keep) // batch_size * batch_size
        perm = torch.randperm(len(used), generator=gen).numpy()
        take = used[perm[:n_emit]]
        for i in range(0, n_emit, batch_size):
            idx = take[i:i + batch_size]
            out = torch.from_numpy(np.take(raw, idx, axis=0)).view(buf.dtype)
            yield out, (torch.from_numpy(np.take(graw, idx)) if graw is not None else None)
        used = used[perm[n_emit:]]
        free = np.concatenate([free, take])
