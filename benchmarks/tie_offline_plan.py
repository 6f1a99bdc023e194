"""TIE offline job with expected-cost batch plans (hf_ext.generation.tie.planner), several seeds.

The bench's offline job (``python -m hf_ext bench tie``: 2,000 synthetic prompts at t=0, Azure prompt lengths,
a 120k-token KV cap, transformers ``generate`` on padded batches, the H100-measured cost model) with every
policy's batches *planned* instead of cut from one order as wide as memory allows. Rows (``tie.csv``, metric
``offline_throughput_tokens``): ``…_planned_seed<N>`` (every policy planned with what it knows; FCFS and LTR
get their best prompt-bucket count in hindsight) and ``…_planned_vs_membatch_seed<N>`` (TIE planned against the
plain memory-cut jobs). Figure ``tie_offline_plan.png``, details ``tie_offline_plan.json``.

``--real-cpu`` adds the same comparison on real ``generate`` calls of a tiny random Llama on the CPU (forced
lengths; median of interleaved rounds).

    python benchmarks/tie_offline_plan.py                 # seeds 0, 1, 2 (predictors cached after the first run)
    python benchmarks/tie_offline_plan.py --seeds 0 --no-write
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

POLICY_ORDER = ("tie", "sjf_oracle", "ssjf", "ltr", "fcfs")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2", help="bench seeds (workload, predictors)")
    p.add_argument("--offline-n", type=int, default=2000, help="requests in the job")
    p.add_argument("--kv-tokens", type=int, default=120_000, help="KV cap in tokens")
    p.add_argument("--calibration", default=None, help="cost model (default: the bench's choice)")
    p.add_argument(
        "--n-train", type=int, default=None, help="predictor training pairs (default: the bench's)"
    )
    p.add_argument("--epochs", type=int, default=None, help="predictor epochs (default: the bench's)")
    p.add_argument("--cache-dir", default=None, help="predictor cache (default ~/.cache/hf_ext/tie)")
    p.add_argument("--real-cpu", action="store_true", help="also run a small job on a tiny Llama (CPU)")
    p.add_argument(
        "--tag",
        default="",
        help="figure / JSON tie_offline_plan_<tag> instead of tie_offline_plan (e.g. for another --calibration; "
        "the rows tell cost models apart by their device column)",
    )
    p.add_argument("--no-write", action="store_true")
    return p


def simulated(args: argparse.Namespace, seed: int) -> dict[str, dict]:
    from hf_ext.generation.tie import bench
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.data import generate_workload, length_pairs

    argv = [
        "--seed",
        str(seed),
        "--offline-n",
        str(args.offline_n),
        "--offline-kv-tokens",
        str(args.kv_tokens),
    ]
    for name in ("n_train", "epochs"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    bargs = bench._parser().parse_args(argv)
    cm = bench.load_cost_model(args.calibration)
    train = length_pairs(
        generate_workload(bargs.n_train, seed=seed + 100, max_new_tokens=bench.MAX_NEW_TOKENS)
    )
    preds = bench.train_predictors(
        train, dict(epochs=bargs.epochs, seed=seed), bench._cache_dir(args.cache_dir)
    )
    cfg = TIEConfig(max_new_tokens=bench.MAX_NEW_TOKENS, batch_max=bargs.max_num_seqs)
    base = bench.offline_requests(bargs, preds, cfg)
    res = bench.offline_planned(cm, base, cfg, args.kv_tokens)
    return {f"{case}_seed{seed}": r for case, r in res.items()}, cm.name, preds


def real_cpu(preds: dict[str, Any], seed: int, reps: int = 5) -> dict[str, dict]:
    """A 96-request job on a tiny random Llama (CPU): TIE planned vs every policy's memory-cut job."""
    import torch

    from hf_ext.generation.tie import bench
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.generation.tie.offline import memory_batches, policy_order, run_static_generate
    from hf_ext.generation.tie.planner import plan_batches
    from hf_ext.testing import tiny_llama

    torch.set_num_threads(2)
    n, cap, kv = 96, 96, 2_400
    bargs = bench._parser().parse_args(["--seed", str(seed)])
    burst = bench._scaled_burst(bargs, preds, n, cap)
    reqs = [r.to_sim_request(i, cap) for i, r in enumerate(burst)]
    cfg = TIEConfig(max_new_tokens=cap, use_request_cap=False)
    model = tiny_llama()
    ids, lens = [r.prompt_ids for r in burst], [r.output_len for r in burst]
    plen = [len(x) for x in ids]
    orders = {p: policy_order(p, reqs, cfg) for p in POLICY_ORDER}
    plans = {p: memory_batches(o, plen, kv, cap) for p, o in orders.items()}
    plans["tie_planned"] = plan_batches(
        orders["tie"], plen, cap, kv_tokens=kv, **bench.request_laws(reqs)
    ).batches
    run_static_generate(
        model, ids[:8], lens[:8], None, batches=[list(range(8))], eos_token_id=2, pad_token_id=0
    )  # warm-up
    out = bench.median_static_runs(model, ids, lens, plans, reps)
    for p, b in plans.items():
        out[p]["n_batches"] = len(b)
    res = {
        "tie": out.pop("tie_planned"),
        **{p: v for p, v in out.items() if p != "tie"},
        "tie_membatch": out["tie"],
    }
    return {f"real_static_tiny_llama_cpu_n{n}_kv{kv}_planned_vs_membatch_seed{seed}": res}


def figure(results: dict[str, dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = [c for c in results if "_planned_seed" in c]
    seeds = [c.rsplit("_seed", 1)[1] for c in cases]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    width = 0.8 / (len(POLICY_ORDER) * 2)
    for j, pol in enumerate(POLICY_ORDER):
        for k, kind in enumerate(("memory cut", "planned")):
            xs, ys = [], []
            for i, c in enumerate(cases):
                plain = results[c.replace("_planned_seed", "_planned_vs_membatch_seed")]
                f0 = plain["fcfs"]["throughput_tok_s"]
                src = results[c] if kind == "planned" else plain
                key = "tie_membatch" if (pol, kind) == ("tie", "memory cut") else pol
                xs.append(i + (2 * j + k - len(POLICY_ORDER)) * width)
                ys.append(src[key]["throughput_tok_s"] / f0)
            ax.bar(
                xs,
                ys,
                width,
                color=plt.cm.tab10(j),
                alpha=0.45 if kind == "memory cut" else 0.95,
                label=f"{pol} ({kind})",
            )
    ax.axhline(1.4, color="k", ls="--", lw=0.8, label="1.4x target")
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"seed {s}" for s in seeds])
    ax.set_ylabel("whole-job tokens/s vs FCFS cut as wide as memory allows")
    ax.set_title("Offline job, 2,000 requests, 120k-token KV cap, generate cost model (H100)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=2, fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from hf_ext.generation.tie.bench import COMPONENT, static_rows
    from hf_ext.utils.bench import append_rows, device_name, plot_results, print_rows, results_dir

    args = _parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--seeds must be comma-separated ints, got {args.seeds!r}") from None
    if not seeds or args.offline_n < 1 or args.kv_tokens < 1:
        raise SystemExit("--seeds needs at least one seed; --offline-n and --kv-tokens must be >= 1")
    if args.tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", args.tag):
        raise SystemExit(f"--tag may use letters, digits, '_', '-' and '.' only, got {args.tag!r}")
    cmd = "python benchmarks/tie_offline_plan.py" + (" " + " ".join(argv) if argv else "")
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    real: dict[str, dict] = {}
    dev = ""
    for seed in seeds:
        print(f"[seed {seed}]")
        res, cm_name, preds = simulated(args, seed)
        results.update(res)
        dev = f"sim:{cm_name}"
        if args.real_cpu:
            new = real_cpu(preds, seed)
            real.update(new)
            for c, r in new.items():
                f0 = r["fcfs"]["throughput_tok_s"]
                print(f"  {c}: " + ", ".join(f"{k} {v['throughput_tok_s'] / f0:.2f}x" for k, v in r.items()))
    rows = static_rows({**results, **real}, dev, device_name(), cmd)
    print_rows(rows, title="TIE offline, planned batches — ratio > 1: TIE better")
    for c, r in results.items():
        if c.endswith(tuple(f"_planned_seed{s}" for s in seeds)):
            print(
                f"  {c}: prompt buckets tie {r['tie']['prompt_buckets']}, fcfs {r['fcfs']['prompt_buckets']} "
                f"(hindsight), ltr {r['ltr']['prompt_buckets']} (hindsight); TIE expected "
                f"{r['tie']['expected_makespan_s']:.0f}s, took {r['tie']['makespan_s']:.0f}s; "
                f"TIE without buckets {r['tie_plan_1bucket']['throughput_tok_s']:.0f} tok/s, with the true laws "
                f"{r['tie_true_dist']['throughput_tok_s']:.0f} tok/s"
            )
    if not args.no_write:
        rdir = results_dir()
        path = append_rows(COMPONENT, rows)
        plot_results(COMPONENT, path)
        stem = rdir / ("tie_offline_plan" + (f"_{args.tag}" if args.tag else ""))
        figure(results, stem.with_suffix(".png"))
        with open(stem.with_suffix(".json"), "w") as f:
            json.dump({"command": cmd, "simulated": results, "real_cpu": real}, f, indent=1, default=float)
        print(f"wrote {path}, {stem.with_suffix('.png')}, {stem.with_suffix('.json')}")
    print(f"done in {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
