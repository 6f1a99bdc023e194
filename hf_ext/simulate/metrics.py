"""Results of a simulation: per-request latencies, summaries (p50/p90/p99), DataFrame/CSV and plots.

Definitions (seconds):

* TTFT = time of the first generated token - arrival;
* end-to-end latency = finish - arrival; queueing delay = first admission - arrival;
* per-token latency = end-to-end latency / output tokens (``Request.output_len``), the metric of TIE / LTR;
* throughput = generated tokens / makespan and finished requests / makespan, makespan = last finish - first
  arrival;
* cache hit rate = context tokens served from the prefix cache (both tiers) / context tokens needed at
  admissions (served + prefilled; a re-admission after a preemption counts again);
* mean KV tokens = the integral of KV tokens in use over time / (end - first arrival);
* recomputed tokens = prefill tokens computed again after a preemption (those whose KV had been computed before
  it: a request preempted mid-prefill had computed only its chunks so far); ``evict_recomputed`` = prompt tokens of
  segments that had been cached before but were evicted when needed again.

Example:
    >>> from hf_ext.simulate import Simulator, CostModel, FCFS, Request
    >>> res = Simulator(CostModel.constant(0.01), FCFS()).run(
    ...     [Request(id=i, arrival=0.0, prompt_len=8, output_len=4) for i in range(2)])
    >>> s = res.summary()
    >>> round(s["makespan_s"], 3), s["n_finished"]
    (0.04, 2)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_PER_REQ = (
    "id",
    "arrival",
    "first_admit",
    "first_token",
    "finish",
    "prompt_len",
    "output_len",
    "generated",
    "n_branches",
    "branches_finished",
    "preemptions",
    "hit_gpu",
    "hit_cpu",
    "prefill_computed",
    "recomputed",
    "evict_recomputed",
)


@dataclass
class SimResult:
    """Per-request arrays (``cols``), engine counters and the memory timeline of one run."""

    cols: dict[str, np.ndarray]
    counters: dict[str, float]
    timeline: dict[str, np.ndarray]
    scheduler: str = ""
    requests: list[Any] = field(default_factory=list)

    @classmethod
    def from_states(cls, sim: Any, states: list[Any], timeline: dict[str, np.ndarray]) -> SimResult:
        n = len(states)
        cols: dict[str, np.ndarray] = {}
        f = np.empty
        cols["id"] = f(n, dtype=np.int64)
        for k in ("arrival", "first_admit", "first_token", "finish"):
            cols[k] = f(n)
        for k in _PER_REQ[5:]:
            cols[k] = f(n, dtype=np.int64)
        for i, rs in enumerate(states):
            r = rs.req
            cols["id"][i] = r.id
            cols["arrival"][i] = r.arrival
            cols["first_admit"][i] = rs.first_admit
            cols["first_token"][i] = rs.first_token
            cols["finish"][i] = rs.finish
            cols["prompt_len"][i] = r.prompt_len
            cols["output_len"][i] = r.output_len
            cols["generated"][i] = sum(rs.progress)
            cols["n_branches"][i] = len(rs.targets)
            cols["branches_finished"][i] = rs.n_finished
            cols["preemptions"][i] = rs.preemptions
            cols["hit_gpu"][i] = rs.hit_gpu
            cols["hit_cpu"][i] = rs.hit_cpu
            cols["prefill_computed"][i] = rs.prefill_computed
            cols["recomputed"][i] = rs.recomputed
            cols["evict_recomputed"][i] = rs.evict_recomputed
        counters = {
            "tokens_generated": float(sim.tokens_generated),
            "tokens_discarded": float(sim.tokens_discarded),
            "preemptions": float(sim.n_preemptions),
            "peak_kv_tokens": float(sim.peak_mem),
            "kv_capacity_tokens": float(sim.capacity),
            "iterations": float(sim.n_iterations),
            "events": float(sim.n_events),
            "end_time": float(sim.now),
            "start_time": float(getattr(sim, "start_time", 0.0)),
            "kv_token_seconds": float(getattr(sim, "kv_token_seconds", math.nan)),
            "cpu_loaded_tokens": float(sim.loaded_tokens),
            "prefetched_tokens": float(sim.prefetched_tokens),
        }
        return cls(
            cols,
            counters,
            timeline,
            getattr(sim.scheduler, "name", type(sim.scheduler).__name__),
            [rs.req for rs in states],
        )

    # ----------------------------------------------------------------------------- arrays
    @property
    def num_finished(self) -> int:
        return int(np.isfinite(self.cols["finish"]).sum())

    @property
    def tokens_generated(self) -> int:
        return int(self.counters["tokens_generated"])

    @property
    def ttft(self) -> np.ndarray:
        return self.cols["first_token"] - self.cols["arrival"]

    @property
    def latency(self) -> np.ndarray:
        """End-to-end latency per request."""
        return self.cols["finish"] - self.cols["arrival"]

    @property
    def queue_delay(self) -> np.ndarray:
        return self.cols["first_admit"] - self.cols["arrival"]

    @property
    def per_token_latency(self) -> np.ndarray:
        return self.latency / np.maximum(self.cols["output_len"], 1)

    @property
    def makespan(self) -> float:
        if not len(self.cols["finish"]):
            return 0.0
        return float(np.nanmax(self.cols["finish"]) - np.min(self.cols["arrival"]))

    # ---------------------------------------------------------------------------- summary
    def summary(self) -> dict[str, float]:
        """Scalar metrics (mean / p50 / p90 / p99 of TTFT, latency, per-token latency, queueing delay, ...)."""
        out: dict[str, float] = {"n_requests": float(len(self.cols["id"])), "n_finished": self.num_finished}
        for name, arr in (
            ("ttft", self.ttft),
            ("latency", self.latency),
            ("per_token", self.per_token_latency),
            ("queue", self.queue_delay),
        ):
            a = arr[np.isfinite(arr)]
            if len(a):
                out[f"{name}_mean"] = float(a.mean())
                p50, p90, p99 = np.percentile(a, [50, 90, 99])
                out[f"{name}_p50"], out[f"{name}_p90"], out[f"{name}_p99"] = (
                    float(p50),
                    float(p90),
                    float(p99),
                )
            else:
                for s in ("mean", "p50", "p90", "p99"):
                    out[f"{name}_{s}"] = math.nan
        ms = self.makespan
        out["makespan_s"] = ms
        out["throughput_tok_s"] = self.counters["tokens_generated"] / ms if ms > 0 else math.nan
        out["throughput_req_s"] = self.num_finished / ms if ms > 0 else math.nan
        hits = float(self.cols["hit_gpu"].sum() + self.cols["hit_cpu"].sum())
        # every admission (re-admissions after a preemption too) needs its context: from the cache or computed
        needed = hits + float(self.cols["prefill_computed"].sum())
        out["cache_hit_rate"] = hits / needed if needed else 0.0
        out["hit_tokens"] = hits
        out["prefill_computed_tokens"] = float(self.cols["prefill_computed"].sum())
        out["recomputed_tokens"] = float(self.cols["recomputed"].sum())
        out["evict_recomputed_tokens"] = float(self.cols["evict_recomputed"].sum())
        out["preemptions"] = self.counters["preemptions"]
        out["cpu_loaded_tokens"] = self.counters.get("cpu_loaded_tokens", 0.0)
        out["prefetched_tokens"] = self.counters.get("prefetched_tokens", 0.0)
        out["tokens_generated"] = self.counters["tokens_generated"]
        out["tokens_discarded"] = self.counters["tokens_discarded"]
        out["peak_kv_tokens"] = self.counters["peak_kv_tokens"]
        out["mean_kv_tokens"] = self.mean_memory()
        cap = self.counters["kv_capacity_tokens"]
        out["peak_kv_util"] = out["peak_kv_tokens"] / cap if math.isfinite(cap) and cap > 0 else math.nan
        return out

    def mean_memory(self) -> float:
        """Time-weighted mean KV tokens in use from the first arrival to the end of the run (the engine integrates
        memory over every step, growing linearly over decode steps; it does not need the timeline). NaN for an
        empty or instantaneous run."""
        c = self.counters
        span = c.get("end_time", math.nan) - c.get("start_time", math.nan)
        integral = c.get("kv_token_seconds", math.nan)
        return float(integral / span) if span > 0 and math.isfinite(integral) else math.nan

    def rollout_summary(self, tail_frac: float = 0.1) -> dict[str, float]:
        """Rollout view: makespan and the share of it spent on the last ``tail_frac`` of responses."""
        if not 0 < tail_frac < 1:
            raise ValueError(f"tail_frac must be in (0, 1), got {tail_frac!r}")
        fin = np.sort(self.cols["finish"][np.isfinite(self.cols["finish"])])
        if not len(fin):  # an empty run
            nan = math.nan
            return {
                "makespan_s": nan,
                "body_done_s": nan,
                "tail_share": nan,
                "tokens_generated": self.counters["tokens_generated"],
                "tokens_discarded": self.counters["tokens_discarded"],
            }
        start = float(np.min(self.cols["arrival"]))
        ms = float(fin[-1] - start)
        k = max(0, int(math.ceil((1 - tail_frac) * len(fin))) - 1)
        t_body = float(fin[k] - start)
        return {
            "makespan_s": ms,
            "body_done_s": t_body,
            "tail_share": (ms - t_body) / ms if ms > 0 else 0.0,
            "tokens_generated": self.counters["tokens_generated"],
            "tokens_discarded": self.counters["tokens_discarded"],
        }

    # ------------------------------------------------------------------------------ export
    def to_dataframe(self) -> Any:
        """Per-request pandas DataFrame (columns of ``cols`` plus ``ttft``, ``latency``, ``per_token``)."""
        import pandas as pd

        df = pd.DataFrame(self.cols)
        df["ttft"] = self.ttft
        df["latency"] = self.latency
        df["per_token"] = self.per_token_latency
        df["queue"] = self.queue_delay
        return df

    def to_csv(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.to_dataframe().to_csv(path, index=False)
        return path


def compare(results: Mapping[str, SimResult], keys: tuple[str, ...] | None = None) -> Any:
    """One row per named result with its :meth:`SimResult.summary` (optionally only ``keys``)."""
    import pandas as pd

    rows = []
    for name, r in results.items():
        s = r.summary()
        if keys is not None:
            s = {k: s[k] for k in keys}
        rows.append({"policy": name, **s})
    return pd.DataFrame(rows).set_index("policy")


def plot(results: Mapping[str, SimResult], path: str | Path, title: str = "simulator") -> Path:
    """Two panels: per-token latency CDF per policy, KV memory over time per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        a = np.sort(r.per_token_latency[np.isfinite(r.per_token_latency)])
        if len(a):
            ax1.plot(a, np.arange(1, len(a) + 1) / len(a), label=name)
        t, m = r.timeline.get("time"), r.timeline.get("kv_tokens")
        if t is not None and len(t):
            step = max(1, len(t) // 5000)
            ax2.plot(t[::step], m[::step], label=name)  # linear between points: decode growth
    ax1.set_xscale("log")
    ax1.set_xlabel("per-token latency (s/token)")
    ax1.set_ylabel("CDF")
    ax1.legend(fontsize=8)
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("KV tokens in use")
    ax2.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
