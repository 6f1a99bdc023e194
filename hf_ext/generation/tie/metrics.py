"""TIE's serving state in the Prometheus text format, for ``GET /tie/metrics`` of a TIE server.

``GET /tie/stats`` (:func:`~hf_ext.generation.tie.serve.tie_stats`) answers JSON for a person or a script;
this module renders the same state, plus the schedulers' queues, as the Prometheus text exposition format
(version 0.0.4) that Prometheus, Grafana Agent or any OpenMetrics scraper reads. No client library is needed.

Families (all prefixed ``hf_ext_tie_``; gauges unless marked counter):

=========================================  ==================================================================
``info{predictor}``                        1, labelled with the predictor in use (``heuristic`` when none)
``waiting_requests{scheduler}``            requests waiting for admission, per live CB scheduler class
``running_requests{scheduler}``            requests in the running batch, per live CB scheduler class
``length_log_requests_total``              counter: requests the length log has recorded
``length_log_errors_total``                counter: requests it failed to record
``length_log_kept``                        rows it keeps in memory
``length_log_window``                      the newest rows the next families are computed on (up to 1,000)
``length_log_endings{reason}``             how those rows ended (``eos``, ``max_new_tokens``, ``cancelled``)
``predicted_law_nll``                      censoring-aware log-t NLL of the laws they were scored with (nats)
``predicted_law_above_q95_ratio``          share ending above the predicted 95th percentile (0.05 if calibrated)
``predicted_law_below_q05_ratio``          share ending below the predicted 5th percentile (exact rows)
``predicted_law_spearman``                 Spearman correlation of predicted medians and exact lengths
``oldest_waiting_seconds{scheduler}``      how long the longest-waiting request has waited (0: none waiting)
``admission_wait_seconds{scheduler}``      histogram: from a request's arrival to its admission, every request
                                           the process's schedulers admitted (first admissions; since start)
``refresher_running``                      1 while a :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` runs
``refresher_version``                      predictors it installed
``refresher_refits_total{outcome}``        counter: refits ``installed``, ``kept``, ``skipped``, ``failed``
``refresher_last_fit_seconds``             training time of the last refit that trained
``refresher_last_nll{predictor}``          the last trained refit's held-out NLL, ``new`` and ``served``
=========================================  ==================================================================

A family whose part is not in use (no length log, no refresher) is left out; a value that cannot be computed (no
exact row yet) is ``NaN``, as the format allows. The waiting time families show what a shortest-job-first order
risks: a request that keeps being passed over (TIE's aging bounds how long, ``TIEConfig.tau``).

Example:
    >>> text = tie_metrics()
    >>> text.splitlines()[0]
    '# HELP hf_ext_tie_info The length predictor the TIE scheduler scores new requests with.'
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable
from itertools import accumulate
from typing import Any

#: the route a TIE server answers with :func:`tie_metrics`
METRICS_ROUTE = "/tie/metrics"
#: the Prometheus text exposition format's content type
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hf_ext_tie_"
OUTCOMES = ("installed", "kept", "skipped", "failed")
#: upper bounds (seconds) of the admission-wait histogram's buckets
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class WaitHistogram:
    """Admission waits per scheduler class, as a Prometheus histogram: ``observe`` runs in the engine's thread (a
    lock and a bisect), ``snapshot`` in the scrape's. Process-wide and only growing, as Prometheus counters must."""

    def __init__(self, buckets: tuple[float, ...] = WAIT_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._lock = threading.Lock()
        self._data: dict[str, list[Any]] = {}  # scheduler -> [per-bucket counts (+Inf last), sum, count]

    def observe(self, scheduler: str, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        i = bisect.bisect_left(self.buckets, seconds)  # the first bucket whose bound is >= seconds
        with self._lock:
            entry = self._data.setdefault(scheduler, [[0] * (len(self.buckets) + 1), 0.0, 0])
            entry[0][i] += 1
            entry[1] += seconds
            entry[2] += 1

    def snapshot(self) -> dict[str, tuple[list[int], float, int]]:
        """Per scheduler: cumulative counts per bucket (``+Inf`` last), the sum of the waits and their count."""
        with self._lock:
            return {
                name: (list(accumulate(counts)), total, n) for name, (counts, total, n) in self._data.items()
            }


#: every admission of our CB schedulers in this process (``_WaitingOrderScheduler.schedule_batch`` observes)
ADMISSION_WAITS = WaitHistogram()


def _label(value: Any) -> str:
    """A label value escaped as the format asks (backslash, double quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    if value is None:
        return "NaN"
    v = float(value)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(int(v)) if v.is_integer() and abs(v) < 2**53 else repr(v)


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, Any], Any]]) -> list[str]:
    """One metric family: ``# HELP``, ``# TYPE`` and one line per ``(labels, value)`` sample."""
    out = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}"]
    for labels, value in samples:
        tags = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
        out.append(f"{PREFIX}{name}{'{' + tags + '}' if tags else ''} {_number(value)}")
    return out


def _queues() -> dict[str, tuple[int, int, float]]:
    """Waiting and running requests summed per class of the live CB schedulers, and the longest wait (seconds) of
    those waiting. Read without locks: a scrape may see a step half done; a queue that changes while read counts as
    it was before."""
    from hf_ext.generation.tie.cb import live_schedulers

    now = time.perf_counter()
    out: dict[str, tuple[int, int, float]] = {}
    for sched in live_schedulers():
        name = type(sched).__name__
        waiting_states = dict(getattr(sched, "waiting_requests", {}))  # a copy: the engine's thread moves on
        born = [
            t for t in (getattr(s, "created_time", None) for s in waiting_states.values()) if t is not None
        ]
        waiting, running, oldest = out.get(name, (0, 0, 0.0))
        out[name] = (
            waiting + len(waiting_states),
            running + len(getattr(sched, "active_requests", ())),
            max(oldest, now - min(born)) if born else oldest,
        )
    return out


def _histogram(name: str, help_text: str, hist: WaitHistogram) -> list[str]:
    """A histogram family: ``_bucket`` lines per ``le`` bound, ``_sum`` and ``_count``, per scheduler (nothing while
    nothing was observed)."""
    snap = hist.snapshot()
    if not snap:
        return []
    out = [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} histogram"]
    for scheduler, (cum, total, n) in sorted(snap.items()):
        tag = f'scheduler="{_label(scheduler)}"'
        for bound, c in zip((*hist.buckets, math.inf), cum):
            le = "+Inf" if math.isinf(bound) else repr(bound)
            out.append(f'{PREFIX}{name}_bucket{{{tag},le="{le}"}} {c}')
        out.append(f"{PREFIX}{name}_sum{{{tag}}} {_number(total)}")
        out.append(f"{PREFIX}{name}_count{{{tag}}} {n}")
    return out


def _outcome(rep: dict[str, Any]) -> str:
    if "error" in rep:
        return "failed"
    if "skipped" in rep:
        return "skipped"
    return "installed" if rep.get("accepted") else "kept"


# the gauges of each live scheduler, in the order of the tuples _queues() gives
_QUEUE_FAMILIES = (
    ("waiting_requests", "Requests waiting for admission, per live continuous-batching scheduler class."),
    ("running_requests", "Requests in the running batch, per live continuous-batching scheduler class."),
    (
        "oldest_waiting_seconds",
        "How long the longest-waiting request has waited (seconds; 0 when none waits).",
    ),
)


def tie_metrics(window: int = 1000) -> str:
    """What ``GET /tie/metrics`` answers: the TIE scheduler's state in the Prometheus text format (the families are
    listed in the module docstring). ``window``: the newest length-log rows the calibration families use."""
    from hf_ext.generation.tie.serve import _ACTIVE, tie_stats

    stats = tie_stats(window)
    lines = _family(
        "info",
        "gauge",
        "The length predictor the TIE scheduler scores new requests with.",
        [({"predictor": stats["predictor"] or "heuristic"}, 1)],
    )
    queues = sorted(_queues().items())
    if queues:
        for i, (name, help_text) in enumerate(_QUEUE_FAMILIES):  # field i of _queues()'s tuples
            lines += _family(name, "gauge", help_text, [({"scheduler": k}, q[i]) for k, q in queues])
    lines += _histogram(
        "admission_wait_seconds",
        "From a request's arrival to its admission into the running batch (first admissions, seconds).",
        ADMISSION_WAITS,
    )
    log = stats["length_log"]
    if log is not None:
        cal = log["calibration"]
        lines += _family(
            "length_log_requests_total", "counter", "Requests the length log recorded.", [({}, log["count"])]
        )
        lines += _family(
            "length_log_errors_total",
            "counter",
            "Requests the length log failed to record.",
            [({}, log["errors"])],
        )
        lines += _family(
            "length_log_kept", "gauge", "Rows the length log keeps in memory.", [({}, log["kept"])]
        )
        lines += _family(
            "length_log_window",
            "gauge",
            "Newest length-log rows the ending and calibration families are computed on.",
            [({}, log["window"])],
        )
        lines += _family(
            "length_log_endings",
            "gauge",
            "How the newest length-log rows ended.",
            [({"reason": k}, v) for k, v in log["reasons"].items()],
        )
        for name, key, help_text in (
            (
                "predicted_law_nll",
                "nll",
                "Censoring-aware log-t NLL of the newest rows' predicted laws (nats).",
            ),
            (
                "predicted_law_above_q95_ratio",
                "above_q0.9",
                "Share of the newest rows ending above their predicted 95th percentile (0.05 if calibrated).",
            ),
            (
                "predicted_law_below_q05_ratio",
                "below_q0.9",
                "Share of the newest exact rows ending below their predicted 5th percentile (0.05 if calibrated).",
            ),
            (
                "predicted_law_spearman",
                "spearman_uncensored",
                "Spearman correlation of predicted medians and exact lengths over the newest rows.",
            ),
        ):
            lines += _family(name, "gauge", help_text, [({}, cal.get(key))])
    ref = _ACTIVE["refresher"]
    if ref is not None:
        history = list(ref.history)
        counts = dict.fromkeys(OUTCOMES, 0)
        for rep in history:
            counts[_outcome(rep)] += 1
        trained = [r for r in history if "fit_s" in r]
        last = trained[-1] if trained else {}
        lines += _family(
            "refresher_running", "gauge", "1 while the predictor refresher runs.", [({}, int(ref.running))]
        )
        lines += _family(
            "refresher_version", "gauge", "Predictors the refresher installed.", [({}, ref.version)]
        )
        lines += _family(
            "refresher_refits_total",
            "counter",
            "Predictor refits by outcome.",
            [({"outcome": k}, v) for k, v in counts.items()],
        )
        lines += _family(
            "refresher_last_fit_seconds",
            "gauge",
            "Training time of the last refit that trained (seconds).",
            [({}, last.get("fit_s"))],
        )
        lines += _family(
            "refresher_last_nll",
            "gauge",
            "Held-out NLL of the last trained refit: the new predictor and the served one (nats).",
            [({"predictor": "new"}, last.get("nll_new")), ({"predictor": "served"}, last.get("nll_served"))],
        )
    return "\n".join(lines) + "\n"
