"""Observed output lengths of served requests: train the length predictor on your own traffic.

TIE's predictor must learn *your* model's output lengths on *your* prompts, and the place those are seen is the
server. A :class:`LengthLog` given to :func:`~hf_ext.generation.tie.cb.enable_tie_scheduler` (``length_log=``),
:func:`~hf_ext.generation.tie.serve.serve_tie` or ``hf-ext serve --tie-length-log FILE`` records one row per
finished request, written by the continuous-batching scheduler when transformers finishes the request:

* ``prompt`` — the text the predictor sees for it (``prompt_text(ids)`` or the decoded prompt ids);
* ``output_len`` — tokens generated (an EOS token counts);
* ``censored`` / ``reason`` — ``"eos"``: the model ended it, the length is exact; ``"max_new_tokens"``: generation
  was cut at the request's cap, so only "at least ``output_len``" is known; ``"cancelled"``: the client went away
  after ``output_len`` tokens (also a lower bound). Requests that failed or were cancelled before their first
  token are not recorded;
* ``max_new_tokens``, ``prompt_tokens``, ``request_id``, ``time`` (Unix seconds);
* ``pred_mu`` / ``pred_sigma`` / ``pred_nu`` / ``source`` — the log-t law the TIE scheduler scored the request with
  and where it came from (``"predictor"``, ``"hint"``, ``"heuristic"``; ``None`` under another scheduler).

:meth:`LengthLog.to_dataset` (or :func:`load_length_log` for the JSONL file) gives a ``datasets.Dataset`` that
``LengthPredictor.fit(ds, censored_column="censored")`` trains on, with the cut rows entering the log-t likelihood as
``log P(X >= output_len)``: treating them as exact would teach the predictor that long answers end at the cap.
:meth:`LengthLog.calibration` checks the laws the server scored with against what happened (a drift monitor;
``report_every=N`` logs it every N requests, a warning when the traffic has drifted).

Example:
    >>> log = LengthLog()
    >>> log.add(prompt="Hi", output_len=12, reason="eos", max_new_tokens=64, prompt_tokens=3, request_id="r0")
    >>> log.add(prompt="Tell me a story", output_len=64, reason="max_new_tokens", max_new_tokens=64,
    ...         prompt_tokens=5, request_id="r1")
    >>> [r["censored"] for r in log.records]
    [False, True]
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import _check_int

logger = logging.getLogger("hf_ext")

REASONS = ("eos", "max_new_tokens", "cancelled")
LAW_SOURCES = ("predictor", "hint", "heuristic")
COLUMNS = (
    "request_id",
    "prompt",
    "output_len",
    "censored",
    "reason",
    "max_new_tokens",
    "prompt_tokens",
    "pred_mu",
    "pred_sigma",
    "pred_nu",
    "source",
    "time",
)


class LengthLog:
    """Thread-safe record of served requests' output lengths (see the module docstring for the columns).

    Args:
        path: a JSONL file each record is appended to as it is made (flushed per record; an existing file is
            appended to, so one log can span server restarts). ``None``: memory only.
        max_records: how many records to keep in memory (the newest; the file keeps all). ``None``: no limit.
        report_every: after every this many records, log the calibration of the last that many laws (logger
            ``hf_ext``): ``INFO`` normally, ``WARNING`` when more than twice the calibrated 5 % ran past the laws'
            95th or stopped under their 5th percentile (the traffic drifted from what the predictor learned).
            ``None``: no reports. Needs ``max_records >= report_every``.

    Attributes:
        records: the kept records (a list copy, oldest first).
        count: records made since creation (including ones no longer kept in memory).
        errors: records that could not be made or written (each logged once per kind on logger ``hf_ext``; the
            engine is never stopped by the log).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        max_records: int | None = 100_000,
        report_every: int | None = None,
    ) -> None:
        _check_int("max_records", max_records, allow_none=True)
        _check_int("report_every", report_every, allow_none=True)
        if report_every is not None and max_records is not None and max_records < report_every:
            raise ValueError(f"max_records ({max_records}) must be >= report_every ({report_every})")
        if path is not None:
            path = os.fspath(path)
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise ValueError(f"path: directory {parent!r} does not exist")
            if os.path.isdir(path):
                raise ValueError(f"path must be a file, {path!r} is a directory")
        self.path = path
        self._lock = threading.Lock()
        self._records: deque[dict[str, Any]] = deque(maxlen=max_records)
        if path is not None and _ends_mid_line(path):
            # a crash cut the last row: drop that partial row (its record is lost anyway), so this run's rows start
            # on a line of their own and the file still loads
            cut = _drop_partial_last_line(path)
            logger.warning(
                "TIE length log: %s ended with a row cut off mid-line (a crash?); dropped its %d byte(s) and appending",
                path,
                cut,
            )
        self._fh: Any = open(path, "a", encoding="utf-8") if path is not None else None  # noqa: SIM115
        self.count = 0
        self.errors = 0
        self.report_every = report_every
        self.reports: list[dict[str, Any]] = []  # the periodic calibration reports made so far
        self._warned: set[str] = set()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn(record)`` after each new record, in the thread that made it (the engine's: keep it cheap).
        An exception in ``fn`` is counted in :attr:`errors` and logged once, never raised to the engine."""
        if not callable(fn):
            raise ValueError(f"fn must be callable, got {type(fn).__name__}")
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Stop calling ``fn`` (no error if it was not added)."""
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    # ------------------------------------------------------------------------------------------- writing
    def add(
        self,
        *,
        prompt: str,
        output_len: int,
        reason: str,
        max_new_tokens: int | None,
        prompt_tokens: int,
        request_id: str,
        law: tuple[float, float, float] | None = None,
        source: str | None = None,
    ) -> dict[str, Any]:
        """Record one request (the scheduler calls this; also usable to import lengths seen elsewhere).

        ``law``: the ``(μ, σ, ν)`` it was scored with, ``source`` one of ``LAW_SOURCES`` (both or neither).
        ``ValueError`` (naming the argument) on a bad value, before anything is recorded.
        """
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
        if isinstance(output_len, bool) or not isinstance(output_len, int) or output_len < 1:
            raise ValueError(f"output_len must be an int >= 1, got {output_len!r}")
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        if (law is None) != (source is None) or (source is not None and source not in LAW_SOURCES):
            raise ValueError(
                f"give law and source together, source one of {LAW_SOURCES}; got source={source!r}"
            )
        rec: dict[str, Any] = {
            "request_id": str(request_id),
            "prompt": prompt,
            "output_len": output_len,
            "censored": reason != "eos",
            "reason": reason,
            "max_new_tokens": None if max_new_tokens is None else int(max_new_tokens),
            "prompt_tokens": int(prompt_tokens),
            "pred_mu": None if law is None else float(law[0]),
            "pred_sigma": None if law is None else float(law[1]),
            "pred_nu": None if law is None else float(law[2]),
            "source": source,
            "time": time.time(),
        }
        with self._lock:
            self._records.append(rec)
            self.count += 1
            if self._fh is not None:
                try:
                    self._fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    self._fh.flush()
                except (OSError, ValueError) as exc:  # disk full, closed file: keep serving
                    self._error("write", f"could not append to {self.path!r}: {exc}")
            due = self.report_every is not None and self.count % self.report_every == 0
            window = self._newest(self.report_every) if due else []  # type: ignore[arg-type]
            listeners = list(self._listeners)
        if due:
            self._report(window)
        for fn in listeners:
            try:
                fn(rec)
            except Exception as exc:  # noqa: BLE001 - runs in the engine's thread
                self._error("listener", f"listener {fn!r} raised {type(exc).__name__}: {exc}")
        return rec

    def _report(self, window: list[dict[str, Any]]) -> None:
        """Log the calibration of the laws in ``window`` (the last ``report_every`` records); see ``report_every``."""
        try:
            cal = calibration(window, levels=(0.9,))
        except Exception as exc:  # noqa: BLE001 - runs in the engine's thread
            self._error("report", f"calibration report failed: {type(exc).__name__}: {exc}")
            return
        cut = sum(bool(r["censored"]) for r in window) / len(window)
        rep = {"count": self.count, "window": len(window), "cut": cut, **cal}
        self.reports.append(rep)
        if not cal["n"]:
            logger.info(
                "TIE length log: %d requests, %.0f%% of the last %d cut; no laws to check",
                self.count,
                100 * cut,
                len(window),
            )
            return
        drift = cal["above_q0.9"] > 0.1 or cal["below_q0.9"] > 0.1
        logger.log(
            logging.WARNING if drift else logging.INFO,
            "TIE length log: %d requests; of the last %d (%.0f%% cut), %.1f%% ran past their law's 95th percentile "
            "and %.1f%% stopped under its 5th (5%% each when calibrated), NLL %.3f%s",
            self.count,
            len(window),
            100 * cut,
            100 * cal["above_q0.9"],
            100 * cal["below_q0.9"],
            cal["nll"],
            "; the traffic has drifted from what the predictor learned: retrain it on this log (hf-ext tie-log "
            "FILE --fit DIR)"
            if drift
            else "",
        )

    def _error(self, kind: str, msg: str) -> None:
        self.errors += 1
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("TIE length log: %s (further errors of this kind are counted, not logged)", msg)

    def close(self) -> None:
        """Close the file (records stay in memory); later records are kept in memory only."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> LengthLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------- reading
    @property
    def records(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._records)

    def newest(self, n: int) -> list[dict[str, Any]]:
        """The newest ``n`` kept records, oldest first, without copying the rest (up to ``max_records``)."""
        with self._lock:
            return self._newest(n)

    def _newest(self, n: int) -> list[dict[str, Any]]:  # the caller holds the lock
        return list(islice(reversed(self._records), n))[::-1]

    def __len__(self) -> int:
        with self._lock:
            return len(self._records)

    def to_dataset(self) -> Any:
        """The kept records as a ``datasets.Dataset`` (columns ``COLUMNS``), ready for
        ``LengthPredictor.fit(ds, censored_column="censored")``."""
        return records_to_dataset(self.records)

    def calibration(self, levels: Iterable[float] = (0.5, 0.9), bins: int = 10) -> dict[str, Any]:
        """How well the laws the scheduler scored with match what happened; see :func:`calibration`."""
        return calibration(self.records, levels, bins)


def records_to_dataset(records: list[dict[str, Any]]) -> Any:
    """``datasets.Dataset`` of length-log records (every column of ``COLUMNS``, in that order)."""
    import datasets

    features = datasets.Features(
        {
            "request_id": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "output_len": datasets.Value("int64"),
            "censored": datasets.Value("bool"),
            "reason": datasets.Value("string"),
            "max_new_tokens": datasets.Value("int64"),
            "prompt_tokens": datasets.Value("int64"),
            "pred_mu": datasets.Value("float64"),
            "pred_sigma": datasets.Value("float64"),
            "pred_nu": datasets.Value("float64"),
            "source": datasets.Value("string"),
            "time": datasets.Value("float64"),
        }
    )
    return datasets.Dataset.from_dict({c: [r.get(c) for r in records] for c in COLUMNS}, features=features)


def _ends_mid_line(path: str) -> bool:
    """Whether the file at ``path`` exists, is not empty and does not end with a newline."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except OSError:
        return False


def _drop_partial_last_line(path: str) -> int:
    """Truncate the file at ``path`` after its last newline (nothing of it when it has none); returns the number of
    bytes removed."""
    with open(path, "r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos, block = end, 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            fh.seek(start)
            i = fh.read(pos - start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        else:
            keep = 0
        fh.truncate(keep)
    return end - keep


def load_length_log(path: str | os.PathLike) -> Any:
    """Read a :class:`LengthLog` JSONL file into a ``datasets.Dataset`` (``ValueError`` naming the line of a bad
    record). A last line cut off mid-record (no newline, not JSON: the writer crashed) is skipped with a warning."""
    records: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        lines = fh.readlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as exc:  # not JSON, or not UTF-8 (a multi-byte character cut)
            if i == len(lines) and not line.endswith(b"\n"):
                logger.warning(
                    "%s:%d: skipped a record cut off mid-line (the writer crashed?): %s",
                    os.fspath(path),
                    i,
                    exc,
                )
                continue
            raise ValueError(
                f"{os.fspath(path)}:{i}: not a JSON record ({exc}); if a crash cut this row before a restart, "
                "delete the line"
            ) from exc
        required = ("prompt", "output_len", "censored", "reason")
        missing = [c for c in required if c not in rec] if isinstance(rec, dict) else list(required)
        if missing:
            raise ValueError(f"{os.fspath(path)}:{i}: not a length-log record (missing {missing})")
        records.append(rec)
    return records_to_dataset(records)


def calibration(
    records: list[dict[str, Any]], levels: Iterable[float] = (0.5, 0.9), bins: int = 10
) -> dict[str, Any]:
    """Predicted laws against observed lengths, censoring-aware, over the records that carry a law
    (:func:`law_calibration` of their ``output_len`` / ``censored`` / ``pred_*``), plus ``by_source``: how many laws
    came from the predictor, hints, the heuristic."""
    rows = [r for r in records if r.get("pred_mu") is not None]
    by_source = {s: sum(r.get("source") == s for r in rows) for s in LAW_SOURCES}
    cols = {k: [r[k] for r in rows] for k in ("output_len", "censored", "pred_mu", "pred_sigma", "pred_nu")}
    out = law_calibration(*cols.values(), levels=levels, bins=bins)
    return {"n": out.pop("n"), "n_censored": out.pop("n_censored"), "by_source": by_source, **out}


def law_calibration(
    lengths: Any,
    censored: Any,
    mu: Any,
    sigma: Any,
    nu: Any,
    levels: Iterable[float] = (0.5, 0.9),
    bins: int = 10,
) -> dict[str, Any]:
    """Log-t laws ``(μ, σ, ν)`` (each ``[N]``) against observed ``lengths[N]``, where ``censored[N]`` marks a length
    that is only a lower bound.

    A censored row (length ``c``) counts, for an event it cannot decide, with that event's probability under its own
    law given ``X >= c`` (as in D-calibration for survival models, Haider et al. 2020). So for a calibrated predictor
    every share below has the stated expectation however many rows were cut, while a biased one shows up through
    the rows that do decide.

    Returns a dict:

    * ``n``, ``n_censored`` — rows, and how many of them are lower bounds;
    * ``nll`` — mean log-t negative log-likelihood (nats of log length), censored rows as ``log P(X >= length)``:
      the predictor's training objective, comparable with ``LengthPredictor.evaluate(...)["nll_censored"]``;
    * ``above_q{p}`` / ``below_q{p}`` for each level ``p`` — the share of requests that ran past the law's upper
      ``(1+p)/2`` quantile / stopped under its lower ``(1-p)/2`` quantile. Calibrated: ``(1-p)/2`` each. Much more
      above means the predictor under-estimates (e.g. the traffic drifted to longer answers), much more below that
      it over-estimates;
    * ``pit`` — ``bins`` shares of the probability integral transform ``F(X)`` over equal bins of ``[0, 1]``
      (calibrated: each ``1/bins``);
    * ``spearman_uncensored`` — rank correlation of ``mu`` with the exact lengths (``nan`` with fewer than 3 exact
      rows or a constant ``mu``).
    """
    from scipy import special, stats

    from hf_ext.generation.tie.distribution import t_logpdf

    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    x = np.asarray(lengths, dtype=np.float64)
    cens = np.asarray(censored, dtype=bool)
    mu, sigma, nu = (np.asarray(v, dtype=np.float64) for v in (mu, sigma, nu))
    out: dict[str, Any] = {"n": int(x.size), "n_censored": int(cens.sum())}
    if not x.size:
        return out
    z = (np.log(x) - mu) / sigma
    logpdf = t_logpdf(z, nu) - np.log(sigma)
    logsf = np.log(np.maximum(special.stdtr(nu, -z), 1e-300))
    out["nll"] = float(np.mean(np.where(cens, -logsf, -logpdf)))
    u = special.stdtr(nu, z)  # F(x): exact rows' PIT; a cut row's PIT is uniform on [F(c), 1] under its law
    tail = np.maximum(1.0 - u, 1e-300)

    def share_above(q: float) -> float:  # P(PIT > q), a cut row by its law given X >= c
        return float(np.mean(np.where(cens, np.clip((1.0 - np.maximum(u, q)) / tail, 0, 1), u > q)))

    for p in levels:
        if not 0.0 < p < 1.0:
            raise ValueError(f"levels must be in (0, 1), got {p!r}")
        out[f"above_q{p:g}"] = share_above((1 + p) / 2)
        out[f"below_q{p:g}"] = 1.0 - share_above((1 - p) / 2)
    edges = np.linspace(0.0, 1.0, bins + 1)
    above = np.array([share_above(q) for q in edges])
    out["pit"] = [float(v) for v in above[:-1] - above[1:]]
    exact = ~cens
    ok = exact.sum() >= 3 and np.ptp(mu[exact]) > 0
    out["spearman_uncensored"] = float(stats.spearmanr(mu[exact], x[exact]).statistic) if ok else math.nan
    return out


# ------------------------------------------------------------------------------------------------- CLI
def _split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a random train / held-out split (held-out ``fraction`` of ``n``, at least one row each)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    k = min(n - 1, max(1, round(n * fraction)))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def main(argv: list[str] | None = None) -> int:
    """``hf-ext tie-log FILE [--fit DIR]``: summarise a length log; optionally train a predictor on it."""
    import argparse

    p = argparse.ArgumentParser(
        prog="hf-ext tie-log",
        description="Summarise a TIE length log (hf-ext serve --tie-length-log FILE): requests, how their lengths "
        "ended, how well the served laws matched. With --fit DIR, train a log-t predictor on it (cut rows as lower "
        "bounds), compare it with the served laws on held-out rows, and save it for --tie-predictor DIR.",
    )
    p.add_argument("log", help="the JSONL length log")
    p.add_argument(
        "--fit", default=None, metavar="DIR", help="train a logt predictor on the log and save it here"
    )
    p.add_argument("--epochs", type=int, default=4, help="training epochs (default 4)")
    p.add_argument("--held-out", type=float, default=0.1, help="fraction kept out of training to score (0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the training")
    p.add_argument(
        "--tiny", action="store_true", help="the 1-layer CPU preset (PredictorConfig.tiny) instead"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.held_out < 1.0:
        p.error(f"--held-out must be in (0, 1), got {args.held_out}")
    if args.epochs < 1:
        p.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    import os

    if not os.path.isfile(args.log):
        p.error(f"log: no such file {args.log!r}")
    from rich.console import Console
    from rich.table import Table

    ds = load_length_log(args.log)
    n = len(ds)
    if n == 0:
        print(f"hf-ext tie-log: {args.log} has no records")
        return 1
    con = Console()
    reasons = {k: sum(r == k for r in ds["reason"]) for k in REASONS}
    exact = [x for x, c in zip(ds["output_len"], ds["censored"]) if not c]
    t = Table(title=f"TIE length log {args.log}")
    t.add_column("what")
    t.add_column("value", justify="right")
    t.add_row("requests", str(n))
    for k, v in reasons.items():
        t.add_row(f"  ended by {k}", f"{v} ({v / n:.0%})")
    t.add_row("prompt tokens, median", f"{np.median(ds['prompt_tokens']):.0f}")
    t.add_row(
        "exact length, median / p90",
        f"{np.median(exact):.0f} / {np.percentile(exact, 90):.0f}" if exact else "-",
    )
    cal = calibration(ds.to_list(), levels=(0.9,))
    t.add_row("laws: predictor / hint / heuristic", " / ".join(str(cal["by_source"][s]) for s in LAW_SOURCES))
    if cal["n"]:
        t.add_row("served laws: NLL (censoring-aware)", f"{cal['nll']:.3f}")
        t.add_row(
            "  above q95 / below q5 (5% each)",
            f"{cal['above_q0.9']:.1%} / {cal['below_q0.9']:.1%}",
        )
        t.add_row("  Spearman, exact rows", f"{cal['spearman_uncensored']:.3f}")
    con.print(t)
    if args.fit is None:
        return 0
    # a request whose prompt text is empty (e.g. special tokens only) was scored by the heuristic and has nothing
    # a predictor could learn from; fit() refuses empty prompts, so such rows are left out (as the refresher does)
    usable = [i for i, prompt in enumerate(ds["prompt"]) if str(prompt).strip()]
    if len(usable) < n:
        print(f"hf-ext tie-log: {n - len(usable)} record(s) with an empty prompt text left out of the fit")
        ds, n = ds.select(usable), len(usable)
    if n < 20:
        print(f"hf-ext tie-log: {n} records are too few to train and score a predictor (need 20)")
        return 1
    from hf_ext.generation.tie.config import PredictorConfig
    from hf_ext.generation.tie.predictor import LengthPredictor

    train_idx, held = _split(n, args.held_out, args.seed)
    cfg = (
        PredictorConfig.tiny(epochs=args.epochs, seed=args.seed)
        if args.tiny
        else PredictorConfig(epochs=args.epochs, seed=args.seed)
    )
    pred = LengthPredictor(cfg)
    t0 = time.perf_counter()
    pred.fit(ds.select(train_idx), censored_column="censored", progress=True)
    fit_s = time.perf_counter() - t0
    held_ds = ds.select(held)
    got = pred.predict(held_ds["prompt"])
    new = law_calibration(
        held_ds["output_len"], held_ds["censored"], got["mu"], got["sigma"], got["nu"], levels=(0.9,)
    )
    served = calibration(held_ds.to_list(), levels=(0.9,))
    t = Table(title=f"held-out {len(held)} of {n} requests (trained on {len(train_idx)} in {fit_s:.0f}s)")
    for c in ("laws", "NLL", "above q95", "below q5", "Spearman (exact rows)"):
        t.add_column(c, justify="right" if c != "laws" else "left")
    for name, c in (("new predictor", new), ("served with", served)):
        if c["n"]:
            t.add_row(
                name,
                f"{c['nll']:.3f}",
                f"{c['above_q0.9']:.1%}",
                f"{c['below_q0.9']:.1%}",
                f"{c['spearman_uncensored']:.3f}",
            )
    con.print(t)
    pred.save_pretrained(args.fit)
    print(f"saved to {args.fit}; serve with: hf-ext serve MODEL --tie-predictor {args.fit}")
    return 0
