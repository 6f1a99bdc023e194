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
``refresher_running``                      1 while a :class:`~hf_ext.generation.tie.refresh.PredictorRefresher` runs
``refresher_version``                      predictors it installed
``refresher_refits_total{outcome}``        counter: refits ``installed``, ``kept``, ``skipped``, ``failed``
``refresher_last_fit_seconds``             training time of the last refit that trained
``refresher_last_nll{predictor}``          the last trained refit's held-out NLL, ``new`` and ``served``
=========================================  ==================================================================

A family whose part is not in use (no length log, no refresher) is left out; a value that cannot be computed (no
exact row yet) is ``NaN``, as the format allows.

Example:
    >>> text = tie_metrics()
    >>> text.splitlines()[0]
    '# HELP hf_ext_tie_info The length predictor the TIE scheduler scores new requests with.'
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

#: the route a TIE server answers with :func:`tie_metrics`
METRICS_ROUTE = "/tie/metrics"
#: the Prometheus text exposition format's content type
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "hf_ext_tie_"
OUTCOMES = ("installed", "kept", "skipped", "failed")


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


def _queues() -> dict[str, tuple[int, int]]:
    """Waiting and running requests summed per class of the live CB schedulers (read without locks: a scrape may see
    a step half done, never fails for it)."""
    from hf_ext.generation.tie.cb import CONTEXT

    out: dict[str, tuple[int, int]] = {}
    for sched in list(CONTEXT.live):
        name = type(sched).__name__
        waiting, running = out.get(name, (0, 0))
        waiting += len(getattr(sched, "waiting_requests", ()))
        running += len(getattr(sched, "active_requests", ()))
        out[name] = (waiting, running)
    return out


def _outcome(rep: dict[str, Any]) -> str:
    if "error" in rep:
        return "failed"
    if "skipped" in rep:
        return "skipped"
    return "installed" if rep.get("accepted") else "kept"


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
    queues = _queues()
    if queues:
        lines += _family(
            "waiting_requests",
            "gauge",
            "Requests waiting for admission, per live continuous-batching scheduler class.",
            [({"scheduler": k}, w) for k, (w, _) in sorted(queues.items())],
        )
        lines += _family(
            "running_requests",
            "gauge",
            "Requests in the running batch, per live continuous-batching scheduler class.",
            [({"scheduler": k}, r) for k, (_, r) in sorted(queues.items())],
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
