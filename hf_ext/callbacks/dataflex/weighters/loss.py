"""``loss`` weighter: ``w = B * softmax(loss / temperature)`` over the batch (hard samples up)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hf_ext.callbacks.dataflex.base import Weighter
from hf_ext.callbacks.dataflex.registry import register


@register("weighter", "loss")
@dataclass
class LossWeighter(Weighter):
    temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature (large: close to uniform)."}
    )
    max_weight: float | None = field(
        default=None, metadata={"help": "Clip each weight at this value (then renormalise)."}
    )

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_weight is not None and self.max_weight < 1:
            raise ValueError(f"max_weight must be >= 1 (weights have mean 1), got {self.max_weight}")

    def weights(
        self, losses: torch.Tensor, indices: torch.Tensor, domains: torch.Tensor | None, step: int
    ) -> torch.Tensor:
        """Args: losses ``[B]`` (detached). Returns ``[B]`` weights with mean 1."""
        b = losses.numel()
        w = torch.softmax(losses.float() / self.temperature, 0) * b
        if self.max_weight is not None:  # cap, handing the excess to the uncapped samples (water-filling)
            cap = float(self.max_weight)
            for _ in range(b):
                over = w > cap + 1e-9
                if not over.any():
                    break
                free = ~over & (w < cap - 1e-9)
                excess = float((w[over] - cap).sum())
                w = torch.where(over, torch.full_like(w, cap), w)
                if not free.any():
                    break
                w = torch.where(free, w + excess * w / w[free].sum(), w)
        return w
