"""Does TIE's tail term pay off in the paper's regime? Long generation caps, Poisson arrivals, memory-bound KV.

The TIE paper serves LMSYS-Chat-1M prompts whose outputs were regenerated with caps of up to 8,192 tokens; its
2.31x is against the best of SSJF / S3 / LTR (``design/WORKLOADS.md``). The bench's Azure replay
(``python -m hf_ext bench tie``) uses the trace's own lengths, capped at 1,000 tokens (p99 about 600). Longer caps
make the tails heavier in absolute terms, and a smaller KV pool makes a long request costlier (it grows and
forces preemptions), which is where pricing the tail should help most. This script measures that regime in the
shared simulator (H100-measured cost model, like the bench):

* workload: the synthetic text workload (``hf_ext.generation.tie.data``) drawn with cap ``M`` (``--caps``), prompt
  lengths from the Azure trace (at most 2,048), Poisson arrivals;
* loads: fractions of the engine's saturated rate (FCFS with every request at t=0, same KV pool: 90 % of the
  requests over the time they took to finish), so ``1.0`` is about the rate the engine can just sustain;
* KV pools (``--kv-tokens``): 450k tokens (an 8B model on an 80 GB card, the bench's default) and 180k (an 8B
  model on a 40 GB card: about 22.5 GB left for a 128 KiB-per-token KV cache, the LTR paper's A100-40GB);
* policies: FCFS, SJF-oracle, SSJF, LTR, TIE and TIE with the expectation alone, with predictors trained as the
  bench trains them but on lengths drawn with cap ``M`` (cached); and SSJF / TIE / TIE expectation-only fed each
  prompt's true ``(μ, σ, ν)`` (``*_true_dist``: a perfect predictor).

The offline job (``--offline-n`` of those requests at t=0, trained predictors) runs as static ``generate`` batches
under each ``--offline-kv-tokens`` cap: batches of the size the cap allows with every row provisioned for
2,048 + ``M`` tokens (``_kvcap``), and batches sized from each batch's own prompts (``_membatch``); whole-job tokens/s
(rows ``offline_throughput_tokens``, cases ``synthetic-cap{M}_offline_static…``). A what-if beside it
(:func:`offline_chunked`) asks whether sizing static batches from predicted lengths would pay: batches that stop after
a horizon and carry unfinished rows into later passes, with the same fixed chunks for every order (rows, cases
``…offline_chunk{C}_…``) and with reservations from each policy's predictions (``offline_predsized`` in the JSON,
``tie_regime_chunked[_seedN].png``).

Appends rows to ``benchmarks/results/tie.csv`` (cases ``synthetic-cap{M}_kv{K}k_load{L}``; the bench's latency
metrics plus ``latency_mean``, mean end-to-end latency; ``--no-write`` to skip) and writes
``benchmarks/results/tie_regime.png`` and ``tie_regime.json`` (``--seed N``: cases and files suffixed ``_seedN``)::

    python benchmarks/tie_regime.py     # both caps, both pools, 5 loads, offline job

On a 2-core CPU a run takes ~30 s once the predictors are cached; training a cap's three predictors (40,000 pairs)
takes 8-10 min the first time (the cap-1,000 ones are the bench's, shared through the cache).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402

# trained-predictor policies, then the same scores fed the true law (bench.TRUE_DIST suffix)
TRAINED = ("fcfs", "sjf_oracle", "ssjf", "ltr", "tie", "tie_expect_only")
A40GB_KV_TOKENS = 180_000
REPLAY_SOURCE = (
    "synthetic text workload (hf_ext.generation.tie.data) with prompt lengths resampled from the Azure LLM inference "
    "trace 2023 (conversation; Azure Public Dataset, CC-BY 4.0) and Poisson arrivals at 1 request/s"
)
PLOT_POLICIES = (
    "fcfs",
    "ssjf",
    "ltr",
    "tie",
    "tie_expect_only",
    "ssjf_true_dist",
    "tie_true_dist",
    "sjf_oracle",
)


def _floats(text: str, name: str, *, lo: float = 0.0) -> list[float]:
    try:
        out = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(not math.isfinite(x) or x <= lo for x in out):
        raise SystemExit(f"--{name} must be comma-separated numbers > {lo:g}, got {text!r}")
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--caps", default="1000,8192", help="generation caps M of the workload (comma-separated)")
    p.add_argument("--kv-tokens", default=f"450000,{A40GB_KV_TOKENS}", help="KV pools in tokens")
    p.add_argument(
        "--loads", default="0.9,1.0,1.1,1.25,1.5", help="fractions of the saturated rate (FCFS, all at t=0)"
    )
    p.add_argument("--n", type=int, default=3000, help="requests per run")
    p.add_argument("--n-train", type=int, default=40000, help="training pairs per predictor (the bench's)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument(
        "--offline-n", type=int, default=2000, help="requests in the offline static-batch job (0: skip it)"
    )
    p.add_argument(
        "--offline-kv-tokens",
        default=f"120000,{A40GB_KV_TOKENS}",
        help="KV caps of the offline job (the bench's 120k, and a 40 GB card's)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--true-law-only", action="store_true", help="skip the trained predictors (no training)")
    p.add_argument("--cache-dir", default=None, help="predictor cache (default ~/.cache/hf_ext/tie)")
    p.add_argument("--no-write", action="store_true", help="do not append rows or write the figure")
    p.add_argument(
        "--export-replay",
        default=None,
        help="also write the largest cap's requests (unit-rate Poisson arrivals, trained predictions) as a replay "
        "JSON for benchmarks/tie_real_cb.py (its --speeds is then the rate in req/s)",
    )
    return p


def workload(cap: int, n: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """``n`` synthetic rows drawn with cap ``cap`` and prompt lengths resampled from the Azure trace (<= 2,048)."""
    from hf_ext.generation.tie.data import generate_workload, load_azure_trace

    rows = generate_workload(n, seed=seed + 500, max_new_tokens=cap)
    plen = np.minimum(np.random.default_rng(seed + 501).choice(load_azure_trace()["prompt_len"], n), 2048)
    return rows, plen


def seed_suffix(seed: int) -> str:
    """Case and file-name suffix of a run: none for the default seed 0, ``_seedN`` otherwise."""
    return f"_seed{seed}" if seed else ""


def saturated_rate(latency: np.ndarray, q: float = 0.9) -> float:
    """Requests per second an engine sustains, from a run with every request at t=0: the first ``q`` of the
    requests over the time they took. (The whole makespan would understate it: the last few long requests decode
    almost alone.)"""
    return q * len(latency) / float(np.quantile(latency, q))


def run_cap(
    args: argparse.Namespace,
    cap: int,
    cm: Any,
    kvs: list[float],
    loads: list[float],
    export: str | None = None,
    offline_kvs: Sequence[float] = (),
) -> tuple[dict[str, dict], dict[str, dict], dict[str, dict]]:
    """Every (KV pool, load) case of one cap: case -> policy -> simulator summary (+ ``rate_req_s``); the offline
    job (the first ``--offline-n`` requests at t=0 as static ``generate`` batches under each of ``offline_kvs``, with
    the trained predictors only, and its chunked what-if with the same chunks for every order): case -> policy ->
    summary; and the what-if's prediction-sized batches (:func:`offline_chunked`). ``export``: also write this cap's
    requests with unit-rate arrivals and the trained predictions there (a replay JSON)."""
    from hf_ext.generation.tie.bench import (
        TRUE_DIST,
        TRUE_DIST_POLICIES,
        _annotate,
        _cache_dir,
        simulate_policies,
        synthetic_requests,
        train_predictors,
        with_true_distribution,
    )
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.data import generate_workload, length_pairs
    from hf_ext.generation.tie.scheduler import precompute_scores

    rows, plen = workload(cap, args.n, args.seed)
    lens = np.asarray([r["output_len"] for r in rows])
    print(
        f"cap {cap}: output median {np.median(lens):.0f}, mean {lens.mean():.0f}, p99 "
        f"{np.percentile(lens, 99):.0f}, {100 * np.mean(lens >= cap):.1f} % at the cap"
    )
    tie_cfg = TIEConfig(max_new_tokens=cap, batch_max=args.max_num_seqs)
    base = synthetic_requests(rows, plen, np.zeros(args.n), cap)
    policies: tuple[str, ...] = ("fcfs", "sjf_oracle")
    if not args.true_law_only:
        train_rows = generate_workload(args.n_train, seed=args.seed + 100, max_new_tokens=cap)
        preds = train_predictors(
            length_pairs(train_rows), dict(epochs=args.epochs, seed=args.seed), _cache_dir(args.cache_dir)
        )
        _annotate(base, preds)
        precompute_scores(base, tie_cfg)
        policies = TRAINED
    offline: dict[str, dict] = {}
    predsized: dict[str, dict] = {}
    if not args.true_law_only and args.offline_n:
        from hf_ext.generation.tie.bench import clone_requests, offline_static

        job = clone_requests(base[: args.offline_n])
        for kv in offline_kvs:
            ns = argparse.Namespace(offline_kv_tokens=int(kv))
            res = offline_static(
                ns, cm, job, tie_cfg, max_new_tokens=cap, batch_sizes=(), prefix=f"synthetic-cap{cap}_"
            )
            offline.update({case + seed_suffix(args.seed): r for case, r in res.items()})
            chunked, sized = offline_chunked(cm, job, tie_cfg, int(kv), cap, f"synthetic-cap{cap}_")
            offline.update({case + seed_suffix(args.seed): r for case, r in chunked.items()})
            predsized.update({case + seed_suffix(args.seed): r for case, r in sized.items()})
    true_base = with_true_distribution(base, tie_cfg)
    out: dict[str, dict] = {}
    rng = np.random.default_rng(args.seed + 502)
    gaps = rng.exponential(1.0, args.n)  # unit-rate Poisson gaps, scaled per load (same draws at every load)
    if export:
        from hf_ext.generation.tie.bench import export_replay

        for r, a in zip(base, np.cumsum(gaps)):
            r.arrival = float(a)
        export_replay(export, base, workload=f"synthetic-cap{cap}-poisson", source=REPLAY_SOURCE)
    for kv in kvs:
        sat = simulate_policies(cm, base, tie_cfg, args.max_num_seqs, int(kv), speed=0, policies=["fcfs"])
        capacity = saturated_rate(sat["fcfs"].latency)
        for load in loads:
            rate = load * capacity
            arr = np.cumsum(gaps) / rate
            for reqs in (base, true_base):
                for r, a in zip(reqs, arr):
                    r.arrival = float(a)
            sims = simulate_policies(cm, base, tie_cfg, args.max_num_seqs, int(kv), policies=policies)
            truth = simulate_policies(
                cm, true_base, tie_cfg, args.max_num_seqs, int(kv), policies=TRUE_DIST_POLICIES
            )
            sims.update({name + TRUE_DIST: r for name, r in truth.items()})
            case = f"synthetic-cap{cap}_kv{int(kv) // 1000}k_load{load:g}" + seed_suffix(args.seed)
            res = {name: r.summary() for name, r in sims.items()}
            for s in res.values():
                s.update(rate_req_s=rate, capacity_req_s=capacity)
            if "tie" in sims and "ssjf" in sims:
                res["tie"]["gap_vs_ssjf"] = gap_by_request(base, sims["tie"], sims["ssjf"])
            out[case] = res
            f = res["fcfs"]["per_token_mean"]
            print(
                f"  {case} ({rate:.2f} req/s): "
                + ", ".join(
                    f"{k} {v['per_token_mean'] * 1e3:.1f}ms [{f / v['per_token_mean']:.2f}x]"
                    for k, v in res.items()
                )
            )
            if "gap_vs_ssjf" in res.get("tie", {}):
                print(
                    "    TIE - SSJF per-token gap (ms) by predicted spread: "
                    + "; ".join(
                        f"{lab} ({g['n']:.0f}) {g['contribution'] * 1e3:+.1f}"
                        for lab, g in res["tie"]["gap_vs_ssjf"]["sigma"].items()
                    )
                )
    return out, offline, predsized


def gap_by_request(base: list[Any], tie: Any, ssjf: Any) -> dict[str, dict[str, dict[str, float]]]:
    """TIE's mean per-token latency gap to SSJF split by each request's predicted spread and by its output length
    (``hf_ext.generation.tie.replay.split_gap``; per group ``n`` and ``contribution`` in seconds, adding up to the
    gap): which requests TIE's score costs."""
    from hf_ext.generation.tie.replay import split_gap_by_bins

    def by_id(r: Any) -> np.ndarray:  # simulator results are per state; index them by request id
        a = np.empty(len(base))
        a[np.asarray(r.cols["id"], dtype=np.int64)] = r.per_token_latency
        return a

    return split_gap_by_bins(
        by_id(tie), by_id(ssjf), [r.meta["pred_sigma"] for r in base], [r.output_len for r in base]
    )


CHUNKS = (128, 256)  # new tokens per pass of the chunked what-if


def offline_chunked(
    cm: Any, job: list[Any], tie_cfg: Any, kv: int, cap: int, prefix: str
) -> tuple[dict[str, dict], dict[str, dict]]:
    """What-if for the offline job: would sizing static batches from predicted lengths reach 1.4x FCFS, and how much
    of that would be the prediction's? (``hf_ext.generation.tie.offline.simulate_chunked_batches``: batches stop
    after their horizon and carry unfinished rows, re-prefilled, into later passes; no such engine is built.)

    Returns (1) case -> policy -> summary for every order with the same prediction-free chunks of ``CHUNKS`` new
    tokens (cases ``…offline_chunk{C}_{n}_kv{K}k``: the engine is the same for every policy, so these become rows);
    (2) batches sized from predictions (JSON and printout only: each policy has its own engine there): TIE reserving
    the median of its law conditioned on what a row has generated, SSJF twice the larger of its prediction and what
    a row has generated, against the plain job (every row provisioned for ``cap``) and fixed 256-token chunks."""
    from hf_ext.generation.tie.bench import request_laws
    from hf_ext.generation.tie.distribution import LogT
    from hf_ext.generation.tie.offline import (
        OFFLINE_POLICIES,
        policy_order,
        simulate_chunked_batches,
    )

    plen = [r.prompt_len for r in job]
    out = [r.output_len for r in job]
    orders = {p: policy_order(p, job, tie_cfg) for p in OFFLINE_POLICIES}
    n = len(job)

    def run(order: list[int], reserve: Any) -> dict[str, float]:
        return simulate_chunked_batches(cm, plen, out, order, kv, reserve).summary()

    def chunk(c: int) -> Any:
        return lambda i, g: min(c, cap - g)

    def chunk_case(c: int) -> str:
        return f"{prefix}offline_chunk{c}_{n}_kv{kv // 1000}k"

    rows = {chunk_case(c): {p: run(o, chunk(c)) for p, o in orders.items()} for c in CHUNKS}
    law = LogT(**request_laws(job, tie_cfg.nu))
    pred = np.asarray([r.meta["pred_len"] for r in job], dtype=np.float64)
    start = law.ppf(np.full(n, 0.5))

    def tie_median(i: int, g: int) -> int:  # median of X | X > g under the predicted law
        if g == 0:
            x = float(start[i])
        else:
            sub = LogT(law.mu[i], law.sigma[i], law.nu[i])
            lo = float(sub.cdf(float(g)))
            x = float(sub.ppf(min(lo + 0.5 * (1.0 - lo), 1.0 - 1e-12)))
        return int(max(1, min(cap - g, math.ceil(x - g))))

    def ssjf_double(i: int, g: int) -> int:
        return int(max(1, min(cap - g, math.ceil(2.0 * max(pred[i], g) - g))))

    sized = {
        f"{prefix}offline_predsized_{n}_kv{kv // 1000}k": {
            "fcfs_full": run(orders["fcfs"], lambda i, g: cap - g),
            "tie_full": run(orders["tie"], lambda i, g: cap - g),
            "fcfs_chunk256": rows[chunk_case(256)]["fcfs"],
            "tie_chunk256": rows[chunk_case(256)]["tie"],
            "ssjf_2x_pred": run(orders["ssjf"], ssjf_double),
            "tie_cond_median": run(orders["tie"], tie_median),
        }
    }
    for case, res in {**rows, **sized}.items():
        ref = res["fcfs"] if "fcfs" in res else res["fcfs_full"]
        print(
            f"  {case}: tokens/s vs {'FCFS' if 'fcfs' in res else 'FCFS, every row provisioned for the cap'} "
            + ", ".join(
                f"{k} {v['throughput_tok_s'] / ref['throughput_tok_s']:.2f}x"
                for k, v in res.items()
                if v is not ref
            )
        )
    return rows, sized


def chunked_figure(predsized: dict[str, dict], png: Path) -> None:
    """Offline tokens/s of the chunked what-if per job, relative to FCFS with every row provisioned for the cap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted(predsized)
    if not cases:
        return
    pols = list(predsized[cases[0]])
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(cases) + 3), 4.2))
    width = 0.8 / len(pols)
    for j, pol in enumerate(pols):
        xs = [i + (j - (len(pols) - 1) / 2) * width for i in range(len(cases))]
        ys = [
            predsized[c][pol]["throughput_tok_s"] / predsized[c]["fcfs_full"]["throughput_tok_s"]
            for c in cases
        ]
        ax.bar(xs, ys, width, label=pol)
    ax.axhline(1.4, color="k", ls=":", lw=1, label="1.4x target")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c.replace("_offline_predsized_", "\n") for c in cases], fontsize=8)
    ax.set_ylabel("tokens/s vs FCFS, rows provisioned for the cap")
    ax.set_title(
        "Offline job as chunked static batches (simulator what-if; no such engine is built)", fontsize=10
    )
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def figure(results: dict[str, dict], png: Path) -> None:
    """Mean (top) and p99 (bottom) per-token latency vs load, one column per (cap, KV pool)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[float, dict]]] = {}
    for case, res in results.items():
        head, load = case.rsplit("_seed", 1)[0].rsplit("_load", 1)
        groups.setdefault(head, []).append((float(load), res))
    fig, axes = plt.subplots(2, len(groups), figsize=(4.4 * len(groups), 7.2), squeeze=False)
    for col, (head, pts) in enumerate(sorted(groups.items())):
        pts.sort(key=lambda t: t[0])
        for row, (key, label) in enumerate((("per_token_mean", "mean"), ("per_token_p99", "p99"))):
            ax = axes[row][col]
            for pol in PLOT_POLICIES:
                if pol in pts[0][1]:
                    ax.plot(
                        [x for x, _ in pts],
                        [r[pol][key] * 1e3 for _, r in pts],
                        "--" if pol.endswith("_true_dist") else "-",
                        marker="o",
                        ms=3,
                        label=pol,
                    )
            ax.set_yscale("log")
            ax.set_xlabel("load (fraction of the saturated rate)")
            ax.set_ylabel(f"{label} per-token latency (ms)")
            ax.set_title(head, fontsize=9)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("TIE in long-cap, memory-bound regimes (simulator; dashed: fed the true length law)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def summary_table(results: dict[str, dict]) -> None:
    """Mean per-token latency per case (ms) and TIE's ratio to each baseline (> 1: TIE better), as a rich table."""
    from rich.console import Console
    from rich.table import Table

    t = Table(
        title="mean per-token latency, ms (ratio: baseline / TIE, > 1 = TIE better); last two: mean end-to-end latency"
    )
    for c in (
        "case",
        "req/s",
        "FCFS",
        "SSJF",
        "LTR",
        "TIE",
        "vs FCFS",
        "vs SSJF",
        "vs LTR",
        "true law: vs SSJF",
        "latency: vs SSJF",
        "vs LTR ",
    ):
        t.add_column(c, justify="left" if c == "case" else "right")
    for case, r in results.items():
        ms = {k: v["per_token_mean"] * 1e3 for k, v in r.items()}
        trained = [f"{ms[k]:.1f}" if k in ms else "-" for k in ("ssjf", "ltr", "tie")]
        ratios = [f"{ms[b] / ms['tie']:.2f}x" if "tie" in ms else "-" for b in ("fcfs", "ssjf", "ltr")]
        true = f"{ms['ssjf_true_dist'] / ms['tie_true_dist']:.2f}x"
        lat = [
            f"{r[b]['latency_mean'] / r['tie']['latency_mean']:.2f}x" if "tie" in r else "-"
            for b in ("ssjf", "ltr")
        ]
        t.add_row(case, f"{r['fcfs']['rate_req_s']:.1f}", f"{ms['fcfs']:.1f}", *trained, *ratios, true, *lat)
    Console(width=160).print(t)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    cap_values = _floats(args.caps, "caps", lo=1)
    if any(c != int(c) for c in cap_values):
        raise SystemExit(f"--caps must be whole numbers of tokens, got {args.caps!r}")
    caps = [int(c) for c in cap_values]
    kvs = _floats(args.kv_tokens, "kv-tokens", lo=1000)
    loads = _floats(args.loads, "loads")
    offline_kvs = _floats(args.offline_kv_tokens, "offline-kv-tokens", lo=1000)
    for name in ("n", "n_train", "epochs", "max_num_seqs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.offline_n <= args.n:
        raise SystemExit(f"--offline-n must be in [0, --n={args.n}], got {args.offline_n}")
    if args.export_replay and args.true_law_only:
        raise SystemExit("--export-replay needs the trained predictions; drop --true-law-only")
    import torch

    from hf_ext.generation.tie.bench import COMPONENT, load_cost_model
    from hf_ext.utils.bench import append_rows, results_dir, run_command

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    cm = load_cost_model(None)
    print(f"cost model {cm.name}")
    results: dict[str, dict] = {}
    offline: dict[str, dict] = {}
    predsized: dict[str, dict] = {}
    for cap in caps:
        online, off, sized = run_cap(
            args, cap, cm, kvs, loads, args.export_replay if cap == max(caps) else None, offline_kvs
        )
        results.update(online)
        offline.update(off)
        predsized.update(sized)
    print(f"done in {time.perf_counter() - t0:.0f}s")
    summary_table(results)
    if args.no_write:
        return 0
    from hf_ext.generation.tie.bench import LATENCY_METRICS, latency_rows, static_rows

    def quality(res: dict[str, dict]) -> tuple[str, str]:
        # the perfect-predictor comparison the regime question is about, kept beside every row
        tie, ssjf = res["tie_true_dist"]["per_token_mean"], res["ssjf_true_dist"]["per_token_mean"]
        return "true_law_ssjf_over_tie_mean", f"{ssjf / tie:.3f}"

    cmd = run_command()
    trained = {c: r for c, r in results.items() if "tie" in r}
    # mean end-to-end latency too: what the score's expectation term orders for (per-token latency weighs short
    # requests far more)
    rows = latency_rows(
        trained, f"sim:{cm.name}", cmd, quality, (*LATENCY_METRICS, ("latency_mean", "latency_mean"))
    )
    rows += static_rows(offline, f"sim:{cm.name}", f"sim:{cm.name}", cmd)
    if rows:
        append_rows(COMPONENT, rows)
    rdir = results_dir()
    stem = rdir / f"tie_regime{seed_suffix(args.seed)}"
    figure(results, stem.with_suffix(".png"))
    keep = (
        "per_token_mean",
        "per_token_p99",
        "ttft_mean",
        "latency_mean",
        "latency_p99",
        "preemptions",
        "rate_req_s",
    )
    slim = {c: {p: {k: s[k] for k in keep} for p, s in r.items()} for c, r in results.items()}
    for c, r in results.items():  # which requests TIE's gap to SSJF sits in (trained policies only)
        if "gap_vs_ssjf" in r.get("tie", {}):
            slim[c]["tie"]["gap_vs_ssjf"] = r["tie"]["gap_vs_ssjf"]
    off = {
        c: {p: {k: s[k] for k in ("throughput_tok_s", "padding_share")} for p, s in r.items()}
        for c, r in offline.items()
    }
    chunked_figure(predsized, rdir / f"tie_regime_chunked{seed_suffix(args.seed)}.png")
    stem.with_suffix(".json").write_text(
        json.dumps({"command": cmd, "cases": slim, "offline": off, "offline_predsized": predsized}, indent=1)
    )
    print(f"wrote {len(rows)} rows, {stem}.png, {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
