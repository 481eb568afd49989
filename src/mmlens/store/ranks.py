"""Which process this is: torch.distributed's rank when initialised, else torchrun's RANK / WORLD_SIZE, else 0 of 1."""

from __future__ import annotations

import os


def rank_world(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    elif rank is None or world_size is None:
        raise ValueError(f"give both rank and world_size or neither; got rank={rank}, world_size={world_size}")
    if not (isinstance(rank, int) and isinstance(world_size, int) and world_size >= 1 and 0 <= rank < world_size):
        raise ValueError(f"rank={rank!r}, world_size={world_size!r}: need ints with 0 <= rank < world_size")
    return rank, world_size


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
