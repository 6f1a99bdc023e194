"""Compare admission policies on the shared serving simulator (hf_ext.simulate).

CPU, a few seconds:

    python examples/simulate_serving.py                                   # synthetic log-t workload
    python examples/simulate_serving.py --workload trace --time-scale 1.5 # Azure 2023 trace, 1.5x load
    python examples/simulate_serving.py --workload rollout --stop-after 6 # RL rollout, early stop
    python examples/simulate_serving.py --workload workflows --capacity 40000 --cpu-capacity 200000

--n defaults per workload (5000 requests / trace rows, 128 rollout prompts, 40 workflows); --rate,
--time-scale and --stop-after apply to one workload each and are an error with another.

Writes a per-request CSV per policy and a plot (per-token latency CDF, KV memory over time) to --out.
The Azure trace is CC-BY 4.0 (Azure Public Dataset; Patel et al., "Splitwise", ISCA 2024).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from hf_ext.simulate import CostModel, Simulator, compare, make_scheduler
from hf_ext.simulate import workload as W
from hf_ext.simulate.metrics import plot

# --n when not given, per workload (the simulator runs any size; these keep the example to seconds)
DEFAULT_N = {"synthetic": 5000, "trace": 5000, "rollout": 128, "workflows": 40}
# flags that only one workload uses: passing them with another is an error, not silently ignored
ONLY_FOR = {"rate": "synthetic", "time_scale": "trace", "stop_after": "rollout"}


def _annotate(reqs, seed: int) -> None:
    """A noisy point prediction of each output length (log-scale sd 0.5) in ``meta["pred_len"]``, for SSJF."""
    rng = np.random.default_rng(seed)
    for r in reqs:
        mu = r.meta.get("true_mu", np.log(max(r.output_len, 1)))
        r.meta["pred_len"] = float(np.exp(mu + rng.normal(0, 0.5)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="synthetic", choices=["synthetic", "trace", "rollout", "workflows"])
    ap.add_argument("--policies", default="fcfs,ssjf,sjf", help="comma list of fcfs, sjf, ssjf, ljf")
    ap.add_argument(
        "--n",
        type=int,
        default=None,
        help="requests (synthetic) / trace rows (trace) / prompts of 8 responses (rollout) / workflows "
        "(workflows); default " + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()),
    )
    ap.add_argument(
        "--rate", type=float, default=None, help="synthetic only: arrival rate, req/s (default 3.5)"
    )
    ap.add_argument(
        "--time-scale", type=float, default=None, help="trace only: time compression (default 1.0)"
    )
    ap.add_argument("--cost-model", default="gpu_md-h100-llama3.1-8b", help="calibration name or JSON path")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=250_000, help="GPU KV capacity in tokens")
    ap.add_argument("--cpu-capacity", type=int, default=0, help="CPU KV tier in tokens")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="rollout only: stop each prompt after M responses"
    )
    ap.add_argument("--out", default="sim_out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for dest, workload in ONLY_FOR.items():
        if getattr(args, dest) is not None and args.workload != workload:
            flag = "--" + dest.replace("_", "-")
            ap.error(f"{flag} applies only to --workload {workload} (got --workload {args.workload})")
    if args.n is not None and args.n < 1:
        ap.error(f"--n must be >= 1, got {args.n}")
    n = args.n if args.n is not None else DEFAULT_N[args.workload]
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        ap.error("--policies: give at least one of fcfs, sjf, ssjf, ljf")

    cm = CostModel.load(args.cost_model)
    reqs: list = []
    if args.workload == "synthetic":
        rate = args.rate if args.rate is not None else 3.5
        reqs = W.synthetic(n, rate=rate, output=W.azure_output_dist("logt", mu_spread=0.8), seed=args.seed)
    elif args.workload == "trace":
        reqs = W.azure_trace(n=n, time_scale=args.time_scale if args.time_scale is not None else 1.0)
        for r in reqs:
            r.meta["true_mu"] = float(np.log(r.output_len))
    elif args.workload == "rollout":
        reqs = W.rollout(n, 8, as_branches=args.stop_after is not None, seed=args.seed)
    _annotate(reqs, args.seed + 1)

    out = Path(args.out)
    results = {}
    for name in policies:
        for r in reqs:
            r.meta.pop("sim_generated", None)
        sim = Simulator(
            cm,
            make_scheduler(name),
            max_num_seqs=args.max_batch,
            kv_capacity_tokens=args.capacity,
            cpu_capacity_tokens=args.cpu_capacity,
            stop_after=args.stop_after,
        )
        if args.workload == "workflows":
            # the same workflows (and predictions) for every policy: sampled afresh, as a run mutates them
            wfs = W.agent_workflows(n, "dynamic", seed=args.seed)
            _annotate([c.request for wf in wfs for c in wf.calls], args.seed + 1)
            res = W.run_workflows(sim, wfs)
            print(f"{name}: mean workflow latency {res.workflow_latency.mean():.2f}s")
        else:
            res = sim.run(reqs)
        if args.workload == "rollout":
            print(f"{name}: rollout {res.rollout_summary()}")
        res.to_csv(out / f"{args.workload}_{name}.csv")
        results[name] = res
    keys = (
        "latency_mean",
        "latency_p99",
        "per_token_mean",
        "per_token_p99",
        "ttft_mean",
        "throughput_tok_s",
        "cache_hit_rate",
        "preemptions",
    )
    print(compare(results, keys).to_string(float_format=lambda x: f"{x:.4g}"))
    print(f"plot: {plot(results, out / f'{args.workload}.png', title=f'{args.workload} ({cm.name})')}")


if __name__ == "__main__":
    main()
