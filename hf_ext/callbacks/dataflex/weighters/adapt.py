"""``adapt`` weighter: weights adapted online from loss trends.

For every group (the sample's domain when domains are known, else the sample itself) two
exponential moving averages of the training loss are kept, a fast one and a slow one. The trend
``(slow - fast) / slow`` is positive while the group's loss is still falling (it is being
learned) and near zero once it plateaus — which is also what unlearnable, noisy-label data does
from the start. Weights are ``B * softmax(beta * z)`` over the batch with ``z`` the standardised
trends, so learnable groups get more weight than stalled ones.

Each group's averages take one step per batch, with the mean loss of the group's rows in that batch: a sample
index that appears twice in one batch (mixture plans draw with replacement; subsets cycle) is observed once, as a
domain with several rows is, and every row of a group gets the same weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from hf_ext.callbacks.dataflex.base import Weighter
from hf_ext.callbacks.dataflex.registry import register


@register("weighter", "adapt")
@dataclass
class AdaptWeighter(Weighter):
    beta: float = field(default=1.0, metadata={"help": "Sharpness of the weights (0: uniform)."})
    fast: float = field(default=0.5, metadata={"help": "Decay of the fast loss average."})
    slow: float = field(default=0.95, metadata={"help": "Decay of the slow loss average (> fast)."})

    def __post_init__(self) -> None:
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not (0 <= self.fast < self.slow < 1):
            raise ValueError(f"need 0 <= fast < slow < 1, got fast={self.fast}, slow={self.slow}")
        self._fast: dict[int, float] = {}
        self._slow: dict[int, float] = {}

    def _observe(self, key: int, loss: float) -> float:
        if key not in self._fast:
            self._fast[key] = self._slow[key] = loss
            return 0.0
        self._fast[key] = self.fast * self._fast[key] + (1 - self.fast) * loss
        self._slow[key] = self.slow * self._slow[key] + (1 - self.slow) * loss
        return (self._slow[key] - self._fast[key]) / max(abs(self._slow[key]), 1e-8)

    def trend(self, key: int) -> float:
        if key not in self._fast:
            return 0.0
        return (self._slow[key] - self._fast[key]) / max(abs(self._slow[key]), 1e-8)

    def weights(
        self, losses: torch.Tensor, indices: torch.Tensor, domains: torch.Tensor | None, step: int
    ) -> torch.Tensor:
        """Args: losses ``[B]`` (detached), indices ``[B]``, domains ``[B]`` or None. Returns ``[B]``, mean 1."""
        b = losses.numel()
        ls = losses.detach().float().cpu()
        if domains is not None:
            keys = [int(k) for k in domains.cpu().tolist()]
        else:
            keys = [-1 - int(i) for i in indices.cpu().tolist()]  # negative keys: per-sample groups
        # one observation per group and batch (the mean of its losses): a domain with several samples in the batch,
        # or a sample index drawn twice, moves its averages once, and all its rows get the same weight
        for k in sorted(set(keys)):
            m = [i for i, key in enumerate(keys) if key == k]
            self._observe(k, float(ls[m].mean()))
        t = torch.tensor([self.trend(k) for k in keys])
        sd = t.std(unbiased=False) if b > 1 else torch.tensor(0.0)
        z = (t - t.mean()) / sd if sd > 1e-12 else torch.zeros_like(t)
        return (torch.softmax(self.beta * z, 0) * b).to(losses.device)

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self._fast)
        return {"keys": keys, "fast": [self._fast[k] for k in keys], "slow": [self._slow[k] for k in keys]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ks = state.get("keys", [])
        self._fast = {int(k): float(v) for k, v in zip(ks, state.get("fast", []))}
        self._slow = {int(k): float(v) for k, v in zip(ks, state.get("slow", []))}
