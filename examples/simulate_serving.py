"""Compare admission policies on the shared serving simulator (hf_ext.simulate).

CPU, a few seconds:

    python examples/simulate_serving.py                                   # synthetic log-t workload
    python examples/simulate_serving.py --workload trace --time-scale 1.5 # Azure 2023 trace, 1.5x load
    python examples/simulate_serving.py --workload rollout --stop-after 6 # RL rollout, early stop
    python examples/simulate_serving.py --workload workflows --capacity 40000 --cpu-capacity 200000

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="synthetic", choices=["synthetic", "trace", "rollout", "workflows"])
    ap.add_argument("--policies", default="fcfs,ssjf,sjf", help="comma list of fcfs, sjf, ssjf, ljf")
    ap.add_argument(
        "--n", type=int, default=5000, help="requests (synthetic) / trace rows / prompts (rollout)"
    )
    ap.add_argument("--rate", type=float, default=3.5, help="arrival rate (synthetic), req/s")
    ap.add_argument("--time-scale", type=float, default=1.0, help="trace time compression")
    ap.add_argument("--cost-model", default="gpu_md-h100-llama3.1-8b", help="calibration name or JSON path")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--capacity", type=int, default=250_000, help="GPU KV capacity in tokens")
    ap.add_argument("--cpu-capacity", type=int, default=0, help="CPU KV tier in tokens")
    ap.add_argument(
        "--stop-after", type=int, default=None, help="rollout: stop each prompt after M responses"
    )
    ap.add_argument("--out", default="sim_out")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cm = CostModel.load(args.cost_model)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if args.workload == "synthetic":
        reqs = W.synthetic(
            args.n, rate=args.rate, output=W.azure_output_dist("logt", mu_spread=0.8), seed=args.seed
        )
    elif args.workload == "trace":
        reqs = W.azure_trace(n=args.n, time_scale=args.time_scale)
        for r in reqs:
            r.meta["true_mu"] = float(np.log(r.output_len))
    elif args.workload == "rollout":
        reqs = W.rollout(min(args.n, 128), 8, as_branches=args.stop_after is not None, seed=args.seed)
    else:
        reqs = []
    rng = np.random.default_rng(args.seed + 1)
    for r in reqs:  # noisy point prediction for SSJF (log-scale sd 0.5)
        mu = r.meta.get("true_mu", np.log(max(r.output_len, 1)))
        r.meta["pred_len"] = float(np.exp(mu + rng.normal(0, 0.5)))

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
            res = W.run_workflows(sim, W.agent_workflows(min(args.n, 40), "dynamic", seed=args.seed))
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
