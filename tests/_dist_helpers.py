"""Module-level functions for distributed tests (spawned processes must import them)."""

from __future__ import annotations


def allreduce_rank(rank: int, world_size: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return float(t.item())
