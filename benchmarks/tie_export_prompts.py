"""Write the prompt texts of the Azure replay (``benchmarks/data/tie_azure_replay*.json``) for a served predictor.

``python -m hf_ext bench tie --export-replay`` writes each trace request's arrival, token counts and the three
predictors' outputs, not its text. A server that runs the length predictor itself (``hf-ext serve --tie-predictor``)
needs the text. This script rebuilds it the way the bench does: the first ``--minutes`` of the trace, a pool of
synthetic prompts (seed ``seed + 300``), each trace output length matched to a prompt (seed ``seed + 1``). It checks
the result against the replay JSON (arrivals and output lengths must agree) and, with ``--predictor``, that a saved
log-t predictor ranks these texts like the JSON's ``mu`` (Spearman >= 0.95: a retrain with the bench's data and
settings is not bit-identical on another CPU).

Needs the Azure trace (``../shared/data``)::

    python benchmarks/tie_export_prompts.py --replay benchmarks/data/tie_azure_replay_n40k.json \\
        --out benchmarks/data/tie_azure_replay_prompts.json --predictor benchmarks/data/tie_predictor_logt_n40k

``benchmarks/data/tie_predictor_logt_n40k`` is the bench's log-t predictor retrained the bench's way (40,000 synthetic
pairs, 4 epochs, seed 0, one CPU thread), saved for ``tie_serve_replay.py --predictor``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replay", required=True, help="the replay JSON the texts belong to")
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=20.0, help="as the bench's --minutes")
    p.add_argument("--seed", type=int, default=0, help="as the bench's --seed")
    p.add_argument(
        "--predictor", default=None, help="saved logt predictor to check against the replay's mu/sigma"
    )
    p.add_argument("--check-n", type=int, default=400, help="requests whose predictions are checked")
    args = p.parse_args(argv)

    from hf_ext.generation.tie.bench import MAX_NEW_TOKENS
    from hf_ext.generation.tie.data import generate_workload, load_azure_trace, match_to_lengths

    replay = json.loads(Path(args.replay).read_text())
    rows = replay["requests"]
    tr = load_azure_trace()
    keep = tr["arrival"] <= args.minutes * 60.0
    arr, olen = tr["arrival"][keep], tr["output_len"][keep]
    pool = generate_workload(4000, seed=args.seed + 300, max_new_tokens=MAX_NEW_TOKENS)
    matched = match_to_lengths(olen, pool, seed=args.seed + 1)
    n = len(rows)
    if not (
        np.allclose([r["arrival"] for r in rows], arr[:n], atol=2e-3)
        and [r["output_len"] for r in rows] == [int(x) for x in olen[:n]]
    ):
        raise SystemExit(
            f"{args.replay}: its arrivals / output lengths are not this trace window's first {n}"
        )
    prompts = [m["prompt"] for m in matched[:n]]
    if args.predictor:
        from scipy.stats import spearmanr

        from hf_ext.generation.tie.predictor import LengthPredictor

        k = min(args.check_n, n)
        got = LengthPredictor.from_pretrained(args.predictor).predict(prompts[:k])
        mu = np.array([r["mu"] for r in rows[:k]])
        d = np.abs(got["mu"] - mu)
        rho = float(spearmanr(got["mu"], mu)[0])
        print(
            f"predictor vs the replay's mu, first {k}: |difference| median {np.median(d):.3f}, max {d.max():.3f}; "
            f"Spearman {rho:.3f}"
        )
        if rho < 0.95:  # a retrain with the same data and settings differs by CPU float order only
            raise SystemExit("the predictor does not rank these prompts like the replay's predictions")
    meta = {**replay["meta"], "replay": Path(args.replay).name, "note": "prompt i is the text of request i"}
    Path(args.out).write_text(json.dumps({"meta": meta, "prompts": prompts}, separators=(",", ":")))
    print(f"wrote {n} prompts to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
