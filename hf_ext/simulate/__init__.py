"""Event-driven LLM serving / rollout simulator shared by TIE, SART, PBKV and rollout shaping (issue #4).

Quick use::

    from hf_ext.simulate import Simulator, CostModel, FCFS, SJFOracle, workload
    reqs = workload.synthetic(n=1000, rate=4.0, seed=0)
    res = Simulator(CostModel.load("gpu_md-h100-llama3.1-8b"), FCFS(), kv_capacity_tokens=200_000).run(reqs)
    print(res.summary()["per_token_mean"])

Submodules: ``engine`` (Simulator, SimConfig, cache/branch policy protocols), ``cost_model``, ``policies``
(FCFS, SJF-oracle, SSJF, ScoreScheduler), ``workload`` (distributions, arrivals, Azure trace, JSONL, agent
workflows, rollouts), ``metrics`` (SimResult, compare, plot), ``calibrate`` (fit a CostModel to a real
transformers model), ``bridge`` (replay through real transformers generation).
"""

from __future__ import annotations

from hf_ext.simulate.cost_model import CostModel
from hf_ext.simulate.engine import BranchState, CacheEntry, LRUCachePolicy, SimConfig, Simulator
from hf_ext.simulate.metrics import SimResult, compare
from hf_ext.simulate.policies import FCFS, LJF, SSJF, ScoreScheduler, SJFOracle, make_scheduler
from hf_ext.simulate.types import Request, Scheduler

__all__ = [
    "FCFS",
    "LJF",
    "SSJF",
    "BranchState",
    "CacheEntry",
    "CostModel",
    "LRUCachePolicy",
    "Request",
    "SJFOracle",
    "Scheduler",
    "ScoreScheduler",
    "SimConfig",
    "SimResult",
    "Simulator",
    "compare",
    "make_scheduler",
]
