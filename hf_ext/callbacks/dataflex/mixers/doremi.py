"""``doremi`` mixer (DoReMi, Xie et al. 2023).

At each update, ``probe_size`` samples per domain are scored by the proxy (training) model and
a reference model; the per-domain excess loss (Algorithm 1 of the paper) clips the difference per token and
averages it over the domain's probe tokens, ``lambda_d = sum_{x, j} max(l_proxy(x_j) - l_ref(x_j), 0) / #tokens``;
it drives an exponentiated-gradient ascent step on the domain weights,
``alpha' = alpha * exp(eta * lambda)`` (normalised), smoothed toward uniform:
``alpha <- (1 - c) * alpha' + c / D``. As in the paper's Algorithm 1 the smoothed ``alpha`` is both
the output and the state the next update starts from. Domains where the proxy is already as good as the reference
(e.g. noisy-label data whose loss neither model can reduce) lose weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.callbacks.dataflex.base import Mixer, UpdateContext
from hf_ext.callbacks.dataflex.registry import register


@register("mixer", "doremi")
@dataclass
class DoReMiMixer(Mixer):
    eta: float = field(default=1.0, metadata={"help": "Step size of the exponentiated-gradient update."})
    smoothing: float = field(
        default=1e-3, metadata={"help": "Mixing weight c toward the uniform distribution."}
    )
    probe_size: int = field(default=16, metadata={"help": "Samples per domain scored at each update."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if not 0 <= self.smoothing <= 1:
            raise ValueError(f"smoothing must be in [0, 1], got {self.smoothing}")
        if self.probe_size <= 0:
            raise ValueError(f"probe_size must be > 0, got {self.probe_size}")
        self._log_alpha: np.ndarray | None = None
        self.last_excess: np.ndarray | None = None
        self.history: list[list[float]] = []

    def excess_losses(self, ctx: UpdateContext) -> np.ndarray:
        if ctx.reference_model is None:
            raise ValueError(
                "mixer 'doremi' needs reference_model=... (a model trained on the default mixture)"
            )
        rng = ctx.rng(4)
        out = np.zeros(ctx.n_domains)
        for d, idx in enumerate(ctx.domain_indices()):
            if len(idx) == 0:
                continue
            probe = np.sort(rng.choice(idx, size=min(self.probe_size, len(idx)), replace=False))
            terms = ctx.excess_loss_terms(probe)  # [n, 2]: clipped excess summed over tokens, token count
            out[d] = terms[:, 0].sum() / max(terms[:, 1].sum(), 1.0)
        return out

    def update(self, ctx: UpdateContext, weights: np.ndarray) -> np.ndarray:
        D = ctx.n_domains
        if self._log_alpha is None or len(self._log_alpha) != D:
            self._log_alpha = np.log(np.maximum(self.init_weights(ctx.domain_names), 1e-12))
        lam = self.excess_losses(ctx)
        self.last_excess = lam
        la = self._log_alpha + self.eta * lam
        la -= la.max()
        alpha = np.exp(la) / np.exp(la).sum()
        w = (1 - self.smoothing) * alpha + self.smoothing / D
        # Algorithm 1 of the paper: the smoothed weights are the state of the next update
        self._log_alpha = np.log(np.maximum(w, 1e-300))
        self.history.append(w.tolist())
        return w

    def average_weights(self) -> np.ndarray | None:
        """DoReMi's output mixture: the mean of the weights over all updates."""
        return np.mean(self.history, 0) if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "log_alpha": None if self._log_alpha is None else self._log_alpha.tolist(),
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        la = state.get("log_alpha")
        self._log_alpha = None if la is None else np.asarray(la, dtype=np.float64)
        self.history = [list(h) for h in state.get("history", [])]
