"""Write a dataset's activations to a store (sharded, atomic, resumable, one slice per rank) or stream them.

Layout of a store folder:
    store.json                          names, dtype, world size and the fingerprint of what was written
    parts/rank-RRRRR-of-WWWWW.json      per rank: its finished shards, how many of its items they cover, widths,
                                        token strings, and `batches`: [end, content digest] of every batch those
                                        items made (`inputs.batch_digest`); rewritten atomically after every shard
    shards/rank-RRRRR-NNNNNN.safetensors  per shard: `act/<name>` (n, d) in the store's dtype and `meta/<column>`

A shard is written once its batches hold at least `shard_tokens` tokens (so it holds whole batches: a resumed run
restarts at a batch boundary, batches the remaining items exactly as the killed run did, and writes the same
shards). Before it does, it re-batches the items it skips and compares their digests with the recorded ones, so
other data of the same length (another image, prompt or order) is refused, naming the first batch that differs. Each
rank runs the items with `index % world_size == rank` into its own shards and part file.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..io import atomic_write_text
from .collect import run_batch
from .inputs import Batch, batch_digest, check_data, iter_batches
from .ranks import barrier, rank_world
from .schema import DTYPES, FORMAT, STORE_FILE, act_key, check_dtype, meta_key, part_file, shard_file
from .shardio import write_shard
from .sites import check_names, check_run_kwargs, store_tokenizer

if TYPE_CHECKING:
    from .reader import ActivationStore


_NOTHING = object()


def _positive(value, arg: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{arg} must be a positive int; got {value!r}")
    return value


def stream_activations(lens, data: Iterable, names, *, batch_size: int = 32, dtype=None, seed: int = 0,
                       rank: int | None = None, world_size: int | None = None,
                       **run_kwargs) -> Iterator[tuple[dict[str, Tensor], dict[str, Tensor]]]:
    """An iterator of `(acts, meta)` per batch, without touching disk (arguments are checked at the call):
    `acts[name]` (n, d) on CPU (in `dtype`, default the model's), `meta[column]` (n,) as in
    `ActivationStore.meta`; padding dropped. Under several ranks each rank gets its own slice of the items.
    `run_kwargs` go to `lens.generate` for diffusion prompts (num_inference_steps, guidance_scale, record_steps,
    height, width, num_images_per_prompt, ...); `seed` seeds each prompt's noise from its example index. At a
    pipeline's text-encoder sites they go to its `encode_prompt` (e.g. max_sequence_length, clean_caption)."""
    resolved = check_names(lens, names)
    check_data(data)
    _positive(batch_size, "batch_size")
    check_run_kwargs(lens, run_kwargs, resolved)
    tdtype = None if dtype is None else DTYPES[check_dtype(dtype)]
    r, w = rank_world(rank, world_size)
    return _stream(lens, data, resolved, batch_size, tdtype, seed, r, w, run_kwargs)


def _stream(lens, data, resolved, batch_size, tdtype, seed, r, w, run_kwargs):
    for batch in iter_batches(data, batch_size, r, w):
        acts, meta = run_batch(lens, resolved, batch, seed=seed, dtype=tdtype, **run_kwargs)
        if acts:  # a batch without tokens at these sites (text-only examples at image-tower sites) yields nothing
            yield acts, meta


def write_activations(lens, data: Iterable, names, folder: str | os.PathLike, *, dtype="float16",
                      batch_size: int = 32, shard_tokens: int = 65_536, resume: bool = True, progress: bool = True,
                      seed: int = 0, **run_kwargs) -> ActivationStore:
    """Record `names` over `data` into the store at `folder` and return it as an `ActivationStore`.

    Items: PIL images / uint8 arrays (image towers), strings (text towers, text-only prompts, diffusion prompts),
    conversations {'image' | 'images', 'text'} (VLMs), or dicts of processor outputs (run as one batch each).
    Padding is dropped. `dtype`: 'float16', 'bfloat16' or 'float32'. `resume=True` continues a killed run (the
    result equals an uninterrupted one); a store written for other names, dtype, data length, model, world size or
    run keywords is refused, and so is other data of the same length: every batch's content digest is recorded
    (`inputs.batch_digest`), and a resumed run compares the batches it skips with them (also when the store is
    complete, so a store is never silently returned for other data). Under torchrun each rank writes its own slice
    (see the module docstring).

    Diffusion lenses: denoiser sites record latent tokens per step and branch (`lens.generate`); text-encoder sites
    (`text_encoder.*`, `text_encoder_2.*`, ...) record the prompt's tokens with only the pipeline's prompt encoding
    run (`text_encoder.py`). One store holds one or the other.
    """
    from tqdm.auto import tqdm

    from .reader import ActivationStore

    dtype = check_dtype(dtype)
    resolved = check_names(lens, names)
    check_data(data)
    _positive(batch_size, "batch_size")
    _positive(shard_tokens, "shard_tokens")
    check_run_kwargs(lens, run_kwargs, resolved)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False; got {resume!r:.40}")
    if not hasattr(data, "__len__"):  # an empty iterable must fail before a store folder is made
        it = iter(data)
        first = next(it, _NOTHING)
        if first is _NOTHING:
            raise ValueError("data is empty: nothing to record")
        data = itertools.chain([first], it)
    rank, world = rank_world()
    folder = Path(folder)
    n_items = len(data) if hasattr(data, "__len__") else None
    fp = {"names": resolved, "dtype": dtype, "items": n_items, "model": model_digest(lens), "world_size": world,
          "run": _describe(run_kwargs), "seed": seed}
    _open_store(folder, fp, resume)
    part_path = folder / part_file(rank, world)
    state = _load_part(part_path, folder) if part_path.exists() else \
        {"rank": rank, "world_size": world, "shards": [], "items_done": 0, "complete": False, "d": {},
         "token_strings": {}, "batches": []}
    recorded = state.get("batches")  # None: a store written without batch digests (nothing to check against)
    recorded = None if recorded is None else [list(b) for b in recorded]  # the sink extends the state's own list
    if not state["complete"] or recorded is not None:
        sink = None if state["complete"] else ShardSink(folder, state, DTYPES[dtype], shard_tokens,
                                                        tokenizer=store_tokenizer(lens, resolved))
        skip = state["items_done"]
        checked = 0
        mine = None if n_items is None else len(range(rank, n_items, world))
        with tqdm(total=mine, initial=skip, desc=f"write_activations{f' rank {rank}' if world > 1 else ''}",
                  unit="item", disable=not progress or sink is None, dynamic_ncols=True) as bar:
            for batch in iter_batches(data, batch_size, rank, world, skip, skipped=recorded is not None):
                if batch.skipped:  # done by the run that was killed: the same data?
                    _check_done(batch, recorded, checked, rank, folder)
                    checked += 1
                    continue
                acts, meta = run_batch(lens, resolved, batch, seed=seed, dtype=DTYPES[dtype], **run_kwargs)
                sink.add(acts, meta, batch.local_end, batch_digest(batch))
                bar.update(batch.local_end - bar.n)
                bar.set_postfix(tokens=sink.tokens, refresh=False)
        if recorded is not None and checked < len(recorded):
            raise ValueError(f"{folder}: the data ends before the {skip} items rank {rank} already wrote (the store "
                             f"recorded {len(recorded)} batches, the data gave {checked}); resume only with the same "
                             "data, or write to another folder")
        if sink is not None:
            sink.finish()
    barrier()
    with warnings.catch_warnings():
        if world > 1:  # other ranks may still be writing when torch.distributed is not there to wait for them
            warnings.simplefilter("ignore")
        return ActivationStore(folder)


class ShardSink:
    """Buffers batches and writes a shard (then the part file) whenever `shard_tokens` are pending. The part file
    lists, besides the shards, `batches`: [local_end, content digest] of every batch the shards cover (batches
    without tokens included), when `add` is given digests."""

    def __init__(self, folder: Path, state: dict, dtype: torch.dtype, shard_tokens: int, *,
                 tokenizer=None):
        self.folder, self.state, self.dtype, self.shard_tokens = folder, state, dtype, shard_tokens
        self.pending: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []
        self.pending_batches: list[list] = []
        self.n_pending = 0
        self.local_end = state["items_done"]
        self.tokenizer = tokenizer
        self.tokens = sum(s["tokens"] for s in state["shards"])

    def add(self, acts: dict[str, Tensor], meta: dict[str, Tensor], local_end: int, digest: str | None = None) -> None:
        self.local_end = local_end
        if digest is not None:
            self.pending_batches.append([local_end, digest])
        if not acts:  # a batch with no tokens (e.g. text-only rows at a vision site) still counts as done
            return
        d = self.state["d"]
        for name, a in acts.items():
            if a.dim() != 2:
                raise ValueError(f"{name}: expected (tokens, d) activations; got shape {tuple(a.shape)}")
            if d.setdefault(name, int(a.shape[1])) != a.shape[1]:
                raise ValueError(f"{name} had width {d[name]} and now {a.shape[1]}: one name, one width")
        self.pending.append((acts, meta))
        n = len(next(iter(meta.values())))
        self.n_pending += n
        self.tokens += n
        if self.n_pending >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        st = self.state
        if self.pending:
            acts = {k: torch.cat([a[k] for a, _ in self.pending]).to(self.dtype) for k in self.pending[0][0]}
            meta = {k: torch.cat([m[k] for _, m in self.pending]) for k in self.pending[0][1]}
            index = len(st["shards"])
            rel = shard_file(st["rank"], index)
            lo = st["shards"][-1]["items"][1] if st["shards"] else 0
            tensors = {**{act_key(k): v for k, v in acts.items()}, **{meta_key(k): v for k, v in meta.items()}}
            write_shard(self.folder / rel, tensors, {"format": FORMAT, "rank": str(st["rank"]), "index": str(index)})
            ex = meta["example"]
            st["shards"].append({"file": rel, "tokens": int(len(ex)), "items": [lo, self.local_end],
                                 "examples": [int(ex.min()), int(ex.max()) + 1] if len(ex) else [0, 0]})
            self._token_strings(meta["token"])
            self.pending, self.n_pending = [], 0
        if self.pending_batches:
            st.setdefault("batches", []).extend(self.pending_batches)
            self.pending_batches = []
        st["items_done"] = self.local_end
        atomic_write_text(self.folder / part_file(st["rank"], st["world_size"]), json.dumps(st))

    def finish(self) -> None:
        self.flush()
        self.state["complete"] = True
        atomic_write_text(self.folder / part_file(self.state["rank"], self.state["world_size"]),
                          json.dumps(self.state))

    def _token_strings(self, ids: Tensor) -> None:
        known = self.state["token_strings"]
        new = [i for i in torch.unique(ids[ids >= 0]).tolist() if str(i) not in known]
        if new and hasattr(self.tokenizer, "convert_ids_to_tokens"):
            known.update({str(i): str(s) for i, s in zip(new, self.tokenizer.convert_ids_to_tokens(new))})


# ------------------------------------------------------------------------------------------- fingerprint
def model_digest(lens) -> str:
    """Class, parameter names, shapes, dtypes and the first values of every parameter: cheap on a 7B model, and
    different for another checkpoint of the same architecture."""
    h = hashlib.sha256(f"{lens.architecture}|{type(lens.model).__name__}".encode())
    mods = [lens.model] if isinstance(lens.model, torch.nn.Module) else \
        [m for _, m in sorted(getattr(lens.model, "components", {}).items()) if isinstance(m, torch.nn.Module)]
    for m in mods:
        for name, p in m.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type != "meta" and p.numel():
                h.update(p.detach().reshape(-1)[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]


def _describe(run_kwargs: dict) -> dict:
    """Run keywords as JSON (objects such as generators by type: they cannot be compared across runs)."""
    def one(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple, range)):
            return [one(x) for x in v]
        if isinstance(v, torch.dtype):
            return str(v)
        return f"<{type(v).__name__}>"
    return {k: one(v) for k, v in sorted(run_kwargs.items())}


def _check_done(batch: Batch, recorded: list, k: int, rank: int, folder: Path) -> None:
    """Batch `k` of those an earlier run wrote must have the content digest (and end) the store recorded for it."""
    got = [batch.local_end, batch_digest(batch)]
    want = recorded[k] if k < len(recorded) else None
    if got == want:
        return
    ex = batch.examples.tolist()
    what = f"examples {ex[0]}..{ex[-1]}" if len(ex) > 1 else f"example {ex[0]}"
    if want is None:
        why = f"the store recorded only {len(recorded)} batches"
    elif want[0] != got[0]:
        why = f"it ends at rank {rank}'s item {got[0]}, the store's batch ended at item {want[0]} (other item kinds?)"
    else:
        why = f"its content digest is {got[1]}, the store recorded {want[1]}"
    raise ValueError(f"{folder}: resuming with other data than the store was written from: batch {k} of rank {rank} "
                     f"({what}, {batch.kind} items) differs ({why}). Resume only with the same data in the same "
                     "order, or write to another folder")


def _open_store(folder: Path, fp: dict, resume: bool) -> None:
    path = folder / STORE_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if not resume:
            raise FileExistsError(f"{folder} already holds a store; pass resume=True to continue it, or use an empty "
                                  "folder")
        if old.get("format") != FORMAT:
            raise ValueError(f"{path}: format {old.get('format')!r}, expected {FORMAT!r}")
        was = old.get("fingerprint", {})
        diff = [f"{k}: {was.get(k)!r} there, {v!r} now" for k, v in fp.items() if was.get(k) != v]
        if diff:
            raise ValueError(f"{folder} holds a store written for something else ({'; '.join(diff)}); resume only "
                             "with the same names, dtype, data, model, world size and run keywords, or use another "
                             "folder")
        return
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"format": FORMAT, "names": fp["names"], "dtype": fp["dtype"],
                                        "world_size": fp["world_size"], "fingerprint": fp}, indent=1))


def _load_part(path: Path, folder: Path) -> dict:
    try:
        state = json.loads(path.read_text())
        for s in state["shards"]:
            if not (folder / s["file"]).exists():
                raise ValueError(f"its shard {s['file']} is missing")
        return state
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: corrupt part file ({e}); delete the store folder and write it again") from None
