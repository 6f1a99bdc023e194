"""Retrain TIE's length predictor on the served length log, in the background, and swap it in when it is better.

A predictor trained once goes stale: the served model changes (a new version answers at more length), the users'
mix of tasks shifts, or it was trained on another workload in the first place. The server sees the truth in its
:class:`~hf_ext.generation.tie.lengthlog.LengthLog`. :class:`PredictorRefresher` closes that loop:

1. It listens to the log (:meth:`LengthLog.add_listener`; the engine's thread only bumps a counter). After ``every``
   new records, once the log keeps at least ``min_records``, its own thread starts a refit.
2. A refit takes the newest ``window`` kept records in the order they finished and holds out the newest ``held_out``
   share. It fine-tunes a copy of the served predictor on the older rest (``warm_start``, the default when a
   :class:`~hf_ext.generation.tie.predictor.LengthPredictor` is served: a few hundred new rows do not make a good
   predictor from scratch), or trains a fresh one (``config=``, or nothing served), cut rows as lower bounds
   (``fit(..., censored_column="censored")``). The requests still generating join the training rows as lower bounds
   (``in_flight``): at overload a scheduler that runs short requests first finishes, and logs, the short ones first.
3. It scores the new predictor and the one being served on the held-out rows: censoring-aware log-t NLL
   (:func:`~hf_ext.generation.tie.lengthlog.law_calibration`; the prompt-length heuristic when nothing is served).
   The held-out rows are the newest traffic, which is what the next requests look like (with
   ``in_flight_held_out``, also the same share of the running requests, then not trained on).
4. If the new NLL is lower by more than ``margin`` nats, it installs the new predictor (default:
   :func:`~hf_ext.generation.tie.cb.set_tie_predictor`, the running TIE scheduler scores the next requests with it)
   and saves it to ``save_dir/v<N>`` when given (numbered after the highest ``v<N>`` already there). Otherwise the served predictor stays.

Every refit appends a report to :attr:`PredictorRefresher.history` and logs a line on logger ``hf_ext``. A refit
that fails is logged and counted in :attr:`PredictorRefresher.errors`; serving never stops for it.

Costs: training runs on the CPU in a separate worker process (``isolate=True``, spawned once per refresher, with
``threads`` torch threads), so it does not hold the server's GIL, which the engine's scheduling thread needs between
GPU steps (measured in ``docs/tie_results.md``). ``isolate=False`` trains in the refresher's own thread. The accepted
predictor never trained on the newest ``held_out`` share (they judged it); the next refit does.

Example:
    >>> from hf_ext.generation.tie.lengthlog import LengthLog
    >>> refresher = PredictorRefresher(LengthLog(), every=1000, min_records=200)
    >>> refresher.every, refresher.version
    (1000, 0)
"""

from __future__ import annotations

import copy
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import _check_int
from hf_ext.generation.tie.lengthlog import LengthLog, law_calibration

logger = logging.getLogger("hf_ext")

REPORT_KEYS = (
    "version",
    "accepted",
    "count",
    "n_train",
    "n_held_out",
    "n_held_in_flight",
    "nll_new",
    "nll_served",
    "above_q0.9_new",
    "above_q0.9_served",
    "below_q0.9_new",
    "below_q0.9_served",
    "spearman_new",
    "spearman_served",
    "fit_s",
    "saved_to",
)


class PredictorRefresher:
    """Retrains the TIE length predictor on a :class:`LengthLog` and installs it when it scores better (see the
    module docstring for the loop).

    Args:
        log: the served requests' length log (the one given to the TIE scheduler).
        predictor: the ``logt`` predictor being served (``None``: the server scores by the prompt-length heuristic;
            new predictors then use ``config`` or ``PredictorConfig()`` and the default tokenizer).
        every: start a refit after this many new records.
        min_records: no refit before the log keeps this many records (train plus held-out).
        window: train and score on the newest ``window`` kept records (``None``: all the log keeps in memory). A
            window forgets old traffic after a drift.
        held_out: the newest share of the window scored and never trained on, in ``(0, 1)``.
        config: :class:`~hf_ext.generation.tie.config.PredictorConfig` of new predictors trained from scratch
            (``kind="logt"``; default: the served predictor's).
        warm_start: fine-tune a copy of the served predictor (its weights and length normalisation) instead of
            training a fresh one. ``None`` (default): when the served predictor is a ``LengthPredictor`` and no
            ``config`` is given.
        margin: install only when the new NLL is lower than the served one's by more than this (nats, >= 0).
        min_exact: skip a refit when fewer than this share of the rows it would use ended on their own (EOS, exact
            lengths). Rows cut at ``max_tokens`` only say "at least": on them alone a predictor that over-estimates
            every length scores best, so the comparison that guards installs means nothing. ``0``: never skip.
        save_dir: save each installed predictor to ``save_dir/v<N>`` (``LengthPredictor.from_pretrained``;
            ``hf-ext serve --tie-predictor`` after a restart), ``N`` one more than the highest ``v<N>`` already there
            (``version`` in a new folder), so a restarted server never overwrites an earlier run's predictors.
        install: called with each accepted predictor (default :func:`~hf_ext.generation.tie.cb.set_tie_predictor`,
            the running TIE scheduler's predictor).
        isolate: train in a worker process (spawned at the first refit, kept until :meth:`stop`; a new one at the
            refit after it dies) instead of the calling thread.
        threads: torch CPU threads of that training (default: a quarter of the cores, 1 to 4).
        in_flight: called at each refit for the requests still generating, as rows ``{"prompt", "output_len"}``
            (tokens so far): added to the training rows as lower bounds. Under an SJF-like order at overload the
            log of finished requests holds the short ones first; the long ones that have started are seen here.
            ``"auto"`` (default): :func:`~hf_ext.generation.tie.cb.in_flight_rows` (the running TIE scheduler's
            requests) when ``install`` is the default, else none. ``None``: none.
        in_flight_held_out: hold out the same ``held_out`` share of the running requests and score the predictors on
            them too, as lower bounds. The newest finished rows alone are biased to short answers in the same way
            as the log, so they favour predictors that under-estimate; the running requests pull the other way.
            Rows may carry ``prompt_tokens`` (and ``max_new_tokens``), which the heuristic baseline needs when
            nothing is served. Off by default: in ``benchmarks/tie_refresh.py`` (four seeds, three loads) it was
            0.92x-1.14x as fast, faster at the heaviest load three times of four and slower at the lighter ones
            three times of four (docs/tie_results.md).

    Attributes:
        predictor: the predictor being served (the last installed one).
        version: how many predictors were installed.
        history: one report per refit (keys ``REPORT_KEYS``; a failed refit: ``{"error": ...}``).
        errors: refits that failed.
    """

    def __init__(
        self,
        log: LengthLog,
        predictor: Any = None,
        *,
        every: int = 2000,
        min_records: int = 500,
        window: int | None = None,
        held_out: float = 0.2,
        config: Any = None,
        warm_start: bool | None = None,
        margin: float = 0.0,
        min_exact: float = 0.1,
        save_dir: str | os.PathLike | None = None,
        install: Callable[[Any], Any] | None = None,
        isolate: bool = True,
        threads: int | None = None,
        in_flight: Callable[[], list[dict[str, Any]]] | None | str = "auto",
        in_flight_held_out: bool = False,
    ) -> None:
        if not isinstance(log, LengthLog):
            raise ValueError(f"log must be a LengthLog, got {type(log).__name__}")
        if predictor is not None and (
            getattr(predictor, "kind", None) != "logt" or not callable(getattr(predictor, "predict", None))
        ):
            raise ValueError(
                f"predictor must be None or a 'logt' LengthPredictor, got {getattr(predictor, 'kind', predictor)!r}"
            )
        _check_int("every", every)
        _check_int("min_records", min_records, 10)
        _check_int("window", window, min_records, allow_none=True)
        kept = log._records.maxlen
        if kept is not None and kept < min_records:
            raise ValueError(f"min_records ({min_records}) exceeds what the log keeps (max_records={kept})")
        if isinstance(held_out, bool) or not isinstance(held_out, (int, float)) or not 0.0 < held_out < 1.0:
            raise ValueError(f"held_out must be a share in (0, 1), got {held_out!r}")
        if (
            isinstance(margin, bool)
            or not isinstance(margin, (int, float))
            or not (math.isfinite(margin) and margin >= 0)
        ):
            raise ValueError(f"margin must be a finite number >= 0 (nats), got {margin!r}")
        if (
            isinstance(min_exact, bool)
            or not isinstance(min_exact, (int, float))
            or not 0.0 <= min_exact <= 1.0
        ):
            raise ValueError(f"min_exact must be a share in [0, 1], got {min_exact!r}")
        if config is not None:
            from hf_ext.generation.tie.config import PredictorConfig

            if not isinstance(config, PredictorConfig) or config.kind != "logt":
                raise ValueError(f"config must be a PredictorConfig with kind='logt', got {config!r}")
        if config is None and predictor is not None and not hasattr(predictor, "config"):
            raise ValueError(
                "config: the served predictor has no PredictorConfig to train new ones with; give config="
            )
        if warm_start is not None and not isinstance(warm_start, bool):
            raise ValueError(f"warm_start must be None, True or False, got {warm_start!r}")
        if not isinstance(isolate, bool):
            raise ValueError(f"isolate must be True or False, got {isolate!r}")
        tunable = hasattr(predictor, "model") and hasattr(predictor, "save_pretrained")  # a LengthPredictor
        if warm_start and not tunable:
            raise ValueError("warm_start=True needs the served LengthPredictor (predictor=) to start from")
        if warm_start and config is not None:
            raise ValueError(
                "give config or warm_start, not both: a warm start keeps the served predictor's config"
            )
        if warm_start is None:
            warm_start = tunable and config is None
        _check_int("threads", threads, allow_none=True)
        if save_dir is not None:
            save_dir = os.fspath(save_dir)
            if os.path.exists(save_dir) and not os.path.isdir(save_dir):
                raise ValueError(f"save_dir must be a directory, {save_dir!r} is a file")
        if in_flight == "auto":
            in_flight = _default_in_flight if install is None else None
        if in_flight is not None and not callable(in_flight):
            raise ValueError(f"in_flight must be callable, None or 'auto', got {in_flight!r}")
        if not isinstance(in_flight_held_out, bool):
            raise ValueError(f"in_flight_held_out must be True or False, got {in_flight_held_out!r}")
        if install is not None and not callable(install):
            raise ValueError(f"install must be callable, got {type(install).__name__}")
        self.log = log
        self.predictor = predictor
        self.every, self.min_records, self.window = every, min_records, window
        self.held_out, self.margin, self.min_exact = float(held_out), float(margin), float(min_exact)
        self.config, self.warm_start = config, bool(warm_start)
        self.save_dir = save_dir
        self._install = install
        self.isolate = bool(isolate)
        self.threads = threads or max(1, min(4, (os.cpu_count() or 4) // 4))
        self._pool: Any = None
        self.in_flight = in_flight
        self.in_flight_held_out = bool(in_flight_held_out)
        self.version = 0
        self.history: list[dict[str, Any]] = []
        self.errors = 0
        self._last = log.count  # the log's count when the last refit started
        self._refit_lock = threading.Lock()
        self._due = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- background
    def start(self) -> PredictorRefresher:
        """Listen to the log and refit in a daemon thread (``RuntimeError`` if already started, or if a
        :meth:`stop` that timed out still waits for its refit to end)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(
                "this PredictorRefresher is already started (or still ending a refit after stop())"
            )
        self._stop.clear()
        self._due.clear()  # stop() set it to wake the old thread: no refit is due yet
        self._thread = threading.Thread(target=self._run, name="hf_ext-tie-refresher", daemon=True)
        self._thread.start()
        self.log.add_listener(self._on_record)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop listening; wait up to ``timeout`` seconds (``None``: as long as it takes) for a refit under way.

        A refit still under way when this returns (:attr:`running` stays ``True`` until it ends) installs nothing.
        """
        self.log.remove_listener(self._on_record)
        self._stop.set()
        self._due.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                return  # the thread closes the pool when its refit ends
            self._thread = None
        self._close_pool()

    def _close_pool(self) -> None:
        """Shut the training worker process down (not while a refit uses it)."""
        with self._refit_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def __enter__(self) -> PredictorRefresher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _on_record(self, _rec: dict[str, Any]) -> None:  # the engine's thread: keep it cheap
        if self.log.count - self._last >= self.every and len(self.log) >= self.min_records:
            self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            if self._stop.is_set():
                self._close_pool()
                return
            self._due.clear()
            try:
                self.refit()
            except Exception as exc:  # noqa: BLE001 - a background thread: report, keep serving
                self.errors += 1
                self.history.append({"error": f"{type(exc).__name__}: {exc}", "count": self.log.count})
                logger.warning(
                    "TIE predictor refresh failed (%s: %s); serving continues", type(exc).__name__, exc
                )

    # ------------------------------------------------------------------------------------------- one refit
    def refit(self) -> dict[str, Any]:
        """Train, score and (if better) install a new predictor now; blocks until done (training in the worker process
        with ``isolate``).

        Returns:
            the report (also appended to :attr:`history`): ``REPORT_KEYS``, or ``{"skipped": why, "count": ...}``
            when the log keeps too few usable records.
        """
        with self._refit_lock:
            self._last = self.log.count
            recs = [
                r for r in self.log.records if str(r["prompt"]).strip()
            ]  # nothing to learn from empty text
            if self.window is not None:
                recs = recs[-self.window :]
            if len(recs) < self.min_records:
                rep = {
                    "skipped": f"{len(recs)} usable records < min_records={self.min_records}",
                    "count": self._last,
                }
                self.history.append(rep)
                return rep
            exact = sum(not r["censored"] for r in recs) / len(recs)
            if exact < self.min_exact:
                rep = {
                    "skipped": f"{exact:.0%} of {len(recs)} rows have exact lengths < min_exact={self.min_exact:.0%} "
                    "(the rest were cut at max_tokens or cancelled: lower bounds only)",
                    "count": self._last,
                }
                self.history.append(rep)
                logger.info("TIE predictor refresh skipped: %s", rep["skipped"])
                return rep
            k = min(len(recs) - 1, max(1, round(len(recs) * self.held_out)))
            train, held = recs[:-k], recs[-k:]
            running = self.in_flight() if self.in_flight is not None else []
            running = [
                {**r, "output_len": int(r["output_len"]), "censored": True}
                for r in running
                if str(r["prompt"]).strip() and int(r["output_len"]) >= 1
            ]
            judged = self._judged_in_flight(running)
            train = train + [r for i, r in enumerate(running) if i not in judged]
            held = held + [running[i] for i in sorted(judged)]
            data = {
                "prompt": [r["prompt"] for r in train],
                "output_len": [int(r["output_len"]) for r in train],
                "censored": [bool(r["censored"]) for r in train],
            }
            cand, fit_s = self._train(self._new_predictor(), data)
            new = self._score(held, cand.predict([r["prompt"] for r in held]))
            served = self._score(held, self._served_laws(held))
            accepted = bool(new["nll"] < served["nll"] - self.margin)
            # stop() returned while this background refit trained: what the process configured since stays
            discarded = accepted and self._stop.is_set() and threading.current_thread() is self._thread
            accepted = accepted and not discarded
            saved_to = None
            if accepted:
                (self._install or _default_install)(cand)
                self.predictor = cand
                self.version += 1
                if self.save_dir is not None:
                    saved_to = os.path.join(self.save_dir, f"v{self._next_save_number()}")
                    cand.save_pretrained(saved_to)
            rep: dict[str, Any] = {
                "version": self.version,
                "accepted": accepted,
                "count": self._last,
                "n_train": len(train),
                "n_held_out": len(held),
                "n_held_in_flight": len(judged),
                "fit_s": fit_s,
                "saved_to": saved_to,
                "time": time.time(),
            }
            if discarded:
                rep["discarded"] = "better, but the refresher was stopped during the refit: not installed"
            for name, cal in (("new", new), ("served", served)):
                rep[f"nll_{name}"] = cal["nll"]
                for key in ("above_q0.9", "below_q0.9"):
                    rep[f"{key}_{name}"] = cal[key]
                rep[f"spearman_{name}"] = cal["spearman_uncensored"]
            self.history.append(rep)
        logger.info(
            "TIE predictor refresh at %d requests: trained on %d in %.0fs; held-out NLL %.3f new vs %.3f served%s",
            rep["count"],
            rep["n_train"],
            fit_s,
            rep["nll_new"],
            rep["nll_served"],
            f"; installed v{self.version}" + (f" ({saved_to})" if saved_to else "")
            if accepted
            else "; discarded (stopped)"
            if discarded
            else "; kept",
        )
        return rep

    def _judged_in_flight(self, running: list[dict[str, Any]]) -> set[int]:
        """Which running rows join the held-out rows: ``held_out`` of them, spread evenly over the list (none with
        ``in_flight_held_out=False``; without a served predictor only rows giving ``prompt_tokens``, which the
        heuristic baseline needs)."""
        if not self.in_flight_held_out:
            return set()
        h = self.held_out
        return {
            i
            for i, r in enumerate(running)
            if math.floor((i + 1) * h) > math.floor(i * h)
            and (self.predictor is not None or r.get("prompt_tokens") is not None)
        }

    def _train(self, cand: Any, data: dict[str, list]) -> tuple[Any, float]:
        """``cand`` trained on ``data`` (here, or in the worker process through a temporary save) and the
        training seconds."""
        if not self.isolate:
            t0 = time.perf_counter()
            cand.fit(data, censored_column="censored")
            return cand, time.perf_counter() - t0
        from concurrent.futures.process import BrokenProcessPool

        from hf_ext.generation.tie.predictor import LengthPredictor

        if self._pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        tmp = tempfile.mkdtemp(prefix="hf_ext_tie_refit_")
        try:
            cand.save_pretrained(tmp)
            try:
                fit_s = self._pool.submit(_fit_saved, tmp, data, self.threads).result()
            except (
                BrokenProcessPool
            ):  # the worker died (OOM killer, a crash): the next refit spawns a new one
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
                raise
            return LengthPredictor.from_pretrained(tmp), fit_s
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _next_save_number(self) -> int:
        """One more than the highest ``v<N>`` folder in ``save_dir`` (1 in a new folder): a restarted server
        continues the numbering instead of overwriting the predictors an earlier run saved."""
        try:
            names = os.listdir(self.save_dir)
        except FileNotFoundError:
            names = []
        return 1 + max((int(n[1:]) for n in names if n[:1] == "v" and n[1:].isdigit()), default=0)

    def _new_predictor(self) -> Any:
        from hf_ext.generation.tie.config import PredictorConfig
        from hf_ext.generation.tie.predictor import LengthPredictor

        if self.warm_start:
            return copy.deepcopy(self.predictor)
        if self.config is not None:
            tok = getattr(self.predictor, "tokenizer", None)  # a stand-in predictor may have none
            return LengthPredictor(self.config, tokenizer=tok)
        if self.predictor is not None:
            return LengthPredictor(copy.deepcopy(self.predictor.config), tokenizer=self.predictor.tokenizer)
        return LengthPredictor(PredictorConfig())

    def _served_laws(self, rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
        """What the served predictor says for ``rows`` (the CB scheduler's prompt-length heuristic without one)."""
        if self.predictor is not None:
            return self.predictor.predict([r["prompt"] for r in rows])
        from hf_ext.generation.tie.config import TIEConfig
        from hf_ext.generation.tie.scheduler import heuristic_prediction

        caps = [r["max_new_tokens"] for r in rows if r.get("max_new_tokens")]
        return heuristic_prediction(
            [r["prompt_tokens"] for r in rows], max(caps) if caps else TIEConfig().max_new_tokens
        )

    @staticmethod
    def _score(rows: list[dict[str, Any]], laws: dict[str, Any]) -> dict[str, Any]:
        return law_calibration(
            [r["output_len"] for r in rows],
            [r["censored"] for r in rows],
            laws["mu"],
            laws["sigma"],
            laws["nu"],
            levels=(0.9,),
        )


def _fit_saved(path: str, data: dict[str, list], threads: int) -> float:
    """In the worker process: load the predictor saved at ``path``, train it on ``data``, save it back there."""
    import torch

    from hf_ext.generation.tie.predictor import LengthPredictor

    torch.set_num_threads(threads)
    pred = LengthPredictor.from_pretrained(path)
    t0 = time.perf_counter()
    pred.fit(data, censored_column="censored")
    fit_s = time.perf_counter() - t0
    pred.save_pretrained(path)
    return fit_s


def _default_in_flight() -> list[dict[str, Any]]:
    from hf_ext.generation.tie.cb import in_flight_rows

    return in_flight_rows()


def _default_install(predictor: Any) -> None:
    from hf_ext.generation.tie.cb import set_tie_predictor

    set_tie_predictor(predictor)
