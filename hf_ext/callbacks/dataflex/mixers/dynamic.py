"""``dynamic`` mixer: domain weights follow a schedule given in the config.

``schedule`` is a list of ``{"step": s, "weights": [...] or {domain_name: w}}`` points;
``interpolation="linear"`` interpolates between points, ``"step"`` holds the last point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.callbacks.dataflex.base import Mixer, UpdateContext, normalize_weights
from hf_ext.callbacks.dataflex.registry import register


@register("mixer", "dynamic")
@dataclass
class DynamicMixer(Mixer):
    schedule: list[dict[str, Any]] = field(
        default_factory=list, metadata={"help": "Points {step, weights}; weights a list or {domain: weight}."}
    )
    interpolation: str = field(default="linear", metadata={"help": "linear or step."})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initial_weights is not None:
            raise ValueError(
                "initial_weights is not used by mixer 'dynamic': the schedule's first point sets the weights "
                "before the first update; drop initial_weights or add a schedule point {step: 0, weights: [...]}"
            )
        if not self.schedule:
            raise ValueError("mixer 'dynamic' needs a non-empty schedule: [{step: 0, weights: [...]}, ...]")
        if self.interpolation not in ("linear", "step"):
            raise ValueError(f"interpolation={self.interpolation!r} is not supported; choose linear or step")
        for p in self.schedule:
            if not isinstance(p, dict) or "step" not in p or "weights" not in p:
                raise ValueError(f"each schedule point needs 'step' and 'weights', got {p!r}")
            step = p["step"]
            if isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(f"schedule point step must be an integer >= 0, got {p!r}")
            w = p["weights"]
            vals = list(w.values()) if isinstance(w, dict) else w
            if not isinstance(vals, (list, tuple)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in vals
            ):
                raise ValueError(
                    f"schedule weights must be a list or a {{domain: weight}} mapping of numbers, got {p!r}"
                )
            if any(x < 0 for x in vals) or sum(vals) <= 0:
                raise ValueError(f"schedule weights must be >= 0 with a positive sum, got {p!r}")
        self.schedule = sorted(self.schedule, key=lambda p: int(p["step"]))

    def _vec(self, w: Any, names: list[str]) -> np.ndarray:
        if isinstance(w, dict):
            # domain names are the labels as strings (encode_domains): a YAML key 0 names the domain '0', as the
            # key '0' of the same schedule saved to JSON does
            w = {str(k): v for k, v in w.items()}
            unknown = sorted(set(w) - set(names))
            if unknown:
                raise ValueError(f"schedule names unknown domain(s) {unknown}; domains: {names}")
            return normalize_weights([float(w.get(n, 0.0)) for n in names])
        if len(w) != len(names):
            raise ValueError(
                f"schedule weights have {len(w)} entries but there are {len(names)} domains {names}"
            )
        return normalize_weights(w)

    def weights_at(self, step: int, names: list[str]) -> np.ndarray:
        pts = [(int(p["step"]), self._vec(p["weights"], names)) for p in self.schedule]
        if step <= pts[0][0]:
            return pts[0][1]
        for (s0, w0), (s1, w1) in zip(pts, pts[1:]):
            if s0 <= step < s1:
                if self.interpolation == "step":
                    return w0
                a = (step - s0) / (s1 - s0)
                return normalize_weights((1 - a) * w0 + a * w1)
        return pts[-1][1]

    def init_weights(self, domain_names: list[str]) -> np.ndarray:
        return self.weights_at(0, domain_names)

    def update(self, ctx: UpdateContext, weights: np.ndarray) -> np.ndarray:
        return self.weights_at(ctx.step, ctx.domain_names)
