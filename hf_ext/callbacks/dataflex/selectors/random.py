"""``random`` selector: a uniform subset of the pool (the control)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hf_ext.callbacks.dataflex.base import Selector, UpdateContext
from hf_ext.callbacks.dataflex.registry import register


@register("selector", "random")
@dataclass
class RandomSelector(Selector):
    """Keeps ``k`` candidates drawn uniformly without replacement (seeded by run seed and step)."""

    def select(self, ctx: UpdateContext, candidates: np.ndarray, k: int) -> np.ndarray:
        return ctx.rng(2).choice(candidates, size=k, replace=False)
