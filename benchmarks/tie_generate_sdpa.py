"""Padded ``generate`` with and without PyTorch's cuDNN SDPA kernel (what ``tie_batched_generate`` avoids).

cuDNN plans its attention kernel for each new input shape. In ``generate`` the KV length grows every step, so a
job whose shapes were not seen before pays for a plan at every step. Each mode runs in a fresh process (an empty
plan cache): one left-padded batch of ``--rows`` prompts (widths up to ``--max-prompt``), each row forced to its own
length (up to ``--new`` tokens; :func:`hf_ext.generation.tie.offline.run_static_generate`, which checks every
length), timed on its first run (fresh shapes) and again (the same shapes). Rows in ``tie.csv``: metric
``generate_seconds``, ours = SDPA without cuDNN (``tie_batched_generate``'s default), baseline ``cudnn_sdpa``,
cases ``generate_sdpa_<shape>_<rows>x<max-prompt>_new<new>_{fresh,repeat}``.

    python benchmarks/tie_generate_sdpa.py                     # H100: llama3.1-8b shape, ~2 min
    python benchmarks/tie_generate_sdpa.py --shape tiny --device cpu --rows 4 --max-prompt 16 --new 6 --no-write
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("no_cudnn", "cudnn")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3.1-8b", help="model shape (hf_ext.simulate.calibrate.SHAPES)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=60, help="rows of the padded batch")
    p.add_argument(
        "--max-prompt", type=int, default=1000, help="widest prompt; the others are 1/4 to all of it"
    )
    p.add_argument("--new", type=int, default=272, help="longest forced output (the others 1 to it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true")
    return p


def _check(args: argparse.Namespace) -> None:
    for name in ("rows", "max_prompt", "new"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")


def job(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The batch: prompt token ids below ``vocab`` (row 0 the widest) and forced output lengths (row 0 the
    longest)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    widths = rng.integers(max(1, args.max_prompt // 4), args.max_prompt + 1, size=args.rows)
    outs = rng.integers(1, args.new + 1, size=args.rows)
    widths[0], outs[0] = args.max_prompt, args.new
    prompts = [rng.integers(3, vocab, size=int(w)).tolist() for w in widths]
    return prompts, [int(x) for x in outs]


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One mode in this process: warm-up on a small batch, then the job twice; seconds of each run."""
    from hf_ext.generation.tie.offline import run_static_generate
    from hf_ext.simulate.calibrate import model_for_shape

    model = model_for_shape(args.shape, args.device)
    prompts, outs = job(args, model.config.vocab_size)
    kw = dict(eos_token_id=2, pad_token_id=0, sdpa_cudnn=args.worker == "cudnn")
    k = min(4, len(prompts))
    run_static_generate(model, [p[:8] for p in prompts[:k]], [2] * k, None, batches=[list(range(k))], **kw)
    times = [
        run_static_generate(
            model, prompts, outs, None, batches=[list(range(len(prompts)))], **kw
        ).batch_times[0]
        for _ in range(2)
    ]
    return {"fresh": times[0], "repeat": times[1]}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    from hf_ext.generation.tie.bench import COMPONENT
    from hf_ext.utils.bench import Row, append_rows, plot_results, print_rows, results_dir

    base = [sys.executable, str(Path(__file__).resolve())]
    base += ["--shape", args.shape, "--device", args.device, "--rows", str(args.rows)]
    base += ["--max-prompt", str(args.max_prompt), "--new", str(args.new), "--seed", str(args.seed)]
    got: dict[str, dict[str, float]] = {}
    for mode in MODES:  # each in a fresh process: an empty cuDNN plan cache
        res = subprocess.run([*base, "--worker", mode], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"worker {mode} failed:\n{res.stderr[-3000:]}")
        got[mode] = json.loads(res.stdout.strip().splitlines()[-1])
        print(
            f"  {mode:<9} first run {got[mode]['fresh']:.2f}s, same shapes again {got[mode]['repeat']:.2f}s"
        )
    stem = f"generate_sdpa_{args.shape}_{args.rows}x{args.max_prompt}_new{args.new}"
    cmd = "python benchmarks/tie_generate_sdpa.py" + (" " + " ".join(argv) if argv else "")
    rows = [
        Row.make(
            COMPONENT,
            f"{stem}_{run}",
            "generate_seconds",
            got["no_cudnn"][run],
            "cudnn_sdpa",
            got["cudnn"][run],
            quality_name="forced_lengths_checked",
            quality_value="yes",
            command=cmd,
        )
        for run in ("fresh", "repeat")
    ]
    print_rows(rows, title="padded generate, SDPA without cuDNN vs with it (ratio > 1: without is faster)")
    if not args.no_write:
        append_rows(COMPONENT, rows)
        plot_results(COMPONENT, results_dir() / f"{COMPONENT}.csv")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
