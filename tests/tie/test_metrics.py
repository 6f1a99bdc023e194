"""GET /tie/metrics: TIE's serving state in the Prometheus text format."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler
from hf_ext.generation.tie.lengthlog import LengthLog, law_calibration
from hf_ext.generation.tie.metrics import _label, _number, tie_metrics


@pytest.fixture(autouse=True)
def _restore():
    from hf_ext.generation.tie.cb import preserved_context
    from hf_ext.generation.tie.serve import _ACTIVE

    before = _ACTIVE["refresher"]
    with preserved_context():
        yield
    _ACTIVE["refresher"] = before


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a scrape, parsed by the Prometheus client's own parser (which fails on a malformed one)."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _fill(log: LengthLog, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        x = int(rng.integers(1, 60))
        log.add(
            prompt=f"p{i}",
            output_len=x,
            reason=("eos", "max_new_tokens", "cancelled")[i % 3],
            max_new_tokens=64,
            prompt_tokens=5,
            request_id=f"r{i}",
            law=(math.log(20), 0.8, 4.0),
            source="predictor",
        )


def test_a_bare_scheduler_reports_only_what_it_has(monkeypatch):
    from hf_ext.generation.tie import metrics

    monkeypatch.setattr(
        metrics, "ADMISSION_WAITS", metrics.WaitHistogram()
    )  # nothing admitted in this process
    enable_tie_scheduler(None, None)
    got = _samples(tie_metrics())
    assert got == {("hf_ext_tie_info", (("predictor", "heuristic"),)): 1.0}


def test_the_log_queues_and_refresher_are_exported_with_their_values():
    log = LengthLog()
    _fill(log, 30, seed=0)
    enable_tie_scheduler(None, None, prompt_text=str, length_log=log)

    class Live:  # what the scrape reads of a live scheduler
        def __init__(self, waiting: int, running: int):
            self.waiting_requests = dict.fromkeys(range(waiting))
            self.active_requests = dict.fromkeys(range(running))

    class TIECBScheduler(Live):
        pass

    a, b = TIECBScheduler(3, 2), TIECBScheduler(1, 4)
    CONTEXT.live.add(a)
    CONTEXT.live.add(b)
    from hf_ext.generation.tie.serve import _ACTIVE

    _ACTIVE["refresher"] = SimpleNamespace(
        running=True,
        version=2,
        errors=1,
        history=[
            {"skipped": "too few", "count": 5},
            {"accepted": True, "fit_s": 1.5, "nll_new": 1.2, "nll_served": 1.4},
            {"error": "ValueError: x", "count": 9},
            {"accepted": False, "fit_s": 2.25, "nll_new": 1.3, "nll_served": 1.25},
        ],
    )
    try:
        got = _samples(tie_metrics(window=12))
    finally:
        CONTEXT.live.discard(a)
        CONTEXT.live.discard(b)
    p = "hf_ext_tie_"
    assert got[(p + "waiting_requests", (("scheduler", "TIECBScheduler"),))] == 4
    assert got[(p + "running_requests", (("scheduler", "TIECBScheduler"),))] == 6
    assert got[(p + "length_log_requests_total", ())] == 30 and got[(p + "length_log_kept", ())] == 30
    assert got[(p + "length_log_errors_total", ())] == 0 and got[(p + "length_log_window", ())] == 12
    assert {
        r: got[(p + "length_log_endings", (("reason", r),))] for r in ("eos", "max_new_tokens", "cancelled")
    } == {
        "eos": 4,
        "max_new_tokens": 4,
        "cancelled": 4,
    }
    newest = log.records[-12:]
    cal = law_calibration(
        [r["output_len"] for r in newest],
        [r["censored"] for r in newest],
        [r["pred_mu"] for r in newest],
        [r["pred_sigma"] for r in newest],
        [r["pred_nu"] for r in newest],
        levels=(0.9,),
    )
    assert got[(p + "predicted_law_nll", ())] == pytest.approx(cal["nll"])
    assert got[(p + "predicted_law_above_q95_ratio", ())] == pytest.approx(cal["above_q0.9"])
    assert got[(p + "refresher_running", ())] == 1 and got[(p + "refresher_version", ())] == 2
    outcomes = {
        o: got[(p + "refresher_refits_total", (("outcome", o),))]
        for o in ("installed", "kept", "skipped", "failed")
    }
    assert outcomes == {"installed": 1, "kept": 1, "skipped": 1, "failed": 1}
    assert got[(p + "refresher_last_fit_seconds", ())] == 2.25  # the last refit that trained
    assert got[(p + "refresher_last_nll", (("predictor", "served"),))] == 1.25


def test_admission_waits_are_a_histogram_and_the_oldest_wait_a_gauge(monkeypatch):
    import time

    from hf_ext.generation.tie import metrics

    hist = metrics.WaitHistogram((1.0, 10.0))
    for w in (0.2, 1.0, 3.0, 50.0, -1.0):  # a bound is inclusive ("le"); a clock step back counts as 0
        hist.observe("TIECBScheduler", w)
    hist.observe("PriorityCBScheduler", 4.0)
    monkeypatch.setattr(metrics, "ADMISSION_WAITS", hist)
    enable_tie_scheduler(None, None)
    now = time.perf_counter()

    class TIECBScheduler:  # two requests waiting for 30 s and 5 s, one running
        waiting_requests = {
            "a": SimpleNamespace(created_time=now - 30.0),
            "b": SimpleNamespace(created_time=now - 5.0),
        }
        active_requests = {"c": SimpleNamespace(created_time=now - 100.0)}

    live = TIECBScheduler()
    CONTEXT.live.add(live)
    try:
        got = _samples(tie_metrics())
    finally:
        CONTEXT.live.discard(live)
    p, tie = "hf_ext_tie_admission_wait_seconds", ("scheduler", "TIECBScheduler")
    buckets = {le: got[(p + "_bucket", tuple(sorted([tie, ("le", le)])))] for le in ("1.0", "10.0", "+Inf")}
    assert buckets == {"1.0": 3, "10.0": 4, "+Inf": 5}  # cumulative
    assert got[(p + "_count", (tie,))] == 5 and got[(p + "_sum", (tie,))] == pytest.approx(54.2)
    assert got[(p + "_count", (("scheduler", "PriorityCBScheduler"),))] == 1
    assert 30.0 <= got[("hf_ext_tie_oldest_waiting_seconds", (tie,))] < 40.0
    assert got[("hf_ext_tie_waiting_requests", (tie,))] == 2


def test_values_and_labels_are_written_as_the_format_asks():
    assert [_number(v) for v in (None, float("nan"), float("inf"), -float("inf"), 3.0, 0.25, 7)] == [
        "NaN",
        "NaN",
        "+Inf",
        "-Inf",
        "3",
        "0.25",
        "7",
    ]
    assert _label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    log = LengthLog()
    enable_tie_scheduler(None, None, prompt_text=str, length_log=log)
    text = tie_metrics()
    assert text.endswith("\n") and "hf_ext_tie_predicted_law_nll NaN" in text  # nothing logged yet
    assert math.isnan(_samples(text)[("hf_ext_tie_predicted_law_nll", ())])


def test_live_schedulers_reads_the_set_again_when_it_changes_while_read(monkeypatch):
    from hf_ext.generation.tie import cb

    class Flaky:  # a WeakSet another thread adds to mid-iteration, once
        calls = 0

        def __iter__(self):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("Set changed size during iteration")
            return iter(["sched"])

    monkeypatch.setattr(cb.CONTEXT, "live", Flaky())
    assert cb.live_schedulers() == ["sched"] and Flaky.calls == 2
