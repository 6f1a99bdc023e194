"""Loss-based selectors.

* ``loss``: the samples with the highest current loss (``focus="high"``), or the lowest /
  the ones closest to the median loss.
* ``delta_loss``: the samples whose loss dropped most since they were last scored
  (learnability): unlearnable (e.g. noisy-label) samples keep a flat loss and are dropped.
  A delta needs two scorings from different model states: an update scheduled at the step of
  the first scoring (``warmup_step=0``: step 0, right after the train-begin scoring) is skipped
  by the callback (:meth:`DeltaLossSelector.ready`), training continues on the current
  selection (at the start: the full data) and the first selection runs at the next update step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.callbacks.dataflex.base import Selector, UpdateContext, top_k
from hf_ext.callbacks.dataflex.registry import register

_FOCUS = ("high", "low", "medium")


@register("selector", "loss")
@dataclass
class LossSelector(Selector):
    """Select by current per-sample loss."""

    focus: str = field(
        default="high", metadata={"help": "high: largest loss first; low: smallest; medium: near the median."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.focus not in _FOCUS:
            raise ValueError(f"focus={self.focus!r} is not supported; choose one of {', '.join(_FOCUS)}")

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        loss = ctx.losses(candidates)
        if self.focus == "high":
            score = loss
        elif self.focus == "low":
            score = -loss
        else:
            score = -np.abs(loss - np.median(loss))
        return top_k(candidates, score, k)


@register("selector", "delta_loss")
@dataclass
class DeltaLossSelector(Selector):
    """Select the samples whose loss decreased most between two scorings.

    The first scoring happens at train begin (:meth:`on_train_begin`), so the first update after
    it compares two model states. :meth:`ready` is False while the only scores come from the
    current step (then every delta would be 0 and the top-k would be the dataset order); the
    callback skips such an update. Candidates never scored before get the median decrease;
    ``select`` without any earlier scoring is an error.
    """

    relative: bool = field(default=False, metadata={"help": "Use (prev - cur) / prev instead of prev - cur."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self._prev: dict[int, float] = {}
        self._prev_step: int | None = None  # step of the latest scoring

    def on_train_begin(self, ctx: UpdateContext, n_total: int) -> None:
        if self._prev:
            return
        if self.pool_size is not None and self.pool_size < n_total:
            idx = np.sort(ctx.rng(1).choice(n_total, size=self.pool_size, replace=False))
        else:
            idx = np.arange(n_total)
        self._record(idx, ctx.losses(idx), ctx.step)

    def ready(self, ctx: UpdateContext) -> bool:
        """Whether scores from an earlier step exist (else every delta would be 0)."""
        return bool(self._prev) and self._prev_step != ctx.step

    def _record(self, idx: np.ndarray, loss: np.ndarray, step: int) -> None:
        for i, v in zip(idx.tolist(), loss.tolist()):
            self._prev[int(i)] = float(v)
        self._prev_step = int(step)

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        cur = ctx.losses(candidates)
        prev = np.array([self._prev.get(int(i), np.nan) for i in candidates])
        if np.isnan(prev).all():
            raise ValueError(
                "delta_loss needs an earlier scoring of the candidates to compute loss decreases: call "
                "on_train_begin(ctx, n) with an earlier model state first (DataFlexCallback does this at train begin)"
            )
        delta = prev - cur
        if self.relative:
            delta = delta / np.maximum(prev, 1e-8)
        delta = np.where(np.isnan(delta), np.nanmedian(delta), delta)
        self._record(candidates, cur, ctx.step)
        return top_k(candidates, delta, k)

    def state_dict(self) -> dict[str, Any]:
        keys = sorted(self._prev)
        return {"prev_index": keys, "prev_loss": [self._prev[i] for i in keys], "prev_step": self._prev_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._prev = {
            int(i): float(v) for i, v in zip(state.get("prev_index", []), state.get("prev_loss", []))
        }
        step = state.get("prev_step")
        self._prev_step = None if step is None else int(step)
