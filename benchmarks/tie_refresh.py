"""A stale TIE predictor after a model update, and PredictorRefresher retraining it from the served log (CPU).

The served model changes: the new version reasons at more length on technical prompts and chats less (``DRIFT``:
code x3, explanations x2.5, arithmetic x2, essays and stories x0.7, chat x0.5 in median length; an assumption, no
public trace records a model update). The length predictor was trained on the old version. This benchmark asks
what that costs TIE and how much :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` wins back by
retraining on the server's own length log while serving.

1. **Stream.** ``--n`` requests of the synthetic text workload (seed 7) with the new model's lengths (cap 1,000),
   at the arrival times and prompt lengths of the Azure 2023 conversation trace's first ``--n`` requests
   (``../shared/data``; without it, the committed 2,000-request replay ``benchmarks/data/tie_azure_replay_n40k.json``),
   compressed ``--loads`` times, in the shared simulator with the bench's cost model and engine (256 running, 450k
   KV tokens).
2. **Predictors** (the bench's 2-layer encoder, ``--n-train`` pairs): ``stale`` (log-t on the old model's lengths),
   ``ssjf_stale`` (SSJF's point regressor, same data), ``oracle`` (log-t on the new model's lengths: retrained
   offline before the update).
3. **Refresh.** The server starts with ``stale``; a :class:`LengthLog` gets each request when it finishes (the
   simulator's finish order) and after every ``--every`` requests ``PredictorRefresher.refit()`` fine-tunes the
   served predictor on the log (real code, its defaults: newest 20 % held out, installed only if its NLL there beats
   the served predictor's; trained in its worker process with 2 threads). A new version
   scores the requests arriving after the ``every``-th finish plus the refit's measured CPU training time (this
   2-core machine). Each refit's finish order comes from a simulation with the versions installed so far.
4. **Report.** Mean / p99 per-token latency and TTFT per load for FCFS, SSJF (stale), SJF-oracle, TIE with the
   stale predictor, with the refresher, and with the oracle predictor; the served laws' NLL per 200 requests.

Writes ``benchmarks/results/tie_refresh.csv`` / ``.png`` (or under ``$HF_EXT_RESULTS_DIR``) and rows in ``tie.csv``
(cases ``refresh_drift_...``)::

    python benchmarks/tie_refresh.py                   # ~10 min on the 2-core CPU
    python benchmarks/tie_refresh.py --quick --no-write  # smoke: tiny predictors, a few seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPLAY = _ROOT / "benchmarks" / "data" / "tie_azure_replay_n40k.json"
MAX_NEW_TOKENS = 1000
#: median-length factors of the new model version, by task (the others unchanged)
DRIFT = {"code": 3.0, "explain": 2.5, "arithmetic": 2.0, "essay": 0.7, "story": 0.7, "chat": 0.5}
POLICIES = ("fcfs", "ssjf_stale", "sjf_oracle", "tie_stale", "tie_refresh", "tie_oracle")
COLUMNS = [
    "load",
    "policy",
    "per_token_mean_ms",
    "per_token_p99_ms",
    "ttft_mean_s",
    "refits",
    "installed",
    "switch_times_s",
    "commit",
    "command",
]


def new_model_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Workload rows whose lengths are drawn from the new model's law (``mu + log DRIFT[task]``)."""
    from hf_ext.generation.tie.data import generate_workload

    rows = generate_workload(n, seed=seed, max_new_tokens=MAX_NEW_TOKENS)
    rng = np.random.default_rng(seed + 1)
    for r in rows:
        r["mu"] = r["mu"] + math.log(DRIFT.get(r["task"], 1.0))
        y = r["mu"] + r["sigma"] * rng.standard_t(r["nu"])
        r["output_len"] = int(min(MAX_NEW_TOKENS, max(1, round(math.exp(min(y, 50.0))))))
    return rows


def trace_times(n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Arrival times and prompt lengths of the first ``n`` Azure conversation-trace requests: the full trace
    (``../shared/data`` or ``$HF_EXT_AZURE_TRACE``), else the committed 2,000-request replay."""
    from hf_ext.generation.tie.data import load_azure_trace

    try:
        t = load_azure_trace(limit=n)
        return t["arrival"], t["prompt_len"], "azure2023conv"
    except FileNotFoundError:
        reqs = json.loads(REPLAY.read_text())["requests"][:n]
        if len(reqs) < n:
            raise SystemExit(
                f"--n {n}: the Azure trace is not here and the committed replay has {len(reqs)}"
            ) from None
        arr = np.asarray([r["arrival"] for r in reqs])
        return arr, np.asarray([r["prompt_len"] for r in reqs]), "azure-replay"


def stream(n: int) -> tuple[list[Any], str]:
    from hf_ext.simulate import Request

    arrival, prompt_len, source = trace_times(n)
    rows = new_model_rows(len(arrival), seed=7)
    reqs = [
        Request(
            id=i,
            arrival=float(a),
            prompt_len=int(pl),
            output_len=int(r["output_len"]),
            prompt=r["prompt"],
            max_new_tokens=MAX_NEW_TOKENS,
            meta={"true_mu": r["mu"], "true_sigma": r["sigma"], "true_nu": r["nu"]},
        )
        for i, (a, pl, r) in enumerate(zip(arrival, prompt_len, rows))
    ]
    return reqs, source


def fit(kind: str, rows: list[dict[str, Any]], args: argparse.Namespace) -> Any:
    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.predictor import LengthPredictor

    cfg = (
        PredictorConfig.tiny(kind=kind, epochs=2, seed=args.seed)
        if args.quick
        else PredictorConfig(kind=kind, epochs=args.epochs, seed=args.seed)
    )
    pred = LengthPredictor(cfg)
    pred.fit(
        {
            "prompt": [r["prompt"] for r in rows],
            "output_len": [r["output_len"] for r in rows],
            "censored": [r["output_len"] >= MAX_NEW_TOKENS for r in rows],
        },
        censored_column="censored" if kind == "logt" else None,
    )
    return pred


def annotated(base: list[Any], pred: Any, tie_cfg: Any) -> list[Any]:
    from hf_ext.generation.tie.bench import clone_requests
    from hf_ext.generation.tie.scheduler import annotate_requests, precompute_scores

    reqs = clone_requests(base)
    annotate_requests(reqs, pred)
    precompute_scores(reqs, tie_cfg)
    return reqs


def run(cm: Any, reqs: list[Any], policy: str, load: float, tie_cfg: Any) -> Any:
    from hf_ext.generation.tie.bench import simulate_policies

    return simulate_policies(cm, reqs, tie_cfg, 256, 450_000, speed=load, policies=(policy,))[policy]


def refresh_run(
    cm: Any, base: list[Any], stale: Any, load: float, tie_cfg: Any, args: argparse.Namespace
) -> tuple[Any, np.ndarray, list[dict], list[Any]]:
    """TIE served with ``stale`` and a refresher refitting every ``args.every`` finished requests.

    Returns the final simulation, each request's predictor version, the refit reports and the versions' laws
    (``[N]`` arrays per version)."""
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.refresh import PredictorRefresher

    n = len(base)
    arrival = np.asarray([r.arrival for r in base]) / load
    laws = [annotated(base, stale, tie_cfg)]
    version = np.zeros(n, dtype=int)
    log = LengthLog(max_records=None)
    state: dict[str, Any] = {}

    def running() -> list[dict]:
        """Requests generating at the refit (started, not finished), with tokens so far (linear in time)."""
        t, ft, fin = state["t"], state["first_token"], state["finish"]
        out = []
        for i in np.nonzero((ft <= t) & (fin > t))[0]:
            k = int(base[i].output_len * (t - ft[i]) / max(fin[i] - ft[i], 1e-9))
            if k >= 1:
                out.append(
                    {"prompt": base[i].prompt, "output_len": k, "prompt_tokens": int(base[i].prompt_len)}
                )
        return out

    ref = PredictorRefresher(
        log,
        stale,
        every=args.every,
        min_records=args.every,
        install=lambda p: None,
        threads=2,
        in_flight=running if args.in_flight else None,
        in_flight_held_out=args.in_flight_held_out,
    )
    reports: list[dict] = []
    fed = 0
    while True:
        reqs = [laws[v][i] for i, v in enumerate(version)]
        res = run(cm, reqs, "tie", load, tie_cfg)
        if fed + args.every > n:
            return res, version, reports, laws
        finish = np.empty(n)
        finish[res.cols["id"]] = res.cols["finish"]
        order = np.argsort(finish, kind="stable")
        for i in order[fed : fed + args.every]:
            r = base[i]
            log.add(
                prompt=r.prompt,
                output_len=int(r.output_len),
                reason="eos" if r.output_len < MAX_NEW_TOKENS else "max_new_tokens",
                max_new_tokens=MAX_NEW_TOKENS,
                prompt_tokens=int(r.prompt_len),
                request_id=str(r.id),
            )
        fed += args.every
        t_done = float(finish[order[fed - 1]])
        first = np.empty(n)
        first[res.cols["id"]] = res.cols["first_token"]
        state.update(t=t_done, first_token=first, finish=finish)
        rep = ref.refit()
        rep["in_flight_rows"] = len(running()) if args.in_flight else 0
        rep["t_installed"] = t_done + rep["fit_s"]
        reports.append(rep)
        if rep["accepted"]:
            laws.append(annotated(base, ref.predictor, tie_cfg))
            version[arrival > rep["t_installed"]] = len(laws) - 1


def segment_nll(base: list[Any], reqs: list[Any], size: int) -> list[float]:
    """Censoring-aware NLL of the laws ``reqs`` were scored with, per ``size`` requests in arrival order."""
    from hf_ext.generation.tie.lengthlog import law_calibration

    out = []
    for s in range(0, len(base), size):
        part = reqs[s : s + size]
        x = [r.output_len for r in base[s : s + size]]
        cal = law_calibration(
            x,
            [v >= MAX_NEW_TOKENS for v in x],
            [r.meta["pred_mu"] for r in part],
            [r.meta["pred_sigma"] for r in part],
            [r.meta["pred_nu"] for r in part],
        )
        out.append(cal["nll"])
    return out


def plot(results: dict[float, dict[str, dict]], nll: dict[str, list[float]], size: int, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for name, vals in nll.items():
        axes[0].plot(np.arange(len(vals)) * size + size / 2, vals, marker="o", label=name)
    axes[0].set_xlabel("request (arrival order)")
    axes[0].set_ylabel("NLL of the served laws (nats, log length)")
    axes[0].set_title(f"served laws per {size} requests, top load")
    loads = sorted(results)
    x = np.arange(len(loads))
    shown = [p for p in POLICIES if p != "fcfs"]
    w = 0.8 / len(shown)
    for i, p in enumerate(shown):
        vals = [results[ld]["fcfs"]["per_token_mean"] / results[ld][p]["per_token_mean"] for ld in loads]
        axes[1].bar(x + (i - (len(shown) - 1) / 2) * w, vals, w, label=p)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_xticks(x, [f"x{ld:g}" for ld in loads])
    axes[1].set_ylabel("FCFS mean per-token latency / policy's (> 1: faster)")
    axes[1].set_title("after a model update: stale vs refreshed predictor")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("TIE with a stale predictor and with PredictorRefresher (simulator, Azure-replay arrivals)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=6000, help="requests in the stream (the trace's first n)")
    p.add_argument("--every", type=int, default=1000, help="refit after this many finished requests")
    p.add_argument(
        "--n-train", type=int, default=12000, help="training pairs of the stale and oracle predictors"
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--loads", default="4,6,8", help="time compression of the replay's arrivals")
    p.add_argument("--calibration", default=None, help="cost model (default: the bench's)")
    p.add_argument(
        "--seed", type=int, default=0, help="predictor training seed (not 0: files and cases get _seedN)"
    )
    p.add_argument(
        "--in-flight",
        action="store_true",
        help="refits also train on the requests still generating, as lower bounds (PredictorRefresher in_flight=)",
    )
    p.add_argument(
        "--in-flight-held-out",
        action="store_true",
        help="with --in-flight: hold out a share of the running requests and score refits on them too "
        "(PredictorRefresher in_flight_held_out=True; files and cases _inflight_held)",
    )
    p.add_argument("--quick", action="store_true", help="tiny predictors and sizes (smoke)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.every, args.n_train = 300, 100, 400
    if args.in_flight_held_out and not args.in_flight:
        raise SystemExit("--in-flight-held-out needs --in-flight")
    if not 1 <= args.every <= args.n // 2:
        raise SystemExit(f"--every must be in [1, n/2] so that a refit can happen, got {args.every}")
    loads = [float(x) for x in args.loads.split(",")]
    from tqdm.auto import tqdm

    from hf_ext.generation.tie.bench import load_cost_model, with_true_distribution
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.data import generate_workload
    from hf_ext.utils.bench import Row, append_rows, git_commit, results_dir

    torch.set_num_threads(2)
    tie_cfg = TIEConfig(max_new_tokens=MAX_NEW_TOKENS)
    cm = load_cost_model(args.calibration)
    base, source = stream(args.n)
    bar = tqdm(total=3 + len(loads), desc="predictors, then loads")
    old = generate_workload(args.n_train, seed=100, max_new_tokens=MAX_NEW_TOKENS)  # the old model's lengths
    stale, ssjf = fit("logt", old, args), fit("point", old, args)
    bar.update(2)
    oracle = fit("logt", new_model_rows(args.n_train, seed=101), args)
    bar.update()
    fixed = {
        "fcfs": (base, "fcfs"),
        "ssjf_stale": (annotated(base, ssjf, tie_cfg), "ssjf"),
        "sjf_oracle": (with_true_distribution(base, tie_cfg), "sjf_oracle"),
        "tie_stale": (annotated(base, stale, tie_cfg), "tie"),
        "tie_oracle": (annotated(base, oracle, tie_cfg), "tie"),
    }
    results: dict[float, dict[str, dict]] = {}
    refits: dict[float, list[dict]] = {}
    nll: dict[str, list[float]] = {}
    size = max(1, args.n // 10)
    for load in loads:
        res = {name: run(cm, reqs, pol, load, tie_cfg).summary() for name, (reqs, pol) in fixed.items()}
        final, version, reports, laws = refresh_run(cm, base, stale, load, tie_cfg, args)
        res["tie_refresh"] = final.summary()
        results[load], refits[load] = res, reports
        if load == max(loads):
            served = [laws[v][i] for i, v in enumerate(version)]
            nll = {
                "stale": segment_nll(base, fixed["tie_stale"][0], size),
                "refreshed": segment_nll(base, served, size),
                "oracle": segment_nll(base, fixed["tie_oracle"][0], size),
            }
        bar.update()
    bar.close()
    cmd = ("python benchmarks/tie_refresh.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    tag = (f"_seed{args.seed}" if args.seed else "") + (
        ("_inflight_held" if args.in_flight_held_out else "_inflight") if args.in_flight else ""
    )
    print(f"\n{'load':>5} " + " ".join(f"{p:>12}" for p in POLICIES) + "   (mean per-token latency, ms)")
    for load in loads:
        print(
            f"x{load:<4g} " + " ".join(f"{results[load][p]['per_token_mean'] * 1e3:12.1f}" for p in POLICIES)
        )
    for load in loads:
        for r in refits[load]:
            what = f"installed at t={r['t_installed']:.0f}s" if r["accepted"] else "kept"
            print(
                f"  x{load:g} refit at {r['count']} finished: NLL {r['nll_new']:.3f} new vs {r['nll_served']:.3f} "
                f"served on {r['n_held_out']} held out ({r['n_held_in_flight']} running), fit {r['fit_s']:.0f}s, "
                f"{what}"
            )
    print(
        "served laws' NLL per segment (top load): "
        + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vals) for k, vals in nll.items())
    )
    rows = []
    for load in loads:
        res = results[load]
        case = f"refresh_drift_{source}{args.n}_every{args.every}_x{load:g}{tag}"
        installed = sum(r["accepted"] for r in refits[load])
        for metric, key in (
            ("per_token_latency_mean", "per_token_mean"),
            ("per_token_latency_p99", "per_token_p99"),
        ):
            for b in ("fcfs", "ssjf_stale", "sjf_oracle", "tie_stale", "tie_oracle"):
                rows.append(
                    Row.make(
                        "tie",
                        case,
                        metric,
                        res["tie_refresh"][key],
                        {"ssjf_stale": "ssjf"}.get(b, b),
                        res[b][key],
                        device="sim:" + (args.calibration or "default"),
                        quality_name="refits_installed/run;ssjf=stale point predictor"
                        if b == "ssjf_stale"
                        else "refits_installed/run",
                        quality_value=f"{installed}/{len(refits[load])}",
                        command=cmd,
                    )
                )
    print("\nTIE with the refresher: ratio (> 1: refreshed TIE better)")
    for r in rows:
        if r.metric == "per_token_latency_mean":
            print(f"  {r.case:<48} vs {r.baseline:<11} {r.ratio:6.3f}")
    if args.no_write:
        return 0
    stem = results_dir() / f"tie_refresh{tag}"
    commit = git_commit()
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for load in loads:
            for pol in POLICIES:
                s = results[load][pol]
                extra = {}
                if pol == "tie_refresh":
                    extra = {
                        "refits": len(refits[load]),
                        "installed": sum(r["accepted"] for r in refits[load]),
                        "switch_times_s": " ".join(
                            f"{r['t_installed']:.1f}" for r in refits[load] if r["accepted"]
                        ),
                    }
                w.writerow(
                    {
                        "load": load,
                        "policy": pol,
                        "per_token_mean_ms": s["per_token_mean"] * 1e3,
                        "per_token_p99_ms": s["per_token_p99"] * 1e3,
                        "ttft_mean_s": s["ttft_mean"],
                        **extra,
                        "commit": commit,
                        "command": cmd,
                    }
                )
    plot(results, nll, size, stem.with_suffix(".png"))
    append_rows("tie", rows)
    print(f"wrote {stem.with_suffix('.csv')}, {stem.with_suffix('.png')} and rows in tie.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
