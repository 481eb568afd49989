"""Activation-store I/O: write throughput, the disk's sequential read speed, and shuffled reads through
`ActivationStore.batches` against it (goal: shuffled >= 50% of sequential).

A synthetic store (`mmlens.store.synthetic`: one pre-generated batch written over and over, so data generation is
not timed) of `--tokens` x `--d` in `--dtype` is written through the store's shard writer, each shard fsynced (the
write figure is what reaches the disk, not the page cache). Before each read the shard files are evicted from the
page cache (`posix_fadvise(DONTNEED)`), then:
- sequential: every shard file read raw, start to end, in 16 MiB chunks (the disk's speed for these files);
- shuffled: `store.batches(name, batch_size, seed=0, buffer_tokens=...)`, the SAE training path, once with
  float32 batches (the default) and once in the store's dtype. MB/s count the stored bytes of the activations read.
On tmpfs (RAM) eviction is impossible and the figures measure memory: pass --folder on a real disk.
JSON lines on stdout (and appended to --out).

    .venv/bin/python benchmarks/store_io.py --tokens 2000000 --d 1024 --folder /path/on/disk
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

CHUNK = 16 * 2**20


def _fs_type(path: Path) -> str:
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fs, *_ = line.split()
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fs
    except OSError:
        pass
    return kind


def evict(files) -> bool:
    """Drop the files' pages from the page cache (after fsync: dirty pages cannot be dropped)."""
    ok = hasattr(os, "posix_fadvise")
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            if ok:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return ok


def read_sequential(files) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                total += n
    return total


def measure(folder: str | os.PathLike | None = None, tokens: int = 1_000_000, d: int = 1024, dtype: str = "float16",
            *, batch_size: int = 4096, buffer_tokens: int = 262_144, shard_tokens: int = 65_536,
            keep: bool = False) -> list[dict]:
    """Write, sequential-read and shuffled-read figures of one synthetic store (see the module docstring)."""
    import mmlens
    from mmlens.store import ActivationStore
    from mmlens.store.schema import DTYPES
    from mmlens.store.synthetic import synthetic_batch
    from mmlens.store.writer import ShardSink, _open_store

    own = folder is None
    root = Path(tempfile.mkdtemp(prefix=".store_io-", dir=".")) if own else Path(folder)
    path = root / "store"
    if path.exists():
        shutil.rmtree(path)
    name = "synthetic.resid"
    tdtype = DTYPES[dtype]
    item = torch.empty((), dtype=tdtype).element_size()
    base = {"bench": "store_io", "tokens": tokens, "d": d, "dtype": dtype, "batch_size": batch_size,
            "buffer_tokens": buffer_tokens, "shard_tokens": shard_tokens, "fs": _fs_type(root),
            "torch": torch.__version__, "mmlens": mmlens.__version__, "host": platform.node(),
            "cpus": os.cpu_count()}
    lines = []
    try:
        per = min(8192, tokens)
        x, meta = synthetic_batch(0, per, d, dtype=tdtype)
        _open_store(path, {"names": [name], "dtype": dtype, "items": None, "model": "synthetic", "world_size": 1,
                           "run": {}, "seed": 0}, resume=False)
        state = {"rank": 0, "world_size": 1, "shards": [], "items_done": 0, "complete": False, "d": {},
                 "token_strings": {}}
        sink = ShardSink(path, state, tdtype, shard_tokens)
        t = time.perf_counter()
        done = 0
        while done < tokens:
            n = min(per, tokens - done)
            sink.add({name: x[:n]}, {k: v[:n] for k, v in meta.items()}, done + n)
            done += n
        sink.finish()
        files = [path / s["file"] for s in state["shards"]]
        evicted = evict(files)  # fsyncs: the write is timed until the data is on disk
        dt = time.perf_counter() - t
        nbytes = tokens * d * item
        lines.append({**base, "figure": "write", "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt),
                      "mb_per_s": round(nbytes / dt / 1e6, 1), "shards": len(files)})

        evict(files)
        t = time.perf_counter()
        got = read_sequential(files)
        dt = time.perf_counter() - t
        seq = got / dt / 1e6
        lines.append({**base, "figure": "sequential_read", "seconds": round(dt, 3), "mb_per_s": round(seq, 1),
                      "bytes": got, "evicted": evicted})

        store = ActivationStore(path)
        for out in (torch.float32, tdtype):
            evict(files)
            n = 0
            t = time.perf_counter()
            for b in store.batches(name, batch_size, seed=0, buffer_tokens=buffer_tokens, dtype=out):
                n += len(b)
            dt = time.perf_counter() - t
            mbs = n * d * item / dt / 1e6
            lines.append({**base, "figure": "shuffled_read", "out_dtype": str(out).removeprefix("torch."),
                          "seconds": round(dt, 3), "tokens_per_s": round(n / dt), "mb_per_s": round(mbs, 1),
                          "ratio_vs_sequential": round(mbs / seq, 3),
                          "goal": 0.5, "evicted": evicted})
    finally:
        if own and not keep:
            shutil.rmtree(root, ignore_errors=True)
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", default=None, help="where to write the store (default: a temporary folder here)")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--buffer-tokens", type=int, default=262_144)
    ap.add_argument("--shard-tokens", type=int, default=65_536)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    lines = measure(args.folder, args.tokens, args.d, args.dtype, batch_size=args.batch_size,
                    buffer_tokens=args.buffer_tokens, shard_tokens=args.shard_tokens)
    for line in lines:
        print(json.dumps(line), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    sys.exit(main())
