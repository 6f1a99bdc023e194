"""How much synthetic training data the TIE length predictor needs (CPU, a few minutes).

Trains the log-t predictor of the TIE bench (same 2-layer encoder, same epochs) on growing slices of the
synthetic workload and scores each on a *validation* set that no benchmark uses (``--val-seed``, default
4242; the bench's own held-out set is seed 200). Reported per size: NLL and CRPS (log length and tokens,
``max_new_tokens=1000``), Spearman to the true length, coverage of the 50 % / 90 % intervals, fit time.
Two reference lines: the best constant log-t (no prompt information) and the generator's own
``(μ, σ, ν)`` per prompt (the ceiling any predictor can reach on this workload).

Writes ``benchmarks/results/tie_predictor_sweep.csv`` and ``.png`` (``--out`` to change the stem)::

    python benchmarks/tie_predictor_sweep.py --sizes 6000,12000,20000,40000
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

COLUMNS = [
    "predictor",
    "n_train",
    "epochs",
    "censor_at",
    "nll",
    "crps_log",
    "crps_tokens",
    "spearman",
    "coverage50",
    "coverage90",
    "fit_s",
    "val_seed",
    "commit",
    "command",
]


def _sizes(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        out = []
    if not out or any(n < 64 for n in out):
        raise SystemExit(f"--sizes must be comma-separated ints >= 64, got {text!r}")
    return out


def reference_rows(val: list[dict], train_lengths: list[int], m_val: int) -> list[dict]:
    """Scores of the best constant log-t and of the generator's true per-prompt law on ``val``."""
    from scipy import stats

    from hf_ext.generation.tie.predictor import constant_logt_baseline, logt_scores

    lens = np.asarray([r["output_len"] for r in val], dtype=np.float64)
    mu0, s0, nu0 = constant_logt_baseline(train_lengths)
    laws = {
        "constant_logt": (np.full_like(lens, mu0), np.full_like(lens, s0), np.full_like(lens, nu0)),
        "true_law": tuple(np.asarray([r[k] for r in val], dtype=np.float64) for k in ("mu", "sigma", "nu")),
    }
    rows = []
    for name, (mu, sigma, nu) in laws.items():
        spearman = float(stats.spearmanr(mu, lens).statistic) if np.ptp(mu) > 0 else 0.0
        rows.append({"predictor": name, **logt_scores(lens, mu, sigma, nu, m_val), "spearman": spearman})
    return rows


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = [r for r in rows if r["predictor"] == "logt"]
    refs = {r["predictor"]: r for r in rows if r["predictor"] != "logt"}
    n = [r["n_train"] for r in fit]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, label in zip(
        axes, ("nll", "crps_tokens", "spearman"), ("NLL (nats, log length)", "CRPS (tokens)", "Spearman")
    ):
        ax.plot(n, [r[key] for r in fit], "o-", label="log-t predictor")
        for name, style in (("true_law", "g--"), ("constant_logt", "r:")):
            ax.axhline(refs[name][key], color=style[0], ls=style[1:], label=name.replace("_", " "))
        ax.set_xscale("log")
        ax.set_xticks(n, [f"{x // 1000}k" if x >= 1000 else str(x) for x in n])
        ax.minorticks_off()
        ax.set_xlabel("synthetic training pairs")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle("TIE length predictor vs training-set size (validation set, never used by the bench)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="6000,12000,20000,40000", help="training-set sizes (comma-separated)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--val-n", type=int, default=3000)
    p.add_argument("--val-seed", type=int, default=4242)
    p.add_argument("--train-seed", type=int, default=100, help="the bench's training seed (--seed 0)")
    p.add_argument(
        "--censor-at",
        type=int,
        default=None,
        help="train with lengths at this cap right-censored (PredictorConfig.censor_at; the workload's cap is 1000)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="output stem (default tie_predictor_sweep in benchmarks/results or $HF_EXT_RESULTS_DIR)",
    )
    args = p.parse_args(argv)
    sizes = _sizes(args.sizes)
    if args.epochs < 1 or args.val_n < 100:
        raise SystemExit("--epochs must be >= 1 and --val-n >= 100")
    from tqdm.auto import tqdm

    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.data import generate_workload, length_pairs
    from hf_ext.generation.tie.predictor import LengthPredictor
    from hf_ext.utils.bench import git_commit, results_dir

    torch.set_num_threads(2)
    m_val = 1000
    val = generate_workload(args.val_n, seed=args.val_seed, max_new_tokens=m_val)
    vd = length_pairs(val)
    rows: list[dict] = []
    for n in tqdm(sizes, desc="training-set sizes"):
        # the bench's own training set for --n-train n (the generator is not prefix-stable across sizes)
        train_rows = generate_workload(n, seed=args.train_seed, max_new_tokens=m_val)
        tr = length_pairs(train_rows)
        if not rows:
            rows = reference_rows(val, tr["output_len"], m_val)
        t0 = time.perf_counter()
        pred = LengthPredictor(
            PredictorConfig(kind="logt", epochs=args.epochs, seed=0, censor_at=args.censor_at)
        )
        pred.fit(tr)
        fit_s = time.perf_counter() - t0
        ev = pred.evaluate(vd, max_new_tokens=m_val)
        rows.append(
            {"predictor": "logt", "n_train": n, "epochs": args.epochs, "fit_s": round(fit_s, 1), **ev}
        )
        print(
            f"  n={n}: NLL {ev['nll']:.4f}, CRPS {ev['crps_tokens']:.1f} tok, Spearman {ev['spearman']:.3f}"
        )
    cmd = "python benchmarks/tie_predictor_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = Path(args.out) if args.out else results_dir() / "tie_predictor_sweep"
    stem.parent.mkdir(parents=True, exist_ok=True)
    commit = git_commit()
    with stem.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({**r, "val_seed": args.val_seed, "commit": commit, "command": cmd.strip()})
    plot(rows, stem.with_suffix(".png"))
    print(
        f"{'predictor':<14} {'n_train':>8} {'NLL':>7} {'CRPS log':>9} {'CRPS tok':>9} {'Spearman':>9} {'cov90':>6}"
    )
    for r in rows:
        print(
            f"{r['predictor']:<14} {r.get('n_train', '-')!s:>8} {r['nll']:7.4f} {r['crps_log']:9.4f} "
            f"{r['crps_tokens']:9.1f} {r['spearman']:9.3f} {r['coverage90']:6.3f}"
        )
    print(f"wrote {stem.with_suffix('.csv')} and {stem.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
