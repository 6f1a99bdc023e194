"""TIE benchmark: Azure-trace replay in the shared simulator, offline batch throughput, real CB on a tiny model.

Run (CPU is fine; ~3-6 minutes, predictors are cached)::

    python -m hf_ext bench tie                 # full
    python -m hf_ext bench tie -- --quick      # ~1 minute smoke run

Pipeline:

1. Three predictors with the same small BERT-shaped encoder (TIE log-t NLL, SSJF log-length MSE,
   LTR ListMLE) are trained on a synthetic split of the text workload (:mod:`.data`) and cached.
   Their quality on a held-out split: log-t NLL vs the best constant log-t, coverage of the 50/90 %
   central intervals, PIT histogram (``benchmarks/results/tie_calibration.png``), rank correlation.
2. Azure LLM inference trace 2023 (conversation; CC-BY 4.0, Patel et al., Splitwise, ISCA 2024):
   the first ``--minutes`` of the trace at its own arrival times and compressed ``--loads`` times; output
   lengths and prompt token counts from the trace, prompt *texts* from a fresh synthetic pool matched to
   those lengths (:func:`.data.match_to_lengths`). Policies: FCFS, SJF with oracle lengths, SSJF, LTR, TIE.
   The engine is the shared simulator (:mod:`hf_ext.simulate`) with a cost model from
   ``hf_ext/simulate/calibrations`` (a measured GPU calibration when present, else the GPU.md-derived fit).
3. Offline batch job: ``--offline-n`` prompts at t=0 under a KV-memory cap; throughput = requests
   finished by a deadline (half of FCFS's makespan) per second — the data-generation goodput of the TIE/LTR
   papers (the full-batch makespan is order-insensitive to first order and is printed for reference).
   The same job as ``generate`` over static (padded) batches cut from each policy's order
   (:mod:`.offline`): a batch runs to its longest row, so the order sets the whole job's tokens/s; batch
   size from the KV cap with worst-case reservation, and 16 / 64; then with every policy's batches planned
   (:func:`offline_planned`, :mod:`.planner`).
4. Real continuous batching on a tiny random Llama (CPU): a burst of prompts with lengths forced per request
   (EOS disabled), all five policies; per-token latency from wall-clock timestamps. Then real static batches
   (``generate`` with forced lengths) in each policy's order; tokens/s from wall clock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import ABLATION_SETTINGS, ablation_config
from hf_ext.utils.bench import bench_main, mark_quick_run

COMPONENT = "tie"
# policies simulated with the trained predictors
SIM_POLICIES = (
    "fcfs",
    "sjf_oracle",
    "ssjf",
    "ltr",
    "tie",
    *ABLATION_SETTINGS,
)
# the predictor ceiling: these policies again, fed the generator's own (mu, sigma, nu) of each prompt (a perfect
# length-distribution predictor; report only). Shows whether a better predictor would close TIE's gap.
TRUE_DIST_POLICIES = ("ssjf", "tie", "tie_expect_only", "per_token_index")
TRUE_DIST = "_true_dist"
POLICIES = SIM_POLICIES + tuple(p + TRUE_DIST for p in TRUE_DIST_POLICIES)
# TIE with one part changed, for the report only (never CSV rows): which part helps which metric
ABLATIONS = {
    "tie_no_aging": "TIE without the starvation guard (aging='none')",
    "tie_no_tail": "TIE without the CVaR term (beta = 0): expectation + aging",
    "tie_expect_only": "TIE with the log-t expectation alone (beta = 0, no aging): the predictor's ranking vs SSJF's",
    "tie_truncate": "TIE with E and CVaR on the truncated support X | 1 <= X <= M instead of clipping",
    "per_token_index": "TIE's predicted law ranked by E[X]/E[1/X] (TIEConfig(score='per_token_index'), no aging), "
    "the static order that minimises mean per-token latency: how far any score of that law can get",
    "per_token_index_aging": "per_token_index with TIEConfig's aging (gamma, tau) left on: what "
    "TIEConfig(score='per_token_index') runs by default",
    **{
        p + TRUE_DIST: f"{p} fed each prompt's true generative (mu, sigma, nu): a perfect predictor"
        for p in TRUE_DIST_POLICIES
    },
}
BASELINES = ("fcfs", "ssjf", "ltr", "sjf_oracle")
# offline time budgets, as fractions of FCFS's makespan; the headline one names the plain offline case
OFFLINE_BUDGETS = (0.25, 0.5, 0.75)
# static-batch sizes simulated beside the one the offline KV cap gives
STATIC_BATCH_SIZES = (16, 64)
# rounds of the real tiny-model static job (every policy once per round; the median run is reported)
REAL_STATIC_REPS = 5
HEADLINE_BUDGET = 0.5
# generation cap of the synthetic workload and the trace replay (every length lies in [1, MAX_NEW_TOKENS])
MAX_NEW_TOKENS = 1000
ATTRIBUTION = (
    "Azure LLM inference trace 2023 (conversation), Azure Public Dataset, CC-BY 4.0; "
    "Patel et al., Splitwise, ISCA 2024"
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-ext bench tie", description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="small, fast settings (smoke test): --n-train 1500 --epochs 3 --minutes 5 --offline-n 600 unless given",
    )
    p.add_argument(
        "--n-train",
        type=int,
        default=40000,
        help="synthetic training prompts per predictor (benchmarks/tie_predictor_sweep.py: 6k -> 40k takes the "
        "validation NLL from 1.19 to 1.07 nats, true law 1.04)",
    )
    p.add_argument("--epochs", type=int, default=4, help="predictor training epochs")
    p.add_argument("--minutes", type=float, default=20.0, help="minutes of the Azure trace to replay")
    p.add_argument(
        "--loads", default="1,2,4,5,6,8", help="time-compression factors of the trace (1 = own arrivals)"
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help="simulated engine: max running sequences")
    p.add_argument(
        "--kv-tokens", type=int, default=450_000, help="online KV capacity in tokens (H100 80GB, 8B)"
    )
    p.add_argument("--offline-n", type=int, default=2000, help="requests in the offline batch job")
    p.add_argument("--offline-kv-tokens", type=int, default=120_000, help="offline KV cap (memory-bound)")
    p.add_argument("--calibration", default=None, help="cost-model JSON name/path (default: best available)")
    p.add_argument(
        "--no-real-cb", action="store_true", help="skip the real tiny-model continuous batching run"
    )
    p.add_argument("--cache-dir", default=None, help="predictor cache (default ~/.cache/hf_ext/tie)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="do not append to benchmarks/results/tie.csv")
    p.add_argument(
        "--tag",
        default=None,
        help="suffix of this run's figures and details JSON (tie_policies_TAG.png, ...); default: none, or "
        "'transformers_cb' with such a calibration and 'quick' with --quick, so that such runs never overwrite "
        "the headline run's files",
    )
    p.add_argument(
        "--export-replay", default=None, help="also write the trace window with predictions to this JSON"
    )
    return p


# ------------------------------------------------------------------------------------------ helpers
def load_cost_model(name: str | None) -> Any:
    """The calibration ``name``, or by default the measured H100 ``generate`` calibration (else the GPU.md-derived
    fit): :func:`hf_ext.simulate.cost_model.default_gpu_cost_model`."""
    from hf_ext.simulate.cost_model import CostModel, default_gpu_cost_model

    return CostModel.load(name) if name else default_gpu_cost_model()


def _cache_dir(arg: str | None) -> Path:
    d = Path(arg or os.environ.get("HF_EXT_CACHE", Path.home() / ".cache" / "hf_ext")) / "tie"
    d.mkdir(parents=True, exist_ok=True)
    return d


def train_predictors(
    train: dict[str, list], cfg_kw: dict[str, Any], cache: Path, progress: bool = True
) -> dict[str, Any]:
    """Train (or load from ``cache``) the logt / point / ltr predictors on the same data."""
    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.predictor import LengthPredictor

    out = {}
    digest = hashlib.sha1(
        json.dumps(
            [train["prompt"][:50], len(train["prompt"]), sum(train["output_len"]), cfg_kw], sort_keys=True
        ).encode()
    ).hexdigest()[:12]
    for kind in ("logt", "point", "ltr"):
        path = cache / f"{kind}-{digest}"
        if (path / "tie_predictor.json").exists():
            out[kind] = LengthPredictor.from_pretrained(path)
            continue
        t0 = time.perf_counter()
        pred = LengthPredictor(PredictorConfig(kind=kind, **cfg_kw))
        pred.fit(train, progress=progress)
        pred.save_pretrained(path)
        print(f"  trained {kind} predictor in {time.perf_counter() - t0:.1f}s -> {path}")
        out[kind] = pred
    return out


def request_laws(reqs: Sequence[Any], nu: float = 3.5) -> dict[str, np.ndarray]:
    """``{"mu", "sigma", "nu"}`` (each ``[N]``) of the predicted log-t laws in the requests' ``meta``
    (``pred_mu`` / ``pred_sigma`` / ``pred_nu``; ``nu`` where a request has no ``pred_nu``)."""
    return {
        "mu": np.asarray([r.meta["pred_mu"] for r in reqs], dtype=np.float64),
        "sigma": np.asarray([r.meta["pred_sigma"] for r in reqs], dtype=np.float64),
        "nu": np.asarray([r.meta.get("pred_nu", nu) for r in reqs], dtype=np.float64),
    }


def _annotate(reqs: list[Any], preds: dict[str, Any]) -> None:
    from hf_ext.generation.tie.scheduler import annotate_requests

    for kind in ("logt", "point", "ltr"):
        annotate_requests(reqs, preds[kind])


def make_schedulers(tie_cfg: Any) -> dict[str, Any]:
    """Fresh simulator schedulers for every policy of :data:`SIM_POLICIES` (TIE variants from ``tie_cfg``)."""
    from hf_ext.generation.tie.scheduler import TIEScheduler
    from hf_ext.simulate import FCFS, SSJF, ScoreScheduler, SJFOracle

    return {
        "fcfs": FCFS(),
        "sjf_oracle": SJFOracle(),
        "ssjf": SSJF(),
        "ltr": ScoreScheduler(lambda r, now: r.meta["ltr_score"], name="ltr"),
        "tie": TIEScheduler(tie_cfg),
        **{name: TIEScheduler(ablation_config(tie_cfg, name), name=name) for name in ABLATION_SETTINGS},
    }


def clone_requests(reqs: list[Any]) -> list[Any]:
    """Copies of simulator requests (own ``meta``) so that runs do not share state."""
    from dataclasses import replace

    return [replace(r, meta=dict(r.meta)) for r in reqs]


def with_true_distribution(reqs: list[Any], tie_cfg: Any) -> list[Any]:
    """Copies of ``reqs`` whose predictions are the generator's own ``(mu, sigma, nu)`` of each prompt
    (``meta["true_mu"]``, ...): TIE gets the true log-t law, SSJF ``exp(true_mu)`` (the median), LTR ``true_mu``."""
    from hf_ext.generation.tie.scheduler import precompute_scores

    out = clone_requests(reqs)
    for r in out:
        m = r.meta
        m.update(pred_mu=m["true_mu"], pred_sigma=m["true_sigma"], pred_nu=m["true_nu"])
        m.update(pred_len=math.exp(m["true_mu"]), ltr_score=m["true_mu"])
    precompute_scores(out, tie_cfg)
    return out


def _true_params(rows: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
    """The hidden generative parameters of synthetic workload rows, as ``meta`` entries."""
    return [{"true_mu": r["mu"], "true_sigma": r["sigma"], "true_nu": r["nu"]} for r in rows]


def predictor_quality(
    preds: dict[str, Any],
    test: dict[str, list],
    train_lengths: list[int],
    png: Path,
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> dict[str, float]:
    """NLL / CRPS / coverage / PIT of the log-t predictor vs the best constant log-t; rank quality of all
    three; CRPS also of SSJF's point predictor (its absolute error), in log length and in clipped tokens."""
    from hf_ext.generation.tie.distribution import interval_coverage, pit
    from hf_ext.generation.tie.predictor import constant_logt_baseline, logt_scores

    q: dict[str, float] = {}
    ev = preds["logt"].evaluate(test, max_new_tokens=max_new_tokens)
    q.update({f"tie_{k}": v for k, v in ev.items()})
    for kind in ("point", "ltr"):
        q.update(
            {f"{kind}_{k}": v for k, v in preds[kind].evaluate(test, max_new_tokens=max_new_tokens).items()}
        )
    lens = np.asarray(test["output_len"], dtype=np.float64)
    mu0, s0, nu0 = constant_logt_baseline(train_lengths)
    const = logt_scores(lens, mu0, s0, nu0, max_new_tokens)
    q.update({f"const_{k}": const[k] for k in ("nll", "coverage90", "crps_log", "crps_tokens")})
    p = preds["logt"].predict(test["prompt"])
    u = pit(lens, p["mu"], p["sigma"], p["nu"], rng=np.random.default_rng(0))
    u0 = pit(lens, mu0, s0, nu0, rng=np.random.default_rng(0))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
        axes[0].hist(u, bins=20, range=(0, 1), density=True, alpha=0.8, label="TIE log-t predictor")
        axes[0].hist(u0, bins=20, range=(0, 1), density=True, histtype="step", lw=1.5, label="constant log-t")
        axes[0].axhline(1.0, color="k", ls="--", lw=0.8)
        axes[0].set_title("PIT histogram (uniform = calibrated)")
        axes[0].legend(fontsize=8)
        levels = np.linspace(0.1, 0.95, 18)
        cov = [interval_coverage(lens, p["mu"], p["sigma"], p["nu"], lv) for lv in levels]
        cov0 = [interval_coverage(lens, mu0, s0, nu0, lv) for lv in levels]
        axes[1].plot(levels, cov, "o-", label="TIE log-t predictor")
        axes[1].plot(levels, cov0, "s--", label="constant log-t")
        axes[1].plot([0, 1], [0, 1], "k:", lw=0.8)
        axes[1].set_xlabel("nominal central-interval level")
        axes[1].set_ylabel("empirical coverage")
        axes[1].set_title(f"coverage: 50% -> {ev['coverage50']:.2f}, 90% -> {ev['coverage90']:.2f}")
        axes[1].legend(fontsize=8)
        axes[2].scatter(np.exp(p["mu"]), lens, s=3, alpha=0.3)
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
        axes[2].set_xlabel("predicted median exp(mu)")
        axes[2].set_ylabel("observed output tokens")
        axes[2].set_title(
            f"NLL {ev['nll']:.3f} vs constant {q['const_nll']:.3f} (nats, log length)\n"
            f"CRPS {ev['crps_tokens']:.0f} tok vs constant {q['const_crps_tokens']:.0f}, "
            f"SSJF point {q['point_crps_tokens']:.0f}",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
    except Exception as exc:  # pragma: no cover - plotting is optional
        print(f"  calibration plot skipped: {exc}")
    return q


# ----------------------------------------------------------------------------------------- sections
def trace_requests(args: argparse.Namespace, preds: dict[str, Any], tie_cfg: Any) -> list[Any]:
    """The first ``--minutes`` of the Azure trace as simulator requests with matched prompts and predictions."""
    from hf_ext.generation.tie.data import generate_workload, load_azure_trace, match_to_lengths
    from hf_ext.generation.tie.scheduler import precompute_scores
    from hf_ext.simulate import Request

    tr = load_azure_trace()
    keep = tr["arrival"] <= args.minutes * 60.0
    arr, plen, olen = tr["arrival"][keep], tr["prompt_len"][keep], tr["output_len"][keep]
    pool = generate_workload(
        4000 if not args.quick else 1500, seed=args.seed + 300, max_new_tokens=MAX_NEW_TOKENS
    )
    rows = match_to_lengths(olen, pool, seed=args.seed + 1)
    base = [
        Request(
            id=i,
            arrival=float(arr[i]),
            prompt_len=int(plen[i]),
            output_len=int(olen[i]),
            prompt=rows[i]["prompt"],
            max_new_tokens=MAX_NEW_TOKENS,
            meta=truth,
        )
        for i, truth in enumerate(_true_params(rows[: len(arr)]))
    ]
    _annotate(base, preds)
    precompute_scores(base, tie_cfg)
    print(
        f"  trace window: {len(base)} requests over {arr[-1]:.0f}s ({len(base) / max(arr[-1], 1):.2f} req/s), "
        f"output median {np.median(olen):.0f}, p99 {np.percentile(olen, 99):.0f}"
    )
    return base


def export_replay(
    path: str | Path,
    base: list[Any],
    limit: int = 2000,
    workload: str = "azure2023conv",
    source: str = ATTRIBUTION,
) -> None:
    """Write the first ``limit`` requests of the trace window (arrival, token counts, all three predictors'
    outputs) as JSON for a real-CB replay elsewhere (``benchmarks/tie_real_cb.py`` on the GPU machine,
    which has no predictors). ``workload`` names the workload in the replay's case names, ``source`` says where
    its requests come from."""
    rows = [
        {
            "arrival": round(r.arrival, 3),
            "prompt_len": r.prompt_len,
            "output_len": r.output_len,
            "mu": round(r.meta["pred_mu"], 5),
            "sigma": round(r.meta["pred_sigma"], 5),
            "nu": round(r.meta["pred_nu"], 4),
            "pred_len": round(r.meta["pred_len"], 3),
            "ltr_score": round(r.meta["ltr_score"], 5),
        }
        for r in base[:limit]
    ]
    meta = {
        "source": source,
        "workload": workload,
        "n": len(rows),
        "note": "predictions from the cached synthetic-text predictors",
    }
    Path(path).write_text(json.dumps({"meta": meta, "requests": rows}, separators=(",", ":")))
    print(f"  wrote {len(rows)} requests to {path}")


def simulate_policies(
    cm: Any,
    base: list[Any],
    tie_cfg: Any,
    max_num_seqs: int,
    kv_tokens: int,
    speed: float = 1.0,
    policies: Sequence[str] | None = None,
    max_num_batched_tokens: int | None = 8192,
) -> dict[str, Any]:
    """Run each policy (default: all of :data:`SIM_POLICIES`) on its own copy of ``base`` in the simulator.

    ``speed`` compresses arrival times (``arrival / speed``; ``0`` = everything at t=0); ``max_num_batched_tokens``
    is the engine's token budget per step (``SimConfig``'s). Returns policy -> simulation result;
    ``result.counters["sim_seconds"]`` is the wall time of that run.
    """
    from hf_ext.simulate import SimConfig, Simulator

    schedulers = make_schedulers(tie_cfg)
    out = {}
    for name in policies or SIM_POLICIES:
        reqs = clone_requests(base)
        for r in reqs:
            r.arrival = 0.0 if speed == 0 else r.arrival / speed
        t0 = time.perf_counter()
        cfg = SimConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_capacity_tokens=kv_tokens,
            record_timeline=False,
        )
        res = Simulator(cm, schedulers[name], cfg).run(reqs)
        res.counters["sim_seconds"] = time.perf_counter() - t0
        out[name] = res
    return out


def trace_replay(
    args: argparse.Namespace, cm: Any, preds: dict[str, Any], tie_cfg: Any, base: list[Any]
) -> dict[str, dict]:
    out: dict[str, dict] = {}
    true_base = with_true_distribution(base, tie_cfg)
    for load in [float(x) for x in args.loads.split(",")]:
        case = f"azure2023conv_{int(args.minutes)}min_x{load:g}"
        sims = simulate_policies(cm, base, tie_cfg, args.max_num_seqs, args.kv_tokens, speed=load)
        truth = simulate_policies(
            cm, true_base, tie_cfg, args.max_num_seqs, args.kv_tokens, speed=load, policies=TRUE_DIST_POLICIES
        )
        sims.update({name + TRUE_DIST: r for name, r in truth.items()})
        res = {name: {**r.summary(), "sim_seconds": r.counters["sim_seconds"]} for name, r in sims.items()}
        out[case] = res
        print(f"  {case}: " + ", ".join(f"{k} {v['per_token_mean'] * 1e3:.1f}ms/tok" for k, v in res.items()))
    return out


def synthetic_requests(
    rows: Sequence[dict[str, Any]], prompt_lens: Sequence[int], arrivals: Sequence[float], max_new_tokens: int
) -> list[Any]:
    """Simulator requests of synthetic workload rows: their text and drawn length, ``prompt_lens[i]`` prompt tokens,
    ``arrivals[i]`` seconds, and the generator's own law in ``meta`` (``true_mu`` / ``true_sigma`` / ``true_nu``)."""
    from hf_ext.simulate import Request

    return [
        Request(
            id=i,
            arrival=float(arrivals[i]),
            prompt_len=int(prompt_lens[i]),
            output_len=int(r["output_len"]),
            prompt=r["prompt"],
            max_new_tokens=max_new_tokens,
            meta=truth,
        )
        for i, (r, truth) in enumerate(zip(rows, _true_params(rows)))
    ]


def offline_requests(args: argparse.Namespace, preds: dict[str, Any], tie_cfg: Any) -> list[Any]:
    """The offline batch job: ``--offline-n`` synthetic prompts at t=0, prompt lengths drawn from the Azure
    trace (<= 2,048), predictions of all three predictors and TIE scores attached."""
    from hf_ext.generation.tie.data import generate_workload, load_azure_trace
    from hf_ext.generation.tie.scheduler import precompute_scores

    rng = np.random.default_rng(args.seed + 7)
    rows = generate_workload(args.offline_n, seed=args.seed + 500, max_new_tokens=MAX_NEW_TOKENS)
    tr_plen = load_azure_trace()["prompt_len"]
    plen = rng.choice(tr_plen[tr_plen <= 2048], size=len(rows))
    base = synthetic_requests(rows, plen, np.zeros(len(rows)), MAX_NEW_TOKENS)
    _annotate(base, preds)
    precompute_scores(base, tie_cfg)
    return base


def budget_goodput(finish: Any, fcfs_makespan: float) -> dict[str, Any]:
    """Requests of a job queued at t=0 finished within each time budget (:data:`OFFLINE_BUDGETS`, fractions of
    FCFS's makespan), per second: ``goodput_req_s`` at the headline budget (``deadline_s``), and
    ``goodput_by_budget`` — the ratio between policies depends on the budget.

    ``finish``: ``[N]`` finish times in seconds after the job's start (``inf``/NaN: never finished)."""
    if not (math.isfinite(fcfs_makespan) and fcfs_makespan > 0):
        raise ValueError(f"fcfs_makespan must be a finite number > 0, got {fcfs_makespan!r}")
    fin = np.asarray(finish, dtype=np.float64)
    budgets = {f: f * fcfs_makespan for f in OFFLINE_BUDGETS}
    done = {f: int(np.sum(np.isfinite(fin) & (fin <= t))) for f, t in budgets.items()}
    deadline = budgets[HEADLINE_BUDGET]
    return {
        "goodput_req_s": done[HEADLINE_BUDGET] / deadline,
        "done_by_deadline": done[HEADLINE_BUDGET],
        "deadline_s": deadline,
        "goodput_by_budget": {f: done[f] / t for f, t in budgets.items()},
    }


def offline_batch(args: argparse.Namespace, cm: Any, base: list[Any], tie_cfg: Any) -> dict[str, dict]:
    """The offline job under continuous batching with a KV cap: requests finished within time budgets."""
    res: dict[str, dict] = {}
    sims = simulate_policies(cm, base, tie_cfg, args.max_num_seqs, args.offline_kv_tokens)
    for name, r in sims.items():
        s = r.summary()
        res[name] = {
            **budget_goodput(r.cols["finish"], sims["fcfs"].makespan),
            "makespan_s": s["makespan_s"],
            "throughput_tok_s": s["throughput_tok_s"],
            "preemptions": s["preemptions"],
        }
    deadline = res["fcfs"]["deadline_s"]
    print(
        f"  offline ({len(base)} requests, KV cap {args.offline_kv_tokens} tokens, deadline {deadline:.0f}s): "
        + ", ".join(f"{k} {v['goodput_req_s']:.2f} req/s" for k, v in res.items())
    )
    for frac in OFFLINE_BUDGETS:
        f0 = res["fcfs"]["goodput_by_budget"][frac]
        print(
            f"    budget {frac:g} x FCFS makespan: goodput vs FCFS "
            + ", ".join(
                f"{k} {v['goodput_by_budget'][frac] / f0:.2f}x" for k, v in res.items() if k != "fcfs"
            )
        )
    return {f"offline_batch{len(base)}_kv{args.offline_kv_tokens // 1000}k": res}


def scheduler_overhead(sizes: tuple[int, ...] = (100, 1000, 5000), reps: int = 20) -> dict[str, dict]:
    """CPU time of one admission-ordering call of the CB schedulers with ``N`` waiting requests.

    transformers calls ``_get_waiting_candidates`` once per step; FIFO is its own scheduler, the others are ours
    (keys/hints by request id; the first call scores the new requests, later ones re-age and sort).
    """
    from transformers.generation.continuous_batching.requests import RequestState
    from transformers.generation.continuous_batching.scheduler import FIFOScheduler

    from hf_ext.generation.tie.cb import (
        PriorityCBScheduler,
        TIECBScheduler,
        clear_length_hints,
        clear_priority_keys,
        set_length_hints,
        set_priority_keys,
    )

    out: dict[str, dict] = {}
    rng = np.random.default_rng(0)
    for n in sizes:
        rids = [f"w{i}" for i in range(n)]
        set_length_hints(None, rng.normal(5.0, 1.0, n), np.full(n, 0.6), request_ids=rids)
        set_priority_keys(rng.random(n), request_ids=rids)
        res = {}
        try:
            for name, cls in (
                ("fcfs", FIFOScheduler),
                ("ssjf", PriorityCBScheduler),
                ("tie", TIECBScheduler),
            ):
                sch = cls(cache=None, safety_margin=0.1, max_requests_per_batch=32)
                for rid in rids:
                    sch.add_waiting_request(
                        RequestState(request_id=rid, initial_tokens=[1, 2, 3], max_new_tokens=1000)
                    )
                t0 = time.perf_counter()
                sch._get_waiting_candidates()
                first = time.perf_counter() - t0
                t0 = time.perf_counter()
                for _ in range(reps):
                    sch._get_waiting_candidates()
                res[name] = {"first_ms": first * 1e3, "step_ms": (time.perf_counter() - t0) / reps * 1e3}
        finally:
            clear_length_hints()
            clear_priority_keys()
        out[f"cb_scheduler_overhead_waiting{n}"] = res
        print(
            f"  {n} waiting: per-step ordering "
            + ", ".join(f"{k} {v['step_ms']:.2f} ms (first {v['first_ms']:.2f})" for k, v in res.items())
        )
    return out


def _scaled_burst(args: argparse.Namespace, preds: dict[str, Any], n: int, cap: int) -> list[Any]:
    """``n`` synthetic prompts for a real tiny-model run: token ids from the tiny tokenizer, output lengths
    scaled to ``<= cap`` (factor ``cap/MAX_NEW_TOKENS·4``) and the predictions scaled the same way (log-t μ and SSJF
    length by the factor, LTR rank scores unchanged); as :class:`ReplayRequest`."""
    from hf_ext.generation.tie.data import generate_workload
    from hf_ext.generation.tie.replay import ReplayRequest
    from hf_ext.testing import tiny_tokenizer

    rows = generate_workload(n, seed=args.seed + 900, max_new_tokens=MAX_NEW_TOKENS)
    tok = tiny_tokenizer()
    prompts = [r["prompt"] for r in rows]
    factor = cap / MAX_NEW_TOKENS * 4
    lens = [max(1, min(cap, int(round(r["output_len"] * factor)))) for r in rows]
    p = preds["logt"].predict(prompts)
    pt = preds["point"].predict(prompts)
    lt = preds["ltr"].predict(prompts)
    return [
        ReplayRequest(
            request_id=f"burst{i}",
            arrival=0.0,
            prompt_ids=tok(prompts[i]).input_ids,
            output_len=lens[i],
            mu=float(p["mu"][i] + math.log(factor)),
            sigma=float(p["sigma"][i]),
            nu=float(p["nu"][i]),
            pred_len=float(math.exp(pt["mu"][i]) * factor),
            ltr_score=float(lt["score"][i]),
        )
        for i in range(n)
    ]


def real_cb(args: argparse.Namespace, preds: dict[str, Any]) -> dict[str, dict]:
    """Real transformers continuous batching on a tiny random Llama (CPU): all five policies on one burst.

    Output lengths are forced per request (EOS disabled) and scaled to ``cap`` (:func:`_scaled_burst`).
    """
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.replay import POLICIES as CB_POLICIES
    from hf_ext.generation.tie.replay import run_cb_replay, summarize_replay
    from hf_ext.testing import tiny_llama

    n, cap = (16, 48) if args.quick else (40, 96)
    reqs = _scaled_burst(args, preds, n, cap)
    model = tiny_llama()
    gc = GenerationConfig(max_new_tokens=cap, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=64, page_size=16, max_batch_tokens=256, max_requests_per_batch=4)
    tie_cfg = TIEConfig(max_new_tokens=cap, use_request_cap=False)
    res = {}
    for pol in CB_POLICIES:
        recs = run_cb_replay(
            model,
            reqs,
            pol,
            generation_config=gc,
            continuous_batching_config=cb,
            tie_config=tie_cfg,
            time_scale=0,
        )
        res[pol] = summarize_replay(recs)
    print(
        f"  real CB tiny Llama ({n} burst requests, lengths <= {cap}): "
        + ", ".join(f"{k} {v['per_token_mean'] * 1e3:.2f} ms/tok" for k, v in res.items())
    )
    return {f"real_cb_tiny_llama_cpu_burst{n}": res}


def median_static_runs(
    model: Any, ids: list[list[int]], lens: list[int], plans: dict[str, list[list[int]]], reps: int
) -> dict[str, dict]:
    """Each plan (name -> batches of request indices) as a forced-length ``generate`` job on ``model``
    (:func:`.offline.run_static_generate`; EOS 2, pad 0) in ``reps`` rounds that each run every plan once
    (interleaved, so a slow spell of a shared CPU hits all plans alike); each plan reports its median-time run
    and every run's makespan (``makespans_s``)."""
    from hf_ext.generation.tie.offline import run_static_generate

    runs: dict[str, list[Any]] = {p: [] for p in plans}
    for _ in range(reps):
        for p, batches in plans.items():
            runs[p].append(
                run_static_generate(
                    model, ids, lens, None, batches=batches, eos_token_id=2, pad_token_id=0, policy=p
                )
            )
    res = {}
    for p, rs in runs.items():
        med = sorted(rs, key=lambda r: r.makespan_s)[len(rs) // 2]
        res[p] = {**med.summary(), "makespans_s": [r.makespan_s for r in rs]}
    return res


def real_static(args: argparse.Namespace, preds: dict[str, Any]) -> dict[str, dict]:
    """Static batches on a real model: ``generate`` on padded batches of a tiny random Llama (CPU), the
    job cut from each policy's order; output lengths forced per request (:func:`.offline.run_static_generate`)."""
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import (
        OFFLINE_POLICIES,
        policy_order,
        run_static_generate,
        static_batches,
    )
    from hf_ext.testing import tiny_llama

    n, cap, bs = (24, 48, 8) if args.quick else (96, 96, 8)
    burst = _scaled_burst(args, preds, n, cap)
    reqs = [r.to_sim_request(i, cap) for i, r in enumerate(burst)]  # all at t=0: FCFS keeps this order
    tie_cfg = TIEConfig(max_new_tokens=cap, use_request_cap=False)
    model = tiny_llama()
    ids, lens = [r.prompt_ids for r in burst], [r.output_len for r in burst]
    run_static_generate(
        model, ids[:bs], lens[:bs], list(range(bs)), bs, eos_token_id=2, pad_token_id=0
    )  # warm-up
    plans = {pol: static_batches(policy_order(pol, reqs, tie_cfg), bs) for pol in OFFLINE_POLICIES}
    res = median_static_runs(model, ids, lens, plans, 1 if args.quick else REAL_STATIC_REPS)
    print(
        f"  real static batches, tiny Llama ({n} requests, batch {bs}, lengths <= {cap}, median of "
        f"{len(res['tie']['makespans_s'])}): "
        + ", ".join(f"{k} {v['throughput_tok_s']:.0f} tok/s" for k, v in res.items())
    )
    return {f"real_static_tiny_llama_cpu_n{n}_b{bs}": res}


def offline_static(
    args: argparse.Namespace,
    cm: Any,
    base: list[Any],
    tie_cfg: Any,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_sizes: Sequence[int] = STATIC_BATCH_SIZES,
    prefix: str = "",
) -> dict[str, dict]:
    """The offline job as ``generate`` over static (padded) batches, in the simulator's cost model.

    Batch sizes: the largest that fits ``--offline-kv-tokens`` with every row reserved at 2,048 prompt +
    ``max_new_tokens`` new tokens (what a ``generate`` user provisions; case suffix ``_kvcap``), ``batch_sizes``
    beside it, and batches each as wide as the KV cap allows for its own padded prompts + ``max_new_tokens``
    (``memory_batches``; suffix ``_membatch``). ``prefix`` starts every case name.
    """
    from hf_ext.generation.tie.offline import (
        OFFLINE_POLICIES,
        batch_size_for_memory,
        policy_order,
        simulate_static_batches,
    )

    mem_b = batch_size_for_memory(args.offline_kv_tokens, 2048, max_new_tokens)
    plen, out = [r.prompt_len for r in base], [r.output_len for r in base]
    orders = {p: policy_order(p, base, tie_cfg) for p in OFFLINE_POLICIES}
    # ablation (report / details only, never CSV rows): the same order without the CVaR term
    orders["tie_no_tail"] = policy_order("tie", base, ablation_config(tie_cfg, "tie_no_tail"))
    true_base = with_true_distribution(base, tie_cfg)  # the predictor ceiling (report only)
    orders.update({p + TRUE_DIST: policy_order(p, true_base, tie_cfg) for p in ("ssjf", "tie")})
    res: dict[str, dict] = {}
    kv = args.offline_kv_tokens
    plans: list[tuple[str, dict[str, Any]]] = [
        (f"{prefix}offline_static{len(base)}_b{b}" + ("_kvcap" if b == mem_b else ""), {"batch_size": b})
        for b in sorted({mem_b, *batch_sizes})
    ]
    # every batch as wide as the KV cap allows for its own prompts (memory_batches)
    plans.append(
        (
            f"{prefix}offline_static{len(base)}_kv{kv // 1000}k_membatch",
            {"kv_tokens": kv, "max_new_tokens": max_new_tokens},
        )
    )
    for case, kw in plans:
        res[case] = {
            p: simulate_static_batches(cm, plen, out, o, policy=p, **kw).summary() for p, o in orders.items()
        }
        _print_vs_fcfs(case, res[case])
    return res


def _print_vs_fcfs(case: str, res: dict[str, dict]) -> None:
    f0 = res["fcfs"]["throughput_tok_s"]
    print(
        f"  {case}: tokens/s vs FCFS "
        + ", ".join(f"{k} {v['throughput_tok_s'] / f0:.2f}x" for k, v in res.items() if k != "fcfs")
    )


def offline_planned(
    cm: Any, base: list[Any], tie_cfg: Any, kv: int, *, max_new_tokens: int = MAX_NEW_TOKENS, prefix: str = ""
) -> dict[str, dict]:
    """The offline job with batch *plans* (:func:`.planner.plan_batches`) under the KV cap, in the cost model.

    Every policy plans with what it knows: TIE from its log-t laws, SSJF from its point predictions, the
    SJF-oracle from the true lengths (each: prompt buckets chosen by its own expected cost, then least-expected-time
    cuts). FCFS and LTR have no lengths: their order is regrouped into ``K`` prompt buckets and cut as wide as
    memory allows, with the ``K`` of :data:`.planner.PLAN_BUCKETS` or ``K = N`` (the job sorted by prompt length)
    that turned out fastest *in hindsight* (the true lengths pick it: a favour to those baselines). Cases:

    * ``…_planned`` — every policy planned (TIE's rows against planned baselines: the fair comparison);
    * ``…_planned_vs_membatch`` — TIE planned against the baselines' plain ``_membatch`` jobs (one order cut as
      wide as memory allows): what a user of ``tie_batched_generate(plan="expected")`` gains over such a loop.
      ``tie_membatch`` (report only) is TIE's own order cut that way.

    Report-only entries (never rows): ``tie_plan_1bucket`` (TIE's plan without prompt buckets) and
    ``tie_true_dist`` (TIE planned with the true laws).
    """
    from hf_ext.generation.tie.offline import memory_batches, policy_order, simulate_static_batches
    from hf_ext.generation.tie.planner import PLAN_BUCKETS, bucket_order, plan_batches

    plen = np.asarray([r.prompt_len for r in base], dtype=np.int64)
    out = np.asarray([r.output_len for r in base], dtype=np.int64)
    cap = max_new_tokens

    def sim(batches: list[list[int]], policy: str, **extra: Any) -> dict[str, Any]:
        r = simulate_static_batches(cm, plen, out, None, policy=policy, batches=batches)
        return {**r.summary(), "n_batches": len(batches), **extra}

    def planned(order: list[int], policy: str, buckets: int | None = None, **pred: Any) -> dict[str, Any]:
        p = plan_batches(order, plen, cap, kv_tokens=kv, cost_model=cm, prompt_buckets=buckets, **pred)
        return sim(p.batches, policy, prompt_buckets=p.prompt_buckets, expected_makespan_s=p.expected_cost)

    def best_bucketed(order: list[int], policy: str) -> dict[str, Any]:
        runs = [
            sim(memory_batches(bucket_order(order, plen, k), plen, kv, cap), policy, prompt_buckets=k)
            for k in (*PLAN_BUCKETS, len(base))
        ]
        return max(runs, key=lambda r: r["throughput_tok_s"])

    orders = {p: policy_order(p, base, tie_cfg) for p in ("fcfs", "sjf_oracle", "ssjf", "ltr", "tie")}
    res: dict[str, dict[str, Any]] = {
        "tie": planned(orders["tie"], "tie", **request_laws(base)),
        "fcfs": best_bucketed(orders["fcfs"], "fcfs"),
        "ssjf": planned(orders["ssjf"], "ssjf", point=[r.meta["pred_len"] for r in base]),
        "ltr": best_bucketed(orders["ltr"], "ltr"),
        "sjf_oracle": planned(orders["sjf_oracle"], "sjf_oracle", point=out),
        "tie_plan_1bucket": planned(orders["tie"], "tie", 1, **request_laws(base)),
    }
    true_base = with_true_distribution(base, tie_cfg)
    res["tie" + TRUE_DIST] = planned(
        policy_order("tie", true_base, tie_cfg), "tie", **request_laws(true_base)
    )
    plain = {p: sim(memory_batches(o, plen, kv, cap), p) for p, o in orders.items() if p != "tie"}
    plain["tie_membatch"] = sim(memory_batches(orders["tie"], plen, kv, cap), "tie")  # report only
    case = f"{prefix}offline_static{len(base)}_kv{kv // 1000}k_planned"
    out_cases = {case: res, case + "_vs_membatch": {"tie": res["tie"], **plain}}
    for c, r in out_cases.items():
        _print_vs_fcfs(c, r)
    return out_cases


def policy_figure(groups: dict[str, dict[str, dict]], png: Path) -> None:
    """Grouped bars: mean and p99 per-token latency of every policy in every case (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover - plotting is optional
        print(f"  policy figure skipped: {exc}")
        return
    cases = [c for c, res in groups.items() if "per_token_mean" in next(iter(res.values()))]
    pols = [p for p in POLICIES if any(p in groups[c] for c in cases)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.9 * len(cases) + 3), 7), sharex=True)
    width = 0.8 / len(pols)
    for ax, key, title in (
        (axes[0], "per_token_mean", "mean per-token latency (s/token)"),
        (axes[1], "per_token_p99", "p99 per-token latency (s/token)"),
    ):
        for j, pol in enumerate(pols):
            xs = [i + (j - (len(pols) - 1) / 2) * width for i, c in enumerate(cases) if pol in groups[c]]
            ys = [groups[c][pol][key] for c in cases if pol in groups[c]]
            color = plt.cm.tab20(j % 20)  # more policies than the default 10-colour cycle
            ax.bar(xs, ys, width, label=pol, color=color, hatch="//" if pol in ABLATIONS else None, alpha=0.9)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(cases)))
    axes[1].set_xticklabels(
        [
            c.replace("azure2023conv_", "")
            .replace("_maxseqs", "\nmaxseqs")
            .replace("_seed", " seed")
            .replace("_", "\n", 1)
            for c in cases
        ],
        fontsize=8,
    )
    axes[0].legend(ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


LATENCY_METRICS = (
    ("per_token_latency_mean", "per_token_mean"),
    ("per_token_latency_p99", "per_token_p99"),
    ("ttft", "ttft_mean"),
)


def latency_rows(
    results: dict[str, dict],
    device: str,
    cmd: str,
    quality: Callable[[dict[str, dict]], tuple[str, str]],
    metrics: Sequence[tuple[str, str]] = LATENCY_METRICS,
) -> list[Any]:
    """Result rows, TIE vs each baseline present, for every case and latency metric.

    ``results``: case -> policy -> summary (simulator or real CB); ``quality(policy_results)`` gives the row's
    ``(quality_name, quality_value)``; ``metrics``: (row metric, summary key) pairs.
    """
    from hf_ext.utils.bench import Row

    rows = []
    for case, res in results.items():
        qname, qvalue = quality(res)
        for metric, key in metrics:
            for b in BASELINES:
                if b in res:
                    rows.append(
                        Row.make(
                            COMPONENT,
                            case,
                            metric,
                            res["tie"][key],
                            b,
                            res[b][key],
                            device=device,
                            quality_name=qname,
                            quality_value=qvalue,
                            command=cmd,
                        )
                    )
    return rows


def static_rows(static: dict[str, dict], sim_dev: str, real_dev: str, cmd: str) -> list[Any]:
    """``offline_throughput_tokens`` rows of the static-batch jobs (whole job: generated tokens / makespan), TIE
    against each baseline present; ``real_*`` cases get ``real_dev``, the others ``sim_dev``."""
    from hf_ext.utils.bench import Row

    return [
        Row.make(
            COMPONENT,
            case,
            "offline_throughput_tokens",
            res["tie"]["throughput_tok_s"],
            b,
            res[b]["throughput_tok_s"],
            higher_is_better=True,
            device=real_dev if case.startswith("real_") else sim_dev,
            quality_name="padding_share_tie/base",
            quality_value=f"{res['tie']['padding_share']:.3f}/{res[b]['padding_share']:.3f}",
            command=cmd,
        )
        for case, res in static.items()
        for b in BASELINES
        if b in res
    ]


def offline_rows(offline: dict[str, dict], device: str, cmd: str) -> list[Any]:
    """Rows of offline jobs queued at t=0 (each policy's :func:`budget_goodput` + ``makespan_s`` /
    ``throughput_tok_s``): ``offline_throughput`` (requests finished within each budget per second; the headline
    budget names the plain case, the others ``_budget<f>``) and ``offline_throughput_tokens`` of the whole job
    (``_whole_job``), TIE against each baseline present."""
    from hf_ext.utils.bench import Row

    rows: list[Any] = []
    for case, res in offline.items():
        for b in (b for b in BASELINES if b in res):
            for frac in OFFLINE_BUDGETS:  # requests finished within the budget per second
                rows.append(
                    Row.make(
                        COMPONENT,
                        case if frac == HEADLINE_BUDGET else f"{case}_budget{frac:g}",
                        "offline_throughput",
                        res["tie"]["goodput_by_budget"][frac],
                        b,
                        res[b]["goodput_by_budget"][frac],
                        higher_is_better=True,
                        device=device,
                        quality_name="budget_s",
                        quality_value=f"{frac * res['fcfs']['makespan_s']:.1f}",
                        command=cmd,
                    )
                )
            rows.append(  # the whole job: generated tokens over its makespan
                Row.make(
                    COMPONENT,
                    f"{case}_whole_job",
                    "offline_throughput_tokens",
                    res["tie"]["throughput_tok_s"],
                    b,
                    res[b]["throughput_tok_s"],
                    higher_is_better=True,
                    device=device,
                    quality_name="makespan_s",
                    quality_value=f"{res['tie']['makespan_s']:.1f}",
                    command=cmd,
                )
            )
    return rows


def real_cb_rows(real: dict[str, dict], device: str, cmd: str) -> list[Any]:
    """Rows of real-CB replays; quality = whether every request produced exactly its forced length."""
    return latency_rows(
        real,
        device,
        cmd,
        lambda res: ("all_lengths_exact", str(all(bool(v["lengths_ok"]) for v in res.values()))),
    )


# -------------------------------------------------------------------------------------------- main
@bench_main
def main(argv: list[str] | None = None) -> int:
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.data import generate_workload, length_pairs
    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows, results_dir

    parser = _parser()
    quick_defaults = dict(n_train=1500, epochs=3, minutes=5.0, offline_n=600)
    full_defaults = {name: parser.get_default(name) for name in quick_defaults}
    # --quick used to overwrite these even when given; it now fills in only the ones left out
    parser.set_defaults(**dict.fromkeys(quick_defaults))
    args = parser.parse_args(argv or [])
    for name, value in (quick_defaults if args.quick else full_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    mark_quick_run(args.quick)
    for name in ("n_train", "epochs", "max_num_seqs", "kv_tokens", "offline_n", "offline_kv_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError("--minutes must be > 0")
    try:
        loads = [float(x) for x in args.loads.split(",")]
    except ValueError:
        loads = []
    if not loads or not all(math.isfinite(x) and x > 0 for x in loads):
        raise ValueError(f"--loads must be comma-separated finite numbers > 0, got {args.loads!r}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    import torch

    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 2) // 2)))
    t_start = time.perf_counter()
    cm = load_cost_model(args.calibration)
    print(f"TIE bench: cost model {cm.name} ({cm.source or 'n/a'}); data: {ATTRIBUTION}")
    train_rows = generate_workload(args.n_train, seed=args.seed + 100, max_new_tokens=MAX_NEW_TOKENS)
    test_rows = generate_workload(
        1500 if not args.quick else 600, seed=args.seed + 200, max_new_tokens=MAX_NEW_TOKENS
    )
    train, test = length_pairs(train_rows), length_pairs(test_rows)
    cfg_kw = dict(epochs=args.epochs, seed=args.seed)
    print("[1/4] predictors (same encoder; cached)")
    preds = train_predictors(train, cfg_kw, _cache_dir(args.cache_dir))
    rdir = results_dir()
    tag = _file_tag(args, cm.name)
    png = (
        rdir / f"tie_calibration{tag}.png"
        if not args.no_write
        else Path(tempfile.mkdtemp()) / "tie_calibration.png"
    )
    quality = predictor_quality(preds, test, train["output_len"], png)
    print(
        f"  log-t NLL {quality['tie_nll']:.3f} (constant {quality['const_nll']:.3f}); coverage 50% "
        f"{quality['tie_coverage50']:.3f}, 90% {quality['tie_coverage90']:.3f}; Spearman tie/ssjf/ltr "
        f"{quality['tie_spearman']:.3f}/{quality['point_spearman']:.3f}/{quality['ltr_spearman']:.3f}; CRPS "
        f"log-t/point/constant {quality['tie_crps_tokens']:.1f}/{quality['point_crps_tokens']:.1f}/"
        f"{quality['const_crps_tokens']:.1f} tokens"
    )
    tie_cfg = TIEConfig(max_new_tokens=MAX_NEW_TOKENS, batch_max=args.max_num_seqs)
    print("[2/4] Azure trace replay (simulator)")
    base = trace_requests(args, preds, tie_cfg)
    if args.export_replay:
        export_replay(args.export_replay, base)
    online = trace_replay(args, cm, preds, tie_cfg, base)
    print("[3/4] offline batch job (simulator, memory cap): continuous batching, then static batches")
    off_base = offline_requests(args, preds, tie_cfg)
    offline = offline_batch(args, cm, off_base, tie_cfg)
    static = offline_static(args, cm, off_base, tie_cfg)
    static.update(offline_planned(cm, off_base, tie_cfg, args.offline_kv_tokens))
    print("[+] CB scheduler overhead (CPU)")
    overhead = scheduler_overhead()
    real = {}
    if not args.no_real_cb:
        print("[4/4] real continuous batching and static batches, tiny Llama on CPU")
        real = real_cb(args, preds)
        static.update(real_static(args, preds))

    dev = f"sim:{cm.name}"
    cmd = "python -m hf_ext bench tie" + (" " + " ".join(argv) if argv else "")
    qual = ("predictor_nll_logt_vs_const", f"{quality['tie_nll']:.3f}/{quality['const_nll']:.3f}")
    rows: list[Any] = latency_rows(online, dev, cmd, lambda res: qual)
    rows += offline_rows(offline, dev, cmd)
    from hf_ext.utils.bench import device_name

    rows += static_rows(static, dev, device_name(), cmd)
    if real:
        rows += real_cb_rows(real, device_name(), cmd)
    for case, res in overhead.items():
        rows += [
            Row.make(
                COMPONENT,
                case,
                "scheduler_step_ms",
                res["tie"]["step_ms"],
                b,
                res[b]["step_ms"],
                device=device_name(),
                quality_name="first_call_ms",
                quality_value=f"{res['tie']['first_ms']:.2f}",
                command=cmd,
            )
            for b in ("fcfs", "ssjf")
        ]
    rows.append(
        Row.make(
            COMPONENT,
            "synthetic_heldout",
            "predictor_nll",
            quality["tie_nll"],
            "constant_logt",
            quality["const_nll"],
            device="cpu",
            quality_name="coverage50/90",
            quality_value=f"{quality['tie_coverage50']:.3f}/{quality['tie_coverage90']:.3f}",
            command=cmd,
        )
    )
    for unit in ("log", "tokens"):  # CRPS: the log-t predictor vs a constant log-t and SSJF's point forecast
        rows += [
            Row.make(
                COMPONENT,
                "synthetic_heldout",
                f"predictor_crps_{unit}",
                quality[f"tie_crps_{unit}"],
                base,
                quality[f"{key}_crps_{unit}"],
                device="cpu",
                quality_name="max_new_tokens",
                quality_value=str(MAX_NEW_TOKENS),
                command=cmd,
            )
            for base, key in (("constant_logt", "const"), ("ssjf_point", "point"))
        ]
    print_rows(rows, title="TIE (ours) vs baselines — ratio > 1: TIE better")
    _print_tables(online, offline, real)
    if not args.no_write:
        path = append_rows(COMPONENT, rows)
        plot_results(COMPONENT, path)
        policy_figure({**online, **real}, rdir / f"tie_policies{tag}.png")
        with open(rdir / f"tie_details{tag}.json", "w") as f:
            json.dump(
                {
                    "command": cmd,
                    "cost_model": cm.name,
                    "quality": quality,
                    "online": online,
                    "offline": offline,
                    "offline_static": static,
                    "real_cb": real,
                    "scheduler_overhead": overhead,
                    "attribution": ATTRIBUTION,
                },
                f,
                indent=1,
                default=float,
            )
        print(
            f"wrote {path}, {path.with_suffix('.png')}, {png}, {rdir / f'tie_policies{tag}.png'}, "
            f"{rdir / f'tie_details{tag}.json'}"
        )
    print(f"TIE bench done in {time.perf_counter() - t_start:.0f}s")
    return 0


def _file_tag(args: argparse.Namespace, cost_model_name: str) -> str:
    """Suffix of the run's figures and details JSON: ``_<--tag>``; by default none for the headline run,
    ``_transformers_cb`` with such a calibration and ``_quick`` (also) with ``--quick``."""
    from hf_ext.simulate.cb_steps import CALIBRATION_PREFIX, is_cb_calibration

    if args.tag is not None:
        return f"_{args.tag}" if args.tag else ""
    parts = [CALIBRATION_PREFIX] if is_cb_calibration(cost_model_name) else []
    if args.quick:
        parts.append("quick")
    return "".join(f"_{p}" for p in parts)


def _print_tables(
    online: dict[str, dict], offline: dict[str, dict], real: dict[str, dict] | None = None
) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="Per-policy results (simulator; real_cb_* rows: real transformers continuous batching)")
    for c in (
        "case",
        "policy",
        "per-token mean (ms)",
        "per-token p99 (ms)",
        "TTFT mean (s)",
        "latency mean / p99 (s)",
    ):
        t.add_column(c)
    for case, res in {**online, **(real or {})}.items():
        for pol in POLICIES:
            if pol not in res:
                continue
            s = res[pol]
            t.add_row(
                case,
                pol,
                f"{s['per_token_mean'] * 1e3:.1f}",
                f"{s['per_token_p99'] * 1e3:.1f}",
                f"{s['ttft_mean']:.2f}",
                f"{s['latency_mean']:.2f} / {s['latency_p99']:.2f}",
            )
    for case, res in offline.items():
        for pol in SIM_POLICIES:
            s = res[pol]
            t.add_row(
                case,
                pol,
                f"goodput {s['goodput_req_s']:.2f} req/s",
                f"makespan {s['makespan_s']:.0f}s",
                f"{s['throughput_tok_s']:.0f} tok/s",
                f"preempt {s['preemptions']:.0f}",
            )
    con = Console()
    con.print(t)
    for name, what in ABLATIONS.items():
        con.print(f"  {name}: {what}")


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main(sys.argv[1:]))
