"""Run in each of two spawned processes (gloo): write one rank's slice of a store, then read this rank's slice of
its batches; the test process compares both with a single-process run."""

from __future__ import annotations

import json
import os


def images(n: int = 5):
    from mmlens.testing.tiny_models import sample_image

    return [sample_image(i) for i in range(n)]


def worker(rank: int, world: int, model: str, folder: str, out: str, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), HF_HUB_OFFLINE="1")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import mmlens
        from mmlens.store import write_activations

        lens = mmlens.load(model)
        store = write_activations(lens, images(), "vision.blocks.1.resid_post", folder, dtype="float32",
                                  batch_size=2, shard_tokens=17, progress=False)
        seen = []
        for x, meta in store.batches("vision.blocks.1.resid_post", 8, seed=1, buffer_tokens=32, with_meta=True):
            seen += (meta["example"] * 100 + meta["position"]).tolist()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump({"seen": seen, "complete": store.complete, "tokens": len(store)}, f)
    finally:
        dist.destroy_process_group()
