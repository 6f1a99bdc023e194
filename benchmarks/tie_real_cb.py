"""TIE on a real engine: Azure-trace replay into transformers continuous batching, five admission policies.

Not the simulator: every request goes through ``ContinuousBatchingManager`` of a random-weight model at its
(scaled) trace arrival time, with its trace output length forced (EOS disabled) and its trace prompt length
(random token ids: content does not matter to a random model; the *predictions* come from the synthetic
prompt texts matched to the trace lengths, exported by ``python -m hf_ext bench tie --export-replay``).

Load is set like the simulator's: ``--speeds`` compresses the trace's own arrival times (``x4`` = four
times its request rate); ``0`` means a burst (everything queued at once). Every policy of one speed replays
the same requests at the same times on the same warm model.

TIE runs first; each baseline's rows are appended as soon as it finishes, so a run cut short (``--budget-s`` or a
killed job) keeps every comparison it completed.

Run on the GPU machine (numbers go to ``$HF_EXT_RESULTS_DIR`` or ``benchmarks/results/tie.csv``)::

    PYTHONPATH=$PWD:$PWD/kernels python benchmarks/tie_real_cb.py --shape llama3.1-8b --n 150 --speeds 4 \
        --max-requests-per-batch 32 --cuda-graph --budget-s 480

``--static-batch B`` measures the offline job instead: the requests as ``generate`` calls on padded batches of
``B`` cut from each policy's order (lengths forced; whole-job tokens/s), e.g.
``--shape llama3.1-8b --n 160 --static-batch 32 --budget-s 480``; ``--static-kv-tokens K`` instead sizes each
batch from a KV budget of ``K`` tokens (its own padded prompts + ``--max-new-tokens`` per row). With
``--static-plan expected`` TIE's batches are planned from its predicted laws (prompt buckets + least expected
time) and compared with the baselines' memory cuts and their own plans. With ``--simulate`` (no model) the same
plans are priced by the simulator's ``generate`` cost model instead (``--calibration``), to say beforehand what a
GPU run should show.

``--simulate --sim-jitter S --sim-seeds K`` replays each speed ``K`` times in the simulator with every arrival shifted
by a normal draw of ``S`` seconds: how far one call's means can move on timing alone, and in what share of the
replays TIE beats each baseline.

Engine runs keep every request's submit / first-token / finish times in ``tie_real_cb_details.json`` and print how
much of each mean its five largest per-token latencies carry. ``--explain-gap`` (no model) reads them back and splits
TIE's gap to each other policy by the request's predicted spread and output length, for the cases the other options
name.

``--gpus N`` runs the policies side by side, one process per GPU of this host (policy ``k`` on GPU ``k mod N``, a
GPU's policies in turn), in about ``1/N`` of the time. Each process builds and warms its own model; the parent
gathers their runs and writes the rows as one call would, each as soon as both its runs have finished (a call
killed mid-way keeps them; on SIGTERM it stops the workers and writes what finished). The rows then compare runs
on identical cards of one host, not on one card: the details name each run's GPU, and the command in each row
carries the flag.

CPU smoke run (tiny model, seconds)::

    python benchmarks/tie_real_cb.py --shape tiny --device cpu --n 12 --speeds 1,0 --no-write
"""

from __future__ import annotations

import argparse
import contextlib
import gc as gc_mod
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# exported before commit d8e3990: its ``mu`` column is the point predictor's (TIE scored a mixed law); kept only to
# rerun the rows that ran without --workload before 2026-11-27, which carry no replay tag in their case names
LEGACY_WORKLOAD = ROOT / "benchmarks" / "data" / "tie_azure_replay.json"
DEFAULT_WORKLOAD = ROOT / "benchmarks" / "data" / "tie_azure_replay_n40k.json"


def _parser() -> argparse.ArgumentParser:
    from hf_ext.generation.tie.config import ABLATION_SETTINGS  # dataclasses only: no torch at --help

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default=str(DEFAULT_WORKLOAD), help="JSON from bench tie --export-replay")
    p.add_argument(
        "--shape", default="llama3.1-8b", help="random-weight model shape (tiny, small, llama3.1-8b)"
    )
    p.add_argument("--device", default="cuda")
    p.add_argument("--n", type=int, default=400, help="requests replayed per policy (first n of the window)")
    p.add_argument("--speeds", default="4", help="trace time-compression factors (0 = burst)")
    p.add_argument(
        "--policies",
        default="tie,fcfs,ssjf,ltr,sjf_oracle",
        help="run in this order; must include tie. Engine replays and --simulate also take TIE's ablations "
        f"({', '.join(ABLATION_SETTINGS)}): reported and kept in the details, no rows",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="start no new policy run after this many seconds (0 = no limit)",
    )
    p.add_argument("--max-new-tokens", type=int, default=1000, help="output lengths are clipped to this")
    p.add_argument("--max-prompt", type=int, default=4096, help="prompt lengths are clipped to this")
    p.add_argument(
        "--max-requests-per-batch",
        type=int,
        default=None,
        help="cap on concurrently running requests (vLLM's max_num_seqs; default: transformers' own)",
    )
    p.add_argument("--cuda-graph", action="store_true", help="let transformers use CUDA graphs (default off)")
    p.add_argument(
        "--no-cudnn-sdpa",
        action="store_true",
        help="continuous-batching replays run with SDPA kept off cuDNN's kernel (hf_ext.utils.sdpa."
        "sdpa_without_cudnn; static jobs always are); case names end in _nocudnn",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--simulate",
        action="store_true",
        help="no model: run the same requests, speeds and concurrency cap in the shared simulator (CPU); with "
        "--static-batch / --static-kv-tokens, the static job's plans priced by the --calibration cost model",
    )
    p.add_argument(
        "--static-batch",
        type=int,
        default=0,
        help="instead of CB: the requests as one offline job of generate calls on padded batches of this size, "
        "cut from each policy's order (0 = off)",
    )
    p.add_argument(
        "--static-kv-tokens",
        type=int,
        default=0,
        help="instead of --static-batch: batches as wide as this KV budget (tokens) allows for their own padded "
        "prompts + --max-new-tokens per row (hf_ext.generation.tie.offline.memory_batches; 0 = off)",
    )
    p.add_argument(
        "--static-plan",
        choices=("order", "expected"),
        default="order",
        help="with --static-batch / --static-kv-tokens: cut each policy's order as wide as allowed, or plan TIE's "
        "batches from its laws (hf_ext.generation.tie.planner) against the baselines' cuts and plans",
    )
    p.add_argument(
        "--static-rounds",
        type=int,
        default=1,
        help="with --static-*: run every plan this many times, the order reversed every other round (the first "
        "plan of a job pays for new shapes); each plan's figures are its median round (for an even count the "
        "faster of the middle two)",
    )
    p.add_argument(
        "--static-only",
        default="",
        help="with --static-*: run only these plans, in the order named (comma-separated names as printed, e.g. "
        "tie_planned,fcfs_prompt_sorted; default all, TIE's first)",
    )
    p.add_argument(
        "--record-steps",
        action="store_true",
        help="time every engine iteration and note its make-up (hf_ext.simulate.cb_steps); writes "
        "tie_real_cb_steps.json beside the results",
    )
    p.add_argument(
        "--fit-steps",
        default=None,
        metavar="JSON",
        help="no model: fit the simulator's cost model to the steps recorded in JSON (--record-steps) and save it "
        "as a calibration (transformers_cb-<device>-<shape>); --fit-policies' steps fit, the others are held out",
    )
    p.add_argument("--fit-policies", default="fcfs,ssjf", help="with --fit-steps: the runs the fit uses")
    p.add_argument(
        "--heldout-steps",
        default=None,
        metavar="JSON",
        help="with --fit-steps: steps of other runs, all held out (checked, never fit); comma-separated files are "
        "checked together and each on its own",
    )
    p.add_argument(
        "--fit-static",
        default=None,
        metavar="JSON",
        help="no model: fit a cost model to the padded generate batches recorded in a static details file "
        "(batch_shapes of every plan; hf_ext.simulate.calibrate.fit_static_batches), each plan also left out in "
        "turn, and save it as the calibration <device>-<shape>-generate-padded (for --static-plan expected)",
    )
    p.add_argument(
        "--fit-static-match",
        action="append",
        default=None,
        metavar="TEXT",
        help="with --fit-static: only runs whose note or versions contain this text (default: every run); give it "
        "again to take the runs that match any of the texts",
    )
    p.add_argument("--calibration", default=None, help="simulator cost model (default: bench tie's choice)")
    p.add_argument(
        "--aging-tau",
        type=float,
        default=None,
        help="TIE's aging period in seconds (default: TIEConfig's, the spec's 30 s); cases get a _tauX suffix",
    )
    p.add_argument(
        "--sim-kv-tokens",
        type=int,
        default=None,
        help="simulator KV capacity in tokens (default: the engine's, if the calibration recorded it, else 450000)",
    )
    p.add_argument(
        "--sim-max-batch-tokens",
        type=int,
        default=None,
        help="simulator token budget per step (default: the engine's, if the calibration recorded it, else 8192)",
    )
    p.add_argument(
        "--sim-jitter",
        type=float,
        default=0.0,
        help="with --simulate: replay each speed --sim-seeds times, each arrival shifted by a normal draw of this "
        "many seconds (after the speed-up): how far one engine call's means can move on slot timing alone",
    )
    p.add_argument(
        "--sim-seeds", type=int, default=0, help="with --sim-jitter: jittered replays per speed (>= 2)"
    )
    p.add_argument(
        "--explain-gap",
        action="store_true",
        help="no model: split TIE's per-token latency gap to the other policies of the recorded engine runs of these "
        "cases by predicted spread and output length (runs that kept per-request times)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="engine replays: run the policies side by side, one process per GPU of this host (policy k on GPU "
        "k mod N, each GPU's policies in turn); the details name each run's GPU",
    )
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)  # a --gpus worker's results file
    p.add_argument("--no-write", action="store_true")
    return p


def load_requests(path: str, n: int, max_new: int, max_prompt: int, vocab: int, seed: int) -> list[Any]:
    from hf_ext.generation.tie.replay import ReplayRequest

    data = json.loads(Path(path).read_text())
    rows = sorted(data["requests"], key=lambda r: r["arrival"])[:n]
    if len(rows) < n:
        raise ValueError(f"--n {n} exceeds the {len(rows)} requests in {path}")
    rng = np.random.default_rng(seed)
    t0 = rows[0]["arrival"]
    out = []
    for i, r in enumerate(rows):
        plen = int(max(1, min(r["prompt_len"], max_prompt)))
        out.append(
            ReplayRequest(
                request_id=f"az{i}",
                arrival=float(r["arrival"] - t0),
                prompt_ids=rng.integers(100, vocab - 100, size=plen).tolist(),
                output_len=int(max(1, min(r["output_len"], max_new))),
                mu=float(r["mu"]),
                sigma=float(r["sigma"]),
                nu=float(r["nu"]),
                pred_len=float(r["pred_len"]),
                ltr_score=float(r["ltr_score"]),
            )
        )
    return out


def _aging(args: argparse.Namespace) -> dict[str, float]:
    """TIEConfig keywords for ``--aging-tau`` (none: the config's default period)."""
    return {} if args.aging_tau is None else {"aging_tau": args.aging_tau}


def simulate_same(
    args: argparse.Namespace, reqs: list[Any], speeds: list[float], policies: list[str]
) -> tuple:
    """The replay's requests, speeds and concurrency cap in the shared simulator: does it rank like the engine?

    With a calibration fit to the engine's own steps (``--fit-steps``), its recorded token budget, KV capacity and
    requests per batch are the simulator's too, unless ``--sim-max-batch-tokens`` / ``--sim-kv-tokens`` /
    ``--max-requests-per-batch`` say otherwise."""
    from hf_ext.generation.tie.bench import simulate_policies

    sim = _sim_setup(args, reqs)
    out: dict[str, dict] = {}
    for speed in speeds:
        sims = simulate_policies(
            sim.cm, sim.base, sim.cfg, sim.max_seqs, sim.kv_tokens, speed, policies, sim.budget
        )
        out[_case(args, len(reqs), speed) + sim.suffix] = {
            pol: _with_top5(r.summary(), r.per_token_latency, [reqs[int(i)].request_id for i in r.cols["id"]])
            for pol, r in sims.items()
        }
    return out, f"sim:{sim.cm.name}"


def _sim_setup(args: argparse.Namespace, reqs: list[Any]) -> argparse.Namespace:
    """The simulator of ``--simulate``: cost model ``cm``, scored requests ``base``, TIE config ``cfg``, engine
    limits ``max_seqs`` / ``kv_tokens`` / ``budget`` and the case suffix (``_sim_cbfit`` for a CB-step fit)."""
    from hf_ext.generation.tie.bench import load_cost_model
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.scheduler import precompute_scores
    from hf_ext.simulate.cb_steps import is_cb_calibration

    cm = load_cost_model(args.calibration)
    limits = cm.extra.get("engine_limits", {})
    kv_tokens = args.sim_kv_tokens or limits.get("kv_tokens") or 450_000
    budget = args.sim_max_batch_tokens or limits.get("max_batch_tokens") or 8192
    # transformers' fallback for max_requests_per_batch is 1024; a CB-step calibration knows the engine's own
    max_seqs = args.max_requests_per_batch or limits.get("max_requests_per_batch") or 1024
    cfg = TIEConfig(max_new_tokens=args.max_new_tokens, batch_max=max_seqs, **_aging(args))
    base = [r.to_sim_request(i, args.max_new_tokens) for i, r in enumerate(reqs)]
    precompute_scores(base, cfg)
    print(f"simulator: {cm.name}, token budget {budget}, KV {kv_tokens} tokens, max {max_seqs} running")
    suffix = "_sim_cbfit" if is_cb_calibration(cm.name) else "_sim"
    return argparse.Namespace(
        cm=cm, base=base, cfg=cfg, max_seqs=max_seqs, kv_tokens=kv_tokens, budget=budget, suffix=suffix
    )


def simulate_jitter(
    args: argparse.Namespace, reqs: list[Any], speeds: list[float], policies: list[str], cmd: str
) -> int:
    """``--simulate --sim-jitter S --sim-seeds K``: every policy replayed ``K`` times per speed in the simulator,
    each time with every arrival shifted by a normal draw of standard deviation ``S`` seconds (the same shifts for
    every policy of one replay). The spread of each policy's means is what slot timing alone can do to a single
    engine call; the share of replays in which TIE beats a baseline says whether a gap is more than that.

    Writes rows (case ``..._jitter<S>s``): the median over the replays of TIE's mean / p99 per-token latency against
    the baseline's, with ``quality`` the share of replays in which TIE was better; the per-replay figures to
    ``tie_real_cb_sim_jitter<tag>.json`` and a box plot beside it."""
    from tqdm.auto import tqdm

    from hf_ext.generation.tie.bench import (
        BASELINES,
        COMPONENT,
        LATENCY_METRICS,
        clone_requests,
        simulate_policies,
    )
    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows, results_dir

    sim = _sim_setup(args, reqs)
    rng = np.random.default_rng(args.seed)
    dev = f"sim:{sim.cm.name}"
    metrics = {m: key for m, key in LATENCY_METRICS if m.startswith("per_token_latency")}  # mean and p99
    runs: dict[str, dict[str, dict[str, list[float]]]] = {}
    rows: list[Any] = []
    for speed in speeds:
        case = f"{_case(args, len(reqs), speed)}{sim.suffix}_jitter{args.sim_jitter:g}s"
        got: dict[str, dict[str, list[float]]] = {p: {k: [] for k in metrics.values()} for p in policies}
        for _ in tqdm(range(args.sim_seeds), desc=f"x{speed:g}, {args.sim_seeds} jittered replays"):
            shifted = clone_requests(sim.base)
            for r, d in zip(shifted, rng.normal(0.0, args.sim_jitter * speed, len(shifted)), strict=True):
                r.arrival = max(0.0, r.arrival + d)  # seconds of trace time: / speed in the simulator
            sims = simulate_policies(
                sim.cm, shifted, sim.cfg, sim.max_seqs, sim.kv_tokens, speed, policies, sim.budget
            )
            for pol, res in sims.items():
                summary = res.summary()
                for key in metrics.values():
                    got[pol][key].append(float(summary[key]))
        runs[case] = got
        for metric, key in metrics.items():
            tie = np.asarray(got["tie"][key])
            for b in [b for b in BASELINES if b in got]:
                base = np.asarray(got[b][key])
                rows.append(
                    Row.make(
                        COMPONENT,
                        case,
                        metric,
                        float(np.median(tie)),
                        b,
                        float(np.median(base)),
                        device=dev,
                        quality_name=f"share_of_{args.sim_seeds}_replays_tie_better",
                        quality_value=f"{float(np.mean(tie < base)):.2f}",
                        command=cmd,
                    )
                )
        _print_jitter(case, got, args.sim_seeds)
    print_rows(rows, title=f"Median over jittered replays ({dev}) — ratio > 1: TIE better")
    if not args.no_write:
        path = append_rows(COMPONENT, rows)
        plot_results(COMPONENT, path)
        out = results_dir() / f"tie_real_cb_sim_jitter{_workload_tag(args.workload)}.json"
        earlier = json.loads(out.read_text())["runs"] if out.exists() else []
        run = {
            "command": cmd,
            "device": dev,
            "jitter_s": args.sim_jitter,
            "seeds": args.sim_seeds,
            "cases": runs,
        }
        out.write_text(json.dumps({"runs": [*earlier, run]}, indent=1))
        # every case in the file, each from its latest run
        every = {case: got for r in [*earlier, run] for case, got in r["cases"].items()}
        _jitter_figure(every, _engine_means(every, sim.suffix, sim.cm.name), out.with_suffix(".png"))
    return 0


def _engine_means(cases: Any, suffix: str, calibration: str) -> dict[str, dict[str, list[float]]]:
    """Per jittered case, each policy's mean per-token latency in every engine call of the same replay (the case
    without ``<suffix>_jitter…``) in ``tie_real_cb_details.json`` that ran on the card the simulator's
    ``calibration`` was fit on (its name holds the card's slug)."""
    from hf_ext.simulate.calibrate import name_slug
    from hf_ext.utils.bench import results_dir

    path = results_dir() / "tie_real_cb_details.json"
    runs = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    out: dict[str, dict[str, list[float]]] = {}
    for case in cases:
        engine_case = case.split(suffix + "_jitter")[0]
        for run in runs:
            if f"-{name_slug(str(run.get('device', '')))}-" not in f"-{calibration}-":
                continue
            for pol, v in run.get("real_cb", {}).get(engine_case, {}).items():
                out.setdefault(case, {}).setdefault(pol, []).append(float(v["per_token_mean"]))
    return out


def _print_jitter(case: str, got: dict[str, dict[str, list[float]]], seeds: int) -> None:
    """Per policy: the spread of its mean per-token latency over the jittered replays, and how often it beat SSJF."""
    print(f"  {case}: mean per-token latency over {seeds} jittered replays (ms)")
    ssjf = np.asarray(got["ssjf"]["per_token_mean"]) if "ssjf" in got else None
    for pol, vals in got.items():
        v = np.asarray(vals["per_token_mean"]) * 1e3
        lo, med, hi = np.percentile(v, [10, 50, 90])
        beats = (
            ""
            if ssjf is None or pol == "ssjf"
            else f"; below SSJF in {np.mean(v < ssjf * 1e3):.0%} of replays"
        )
        print(
            f"    {pol:24s} median {med:7.1f}  10-90 % {lo:7.1f}-{hi:7.1f}  (spread {(hi - lo) / med:5.1%}){beats}"
        )


def _jitter_figure(
    runs: dict[str, dict[str, dict[str, list[float]]]], engine: dict[str, dict[str, list[float]]], png: Path
) -> None:
    """One panel per case: each policy's mean per-token latency over the jittered replays (box and points), and
    the engine calls of the same replay on the calibration's card as black crosses."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # pragma: no cover - plotting is optional
        print(f"  jitter figure skipped: {exc}")
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs), 4.8), squeeze=False)
    for ax, (case, got) in zip(axes[0], runs.items(), strict=True):
        pols = list(got)
        data = [np.asarray(got[p]["per_token_mean"]) * 1e3 for p in pols]
        ax.boxplot(data, showfliers=False)
        for i, d in enumerate(data, start=1):
            ax.plot(np.full(len(d), i) + np.linspace(-0.15, 0.15, len(d)), d, ".", alpha=0.5)
        label = "engine calls"  # on the first policy that has any
        for i, pol in enumerate(pols, start=1):
            calls = np.asarray(engine.get(case, {}).get(pol, [])) * 1e3
            if len(calls):
                ax.plot(np.full(len(calls), i + 0.3), calls, "kx", label=label)
                label = None
        ax.set_xticks(range(1, len(pols) + 1), pols, rotation=30, ha="right")
        ax.set_ylabel("mean per-token latency (ms)")
        ax.set_title(case.replace("_replay", "\n_replay"), fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        if engine.get(case):
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"  wrote {png}")


def fit_static_details(args: argparse.Namespace, cmd: str) -> int:
    """``--fit-static``: the planner's cost model fit to the padded ``generate`` batches of a static details file's
    runs (those matching ``--fit-static-match``), with each plan's makespan predicted by a fit without it."""
    from hf_ext.simulate.calibrate import STATIC_SUFFIX, fit_static_batches, name_slug, predict_generate
    from hf_ext.simulate.cost_model import CALIBRATION_DIR
    from hf_ext.utils.bench import results_dir

    data = json.loads(Path(args.fit_static).read_text())
    matches = args.fit_static_match or [""]
    runs = [
        r
        for r in data.get("runs", [data])
        if any(m in f"{r.get('note', '')} {r.get('versions', '')}" for m in matches)
    ]
    groups: dict[str, list[list[float]]] = {}  # "<run>:<plan>" -> [rows, width, steps, seconds] per batch
    for i, run in enumerate(runs):
        for res in run.get("real_static", {}).values():
            for plan, summary in res.items():
                if summary.get("batch_shapes"):
                    groups[f"{i}:{plan}"] = summary["batch_shapes"]
    devices = sorted({str(r.get("device", "?")) for r in runs})
    if len(groups) < 2 or len(devices) != 1:
        raise ValueError(
            f"--fit-static needs at least two plans with batch_shapes from one device in the runs of {args.fit_static}"
            f" matching --fit-static-match {' or '.join(map(repr, matches))}; got {len(groups)} plan(s), devices"
            f" {devices}"
        )
    name = f"{name_slug(devices[0])}-{args.shape}{STATIC_SUFFIX}"
    batches = [b for shapes in groups.values() for b in shapes]
    cm = fit_static_batches(batches, name=name, source=f"measured: padded generate batches ({devices[0]})")

    def makespan(model: Any, shapes: list[list[float]]) -> float:
        return sum(predict_generate(model, int(b[0]), int(b[1]), int(b[2])) for b in shapes)

    held: dict[str, dict[str, float]] = {}
    print(
        f"{name}: {len(batches)} batches of {len(groups)} plans; fit error {cm.extra['fit_mean_abs_rel_err']:.1%}"
    )
    for key, shapes in groups.items():
        rest = [b for other, s in groups.items() if other != key for b in s]
        measured = sum(b[3] for b in shapes)
        pred = makespan(fit_static_batches(rest), shapes)
        held[key] = {"measured_s": measured, "predicted_s": pred, "rel_err": pred / measured - 1}
        print(
            f"  {key:<24} measured {measured:7.1f}s, fit without it {pred:7.1f}s ({pred / measured - 1:+.1%})"
        )
    cm.extra.update(
        leave_one_plan_out=held,
        runs_note=[r.get("note", "") for r in runs],
        recorded_by=sorted({r["command"] for r in runs}),
        fit_command=cmd,
    )
    # --no-write keeps the shipped calibrations as they are: the fit goes beside the results instead
    path = cm.save((results_dir() if args.no_write else CALIBRATION_DIR) / f"{name}.json")
    print(f"saved {path}")
    return 0


def _engine_calls() -> list[dict[str, Any]]:
    """The calls recorded in ``tie_real_cb_details.json`` (each: ``command``, ``device``, ``real_cb``: case ->
    policy -> summary), oldest first; withdrawn calls left out."""
    from hf_ext.utils.bench import results_dir

    path = results_dir() / "tie_real_cb_details.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    runs = data.get("runs", [data])  # a run writes itself; the committed file collects runs under "runs"
    return [run for run in runs if "withdrawn" not in run]


def _engine_runs() -> dict[str, dict[str, dict[str, dict]]]:
    """Engine runs in ``tie_real_cb_details.json``: case -> device -> policy -> summary. A later run of a case's
    policy replaces the earlier one; withdrawn runs never count."""
    engine: dict[str, dict[str, dict]] = {}
    for run in _engine_calls():
        dev = str(run.get("device", "?"))
        for case, res in run.get("real_cb", {}).items():
            engine.setdefault(case, {}).setdefault(dev, {}).update(res)
    return engine


def _per_token(summary: dict[str, Any], ids: list[str]) -> np.ndarray:
    """Per-token latency of each request of an engine run's per-request columns, checked to be in ``ids``' order."""
    c = summary["requests"]
    if c["request_id"] != ids:
        raise ValueError("runs of one case must replay the same requests in the same order")
    return (np.asarray(c["finish"]) - np.asarray(c["submit"])) / np.asarray(c["output_len"])


def explain_gap(args: argparse.Namespace, reqs: list[Any], speeds: list[float]) -> int:
    """No model: for every engine run of these cases that kept per-request times, split TIE's mean per-token latency
    gap to each other policy by the request's predicted spread (σ) and by its output length, and print it
    (:func:`hf_ext.generation.tie.replay.split_gap`; the contributions add up to the gap, in ms). TIE is compared
    only with policies of the same call (same card, same warm model), never across calls."""
    from hf_ext.generation.tie.replay import split_gap_by_bins

    calls = _engine_calls()
    by_id = {r.request_id: r for r in reqs}
    found = False
    for speed in speeds:
        case = _case(args, len(reqs), speed)
        for k, call in enumerate(calls):
            res = call.get("real_cb", {}).get(case, {})
            if "requests" not in res.get("tie", {}):
                continue
            dev = f"{call.get('device', '?')}, call {k} of the details"
            ids = res["tie"]["requests"]["request_id"]
            tie = _per_token(res["tie"], ids)
            sigmas, lengths = [by_id[i].sigma for i in ids], [by_id[i].output_len for i in ids]
            for other in [p for p in res if p != "tie" and "requests" in res[p]]:
                found = True
                base = _per_token(res[other], ids)
                print(
                    f"{case} ({dev}): TIE {tie.mean() * 1e3:.1f} ms vs {other} {base.mean() * 1e3:.1f} ms mean "
                    f"per-token latency; gap {(tie.mean() - base.mean()) * 1e3:+.1f} ms, by group:"
                )
                splits = split_gap_by_bins(tie, base, sigmas, lengths)
                for name, key in (("predicted spread", "sigma"), ("output length", "length")):
                    parts = [
                        f"{lab} ({g['n']:.0f}): {g['contribution'] * 1e3:+.1f}"
                        for lab, g in splits[key].items()
                    ]
                    print(f"  {name}: " + "; ".join(parts))
    if not found:
        print("no engine run of these cases kept per-request times (tie_real_cb_details.json)")
    return 0


def engine_vs_sim(sim: dict[str, dict]) -> dict[str, dict]:
    """Engine runs of the simulated cases (latest valid run of each policy, from ``tie_real_cb_details.json``) side
    by side with the simulation: prints mean per-token latency per policy and returns
    ``{case engine: .., case sim: ..}``. Runs on different GPUs are never merged: with several devices for a case,
    each gets its own ``case engine (<device>)`` entry."""
    engine = _engine_runs()
    out: dict[str, dict] = {}
    for case, res in sim.items():
        base = case.rsplit("_sim", 1)[0]
        for dev, real in engine.get(base, {}).items():
            label = f"{base} engine" if len(engine[base]) == 1 else f"{base} engine ({dev})"
            out[label], out[f"{base} sim"] = real, res
            print(f"  {base}: mean per-token latency, engine ({dev}) vs simulator (ms)")
            for pol in res:
                if pol in real:
                    e, m = real[pol]["per_token_mean"] * 1e3, res[pol]["per_token_mean"] * 1e3
                    print(f"    {pol:16s} {e:8.1f} {m:8.1f}  sim/engine {m / e:5.2f}")
    return out


def _steps_columns(log: Any) -> dict[str, Any]:
    """A recorded run's steps as compact columns (times in µs) plus the engine's limits."""
    cols = log.arrays()
    return {
        "limits": log.limits[0] if log.limits else {},
        "steps": {
            k: [round(float(x) * 1e6) if k == "dt" else round(float(x), 1) for x in v]
            for k, v in cols.items()
        },
    }


def _steps_list(rec: dict[str, Any]) -> list[dict[str, float]]:
    cols = rec["steps"]
    n = len(cols["dt"])
    return [{k: (cols[k][i] * 1e-6 if k == "dt" else float(cols[k][i])) for k in cols} for i in range(n)]


def fit_recorded_steps(args: argparse.Namespace, cmd: str) -> int:
    """``--fit-steps``: cost model fit to the engine's recorded steps, held-out check, saved as a calibration."""
    from hf_ext.simulate.cb_steps import CALIBRATION_PREFIX, fit_steps, steps_summary
    from hf_ext.simulate.cost_model import CALIBRATION_DIR
    from hf_ext.utils.bench import Row, append_rows, print_rows, results_dir

    data = json.loads(Path(args.fit_steps).read_text())
    fit_pols = [p for p in args.fit_policies.split(",") if p]
    train: list[dict[str, float]] = []
    held: list[dict[str, float]] = []
    limits: dict[str, Any] = {}
    runs = data["runs"]
    for run in runs:
        for pols in run["cases"].values():
            for pol, rec in pols.items():
                (train if pol in fit_pols else held).extend(_steps_list(rec))
                limits = limits or rec["limits"]
    if not train or not held:
        raise ValueError(
            f"--fit-policies {args.fit_policies!r} must leave steps both to fit ({len(train)}) and to hold out "
            f"({len(held)}) in {args.fit_steps}"
        )
    first = runs[0]
    name = f"{CALIBRATION_PREFIX}-{first['device_slug']}-{first['shape']}"
    cm = fit_steps(
        train,
        name=name,
        source=f"measured: transformers continuous batching steps ({first['device']})",
        kv_bytes_per_token=float(first.get("kv_bytes_per_token", 0.0)),
    )
    cm.extra["heldout"] = steps_summary(cm, held)
    files = [f for f in (args.heldout_steps or "").split(",") if f]
    by_file = {Path(f).stem: json.loads(Path(f).read_text())["runs"] for f in files}
    other_runs = [run for runs_ in by_file.values() for run in runs_]

    def steps_of(runs_: list[dict[str, Any]]) -> list[dict[str, float]]:
        return [
            s
            for run in runs_
            for pols in run["cases"].values()
            for rec in pols.values()
            for s in _steps_list(rec)
        ]

    other = steps_of(other_runs)
    if other:
        cm.extra["heldout_runs"] = steps_summary(cm, other)  # all held-out files together
        cm.extra["heldout_runs_recorded_by"] = sorted({r["command"] for r in other_runs})
        if len(by_file) > 1:
            cm.extra["heldout_runs_by_file"] = {k: steps_summary(cm, steps_of(v)) for k, v in by_file.items()}
    cm.extra["engine_limits"] = limits
    cm.extra["fit_policies"] = fit_pols
    cm.extra["recorded_by"] = sorted({r["command"] for r in runs})
    cm.extra["fit_command"] = cmd
    # --no-write keeps the shipped calibrations as they are: the fit goes beside the results instead
    path = cm.save((results_dir() if args.no_write else CALIBRATION_DIR) / f"{name}.json")
    rows = []
    splits = [("fit", cm.extra["fit"]), ("heldout", cm.extra["heldout"])]
    if other:
        splits.append(("heldout-runs", cm.extra["heldout_runs"]))
        splits += [(f"heldout {k}", v) for k, v in cm.extra.get("heldout_runs_by_file", {}).items()]
    for split, summ in splits:
        for kind, v in summ.items():
            rows.append(
                Row.make(
                    "simulator",
                    f"{name} {split} {kind} steps ({v['steps']})",
                    "step_time_sum_s",
                    v["sum_ratio"],
                    "measured",
                    1.0,
                    device=first["device"],
                    quality_name="median_abs_rel_err",
                    quality_value=round(v["median_abs_rel_err"], 4),
                    command=cmd,
                )
            )
    print_rows(rows, title=f"{name}: simulated / measured step time (ours = ratio of sums)")
    print(f"saved {path}")
    if not args.no_write:
        append_rows("simulator", rows)
    return 0


def _with_top5(summary: dict[str, Any], per_token: Any, request_ids: list[str]) -> dict[str, Any]:
    """``summary`` plus how much of its mean per-token latency the five largest values carry (``top5_share``, s),
    the mean without them and their request ids: a mean over a few hundred requests can turn on a handful of short
    requests that waited (:func:`hf_ext.generation.tie.replay.top_contributors`)."""
    from hf_ext.generation.tie.replay import top_contributors

    top = top_contributors(per_token, min(5, len(request_ids) - 1))
    summary.update(
        top5_share=top["share"],
        per_token_mean_without_top5=top["mean_without"],
        top5_requests=[request_ids[i] for i in top["index"]],
    )
    return summary


def _report(case: str, policy: str, s: dict[str, Any]) -> None:
    extra = f", lengths exact {bool(s['lengths_ok'])}, {s['wall_s']:.0f}s" if "wall_s" in s else ""
    if s.get("soft_resets"):
        extra += f", {s['soft_resets']:.0f} soft resets"
    if "top5_share" in s:
        extra += (
            f", top-5 share {s['top5_share'] * 1e3:.1f} ms (mean without {s['per_token_mean_without_top5'] * 1e3:.1f}"
            f"; {', '.join(s['top5_requests'])})"
        )
    print(
        f"  {case} {policy:10s}: per-token {s['per_token_mean'] * 1e3:8.1f} ms "
        f"(p99 {s['per_token_p99'] * 1e3:8.1f}), TTFT {s['ttft_mean']:6.2f}s{extra}"
    )


def _workload_tag(path: str | Path) -> str:
    """``""`` for the legacy replay file, else ``_replay-<name>`` (``tie_azure_replay_n40k.json``, the default ->
    ``_replay-n40k``): replays with other predictions never share a case name."""
    p = Path(path)
    if p.resolve() == LEGACY_WORKLOAD.resolve():
        return ""
    stem = p.stem
    prefix = LEGACY_WORKLOAD.stem + "_"
    return "_replay-" + (stem[len(prefix) :] if stem.startswith(prefix) and len(stem) > len(prefix) else stem)


def _workload_name(path: str | Path) -> str:
    """The replay's workload name for case names: its ``meta["workload"]``, or ``azure2023conv`` (older files)."""
    return json.loads(Path(path).read_text()).get("meta", {}).get("workload", "azure2023conv")


def _case(args: argparse.Namespace, n: int, speed: float) -> str:
    case = f"real_cb_{args.shape}_{_workload_name(args.workload)}_n{n}_" + (
        "burst" if speed == 0 else f"x{speed:g}"
    )
    if args.max_requests_per_batch is not None:
        case += f"_maxseqs{args.max_requests_per_batch}"
    case += f"_tau{args.aging_tau:g}" if getattr(args, "aging_tau", None) is not None else ""
    case += "_nocudnn" if getattr(args, "no_cudnn_sdpa", False) else ""
    case += _workload_tag(args.workload)
    return case + (f"_seed{args.seed}" if args.seed else "")


def comparison_rows(
    case: str,
    res: dict[str, dict],
    new: list[str],
    speed: float,
    goodput_written: set[str],
    dev: str,
    cmd: str,
) -> list[Any]:
    """The rows of TIE against the baselines ``new`` (finished runs in ``res``, all on card ``dev``); for a burst
    (``speed`` 0) also the goodput rows of :func:`burst_goodput_rows` not yet in ``goodput_written``."""
    from hf_ext.generation.tie.bench import real_cb_rows

    rows = real_cb_rows({case: {"tie": res["tie"], **{p: res[p] for p in new}}}, dev, cmd) if new else []
    if speed == 0:  # the burst as an offline job: goodput within budgets set by FCFS's makespan
        rows += burst_goodput_rows(case, res, goodput_written, dev, cmd)
    return rows


def burst_goodput_rows(case: str, res: dict[str, dict], written: set[str], dev: str, cmd: str) -> list[Any]:
    """A burst replay as the offline job of ``bench tie``: per policy, requests finished within each budget (a
    fraction of FCFS's makespan in this run) per second (:func:`hf_ext.generation.tie.bench.budget_goodput`,
    stored in ``res``) and whole-job tokens/s. Returns the rows of TIE against the baselines in ``res`` not yet in
    ``written`` (which it updates); none before TIE and FCFS have both run (FCFS's makespan sets the budgets)."""
    from hf_ext.generation.tie.bench import budget_goodput, offline_rows

    if "fcfs" not in res or "tie" not in res:
        return []
    for v in res.values():
        v.update(budget_goodput(v["finish_s"], res["fcfs"]["makespan_s"]))
    new = {p for p in res if p != "tie"} - written
    written |= new
    return [r for r in offline_rows({case: res}, dev, cmd) if r.baseline in new]


def static_plan_names(static_plan: str, policies: list[str]) -> list[str]:
    """The names :func:`static_plans` gives this job's plans, in run order (checked before any work)."""
    if static_plan == "order":
        return list(policies)
    names = ["tie_planned"]
    names += ["fcfs", "fcfs_prompt_sorted"] if "fcfs" in policies else []
    names += [f"{p}_planned" for p in ("ssjf", "sjf_oracle") if p in policies]
    return names + (["ltr"] if "ltr" in policies else []) + ["tie_membatch"]


def static_only(args: argparse.Namespace, policies: list[str]) -> list[str] | None:
    """``--static-only`` as a list of this job's plan names (``None``: all); ``ValueError`` naming the flag and the
    job's plans for an unknown name."""
    if not args.static_only:
        return None
    names = static_plan_names(args.static_plan, policies)
    keep = [x.strip() for x in args.static_only.split(",") if x.strip()]
    bad = [x for x in keep if x not in names]
    if bad or not keep:
        raise ValueError(
            f"--static-only: unknown plan(s) {bad or keep!r}; this job's plans: {', '.join(names)}"
        )
    return keep


def static_plans(
    args: argparse.Namespace,
    sim_reqs: list[Any],
    plen: list[int],
    policies: list[str],
    cfg: Any,
    sizing: dict,
) -> tuple[dict[str, list[list[int]]], dict[str, dict[str, str]]]:
    """The static job's batch plans (run in this order) and the cases that compare them (role -> plan name).

    ``--static-plan order``: each policy's order cut as wide as the limit allows; one case. ``expected``: TIE's
    plan from its laws (:func:`hf_ext.generation.tie.planner.plan_batches`, the simulator's ``generate`` cost
    model), against the memory cuts (``…_planned_vs_membatch``) and against what each baseline can plan with
    what it knows (``…_planned``): FCFS its job sorted by prompt length (no lengths to plan with), SSJF its point
    predictions, the SJF-oracle the true lengths. TIE's own memory cut runs last (``tie_membatch``, report only).
    """
    from hf_ext.generation.tie.offline import _cut_batches, policy_order
    from hf_ext.generation.tie.planner import bucket_order, plan_batches

    cap = args.max_new_tokens
    kv, bs = sizing.get("kv_tokens"), sizing.get("batch_size")
    orders = {p: policy_order(p, sim_reqs, cfg) for p in policies}

    def cut(order: list[int]) -> list[list[int]]:
        return _cut_batches(order, np.asarray(plen), bs, kv, cap)

    if args.static_plan == "order":
        return {p: cut(o) for p, o in orders.items()}, {"": {p: p for p in policies}}
    from hf_ext.generation.tie.bench import load_cost_model, request_laws

    cm = load_cost_model(args.calibration)

    def plan(order: list[int], **pred: Any) -> list[list[int]]:
        return plan_batches(order, plen, cap, kv_tokens=kv, batch_size=bs, cost_model=cm, **pred).batches

    plans = {"tie_planned": plan(orders["tie"], **request_laws(sim_reqs))}
    vs_cut: dict[str, str] = {"tie": "tie_planned"}
    vs_planned: dict[str, str] = {"tie": "tie_planned"}
    if "fcfs" in orders:
        plans["fcfs"] = cut(orders["fcfs"])
        plans["fcfs_prompt_sorted"] = cut(bucket_order(orders["fcfs"], plen, len(plen)))
        vs_cut["fcfs"], vs_planned["fcfs"] = "fcfs", "fcfs_prompt_sorted"
    if "ssjf" in orders:
        plans["ssjf_planned"] = plan(orders["ssjf"], point=[r.meta["pred_len"] for r in sim_reqs])
        vs_planned["ssjf"] = "ssjf_planned"
    if "sjf_oracle" in orders:
        plans["sjf_oracle_planned"] = plan(orders["sjf_oracle"], point=[r.output_len for r in sim_reqs])
        vs_planned["sjf_oracle"] = "sjf_oracle_planned"
    if "ltr" in orders:
        plans["ltr"] = cut(orders["ltr"])
        vs_cut["ltr"] = "ltr"
    plans["tie_membatch"] = cut(orders["tie"])  # report only: last, so a budget cuts it before any comparison
    return plans, {"_planned_vs_membatch": vs_cut, "_planned": vs_planned}


def static_job(
    args: argparse.Namespace, reqs: list[Any], policies: list[str]
) -> tuple[int, dict[str, list[list[int]]], dict[str, dict[str, str]], str]:
    """A static job's batch width (the widest a batch may be), plans (``--static-only`` applied), comparison cases
    (:func:`static_plans`) and case name; the same for the engine and ``--simulate``."""
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import batch_size_for_memory

    kv, cap = args.static_kv_tokens, args.max_new_tokens
    plen = [len(r.prompt_ids) for r in reqs]
    if kv:  # memory-sized batches; TIE's β sees the worst-case batch (longest prompt of the job + the cap)
        sizing: dict[str, Any] = {"kv_tokens": kv, "max_new_tokens": cap}
        bs = batch_size_for_memory(kv, max(plen), cap)
    else:
        sizing, bs = {"batch_size": args.static_batch}, args.static_batch
    sim_reqs = [r.to_sim_request(i, cap) for i, r in enumerate(reqs)]
    plans, cases = static_plans(
        args, sim_reqs, plen, policies, TIEConfig(max_new_tokens=cap, batch_max=bs), sizing
    )
    keep = static_only(args, policies)
    plans = plans if keep is None else {k: plans[k] for k in keep}  # run in the order named
    case = f"real_static_{args.shape}_{_workload_name(args.workload)}_n{len(reqs)}_" + (
        f"kv{kv // 1000}k" if kv else f"b{bs}"
    )
    return bs, plans, cases, case + (f"_seed{args.seed}" if args.seed else "")


def static_comparisons(
    case: str, cases: dict[str, dict[str, str]], res: dict[str, dict], just_done: str | None = None
) -> dict[str, dict]:
    """``{case + suffix: {"tie": …, baseline: …}}`` for every comparison of ``cases`` whose plans are both in
    ``res``; with ``just_done``, only those that plan completes (the engine writes each comparison once)."""
    out: dict[str, dict] = {}
    for suffix, roles in cases.items():
        if roles["tie"] not in res:
            continue
        for b, plan_name in roles.items():
            if (
                b != "tie"
                and plan_name in res
                and (just_done is None or just_done in (plan_name, roles["tie"]))
            ):
                out.setdefault(case + suffix, {"tie": res[roles["tie"]]})[b] = res[plan_name]
    return out


def simulate_static(args: argparse.Namespace, reqs: list[Any], policies: list[str], cmd: str) -> int:
    """``--simulate`` with a static job: the engine's plans for these requests, each priced by the simulator's
    ``generate`` cost model (``--calibration``; :func:`hf_ext.generation.tie.offline.simulate_static_batches`), no
    model. Cases are the engine's with ``_sim`` at the end, rows carry ``sim:<calibration>``."""
    from hf_ext.generation.tie.bench import COMPONENT, load_cost_model, static_rows
    from hf_ext.generation.tie.offline import simulate_static_batches
    from hf_ext.utils.bench import append_rows, plot_results, print_rows

    _, plans, cases, case = static_job(args, reqs, policies)
    cm = load_cost_model(args.calibration)
    plen, lens = [len(r.prompt_ids) for r in reqs], [r.output_len for r in reqs]
    res: dict[str, dict] = {}
    for name, batches in plans.items():
        r = simulate_static_batches(cm, plen, lens, None, batches=batches, policy=name)
        res[name] = {**r.summary(), "batches": len(batches)}
        print(
            f"  {case}_sim {name:<18}: {res[name]['throughput_tok_s']:.0f} tok/s, {len(batches)} batches, "
            f"padding {res[name]['padding_share']:.1%}, {r.makespan_s:.1f}s"
        )
    sim_dev = f"sim:{cm.name}"
    new = {k + "_sim": v for k, v in static_comparisons(case, cases, res).items()}
    rows = static_rows(new, sim_dev, sim_dev, cmd)
    print_rows(rows, title=f"The same static job in the simulator ({sim_dev}) — ratio > 1: TIE better")
    if not args.no_write and rows:
        plot_results(COMPONENT, append_rows(COMPONENT, rows))
    return 0


def run_static(
    args: argparse.Namespace, model: Any, reqs: list[Any], policies: list[str], cmd: str, t_start: float
) -> int:
    """The requests as one offline job: ``generate`` on padded batches of ``--static-batch`` rows, or as wide as
    ``--static-kv-tokens`` allows, cut from each policy's order or planned (``--static-plan``, see
    :func:`static_plans`), lengths forced (:func:`hf_ext.generation.tie.offline.run_static_generate`); whole-job
    tokens/s."""
    from hf_ext.generation.tie.bench import COMPONENT, static_rows
    from hf_ext.generation.tie.offline import run_static_generate
    from hf_ext.utils.bench import append_rows, device_name, plot_results, print_rows, results_dir

    dev = device_name()
    ids, lens = [r.prompt_ids for r in reqs], [r.output_len for r in reqs]
    bs, plans, cases, case = static_job(args, reqs, policies)
    kw = dict(eos_token_id=2, pad_token_id=0)  # a random model: EOS is forced at each row's length
    k = min(bs, len(reqs))
    run_static_generate(model, ids[:k], [min(x, 8) for x in lens[:k]], list(range(k)), k, **kw)  # warm-up
    res: dict[str, dict] = {}
    all_rows: list[Any] = []
    runs: dict[str, list[Any]] = {}
    schedule = [
        (rnd, name) for rnd in range(args.static_rounds) for name in (list(plans)[:: -1 if rnd % 2 else 1])
    ]
    for rnd, name in schedule:  # plan order: TIE first unless --static-only names another
        if args.budget_s and time.perf_counter() - t_start > args.budget_s:
            print(f"  --budget-s {args.budget_s:.0f} spent: skipping {name} (round {rnd + 1}) and the rest")
            break
        batches = plans[name]
        runs.setdefault(name, []).append(
            run_static_generate(model, ids, lens, None, batches=batches, policy=name, progress=True, **kw)
        )
        if len(runs[name]) < args.static_rounds:
            continue
        r = sorted(runs[name], key=lambda x: x.makespan_s)[(args.static_rounds - 1) // 2]  # the median round
        res[name] = {
            **r.summary(),
            "batches": len(r.batch_times),
            # per batch, for fitting a cost model of padded generate batches: rows, padded prompt width, steps, time
            "batch_shapes": [
                [len(b), max(len(ids[i]) for i in b), max(lens[i] for i in b), t]
                for b, t in zip(batches, r.batch_times)
            ],
        }
        if args.static_rounds > 1:
            res[name]["round_makespans_s"] = [x.makespan_s for x in runs[name]]
        print(
            f"  {case} {name:<18}: {res[name]['throughput_tok_s']:.0f} tok/s, {r.decode_steps} decode steps, "
            f"{len(r.batch_times)} batches, padding {res[name]['padding_share']:.1%}, {r.makespan_s:.1f}s"
        )
        # rows as soon as a comparison exists: TIE's plan against each baseline plan that has finished
        new = static_comparisons(case, cases, res, just_done=name)
        rows = static_rows(new, "", dev, cmd) if new else []
        all_rows += rows
        if not args.no_write:  # every finished plan is kept, report-only ones too
            if rows:
                append_rows(COMPONENT, rows)
            details = results_dir() / "tie_real_static_details.json"
            details.write_text(
                json.dumps(
                    {"command": cmd, "device": dev, "real_static": {case: res}, "cases": cases}, indent=1
                )
            )
    print_rows(all_rows, title="TIE for static generate batches — ratio > 1: TIE better")
    if not args.no_write and all_rows:
        plot_results(COMPONENT, results_dir() / f"{COMPONENT}.csv")
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.n < 2:
        raise ValueError("--n must be >= 2")
    for name in ("static_batch", "static_kv_tokens"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.static_batch and args.static_kv_tokens:
        raise ValueError("give at most one of --static-batch and --static-kv-tokens")
    if args.static_rounds < 1:
        raise ValueError(f"--static-rounds must be >= 1, got {args.static_rounds}")
    speeds = [float(x) for x in args.speeds.split(",")]
    if any(not math.isfinite(x) or x < 0 for x in speeds):
        raise ValueError(f"--speeds must be numbers >= 0, got {args.speeds!r}")
    import torch
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie.bench import COMPONENT, latency_rows, policy_figure
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import OFFLINE_POLICIES
    from hf_ext.generation.tie.replay import POLICIES, request_columns, run_cb_replay, summarize_replay
    from hf_ext.simulate.calibrate import device_slug, model_for_shape
    from hf_ext.simulate.cb_steps import record_cb_steps
    from hf_ext.simulate.cost_model import CostModel
    from hf_ext.utils.bench import append_rows, device_name, plot_results, print_rows, results_dir
    from hf_ext.utils.sdpa import sdpa_without_cudnn

    policies = [p for p in args.policies.split(",") if p]
    static = bool(args.static_batch or args.static_kv_tokens)  # an offline job of padded generate batches
    # engine replays also run TIE's ablations (report only, no rows); a static job orders by the five policies
    allowed = OFFLINE_POLICIES if static else POLICIES
    bad = [p for p in policies if p not in allowed]
    worker = args.worker_out is not None  # one GPU's share of a --gpus run: TIE may be on another GPU
    if bad or ("tie" not in policies and not worker):
        raise ValueError(f"--policies must include 'tie' and only use {allowed}, got {args.policies!r}")
    _check_gpus(args, static, len(policies))
    if static:
        static_only(args, policies)  # an unknown plan name is refused before any work
    elif args.static_only or args.static_rounds != 1:
        raise ValueError("--static-only / --static-rounds need --static-batch or --static-kv-tokens")
    if args.sim_jitter < 0 or not math.isfinite(args.sim_jitter):
        raise ValueError(f"--sim-jitter must be a number of seconds >= 0, got {args.sim_jitter}")
    if (args.sim_jitter > 0) != (args.sim_seeds != 0):
        raise ValueError(
            "--sim-jitter and --sim-seeds go together: give both (jitter > 0, seeds >= 2) or neither"
        )
    if args.sim_seeds and (args.sim_seeds < 2 or not args.simulate or static or 0 in speeds):
        raise ValueError(
            "--sim-seeds needs >= 2 replays, --simulate, a continuous-batching replay (no static job) and --speeds "
            f"> 0 (a burst has no arrival times to shift); got --sim-seeds {args.sim_seeds}, --speeds {args.speeds}"
        )
    if args.explain_gap and static:
        raise ValueError("--explain-gap reads continuous-batching replays: it takes no static job")
    if args.no_cudnn_sdpa and static:
        raise ValueError(
            "--no-cudnn-sdpa is for continuous-batching replays: static jobs always keep SDPA off cuDNN"
        )
    cmd = ("python benchmarks/tie_real_cb.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    if args.fit_steps:
        return fit_recorded_steps(args, cmd)
    if args.fit_static:
        return fit_static_details(args, cmd)
    if args.explain_gap or args.simulate:  # no model: prompt ids only need some vocabulary
        reqs = load_requests(args.workload, args.n, args.max_new_tokens, args.max_prompt, 32000, args.seed)
    if args.explain_gap:
        return explain_gap(args, reqs, speeds)
    if args.simulate and static:
        return simulate_static(args, reqs, policies, cmd)
    if args.sim_seeds:
        return simulate_jitter(args, reqs, speeds, policies, cmd)
    if args.simulate:
        sim, sim_dev = simulate_same(args, reqs, speeds, policies)
        for case, res in sim.items():
            for pol, v in res.items():
                _report(case, pol, v)
        rows = latency_rows(sim, sim_dev, cmd, lambda res: ("simulated_same_requests", "True"))
        print_rows(rows, title=f"The same replay in the simulator ({sim_dev}) — ratio > 1: TIE better")
        pairs = engine_vs_sim(sim)
        if not args.no_write:
            path = append_rows(COMPONENT, rows)
            plot_results(COMPONENT, path)
            cbfit = any(c.endswith("_sim_cbfit") for c in sim)
            tau = "" if args.aging_tau is None else f"_tau{args.aging_tau:g}"
            # another replay's figures never overwrite the default replay's
            tag = _workload_tag(args.workload)
            policy_figure(sim, results_dir() / f"tie_real_cb_sim{'_cbfit' if cbfit else ''}{tau}{tag}.png")
            if pairs:
                policy_figure(pairs, results_dir() / f"tie_real_cb_vs_sim{tag}.png")
        return 0
    if args.gpus > 1:
        return run_side_by_side(args, argv if argv is not None else sys.argv[1:], policies, speeds, cmd)
    if args.device == "cpu":
        torch.set_num_threads(2)
    t_start = time.perf_counter()
    model = model_for_shape(args.shape, args.device, seed=args.seed)
    vocab = model.config.vocab_size
    reqs = load_requests(args.workload, args.n, args.max_new_tokens, args.max_prompt, vocab, args.seed)
    if static:
        return run_static(args, model, reqs, policies, cmd, t_start)
    gc = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    cb_kw: dict[str, Any] = {"use_cuda_graph": bool(args.cuda_graph)}
    if args.device == "cpu":  # small paged cache for the tiny CPU smoke run
        cb_kw.update(num_blocks=256, page_size=16, max_batch_tokens=256, max_requests_per_batch=8)
    else:
        cb_kw["max_memory_percent"] = 0.75  # headroom for CUDA-graph pools next to the paged KV cache
    if args.max_requests_per_batch is not None:
        cb_kw["max_requests_per_batch"] = args.max_requests_per_batch
    cb = ContinuousBatchingConfig(**cb_kw)
    # a request's max_new_tokens is its forced (true) length here: TIE must not truncate its law there
    tie_cfg = TIEConfig(max_new_tokens=args.max_new_tokens, use_request_cap=False, **_aging(args))
    dev = device_name()
    print(f"model {args.shape} on {dev}; {len(reqs)} requests; built in {time.perf_counter() - t_start:.1f}s")

    steps_path = results_dir() / "tie_real_cb_steps.json"
    steps_run: dict[str, Any] = {
        "command": cmd,
        "device": dev,
        "device_slug": device_slug(args.device),
        "shape": args.shape,
        "kv_bytes_per_token": CostModel.kv_bytes_from_config(
            model.config, 2 if args.device.startswith("cuda") else 4
        ),
        "cases": {},
    }
    earlier_runs = json.loads(steps_path.read_text())["runs"] if steps_path.exists() else []

    def replay(rs: list[Any], policy: str, scale: float, case: str | None = None) -> dict[str, float]:
        steps = record_cb_steps() if case and args.record_steps else contextlib.nullcontext()
        with steps as log, sdpa_without_cudnn(args.no_cudnn_sdpa):
            recs = run_cb_replay(
                model,
                rs,
                policy,
                generation_config=gc,
                continuous_batching_config=cb,
                tie_config=tie_cfg,
                time_scale=scale,
                progress=not worker,  # side-by-side workers print one line per run, no bars
            )
        if log is not None and not args.no_write:  # appended to the file's runs as soon as each policy ends
            steps_run["cases"].setdefault(case, {})[policy] = _steps_columns(log)
            steps_path.write_text(json.dumps({"runs": [*earlier_runs, steps_run]}))
        gc_mod.collect()  # the manager (and its paged KV cache) is gone: give the memory back before the next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            print(
                f"    cuda memory after {policy}: {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated"
            )
        out = summarize_replay(recs)
        out["requests"] = request_columns(recs)  # per request: which ones make the mean (read back later)
        ids = out["requests"]["request_id"]
        _with_top5(out, _per_token(out, ids), ids)
        if scale == 0:  # a burst is an offline job: each request's finish, seconds after the job's start
            start = min(r["submit"] for r in recs)
            out["finish_s"] = [r["finish"] - start for r in recs]
        return out

    t0 = time.perf_counter()
    replay(reqs[:8], "fcfs", 0.0)  # warm-up (kernels, graphs, allocator)
    print(f"warm-up {time.perf_counter() - t0:.1f}s")
    real: dict[str, dict] = {}
    speed_of: dict[str, float] = {}
    all_rows: list[Any] = []
    details = results_dir() / "tie_real_cb_details.json"
    for speed in speeds:
        scale = 0.0 if speed == 0 else 1.0 / speed
        case = _case(args, len(reqs), speed)
        speed_of[case] = speed
        res: dict[str, dict] = {}
        real[case] = res
        goodput_written: set[str] = set()
        for pol in policies:  # TIE first: a run cut short still compares it with what finished
            if args.budget_s and time.perf_counter() - t_start > args.budget_s:
                print(f"  --budget-s {args.budget_s:.0f} spent: skipping {case} {pol} and the rest")
                break
            t0 = time.perf_counter()
            res[pol] = replay(reqs, pol, scale, case)
            res[pol]["wall_s"] = time.perf_counter() - t0
            _report(case, pol, res[pol])
            if worker:  # the parent compares and writes; this file keeps every finished run
                _write_atomic(
                    Path(args.worker_out), json.dumps({"device": dev, "speeds": speed_of, "real_cb": real})
                )
                continue
            if "tie" not in res:
                continue  # compared once TIE has run
            done = [p for p in res if p != "tie"] if pol == "tie" else [pol]
            if not done:
                continue
            rows = comparison_rows(case, res, done, speed, goodput_written, dev, cmd)
            all_rows += rows
            if not args.no_write:  # written as soon as a comparison exists: a killed run keeps its numbers
                append_rows(COMPONENT, rows)
                details.write_text(json.dumps({"command": cmd, "device": dev, "real_cb": real}, indent=1))
    if not worker:
        _finish(args, real, all_rows, details)
    print(f"total {time.perf_counter() - t_start:.0f}s")
    return 0


def _finish(args: argparse.Namespace, real: dict[str, dict], rows: list[Any], details: Path) -> None:
    """Print the rows of an engine call, and redraw the results figure and this replay's policy figure."""
    from hf_ext.generation.tie.bench import COMPONENT, policy_figure
    from hf_ext.utils.bench import plot_results, print_rows, results_dir

    if not rows:  # TIE with its ablations only, or a run cut short before a baseline finished
        print("no rows: no baseline finished beside TIE (ablations are kept in the details only)")
        return
    print_rows(rows, title="TIE on real continuous batching — ratio > 1: TIE better")
    if not args.no_write:
        path = results_dir() / f"{COMPONENT}.csv"
        plot_results(COMPONENT, path)
        policy_figure(real, results_dir() / f"tie_real_cb{_workload_tag(args.workload)}.png")
        print(f"wrote {path}, {details}")


def _check_gpus(args: argparse.Namespace, static: bool, n_policies: int) -> None:
    """Refuse a ``--gpus`` the run cannot use, before any work."""
    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if args.gpus == 1:
        return
    modes = {
        "--static-batch / --static-kv-tokens": static,
        "--simulate": args.simulate,
        "--explain-gap": args.explain_gap,
        "--record-steps": args.record_steps,
        "--fit-steps": bool(args.fit_steps),
        "--fit-static": bool(args.fit_static),
    }
    if any(modes.values()):
        on = ", ".join(k for k, v in modes.items() if v)
        raise ValueError(f"--gpus > 1 runs continuous-batching replays only; drop it or {on}")
    if args.gpus > n_policies:
        raise ValueError(f"--gpus must be at most the number of policies ({n_policies}), got {args.gpus}")


def _drop_options(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the options ``names`` (``--opt value`` or ``--opt=value``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif not any(a.startswith(n + "=") for n in names):
            out.append(a)
    return out


def _relay(stream: Any, prefix: str) -> None:
    for line in stream:
        print(prefix + line, end="", flush=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class SideBySideWriter:
    """The rows and details of a ``--gpus`` call, brought up to date from the workers' files (one per worker,
    rewritten after each of its runs) whenever one of them changes.

    A row of TIE against a baseline is appended once both runs exist and ran on cards of the same name; each pair
    is written once. The details file is rewritten with every run so far, each with its GPU. A call that is killed
    therefore keeps every comparison the parent had seen, as a serial call keeps every comparison it finished."""

    def __init__(
        self, args: argparse.Namespace, policies: list[str], cmd: str, workers: list[tuple[str, Path]]
    ) -> None:
        from hf_ext.utils.bench import results_dir

        self.args, self.policies, self.cmd, self.workers = args, policies, cmd, workers
        self.details = results_dir() / "tie_real_cb_details.json"
        self.real: dict[str, dict] = {}
        self.rows: list[Any] = []
        self._paired: set[tuple[str, str]] = set()  # (case, baseline) already written or refused
        self._goodput: dict[str, set[str]] = {}
        self._stamps: dict[Path, int] = {}

    def update(self) -> None:
        from hf_ext.generation.tie.bench import COMPONENT
        from hf_ext.utils.bench import append_rows

        stamps = {out: out.stat().st_mtime_ns for _, out in self.workers if out.exists()}
        if stamps == self._stamps:
            return
        self._stamps = stamps
        real: dict[str, dict] = {}
        speed_of: dict[str, float] = {}
        device_of: dict[str, str] = {}
        for gid, out in self.workers:
            if out not in stamps:
                continue
            run = json.loads(out.read_text())
            speed_of.update(run["speeds"])
            for case, res in run["real_cb"].items():
                for pol, v in res.items():
                    real.setdefault(case, {})[pol] = {**v, "gpu": gid}
                    device_of[pol] = run["device"]
        # the policies in the order given, as one call would list them
        self.real = {case: {p: res[p] for p in self.policies if p in res} for case, res in real.items()}
        rows: list[Any] = []
        for case, res in self.real.items():
            if "tie" not in res:
                continue
            dev = device_of["tie"]
            new = [p for p in res if p != "tie" and (case, p) not in self._paired]
            self._paired.update((case, p) for p in new)
            for p in new:
                if device_of[p] != dev:
                    print(
                        f"{case} {p} ran on {device_of[p]}, TIE on {dev}: no row; the run is in the details"
                    )
            # only runs on TIE's card are compared
            same = {p: v for p, v in res.items() if device_of[p] == dev}
            goodput = self._goodput.setdefault(case, set())
            rows += comparison_rows(
                case, same, [p for p in new if p in same], speed_of[case], goodput, dev, self.cmd
            )
        self.rows += rows
        if self.args.no_write:
            return
        if rows:
            append_rows(COMPONENT, rows)
        devices = sorted({device_of[p] for res in self.real.values() for p in res})
        gpus = {p: v["gpu"] for res in self.real.values() for p, v in res.items()}
        body = {"command": self.cmd, "device": ", ".join(devices), "gpus": gpus, "real_cb": self.real}
        _write_atomic(self.details, json.dumps(body, indent=1))


def run_side_by_side(
    args: argparse.Namespace, argv: list[str], policies: list[str], speeds: list[float], cmd: str
) -> int:
    """``--gpus N``: one worker process per GPU (``CUDA_VISIBLE_DEVICES``), worker ``j`` replaying
    ``policies[j::N]`` in turn with the same requests, speeds and engine settings; the rows of TIE against
    each baseline, as one call on one card would write them. Each run's GPU is kept in the details (``gpu``).
    A baseline that ran on a card of another name than TIE's gives no row.

    Rows and details are written as runs finish (:class:`SideBySideWriter`, polled every ``poll_s``), not at
    the end. The workers' files sit in the results folder (``tie_real_cb_worker<j>.json``) until the call ends,
    so even a parent killed outright leaves every finished run there. On SIGTERM the parent stops the workers
    (within ``poll_s``), writes what finished and returns 1; it also returns 1 if a worker failed (what finished
    is still written)."""
    import signal
    import tempfile
    import threading

    from hf_ext.utils.bench import results_dir

    poll_s = 2.0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.device_count() < args.gpus:
            raise ValueError(
                f"--gpus {args.gpus} needs {args.gpus} GPUs; {torch.cuda.device_count()} are visible"
            )
        visible = env.get("CUDA_VISIBLE_DEVICES")
        gpu_ids = visible.split(",")[: args.gpus] if visible else [str(j) for j in range(args.gpus)]
    else:  # CPU (tests): the workers share the processor
        gpu_ids = [f"{args.device}-worker{j}" for j in range(args.gpus)]
    child_argv = _drop_options(argv, ("--gpus", "--policies", "--worker-out"))
    t0 = time.perf_counter()
    failed: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if args.no_write else results_dir()
        outs = [folder / f"tie_real_cb_worker{j}.json" for j in range(len(gpu_ids))]
        for out in outs:  # a killed call's leftovers are not this call's runs
            out.unlink(missing_ok=True)
        writer = SideBySideWriter(args, policies, cmd, list(zip(gpu_ids, outs)))
        # SIGTERM (e.g. the device's time limit): stop the workers, keep what finished
        stop = threading.Event()
        on_main = threading.current_thread() is threading.main_thread()
        before = signal.signal(signal.SIGTERM, lambda *_: stop.set()) if on_main else None
        workers = []
        try:
            for j, (gid, out) in enumerate(zip(gpu_ids, outs)):
                share = policies[j :: args.gpus]
                wenv = {**env, "CUDA_VISIBLE_DEVICES": gid} if args.device.startswith("cuda") else env
                child = [*child_argv, "--policies", ",".join(share), "--worker-out", str(out)]
                proc = subprocess.Popen(
                    [sys.executable, __file__, *child],
                    env=wenv,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                relay = threading.Thread(target=_relay, args=(proc.stdout, f"[gpu {gid}] "), daemon=True)
                relay.start()
                workers.append((gid, share, proc, relay))
                print(f"worker on GPU {gid}: {', '.join(share)}")
            while any(proc.poll() is None for _, _, proc, _ in workers) and not stop.is_set():
                stop.wait(poll_s)
                writer.update()
            if stop.is_set():
                print("SIGTERM: stopping the workers; writing the runs that finished")
                failed.append("the call (SIGTERM)")
                for _, _, proc, _ in workers:
                    proc.terminate()
        except BaseException:  # the parent's own error or Ctrl-C: no worker outlives it
            for _, _, proc, _ in workers:
                proc.terminate()
            raise
        finally:
            if on_main:
                signal.signal(signal.SIGTERM, before)
        for gid, share, proc, relay in workers:
            if proc.wait() != 0 and not stop.is_set():
                failed.append(f"GPU {gid} ({', '.join(share)}): exit {proc.returncode}")
            relay.join()
        writer.update()
        for out in outs:  # everything in them is in the details now
            out.unlink(missing_ok=True)
    print(f"side by side on {len(gpu_ids)} GPUs: {time.perf_counter() - t0:.0f}s")
    _finish(args, writer.real, writer.rows, writer.details)
    for f in failed:
        print(f"not finished: {f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
