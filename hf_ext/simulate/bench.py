"""``python -m hf_ext bench simulate``: calibration error and simulation speed of the serving simulator.

Rows written to ``benchmarks/results/simulator.csv`` (component ``simulator``):

* ``generate_time_s`` per held-out validation case: ours = simulated, baseline ``measured`` (real
  transformers ``generate`` wall time); ratio = measured / simulated (1.0 = exact);
* ``calibration_error``: mean |simulated / measured - 1| over those cases, baseline ``target_0.20``;
* ``sim_seconds_100k``: wall seconds to simulate 100,000 requests (Azure-matched lengths, log-t tail,
  Poisson arrivals, GPU.md H100 cost model) per scheduler, baseline ``target_60s`` = 60; another ``--n`` is
  named exactly: ``sim_seconds_10k`` for a multiple of 1,000, else ``sim_seconds_n{n}`` (``sim_seconds_n500``);
* ``sim_seconds_trace``: wall seconds to replay the whole Azure 2023 conversation trace (19,366 requests;
  CC-BY 4.0, Patel et al., ISCA 2024) when the file is present.

Usage::

    python -m hf_ext bench simulate                       # CPU tiny calibration + 100k speed
    python -m hf_ext bench simulate --quick               # 10k requests, fewer reps (smoke)
    PYTHONPATH=$PWD:$PWD/kernels python -m hf_ext bench simulate --device cuda --shape llama3.1-8b \
        --calib-out hf_ext/simulate/calibrations/    # GPU calibration (~2 min on one H100)
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path

from hf_ext.utils.bench import bench_main, mark_quick_run

COMPONENT = "simulator"


def positive_float(text: str) -> float:
    """argparse ``type`` of a finite number > 0 (``--rate 0`` is an argparse error, not a traceback)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return v


@bench_main
def main(argv: Sequence[str] | None = None) -> int:
    from hf_ext.simulate.calibrate import SHAPES, positive_int

    ap = argparse.ArgumentParser(prog="hf-ext bench simulate", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--device", default=None, help="cpu or cuda[:i]: device of the calibration measurement (default cpu)"
    )
    ap.add_argument(
        "--shape", default=None, choices=SHAPES, help="model shape (default tiny on CPU, llama3.1-8b on CUDA)"
    )
    ap.add_argument(
        "--n", type=positive_int, default=None, help="requests in the speed run (>= 1, default 100000)"
    )
    ap.add_argument(
        "--rate",
        type=positive_float,
        default=None,
        help="arrival rate of the speed run (req/s, finite, > 0, default 5.5)",
    )
    ap.add_argument(
        "--reps",
        type=positive_int,
        default=None,
        help="timed rounds per calibration point, >= 1 (default 3 CPU, 2 CUDA)",
    )
    ap.add_argument("--quick", action="store_true", help="10k requests and 2 reps (smoke test)")
    ap.add_argument("--skip-calibration", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument(
        "--calib-out", default=None, help="directory or .json path to save the fitted calibration"
    )
    args = ap.parse_args(list(argv) if argv is not None else None)
    mark_quick_run(args.quick)
    # a flag of a part that is skipped would be ignored: say so instead of running without it
    for skip, part, flags in (
        (args.skip_calibration, "calibration", ("device", "shape", "reps", "calib_out")),
        (args.skip_speed, "speed run", ("n", "rate")),
    ):
        given = [f"--{f.replace('_', '-')}" for f in flags if getattr(args, f) is not None]
        if skip and given:
            ap.error(f"{', '.join(given)} only apply to the {part}, which --skip-{part.split()[0]} skips")
    args.device = args.device or "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        ap.error(f"--device must be cpu or cuda[:i], got {args.device!r}")
    if args.device.startswith("cuda") and not args.skip_calibration:
        import torch

        index = int(args.device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            ap.error(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    shape = args.shape or ("llama3.1-8b" if args.device.startswith("cuda") else "tiny")
    args.n = 100_000 if args.n is None else args.n
    args.rate = 5.5 if args.rate is None else args.rate
    if args.reps is None:
        args.reps = 2 if args.device.startswith("cuda") else 3
    if args.quick:
        args.n = min(args.n, 10_000)
        args.reps = min(args.reps, 2)

    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows

    rows: list[Row] = []
    if not args.skip_calibration:
        rows += _calibration_rows(args.device, shape, args.reps, args.calib_out)
    if not args.skip_speed:
        rows += _speed_rows(args.n, args.rate)
    if not rows:
        print("nothing to do")
        return 0
    print_rows(rows, title="hf_ext simulator")
    path = append_rows(COMPONENT, rows)
    png = plot_results(COMPONENT, path)
    print(f"wrote {path} and {png}")
    return 0


def _calibration_rows(device: str, shape: str, reps: int, out: str | None) -> list:
    from hf_ext.simulate.calibrate import calibrate
    from hf_ext.utils.bench import Row

    t0 = time.perf_counter()
    cm = calibrate(shape, device, reps=reps, progress=True)
    cm.extra["seconds"] = time.perf_counter() - t0
    if out:
        p = Path(out)
        p = p / f"{cm.name}.json" if (p.is_dir() or not p.suffix) else p
        cm.save(p)
        print(f"saved calibration {p}")
    case = f"{device.split(':')[0]}-{shape}"
    rows = []
    for v in cm.extra["validation"]:
        rows.append(
            Row.make(
                COMPONENT,
                f"{case} B={v['batch']} P={v['prompt']} new={v['new']}",
                "generate_time_s",
                v["simulated_s"],
                "measured",
                v["measured_s"],
                quality_name="rel_err",
                quality_value=round(v["rel_err"], 4),
            )
        )
    err = cm.extra["calibration_error"]
    rows.append(
        Row.make(
            COMPONENT,
            case,
            "calibration_error",
            err,
            "target_0.20",
            0.20,
            quality_name="fit_mean_abs_rel_err",
            quality_value=round(cm.extra["fit_mean_abs_rel_err"], 4),
        )
    )
    return rows


def speed_metric(n: int) -> str:
    """Metric name of the ``n``-request speed run: ``sim_seconds_100k`` (the name of the existing rows) for a
    multiple of 1,000, else ``sim_seconds_n{n}``; never rounded (``n // 1000`` wrote ``--n 500`` as ``0k``)."""
    return f"sim_seconds_{n // 1000}k" if n % 1000 == 0 else f"sim_seconds_n{n}"


def _speed_rows(n: int, rate: float) -> list:
    from hf_ext.simulate import FCFS, CostModel, Simulator, SJFOracle
    from hf_ext.simulate import workload as W
    from hf_ext.utils.bench import Row

    cm = CostModel.load("gpu_md-h100-llama3.1-8b")
    reqs = W.synthetic(n, rate=rate, output=W.azure_output_dist("logt"), seed=0)
    rows = []
    for sched in (FCFS(), SJFOracle()):
        for r in reqs:
            r.meta.pop("sim_generated", None)
        t0 = time.perf_counter()
        res = Simulator(cm, sched, max_num_seqs=256, kv_capacity_tokens=400_000).run(reqs)
        dt = time.perf_counter() - t0
        s = res.summary()
        metric = speed_metric(n)
        rows.append(
            Row.make(
                COMPONENT,
                f"{n} reqs {rate} req/s {sched.name}",
                metric,
                dt,
                "target_60s",
                60.0,
                quality_name="events_per_s",
                quality_value=round(res.counters["events"] / dt),
            )
        )
        print(
            f"{sched.name}: {n} requests in {dt:.2f}s; mean latency {s['latency_mean']:.2f}s, "
            f"per-token {s['per_token_mean'] * 1e3:.1f} ms, {res.counters['events']:.0f} events, "
            f"{res.counters['iterations']:.0f} iterations"
        )
    try:
        trace = W.azure_trace()
    except FileNotFoundError as e:
        print(f"skipping trace replay: {e}")
        return rows
    t0 = time.perf_counter()
    res = Simulator(cm, FCFS(), max_num_seqs=256, kv_capacity_tokens=400_000).run(trace)
    dt = time.perf_counter() - t0
    rows.append(
        Row.make(
            COMPONENT,
            f"azure2023conv trace {len(trace)} reqs fcfs",
            "sim_seconds_trace",
            dt,
            "target_60s",
            60.0,
            quality_name="per_token_mean_ms",
            quality_value=round(res.summary()["per_token_mean"] * 1e3, 2),
        )
    )
    return rows


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.exit(main())
