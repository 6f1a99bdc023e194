"""``odm`` mixer (Online Data Mixing, Albalak et al. 2023): domains are arms of an EXP3 bandit.

The reward of a domain is its training loss (high loss = more to learn). Every optimizer step
is a bandit round, so the exploration rate follows the global step ``t``:
``eps_t = min(1/D, sqrt(ln D / (D t)))``. At an update, each domain ``d`` seen since the last
update (mean training loss ``L_d``, drawn with probability ``pi_d``) gets the
importance-weighted reward ``R_d <- alpha * R_d + (1 - alpha) * L_d / pi_d``; unseen domains
keep their estimate. The policy is ``pi = (1 - D * eps_t) * softmax(eps_{t-1} * R) + eps_t``.
Without reported losses (plain ``Trainer`` + callback), ``probe_size`` samples per domain are
scored instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.callbacks.dataflex.base import Mixer, UpdateContext
from hf_ext.callbacks.dataflex.registry import register


@register("mixer", "odm")
@dataclass
class ODMMixer(Mixer):
    alpha: float = field(
        default=0.9, metadata={"help": "Smoothing of the reward estimate (ODM default 0.9)."}
    )
    probe_size: int = field(
        default=16, metadata={"help": "Samples per domain scored when no training losses were reported."}
    )

    needs_observations = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha < 1:
            raise ValueError(f"alpha must be in [0, 1), got {self.alpha}")
        if self.probe_size <= 0:
            raise ValueError(f"probe_size must be > 0, got {self.probe_size}")
        self._reward: np.ndarray | None = None
        self._t = 0

    @staticmethod
    def eps(t: int, d: int) -> float:
        return min(1.0 / d, math.sqrt(math.log(d) / (d * max(1, t)))) if d > 1 else 0.0

    def observed_losses(self, ctx: UpdateContext) -> tuple[np.ndarray, np.ndarray]:
        """Mean loss per domain and which domains were seen (reported training losses, else a probe)."""
        if ctx.observed_count is not None and ctx.observed_count.sum() > 0:
            seen = ctx.observed_count > 0
            return np.where(seen, ctx.observed_loss / np.maximum(ctx.observed_count, 1), 0.0), seen
        rng = ctx.rng(5)
        out = np.zeros(ctx.n_domains)
        seen = np.zeros(ctx.n_domains, dtype=bool)
        for d, idx in enumerate(ctx.domain_indices()):
            if len(idx):
                probe = np.sort(rng.choice(idx, size=min(self.probe_size, len(idx)), replace=False))
                out[d] = float(ctx.losses(probe).mean())
                seen[d] = True
        return out, seen

    def update(self, ctx: UpdateContext, weights: np.ndarray) -> np.ndarray:
        D = ctx.n_domains
        if self._reward is None or len(self._reward) != D:
            self._reward = np.zeros(D)
        if weights is None:
            weights = self.init_weights(ctx.domain_names)
        loss, seen = self.observed_losses(ctx)
        if ctx.observed_count is not None and ctx.observed_count.sum() > 0:
            x = loss / np.maximum(weights, 1e-12)  # training losses: domain d was drawn with probability pi_d
        else:
            # a probe scores every domain alike, whatever its weight: no importance correction (dividing by pi made a
            # domain of weight 0 score loss / 1e-12 and take most of the mixture at the first update)
            x = loss
        self._reward = np.where(seen, self.alpha * self._reward + (1 - self.alpha) * x, self._reward)
        t = max(1, int(ctx.step))
        self._t = t
        z = self.eps(max(1, t - 1), D) * self._reward
        z = np.exp(z - z.max())
        eps = self.eps(t, D)
        return (1 - D * eps) * z / z.sum() + eps

    def state_dict(self) -> dict[str, Any]:
        return {"reward": None if self._reward is None else self._reward.tolist(), "t": self._t}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        r = state.get("reward")
        self._reward = None if r is None else np.asarray(r, dtype=np.float64)
        self._t = int(state.get("t", 0))
