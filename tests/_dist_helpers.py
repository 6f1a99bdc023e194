"""Module-level functions for distributed tests (spawned processes must import them)."""

from __future__ import annotations


def allreduce_rank(rank: int, world_size: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t.item())


def abort_once(rank: int, world_size: int, marker: str) -> int:
    """Rank 1 dies from SIGABRT the first time (a native crash), then behaves."""
    import os

    if rank == 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    return rank


def raise_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom")
    return rank


def sleep_on_ranks(rank: int, world_size: int, seconds: float) -> int:
    """Every rank sleeps ``seconds`` (a group that hangs), then returns its rank."""
    import time

    time.sleep(seconds)
    return rank
