"""Training TIE's predictor on a served length log, where clients' ``max_tokens`` cut long answers (CPU).

A :class:`~hf_ext.generation.tie.lengthlog.LengthLog` records what a server saw: a request stopped at its
``max_tokens`` only says "at least that long". This benchmark asks what that costs and what
``LengthPredictor.fit(..., censored_column="censored")`` gets back:

1. **A served log.** The synthetic text workload (the bench's training prompts, ``--n-train`` of them, true lengths
   capped at 1,000) is "served" under a client-cap mix (``--caps``: one scenario per ``;``-separated list, each
   request's ``max_tokens`` drawn uniformly from it) and ``--cancel-rate`` of requests cancelled at a uniform point.
   The logged length is the true one cut there, flagged censored when it was cut. The caps are an assumption (no
   public trace has clients' ``max_tokens``), so several mixes are run.
2. **Predictors**, the bench's 2-layer encoder on each log: log-t with the cut rows censored (``tie_censored``),
   log-t taking every logged length as exact (``tie_as_exact``), SSJF's point regressor on the logged lengths
   (``ssjf_as_exact``) and on the uncut rows only (``ssjf_uncut_only``) — a point regressor cannot use a lower
   bound. Once: log-t trained on the true lengths (``tie_true_lengths``), the ceiling.
3. **Quality** on a validation set no benchmark uses (seed 4242): NLL (lengths at the 1,000 cap censored), CRPS in
   tokens, Spearman, and the censoring-aware calibration shares of :func:`~hf_ext.generation.tie.lengthlog.
   calibration` (a calibrated law has 5 % of requests above its 95th percentile).
4. **Scheduling**: the Azure replay (``benchmarks/data/tie_azure_replay_n40k.json``, its 2,000 requests, their
   texts in ``tie_azure_replay_prompts.json``) in the shared simulator at ``--loads`` times the trace's rate, with the
   bench's cost model and engine (256 running, 450k KV tokens), each predictor annotating the same requests.

Writes ``benchmarks/results/tie_served_log.csv`` / ``.png`` (or under ``$HF_EXT_RESULTS_DIR``) and rows in
``tie.csv`` (cases ``servedlog_caps<mix>_...``: TIE trained with censoring against FCFS and the better of the two
SSJF variants)::

    python benchmarks/tie_served_log.py                       # ~20 min on the 2-core CPU (trains 13 predictors)
    python benchmarks/tie_served_log.py --quick --no-write    # smoke: tiny predictors, a few seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DATA = _ROOT / "benchmarks" / "data"
REPLAY = DATA / "tie_azure_replay_n40k.json"
PROMPTS = DATA / "tie_azure_replay_prompts.json"
MAX_NEW_TOKENS = 1000
VARIANTS = ("tie_censored", "tie_as_exact", "ssjf_as_exact", "ssjf_uncut_only")
COLUMNS = [
    "scenario",
    "predictor",
    "censored_share",
    "nll",
    "crps_tokens",
    "spearman",
    "above_q0.9",
    "below_q0.9",
    "fit_s",
    "load",
    "per_token_mean_ms",
    "per_token_p99_ms",
    "ttft_mean_s",
    "commit",
    "command",
]


def parse_caps(text: str) -> list[tuple[int, ...]]:
    """``"1000;256,512,1000"`` -> ``[(1000,), (256, 512, 1000)]`` (``SystemExit`` naming ``--caps`` otherwise)."""
    out = []
    for part in text.split(";"):
        try:
            caps = tuple(int(c) for c in part.split(",") if c.strip())
        except ValueError:
            caps = ()
        if not caps or any(c < 1 or c > MAX_NEW_TOKENS for c in caps):
            raise SystemExit(
                f"--caps: each mix is comma-separated ints in [1, {MAX_NEW_TOKENS}], got {part!r}"
            )
        out.append(caps)
    return out


def served_log(
    rows: list[dict[str, Any]], caps: tuple[int, ...], cancel_rate: float, seed: int
) -> dict[str, list]:
    """What a server's length log holds for ``rows`` (true ``output_len``): each request cut at a client cap drawn
    from ``caps``, or cancelled with probability ``cancel_rate`` at a uniform point of its length; ``censored`` when
    cut (lengths at the workload's own cap count as cut, as generation stopped there)."""
    rng = np.random.default_rng(seed)
    true = np.asarray([r["output_len"] for r in rows])
    cap = rng.choice(np.asarray(caps), size=len(rows))
    out = np.minimum(true, cap)
    cens = (true >= cap) | (true >= MAX_NEW_TOKENS)
    cancel = rng.random(len(rows)) < cancel_rate
    stop = np.maximum(1, np.floor(rng.random(len(rows)) * out)).astype(int)
    cut = cancel & (stop < out)
    out = np.where(cut, stop, out)
    cens = cens | cut
    return {"prompt": [r["prompt"] for r in rows], "output_len": out.tolist(), "censored": cens.tolist()}


def fit(kind: str, data: dict[str, list], censored: bool, args: argparse.Namespace) -> tuple[Any, float]:
    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.predictor import LengthPredictor

    cfg = (
        PredictorConfig.tiny(kind=kind, epochs=1, seed=args.seed)
        if args.quick
        else PredictorConfig(kind=kind, epochs=args.epochs, seed=args.seed)
    )
    pred = LengthPredictor(cfg)
    t0 = time.perf_counter()
    pred.fit(data, censored_column="censored" if censored else None)
    return pred, time.perf_counter() - t0


def quality(pred: Any, val: dict[str, list]) -> dict[str, float]:
    """Validation scores; lengths at the workload cap are censored in the NLL and the calibration shares."""
    from hf_ext.generation.tie.lengthlog import law_calibration

    ev = pred.evaluate(val, max_new_tokens=MAX_NEW_TOKENS, censored_column="censored")
    q = {"spearman": ev["spearman"], "crps_tokens": ev.get("crps_tokens", math.nan)}
    if pred.kind == "logt":
        p = pred.predict(val["prompt"])
        cal = law_calibration(val["output_len"], val["censored"], p["mu"], p["sigma"], p["nu"], levels=(0.9,))
        q.update(nll=ev["nll_censored"], **{k: cal[k] for k in ("above_q0.9", "below_q0.9")})
    return q


def replay_requests(n: int) -> list[Any]:
    from hf_ext.simulate import Request

    reqs = json.loads(REPLAY.read_text())["requests"][:n]
    texts = json.loads(PROMPTS.read_text())["prompts"][:n]
    return [
        Request(
            id=i,
            arrival=float(r["arrival"]),
            prompt_len=int(r["prompt_len"]),
            output_len=int(r["output_len"]),
            prompt=t,
            max_new_tokens=MAX_NEW_TOKENS,
            meta={},
        )
        for i, (r, t) in enumerate(zip(reqs, texts))
    ]


def schedule(
    base: list[Any], preds: dict[str, Any], loads: list[float], args: argparse.Namespace
) -> dict[float, dict[str, dict]]:
    """load -> policy label -> simulator summary; FCFS and SJF-oracle once, SSJF / TIE once per predictor."""
    from hf_ext.generation.tie.bench import clone_requests, load_cost_model, simulate_policies
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.scheduler import annotate_requests, precompute_scores

    cm = load_cost_model(args.calibration)
    tie_cfg = TIEConfig(max_new_tokens=MAX_NEW_TOKENS)
    annotated = {}
    for label, pred in preds.items():
        reqs = clone_requests(base)
        annotate_requests(reqs, pred)
        precompute_scores(reqs, tie_cfg)
        annotated[label] = reqs
    out: dict[float, dict[str, dict]] = {}
    for load in loads:
        res = {}
        sims = simulate_policies(cm, base, tie_cfg, 256, 450_000, speed=load, policies=("fcfs", "sjf_oracle"))
        res.update({k: v.summary() for k, v in sims.items()})
        for label, reqs in annotated.items():
            policy = "tie" if label.startswith("tie") else "ssjf"
            res[label] = simulate_policies(cm, reqs, tie_cfg, 256, 450_000, speed=load, policies=(policy,))[
                policy
            ].summary()
        out[load] = res
    return out


def plot(qrows: list[dict], srows: list[dict], scenarios: list[str], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    x = np.arange(len(scenarios))
    w = 0.2
    for i, (v, key) in enumerate((("tie_censored", "nll"), ("tie_as_exact", "nll"))):
        axes[0].bar(x + (i - 0.5) * w, [_get(qrows, s, v, key) for s in scenarios], w, label=v)
    ceiling = [r["nll"] for r in qrows if r["predictor"] == "tie_true_lengths"]
    if ceiling:
        axes[0].axhline(ceiling[0], color="g", ls="--", label="trained on true lengths")
    axes[0].set_title("validation NLL (nats, log length; lower is better)")
    nlls = [r["nll"] for r in qrows if isinstance(r.get("nll"), float) and math.isfinite(r["nll"])]
    axes[0].set_ylim(1.0, 1.05 * max(nlls))
    for i, v in enumerate(("tie_censored", "tie_as_exact")):
        axes[1].bar(x + (i - 0.5) * w, [_get(qrows, s, v, "above_q0.9") for s in scenarios], w, label=v)
    axes[1].axhline(0.05, color="k", ls=":", label="calibrated (5 %)")
    axes[1].set_title("share above the predicted 95th percentile")
    loads = sorted({r["load"] for r in srows})
    top = max(loads)
    labels = ("tie_censored", "tie_as_exact", "ssjf_as_exact", "ssjf_uncut_only")
    for i, v in enumerate(labels):
        vals = [_lat(srows, s, v, top) / _lat(srows, s, "fcfs", top) for s in scenarios]
        axes[2].bar(x + (i - 1.5) * w, vals, w, label=v)
    axes[2].set_title(f"Azure replay x{top:g}: mean per-token latency / FCFS")
    axes[2].set_ylim(0, 0.9)
    for ax in axes:
        ax.set_xticks(x, scenarios, fontsize=8)
        ax.set_xlabel("client max_tokens mix")
        ax.legend(fontsize=7)
    fig.suptitle("TIE's predictor trained on a served length log (cut rows censored vs taken as exact)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _get(rows: list[dict], scenario: str, predictor: str, key: str) -> float:
    for r in rows:
        if r["scenario"] == scenario and r["predictor"] == predictor:
            return float(r[key])
    return math.nan


def _lat(rows: list[dict], scenario: str, predictor: str, load: float) -> float:
    for r in rows:
        if r["scenario"] in (scenario, "all") and r["predictor"] == predictor and r["load"] == load:
            return float(r["per_token_mean_ms"])
    return math.nan


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--caps", default="1000;256,512,1000;128,256,512", help="client max_tokens mixes, ';'-separated"
    )
    p.add_argument("--cancel-rate", type=float, default=0.02, help="share of requests the client cancels")
    p.add_argument("--n-train", type=int, default=12000, help="served requests per log (training pairs)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--val-n", type=int, default=3000)
    p.add_argument("--n-replay", type=int, default=2000, help="Azure replay requests to schedule")
    p.add_argument("--loads", default="4,5,6,8", help="time compression of the replay's arrivals")
    p.add_argument("--calibration", default=None, help="cost model (default: the bench's)")
    p.add_argument("--quick", action="store_true", help="tiny predictors and sizes (smoke)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the CSV")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the client caps, cancellations and predictor training (not 0: files and cases get _seedN)",
    )
    args = p.parse_args(argv)
    tag = f"_seed{args.seed}" if args.seed else ""
    from hf_ext.utils.bench import results_dir

    stem = results_dir() / f"tie_served_log{tag}"
    if args.replot:
        with stem.with_suffix(".csv").open(newline="") as f:
            got = list(csv.DictReader(f))
        num = [c for c in COLUMNS if c not in ("scenario", "predictor", "commit", "command")]
        for r in got:
            r.update({c: float(r[c]) if r[c] not in ("", None) else math.nan for c in num})
        qrows = [r for r in got if r["load"] != r["load"]]  # quality rows have no load
        srows = [r for r in got if r["load"] == r["load"]]
        plot(
            qrows,
            srows,
            [r["scenario"] for r in qrows if r["predictor"] == "tie_censored"],
            stem.with_suffix(".png"),
        )
        return 0
    mixes = parse_caps(args.caps)
    if not 0.0 <= args.cancel_rate < 1.0:
        raise SystemExit(f"--cancel-rate must be in [0, 1), got {args.cancel_rate}")
    if args.quick:
        args.n_train, args.val_n, args.n_replay = 400, 300, 200
    loads = [float(x) for x in args.loads.split(",")]
    from tqdm.auto import tqdm

    from hf_ext.generation.tie.data import generate_workload
    from hf_ext.utils.bench import Row, append_rows, git_commit

    torch.set_num_threads(2)
    train_rows = generate_workload(args.n_train, seed=100, max_new_tokens=MAX_NEW_TOKENS)  # the bench's seed
    val_rows = generate_workload(args.val_n, seed=4242, max_new_tokens=MAX_NEW_TOKENS)
    val = {
        "prompt": [r["prompt"] for r in val_rows],
        "output_len": [r["output_len"] for r in val_rows],
        "censored": [r["output_len"] >= MAX_NEW_TOKENS for r in val_rows],
    }
    base = replay_requests(args.n_replay)
    scenarios = ["caps" + "-".join(str(c) for c in caps) for caps in mixes]
    qrows: list[dict] = []
    srows: list[dict] = []
    jobs = [(s, caps, v) for s, caps in zip(scenarios, mixes) for v in VARIANTS]
    true_log = served_log(train_rows, (MAX_NEW_TOKENS,), 0.0, seed=0)
    preds_by_scenario: dict[str, dict[str, Any]] = {s: {} for s in scenarios}
    bar = tqdm(total=len(jobs) + 1, desc="training predictors")
    pred, fit_s = fit("logt", true_log, True, args)
    bar.update()
    qrows.append(
        {
            "scenario": "true",
            "predictor": "tie_true_lengths",
            "censored_share": 0.0,
            "fit_s": fit_s,
            **quality(pred, val),
        }
    )
    logs = {
        s: served_log(train_rows, caps, args.cancel_rate, seed=1 + args.seed)
        for s, caps in zip(scenarios, mixes)
    }
    for s, _, variant in jobs:
        log = logs[s]
        share = float(np.mean(log["censored"]))
        if variant == "ssjf_uncut_only":
            keep = [i for i, c in enumerate(log["censored"]) if not c]
            log = {k: [v[i] for i in keep] for k, v in log.items()}
        kind = "logt" if variant.startswith("tie") else "point"
        pred, fit_s = fit(kind, log, variant == "tie_censored", args)
        qrows.append(
            {
                "scenario": s,
                "predictor": variant,
                "censored_share": share,
                "fit_s": fit_s,
                **quality(pred, val),
            }
        )
        preds_by_scenario[s][variant] = pred
        bar.update()
    bar.close()
    for s in tqdm(scenarios, desc="scheduling the replay"):
        res = schedule(base, preds_by_scenario[s], loads, args)
        for load, by in res.items():
            for label, summ in by.items():
                if label not in VARIANTS and s != scenarios[0]:
                    continue  # FCFS and SJF-oracle do not depend on the predictors: one row per load
                srows.append(
                    {
                        "scenario": s if label in VARIANTS else "all",
                        "predictor": label,
                        "load": load,
                        "per_token_mean_ms": summ["per_token_mean"] * 1e3,
                        "per_token_p99_ms": summ["per_token_p99"] * 1e3,
                        "ttft_mean_s": summ["ttft_mean"],
                    }
                )
    cmd = "python benchmarks/tie_served_log.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(
        f"\n{'scenario':<18} {'predictor':<18} {'cut':>5} {'NLL':>7} {'CRPS tok':>9} {'Spearman':>9} {'>q95':>6}"
    )
    for r in qrows:
        print(
            f"{r['scenario']:<18} {r['predictor']:<18} {r['censored_share']:5.2f} {r.get('nll', math.nan):7.3f} "
            f"{r['crps_tokens']:9.1f} {r['spearman']:9.3f} {r.get('above_q0.9', math.nan):6.3f}"
        )
    rows = []
    for s in scenarios:
        for load in loads:
            lat = {v: _lat(srows, s, v, load) for v in (*VARIANTS, "fcfs", "sjf_oracle")}
            print(f"{s} x{load:g}: " + ", ".join(f"{k} {v:.1f}" for k, v in lat.items()) + " ms/token")
            ssjf = min(("ssjf_as_exact", "ssjf_uncut_only"), key=lambda v: lat[v])
            case = f"servedlog_{s}_cancel{args.cancel_rate:g}_n{args.n_train}_azure-replay{args.n_replay}_x{load:g}{tag}"
            qv = f"{_get(qrows, s, 'tie_censored', 'nll'):.3f}/{_get(qrows, s, 'tie_as_exact', 'nll'):.3f}"
            for b, v in (("fcfs", "fcfs"), ("ssjf", ssjf), ("sjf_oracle", "sjf_oracle")):
                rows.append(
                    Row.make(
                        "tie",
                        case,
                        "per_token_latency_mean",
                        lat["tie_censored"] / 1e3,
                        b,
                        lat[v] / 1e3,
                        device="sim:" + (args.calibration or "default"),
                        quality_name="predictor_nll_censored_vs_as_exact"
                        + (f";ssjf={v}" if b == "ssjf" else ""),
                        quality_value=qv,
                        command=cmd.strip(),
                    )
                )
    print("\nTIE trained with censoring: mean per-token latency ratio (> 1: TIE better)")
    for r in rows:
        print(f"  {r.case:<70} vs {r.baseline:<10} {r.ratio:6.3f}  {r.quality_name.partition(';')[2]}")
    if args.no_write:
        return 0
    commit = git_commit()
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in qrows + srows:
            w.writerow({**r, "commit": commit, "command": cmd.strip()})
    plot(qrows, srows, scenarios, stem.with_suffix(".png"))
    append_rows("tie", rows)
    print(f"wrote {stem.with_suffix('.csv')}, {stem.with_suffix('.png')} and rows in tie.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
