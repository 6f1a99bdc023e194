"""FSEP expert compute: one grouped GEMM per projection vs one GEMM pair per expert, on one GPU.

Times forward + backward of the two code paths ``FSEPExperts`` chooses between
(``FSEPConfig(expert_compute="grouped_mm")`` and ``"loop"``), called as they are in the layer, over real MoE
expert shapes, the number of experts one rank materialises (``C``), the mean rows (routed tokens) per expert and
how the rows are spread over the experts (``uniform`` or ``zipf``: the i-th expert gets rows ∝ 1 / (i + 1)).
Both paths run interleaved round by round (``hf_ext.utils.bench.time_interleaved``), each timing ``--calls``
forward + backward passes back to back (the CPU queues the next kernels while the GPU runs, as in a training
step; one synchronised call would charge the loop's kernel launches in full), and their outputs and gradients
are compared in the same run. It writes ``expert_compute_ms`` rows to ``fsep.csv`` (``ours``: grouped
GEMM, baseline ``loop``; ratio > 1: grouped is faster) and ``fsep_expert_compute.png`` beside it, and prints how
often ``expert_compute="auto"``'s rule picked the faster path.

Usage (on a CUDA GPU with bf16 grouped GEMMs, torch >= 2.8)::

    python benchmarks/fsep_expert_compute.py [--shapes olmoe_1b_7b mixtral_8x7b] [--experts 2 8] [--rows 256 4096] [--rounds 10] [--no-write]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from hf_ext.accelerate.fsep.layer import GROUPED_MM_MIN_EXPERTS, FSEPExperts, _grouped_mm_unsupported
from hf_ext.utils.bench import Row, append_rows, print_rows, results_dir, time_interleaved

# (hidden, expert intermediate) of the models' configs
SHAPES: dict[str, tuple[int, int]] = {
    "qwen3_30b_a3b": (2048, 768),
    "olmoe_1b_7b": (2048, 1024),
    "deepseek_v2_lite": (2048, 1408),
    "gpt_oss_20b": (2880, 2880),
    "mixtral_8x7b": (4096, 14336),
}
EXPERTS = (2, 4, 8, 16, 32, 64)
ROWS = (64, 256, 1024)
SKEWS = ("uniform", "zipf")
WEIGHT_BYTES_CAP = 12 * 2**30  # per path: bf16 weights + their gradients stay under ~2x this


def split_rows(total: int, c: int, skew: str) -> list[int]:
    """``total`` rows over ``c`` experts: equal shares (``uniform``) or ∝ 1 / (i + 1) (``zipf``); sums to total."""
    if skew not in SKEWS:
        raise ValueError(f"skew must be one of {SKEWS}, got {skew!r}")
    share = [1.0] * c if skew == "uniform" else [1.0 / (i + 1) for i in range(c)]
    s = sum(share)
    rows = [int(total * x / s) for x in share]
    rows[0] += total - sum(rows)
    return rows


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


def run_case(
    name: str, hidden: int, inter: int, c: int, rows_per_expert: int, skew: str, rounds: int, calls: int = 4
) -> Row | None:
    """Time one configuration (ms per forward + backward); ``None`` when its weights would exceed the cap."""
    if c * 3 * hidden * inter * 2 > WEIGHT_BYTES_CAP:
        return None
    per_slot = split_rows(rows_per_expert * c, c, skew)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    w = (torch.randn((c, 3 * inter * hidden), device=dev, generator=gen) * hidden**-0.5).to(dt)
    x = torch.randn((sum(per_slot), hidden), device=dev, generator=gen).to(dt)
    gy = torch.randn((sum(per_slot), hidden), device=dev, generator=gen).to(dt)
    w.requires_grad_(True)
    x.requires_grad_(True)
    if _grouped_mm_unsupported(x, w, hidden, inter) is not None:
        raise SystemExit(f"grouped GEMM unavailable: {_grouped_mm_unsupported(x, w, hidden, inter)}")
    layer = SimpleNamespace(hidden=hidden, intermediate=inter, act_fn=F.silu)
    paths = {"loop": FSEPExperts._experts_loop, "grouped_mm": FSEPExperts._experts_grouped}

    def step(fn) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w.grad = None
        x.grad = None
        y = fn(layer, x, w, per_slot)
        y.backward(gy)
        return y, w.grad, x.grad

    outs = {k: [t.detach().clone() for t in step(fn)] for k, fn in paths.items()}
    err = max(_max_rel(a, b) for a, b in zip(outs["grouped_mm"], outs["loop"]))
    del outs

    def repeat(fn) -> None:
        for _ in range(calls):
            step(fn)

    ms = time_interleaved({k: (lambda fn=fn: repeat(fn)) for k, fn in paths.items()}, rounds=rounds, warmup=2)
    ms = {k: v / calls for k, v in ms.items()}
    auto = "grouped_mm" if c >= GROUPED_MM_MIN_EXPERTS else "loop"
    return Row.make(
        "fsep",
        f"expert_compute_{name}_H{hidden}_I{inter}_C{c}_r{rows_per_expert}_{skew}",
        "expert_compute_ms",
        ms["grouped_mm"],
        "loop",
        ms["loop"],
        quality_name=f"max_rel_err_vs_loop;auto_picks={auto};calls={calls}",
        quality_value=round(err, 5),
    )


def plot(rows: list[Row], out: Path) -> Path:
    """One panel per shape: loop / grouped time against C, a line per (rows per expert, skew)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(dict.fromkeys(r.case.split("_H")[0].removeprefix("expert_compute_") for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False, sharey=True)
    for ax, shape in zip(axes[0], shapes):
        series: dict[str, list[tuple[int, float]]] = {}
        for r in rows:
            if r.case.startswith(f"expert_compute_{shape}_H"):
                parts = r.case.split("_")
                c = int(next(p for p in parts if p.startswith("C"))[1:])
                label = f"{next(p for p in parts if p.startswith('r'))[1:]} rows/expert, {parts[-1]}"
                series.setdefault(label, []).append((c, r.ratio or math.nan))
        for label, pts in series.items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axvline(GROUPED_MM_MIN_EXPERTS, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"{shape} ({rows[0].device})" if shape == shapes[0] else shape, fontsize=9)
        ax.set_xlabel("experts materialised on the rank (C)")
    axes[0][0].set_ylabel("loop time / grouped GEMM time (>1: grouped faster)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(
        "FSEP expert forward + backward, bf16: grouped GEMM vs per-expert GEMMs (dotted: auto's threshold)"
    )
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--experts", nargs="+", type=int, default=list(EXPERTS), help="values of C")
    p.add_argument("--rows", nargs="+", type=int, default=list(ROWS), help="mean rows per expert")
    p.add_argument("--calls", type=int, default=4, help="passes timed back to back per round (>= 1)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds per configuration (>= 1)")
    p.add_argument("--no-write", action="store_true", help="print only; no CSV rows or PNG")
    a = p.parse_args(argv)
    for flag, vals in (
        ("--rounds", [a.rounds]),
        ("--calls", [a.calls]),
        ("--experts", a.experts),
        ("--rows", a.rows),
    ):
        if min(vals) < 1:
            p.error(f"{flag} must be >= 1, got {vals}")
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    rows: list[Row] = []
    configs = [(s, c, r, k) for s in a.shapes for c in a.experts for r in a.rows for k in SKEWS]
    try:
        from tqdm import tqdm

        configs = tqdm(configs, desc="configurations")
    except ImportError:
        pass
    for s, c, r, k in configs:
        row = run_case(s, *SHAPES[s], c, r, k, a.rounds, a.calls)
        if row is not None:
            rows.append(row)
        torch.cuda.empty_cache()
    print_rows(rows, "FSEP expert compute: grouped GEMM (ours) vs per-expert loop, fwd+bwd ms")
    right = sum(("auto_picks=grouped_mm" in r.quality_name) == ((r.ratio or 0) > 1.0) for r in rows)
    print(
        f"auto's rule (grouped from {GROUPED_MM_MIN_EXPERTS} experts) picked the faster path in {right}/{len(rows)}"
    )
    if not a.no_write and rows:
        path = append_rows("fsep", rows)
        print(f"rows -> {path}; plot -> {plot(rows, results_dir() / 'fsep_expert_compute.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
