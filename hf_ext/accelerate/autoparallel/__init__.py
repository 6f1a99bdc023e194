"""Galvatron-style automatic parallelism (issue #8): profile, model cost, search a plan, apply it.

Public names load lazily::

    from hf_ext.accelerate.autoparallel import search_plan, apply_plan
    plan = search_plan("llama3-8b", gpus=8, memory_gb=80, seq_len=4096)   # or model.config
    runner = apply_plan(model, plan)                                       # under torchrun

``search_plans`` is :func:`hf_ext.accelerate.autoparallel.search.search` (the ``search`` name is the
submodule). See docs/autoparallel.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "ModelShape": "shapes",
    "get_shape": "shapes",
    "BUILTIN_SHAPES": "shapes",
    "profile_model": "profiler",
    "profile_collectives": "profiler",
    "HardwareProfile": "profiler",
    "ModelProfile": "profiler",
    "CostModel": "cost_model",
    "LayerStrategy": "cost_model",
    "ParallelConfig": "cost_model",
    "TrainingSpec": "cost_model",
    "SearchConfig": "search",
    "SearchResult": "search",
    "search_plans": "search",
    "search_plan": "search",
    "predict": "search",
    "predict_breakdown": "search",
    "NoFeasiblePlanError": "search",
    "Plan": "plan",
    "apply_plan": "apply",
    "AppliedPlan": "apply",
}
__all__ = [*_LAZY, "prepare"]


def __getattr__(name: str) -> Any:
    if name == "prepare":
        name = "apply_plan"
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
