"""Workload generators: heavy-tailed lengths, arrival processes, the Azure production trace, JSONL files,
RL rollouts and agent workflows with shared prefixes.

Default length parameters are matched to the Azure LLM inference trace 2023 (conversation), see
``../shared/design/WORKLOADS.md``: output median 129 / p99 601 tokens -> log-normal mu = ln 129 = 4.86,
sigma = ln(601/129)/2.326 = 0.66; prompt median 1,020 / p99 4,100 -> mu = 6.93, sigma = 0.60; arrivals
Poisson at 5.5 req/s.  Those figures describe the trace; heavier tails (log-t with nu ~ 3.5 as in TIE,
"over-thinking" mixtures of reasoning models) are assumptions, documented where used.

Trace attribution: the Azure LLM inference trace 2023 is from the Azure Public Dataset, licensed CC-BY 4.0;
cite Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.

Example:
    >>> reqs = synthetic(n=100, rate=5.5, seed=0)
    >>> len(reqs), reqs[0].arrival >= 0, all(r.output_len >= 1 for r in reqs)
    (100, True, True)
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hf_ext.simulate.types import Request
from hf_ext.utils.jsonable import to_jsonable

AZURE_TRACE_NAME = "azure_llm_inference_2023_conv.csv"
AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY 4.0); Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
)
REPO_ROOT = Path(__file__).resolve().parents[2]

# log-normal fits to the Azure conversation trace's median / p99 (see the module docstring)
AZURE_OUTPUT_MU, AZURE_OUTPUT_SIGMA = math.log(129), math.log(601 / 129) / 2.326
AZURE_PROMPT_MU, AZURE_PROMPT_SIGMA = math.log(1020), math.log(4100 / 1020) / 2.326
AZURE_RATE = 5.5

LENGTH_DISTS = ("lognormal", "logt", "mixture")
ARRIVALS = ("poisson", "gamma", "mmpp", "offline")


def _finite(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Real) and math.isfinite(v)


def _finite_positive(v: Any) -> bool:
    return _finite(v) and v > 0


# ------------------------------------------------------------------------------------- lengths
@dataclass
class LengthDist:
    """A heavy-tailed length distribution: ``log X = mu_i + sigma * eps``.

    * ``lognormal``: eps ~ N(0, 1);
    * ``logt``: eps ~ Student-t(nu) (TIE's model; nu ~ 3.5);
    * ``mixture``: with probability ``tail_prob`` the request "over-thinks": mu_i += ``tail_shift``
      (log-scale shift, e.g. ln 8) and sigma = ``tail_sigma``.

    ``mu_spread`` > 0 draws a per-request location mu_i = mu + N(0, mu_spread) (what a prompt-conditioned
    predictor could learn); sigma is then the irreducible per-request noise.  Samples are rounded and clipped
    to ``[min_len, max_len]``.
    """

    kind: str = field(default="lognormal", metadata={"help": "lognormal | logt | mixture"})
    mu: float = field(default=AZURE_OUTPUT_MU, metadata={"help": "log-scale location"})
    sigma: float = field(default=AZURE_OUTPUT_SIGMA, metadata={"help": "log-scale scale"})
    nu: float = field(default=3.5, metadata={"help": "Student-t degrees of freedom (logt)"})
    mu_spread: float = field(default=0.0, metadata={"help": "std of per-request mu_i around mu"})
    tail_prob: float = field(default=0.1, metadata={"help": "mixture: probability of the over-thinking tail"})
    tail_shift: float = field(
        default=math.log(8.0), metadata={"help": "mixture: log-scale shift of the tail"}
    )
    tail_sigma: float = field(default=0.5, metadata={"help": "mixture: sigma of the tail component"})
    min_len: int = field(default=1, metadata={"help": "clip below"})
    max_len: int = field(default=32768, metadata={"help": "clip above (generation cap)"})

    def __post_init__(self) -> None:
        if self.kind not in LENGTH_DISTS:
            raise ValueError(f"LengthDist.kind must be one of {LENGTH_DISTS}, got {self.kind!r}")
        for name in (
            "mu",
            "sigma",
            "nu",
            "mu_spread",
            "tail_prob",
            "tail_shift",
            "tail_sigma",
            "min_len",
            "max_len",
        ):
            v = getattr(self, name)
            if not _finite(v):
                raise ValueError(f"LengthDist.{name} must be a finite number, got {v!r}")
        if self.sigma < 0 or self.mu_spread < 0 or self.tail_sigma < 0:
            raise ValueError("LengthDist.sigma, mu_spread and tail_sigma must be >= 0")
        if self.nu <= 0:
            raise ValueError(f"LengthDist.nu must be > 0, got {self.nu!r}")
        if not 0 <= self.tail_prob <= 1:
            raise ValueError(f"LengthDist.tail_prob must be in [0, 1], got {self.tail_prob!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")

    def sample(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(lengths int64[n], mu_i float[n], sigma_i float[n])``."""
        mu = self.mu + (rng.normal(0.0, self.mu_spread, n) if self.mu_spread > 0 else np.zeros(n))
        sig = np.full(n, self.sigma)
        if self.kind == "logt":
            eps = rng.standard_t(self.nu, n)
        else:
            eps = rng.standard_normal(n)
        if self.kind == "mixture":
            tail = rng.random(n) < self.tail_prob
            mu = np.where(tail, mu + self.tail_shift, mu)
            sig = np.where(tail, self.tail_sigma, sig)
        x = np.exp(np.clip(mu + sig * eps, -50, 50))
        lens = np.clip(np.rint(x), self.min_len, self.max_len).astype(np.int64)
        return lens, mu, sig


def azure_output_dist(kind: str = "lognormal", **kw: Any) -> LengthDist:
    """Output lengths matched to the Azure trace's median/p99 (log-t keeps the median, nu=3.5)."""
    kw.setdefault("max_len", 4096)
    return LengthDist(kind=kind, mu=AZURE_OUTPUT_MU, sigma=AZURE_OUTPUT_SIGMA, **kw)


def azure_prompt_dist(**kw: Any) -> LengthDist:
    """Prompt lengths matched to the Azure trace's median/p99 (log-normal)."""
    kw.setdefault("max_len", 8192)
    return LengthDist(kind="lognormal", mu=AZURE_PROMPT_MU, sigma=AZURE_PROMPT_SIGMA, **kw)


# ------------------------------------------------------------------------------------ arrivals
def arrival_times(
    n: int,
    rate: float,
    process: str = "poisson",
    rng: np.random.Generator | None = None,
    *,
    cv: float = 2.0,
    burst_factor: float = 4.0,
    burst_frac: float = 0.2,
    mean_phase_s: float = 30.0,
) -> np.ndarray:
    """``n`` arrival times (s, starting near 0) at mean ``rate`` req/s.

    * ``poisson``: exponential gaps;
    * ``gamma``: gamma gaps with coefficient of variation ``cv`` (> 1 is bursty);
    * ``mmpp``: 2-state Markov-modulated Poisson: a burst state at ``burst_factor`` x the base rate for a
      ``burst_frac`` share of the time, phases of mean ``mean_phase_s``; the mean rate is ``rate``;
    * ``offline``: all at 0 (a batch job).
    """
    if process not in ARRIVALS:
        raise ValueError(f"process must be one of {ARRIVALS}, got {process!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = rng or np.random.default_rng(0)
    if process == "offline":
        return np.zeros(n)
    if not _finite_positive(rate):
        raise ValueError(f"rate must be a finite number > 0 req/s, got {rate!r}")
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, n)
    elif process == "gamma":
        if not _finite_positive(cv):
            raise ValueError(f"cv must be a finite number > 0, got {cv!r}")
        k = 1.0 / cv**2
        gaps = rng.gamma(k, 1.0 / (rate * k), n)
    else:
        if not 0 < burst_frac < 1 or not _finite_positive(burst_factor) or not _finite_positive(mean_phase_s):
            raise ValueError(
                "mmpp needs 0 < burst_frac < 1, and burst_factor and mean_phase_s finite and > 0; got "
                f"burst_frac={burst_frac!r}, burst_factor={burst_factor!r}, mean_phase_s={mean_phase_s!r}"
            )
        base = rate / (1 - burst_frac + burst_frac * burst_factor)
        rates = (base, base * burst_factor)
        means = (mean_phase_s * (1 - burst_frac) / 0.5, mean_phase_s * burst_frac / 0.5)
        out = np.empty(n)
        t, state, i = 0.0, 0, 0
        phase_end = rng.exponential(means[0])
        while i < n:
            g = rng.exponential(1.0 / rates[state])
            if t + g > phase_end:
                t = phase_end
                state = 1 - state
                phase_end = t + rng.exponential(means[state])
                continue
            t += g
            out[i] = t
            i += 1
        return out
    return np.cumsum(gaps)


# ----------------------------------------------------------------------------------- synthetic
def synthetic(
    n: int = 1000,
    rate: float = AZURE_RATE,
    *,
    output: LengthDist | None = None,
    prompt: LengthDist | None = None,
    arrival: str = "poisson",
    seed: int = 0,
    **arrival_kw: Any,
) -> list[Request]:
    """``n`` requests with heavy-tailed output/prompt lengths and the chosen arrival process.

    Each request's ``meta`` holds the true log-scale parameters of its output length (``true_mu``,
    ``true_sigma``, ``dist``, ``nu``) so predictors can be simulated (e.g. ``pred_mu = true_mu + noise``).
    """
    rng = np.random.default_rng(seed)
    output = output or azure_output_dist()
    prompt = prompt or azure_prompt_dist()
    arr = arrival_times(n, rate, arrival, rng, **arrival_kw)
    outs, mu, sig = output.sample(n, rng)
    proms, _, _ = prompt.sample(n, rng)
    reqs = []
    for i in range(n):
        reqs.append(
            Request(
                id=i,
                arrival=float(arr[i]),
                prompt_len=int(proms[i]),
                output_len=int(outs[i]),
                max_new_tokens=output.max_len,
                meta={
                    "true_mu": float(mu[i]),
                    "true_sigma": float(sig[i]),
                    "dist": output.kind,
                    "nu": output.nu,
                },
            )
        )
    return reqs


def offline_batch(n: int = 1000, **kw: Any) -> list[Request]:
    """All requests at t=0 (offline data generation / a batch job)."""
    return synthetic(n, rate=1.0, arrival="offline", **kw)


# --------------------------------------------------------------------------------- Azure trace
def default_data_dir() -> Path:
    """``../shared/data`` relative to the repository root (override with ``$HF_EXT_DATA_DIR``)."""
    import os

    env = os.environ.get("HF_EXT_DATA_DIR")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def azure_trace(
    path: str | Path | None = None,
    *,
    n: int | None = None,
    start: int = 0,
    time_scale: float = 1.0,
    max_output: int | None = None,
) -> list[Request]:
    """Replay the Azure LLM inference trace 2023 (conversation; 19,365 requests in one hour).

    Source: Azure Public Dataset, "Azure LLM inference trace 2023", licensed CC-BY 4.0. Cite: Patel et al.,
    "Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024.

    Args:
        path: the CSV (``TIMESTAMP,ContextTokens,GeneratedTokens``); default ``../shared/data/``
            ``azure_llm_inference_2023_conv.csv`` relative to the repo root (or ``$HF_EXT_DATA_DIR``).
        n: number of rows to keep (from ``start``), None for all.
        start: first row.
        time_scale: time compression factor: arrivals are divided by it (2.0 = twice the load).
        max_output: clip generated tokens (e.g. a model's generation cap); None or >= 1.
    """
    import csv
    from datetime import datetime

    if not _finite_positive(time_scale):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    if max_output is not None and (
        isinstance(max_output, bool) or not isinstance(max_output, numbers.Integral) or max_output < 1
    ):
        raise ValueError(f"max_output must be None or an int >= 1 (tokens), got {max_output!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0):
        raise ValueError(f"n must be None or an int >= 0 (rows), got {n!r}")
    if isinstance(start, bool) or not isinstance(start, numbers.Integral) or start < 0:
        raise ValueError(f"start must be an int >= 0 (first row), got {start!r}")
    p = Path(path) if path is not None else default_data_dir() / AZURE_TRACE_NAME
    if p.is_dir():
        p = p / AZURE_TRACE_NAME
    if not p.exists():
        raise FileNotFoundError(
            f"Azure trace not found at {p}; pass path= (the CSV {AZURE_TRACE_NAME} with columns "
            "TIMESTAMP,ContextTokens,GeneratedTokens from the Azure Public Dataset) or set $HF_EXT_DATA_DIR"
        )
    times: list[float] = []
    ctx: list[int] = []
    gen: list[int] = []
    with p.open(newline="") as f:
        rd = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not need.issubset(rd.fieldnames or ()):
            raise ValueError(f"{p}: expected columns {sorted(need)}, got {rd.fieldnames}")
        for i, row in enumerate(rd):
            if i < start:
                continue
            if n is not None and len(times) >= n:
                break
            ts = row["TIMESTAMP"].strip()
            if "." in ts:  # 7-digit fractions: keep microseconds
                head, frac = ts.split(".", 1)
                ts = f"{head}.{frac[:6]}"
            times.append(datetime.fromisoformat(ts).timestamp())
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    t = np.asarray(times)
    t = (t - t.min()) / time_scale if len(t) else t
    reqs = []
    for i in range(len(t)):
        out = max(1, gen[i] if max_output is None else min(gen[i], max_output))
        reqs.append(
            Request(
                id=i,
                arrival=float(t[i]),
                prompt_len=max(1, ctx[i]),
                output_len=out,
                meta={"source": "azure2023conv"},
            )
        )
    reqs.sort(key=lambda r: r.arrival)
    return reqs


def trace_stats(reqs: Sequence[Request]) -> dict[str, float]:
    """Arrival rate, inter-arrival CV and length percentiles of a workload (at least one request)."""
    if len(reqs) == 0:
        raise ValueError("trace_stats needs reqs with at least one request, got an empty sequence")
    arr = np.sort(np.asarray([r.arrival for r in reqs]))
    gaps = np.diff(arr)
    out = np.asarray([r.output_len for r in reqs])
    pr = np.asarray([r.prompt_len for r in reqs])
    span = float(arr[-1] - arr[0]) if len(arr) > 1 else 0.0
    return {
        "n": float(len(reqs)),
        "rate": (len(arr) - 1) / span if span > 0 else math.inf,
        "interarrival_cv": float(gaps.std() / gaps.mean()) if len(gaps) and gaps.mean() > 0 else math.nan,
        "output_mean": float(out.mean()),
        "output_p50": float(np.percentile(out, 50)),
        "output_p90": float(np.percentile(out, 90)),
        "output_p99": float(np.percentile(out, 99)),
        "prompt_p50": float(np.percentile(pr, 50)),
        "prompt_p99": float(np.percentile(pr, 99)),
    }


# -------------------------------------------------------------------------------------- JSONL
def save_jsonl(reqs: Sequence[Request], path: str | Path) -> Path:
    """One JSON object per request (``id, arrival, prompt_len, output_len, prompt, max_new_tokens, meta``).

    numpy scalars are written as Python numbers. Every line is made before the file is touched and the file is
    replaced whole, so a value JSON cannot hold raises ``TypeError`` and leaves no partial workload behind."""
    from hf_ext.utils.atomic import atomic_write_text

    p = Path(path)
    lines = [
        json.dumps(
            to_jsonable(
                {
                    "id": r.id,
                    "arrival": r.arrival,
                    "prompt_len": r.prompt_len,
                    "output_len": r.output_len,
                    "prompt": r.prompt,
                    "max_new_tokens": r.max_new_tokens,
                    "meta": r.meta,
                }
            )
        )
        + "\n"
        for r in reqs
    ]
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, "".join(lines))
    return p


def load_jsonl(path: str | Path) -> list[Request]:
    """Inverse of :func:`save_jsonl` (``meta["prefix_segments"]`` comes back as a list of tuples)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"workload file not found: {p}")
    out = []
    with p.open() as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            for k in ("id", "arrival", "prompt_len", "output_len"):
                if k not in d:
                    raise ValueError(f"{p}:{ln}: missing field {k!r}")
            meta = d.get("meta") or {}
            if "prefix_segments" in meta:
                meta["prefix_segments"] = [tuple(s) for s in meta["prefix_segments"]]
            out.append(
                Request(
                    id=int(d["id"]),
                    arrival=float(d["arrival"]),
                    prompt_len=int(d["prompt_len"]),
                    output_len=int(d["output_len"]),
                    prompt=d.get("prompt"),
                    max_new_tokens=d.get("max_new_tokens"),
                    meta=meta,
                )
            )
    return out


# ------------------------------------------------------------------------------------ rollouts
def rollout(
    n_prompts: int = 64,
    num_generations: int = 8,
    *,
    prompt_len: int | LengthDist = 256,
    mu: float = math.log(1500.0),
    prompt_spread: float = 0.6,
    sigma_within: float = 0.5,
    nu: float = 3.5,
    max_len: int = 8192,
    as_branches: bool = False,
    seed: int = 0,
) -> list[Request]:
    """An RL rollout batch: ``n_prompts`` x ``num_generations`` responses, all at t=0.

    Per prompt a location ``mu_p = mu + N(0, prompt_spread)``; each response ``log X = mu_p + sigma_within
    * t_nu`` (log-t: same-prompt responses are similar but with a heavy within-prompt tail, as the
    rollout-shaping paper reports), clipped at ``max_len`` (truncated responses have ``meta["truncated"]``).
    ``as_branches=True`` returns one request per prompt with ``meta["branch_lens"]`` (the engine decodes
    the group as branches and can stop after M of them, see ``SimConfig.stop_after``); otherwise one request
    per response with ``meta["group_id"]``.
    """
    if n_prompts < 1 or num_generations < 1:
        raise ValueError("n_prompts and num_generations must be >= 1")
    if not _finite(mu):
        raise ValueError(f"mu must be a finite number, got {mu!r}")
    for name, v in (("prompt_spread", prompt_spread), ("sigma_within", sigma_within)):
        if not (_finite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if not _finite_positive(nu):
        raise ValueError(f"nu must be a finite number > 0, got {nu!r}")
    if isinstance(max_len, bool) or not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1, got {max_len!r}")
    rng = np.random.default_rng(seed)
    mus = mu + rng.normal(0, prompt_spread, n_prompts)
    if isinstance(prompt_len, LengthDist):
        plens = prompt_len.sample(n_prompts, rng)[0]
    else:
        plens = np.full(n_prompts, int(prompt_len))
    reqs: list[Request] = []
    for p in range(n_prompts):
        x = np.exp(mus[p] + sigma_within * rng.standard_t(nu, num_generations))
        lens = np.clip(np.rint(x), 1, max_len).astype(int)
        if as_branches:
            reqs.append(
                Request(
                    id=p,
                    arrival=0.0,
                    prompt_len=int(plens[p]),
                    output_len=int(lens.max()),
                    max_new_tokens=max_len,
                    meta={
                        "branch_lens": lens.tolist(),
                        "group_id": p,
                        "prompt_mu": float(mus[p]),
                        "truncated": (lens >= max_len).tolist(),
                    },
                )
            )
        else:
            for g in range(num_generations):
                reqs.append(
                    Request(
                        id=len(reqs),
                        arrival=0.0,
                        prompt_len=int(plens[p]),
                        output_len=int(lens[g]),
                        max_new_tokens=max_len,
                        meta={
                            "group_id": p,
                            "prompt_mu": float(mus[p]),
                            "truncated": bool(lens[g] >= max_len),
                            "prefix_segments": [(f"rollout/p{p}", int(plens[p]))],
                        },
                    )
                )
    return reqs


# ---------------------------------------------------------------------------- agent workflows
@dataclass
class WorkflowCall:
    """One agent invocation in a workflow: released when all ``deps`` (call indices) have finished."""

    index: int
    agent: int
    deps: list[int]
    new_tokens: int
    output_len: int
    request: Request | None = None


@dataclass
class Workflow:
    """A pre-sampled workflow (a DAG of agent calls) and its start time."""

    id: int
    kind: str
    start: float
    calls: list[WorkflowCall]


def agent_workflows(
    n_workflows: int = 20,
    kind: str = "dynamic",
    *,
    n_agents: int = 6,
    system_prompt_len: int = 1024,
    new_tokens: tuple[int, int] = (64, 512),
    output: LengthDist | None = None,
    steps: tuple[int, int] = (3, 8),
    branch_prob: float = 0.3,
    react_loops: tuple[int, int] = (2, 6),
    rate: float = 0.5,
    seed: int = 0,
) -> list[Workflow]:
    """Sample agent workflows.

    * ``chain``: a static pipeline visiting agents 0, 1, ..., ``steps`` long (same step graph every time:
      KVFlow's setting);
    * ``dynamic``: a random walk over a fixed agent transition matrix; with ``branch_prob`` a call fans out to
      two parallel successors that a later call joins (dynamic branching graph);
    * ``react``: one agent loops thought -> tool -> observation ``react_loops`` times, then a final answer
      call of another agent.

    Each agent has a fixed system prompt (``system_prompt_len`` tokens, shared across workflows); a call's
    prompt is: its agent's system prompt, then the history of this agent in this workflow (its previous
    prompt and output, so loops reuse their growing context), then ``new_tokens`` fresh tokens (tool result
    / user turn).  Prompts are expressed as ``meta["prefix_segments"]`` so the simulator's prefix cache and
    PBKV/KVFlow policies can reuse them.  Run with :func:`run_workflows`.
    """
    kinds = ("chain", "dynamic", "react")
    if kind not in kinds:
        raise ValueError(f"kind must be one of {kinds}, got {kind!r}")
    if n_agents < 2:
        raise ValueError(f"n_agents must be >= 2, got {n_agents}")
    rng = np.random.default_rng(seed)
    output = output or LengthDist("lognormal", mu=math.log(150), sigma=0.6, max_len=2048)
    trans = rng.dirichlet(np.full(n_agents, 0.3), size=n_agents)  # fixed across workflows: learnable
    starts = arrival_times(n_workflows, rate, "poisson", rng)
    wfs: list[Workflow] = []
    for w in range(n_workflows):
        calls: list[WorkflowCall] = []

        def add(agent: int, deps: list[int], _calls: list[WorkflowCall] = calls) -> int:
            nt = int(rng.integers(new_tokens[0], new_tokens[1] + 1))
            out = int(output.sample(1, rng)[0][0])
            _calls.append(WorkflowCall(len(_calls), int(agent), deps, nt, out))
            return len(_calls) - 1

        if kind == "chain":
            n_steps = int(steps[1])
            prev: list[int] = []
            for s in range(n_steps):
                prev = [add(s % n_agents, prev)]
        elif kind == "react":
            loops = int(rng.integers(react_loops[0], react_loops[1] + 1))
            a = int(rng.integers(0, n_agents - 1))
            prev = []
            for _ in range(loops):
                prev = [add(a, prev)]
            add(n_agents - 1, prev)
        else:
            n_steps = int(rng.integers(steps[0], steps[1] + 1))
            a = int(rng.integers(0, n_agents))
            prev = [add(a, [])]
            while len(calls) < n_steps:
                if rng.random() < branch_prob and len(calls) + 3 <= n_steps:
                    b1, b2 = rng.choice(n_agents, 2, replace=False, p=trans[a])
                    c1, c2 = add(b1, prev), add(b2, prev)
                    a = int(rng.choice(n_agents, p=trans[b1]))
                    prev = [add(a, [c1, c2])]
                else:
                    a = int(rng.choice(n_agents, p=trans[a]))
                    prev = [add(a, prev)]
        wfs.append(Workflow(w, kind, float(starts[w]), calls))
    _attach_requests(wfs, system_prompt_len)
    return wfs


def _attach_requests(wfs: list[Workflow], system_prompt_len: int) -> None:
    rid = 0
    for wf in wfs:
        last_of_agent: dict[int, WorkflowCall] = {}
        for c in wf.calls:
            segs: list[tuple[str, int]] = [(f"agent{c.agent}/system", system_prompt_len)]
            prev = last_of_agent.get(c.agent)
            if prev is not None and prev.request is not None:
                segs = list(prev.request.meta["prefix_segments"]) + [
                    (prev.request.meta["output_key"], prev.output_len)
                ]
            segs.append((f"wf{wf.id}/c{c.index}/in", c.new_tokens))
            plen = sum(t for _, t in segs)
            c.request = Request(
                id=rid,
                arrival=wf.start,
                prompt_len=plen,
                output_len=c.output_len,
                meta={
                    "prefix_segments": segs,
                    "output_key": f"wf{wf.id}/c{c.index}/out",
                    "workflow_id": wf.id,
                    "call": c.index,
                    "agent": c.agent,
                    "deps": list(c.deps),
                    "workflow_kind": wf.kind,
                },
            )
            rid += 1
            last_of_agent[c.agent] = c


def workflow_requests(wfs: Sequence[Workflow]) -> list[Request]:
    """All calls' requests (for inspection; use :func:`run_workflows` to respect dependencies)."""
    return [c.request for wf in wfs for c in wf.calls if c.request is not None]


def run_workflows(sim: Any, wfs: Sequence[Workflow], think_time_s: float = 0.0) -> Any:
    """Run workflows on a :class:`~hf_ext.simulate.engine.Simulator`: a call is submitted when its
    dependencies have finished (plus ``think_time_s``); returns the SimResult with
    ``result.workflow_latency`` (array: last finish - start per workflow)."""
    pending: dict[int, tuple[Workflow, WorkflowCall]] = {}
    remaining: dict[tuple[int, int], int] = {}
    children: dict[tuple[int, int], list[WorkflowCall]] = {}
    initial: list[Request] = []
    for wf in wfs:
        for c in wf.calls:
            assert c.request is not None
            pending[id(c.request)] = (wf, c)
            remaining[(wf.id, c.index)] = len(c.deps)
            for d in c.deps:
                children.setdefault((wf.id, d), []).append(c)
            if not c.deps:
                c.request.arrival = wf.start
                initial.append(c.request)
    prev_hook = sim.on_finish

    def on_finish(req: Request, now: float) -> None:
        if prev_hook is not None:
            prev_hook(req, now)
        wf, c = pending[id(req)]
        for ch in children.get((wf.id, c.index), ()):
            key = (wf.id, ch.index)
            remaining[key] -= 1
            if remaining[key] == 0:
                assert ch.request is not None
                ch.request.arrival = now + think_time_s
                sim.submit(ch.request)

    sim.on_finish = on_finish
    try:
        res = sim.run(initial)
    finally:
        sim.on_finish = prev_hook
    fin: dict[int, float] = {}
    for r, f in zip(res.requests, res.cols["finish"]):
        w = r.meta["workflow_id"]
        fin[w] = max(fin.get(w, 0.0), float(f))
    res.workflow_latency = np.asarray([fin[wf.id] - wf.start for wf in wfs])
    return res
