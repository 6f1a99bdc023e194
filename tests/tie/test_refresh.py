"""Retraining the length predictor on the served length log (PredictorRefresher) and swapping it in."""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest
import torch

from hf_ext.generation.tie.config import PredictorConfig
from hf_ext.generation.tie.lengthlog import LengthLog, law_calibration
from hf_ext.generation.tie.predictor import LengthPredictor
from hf_ext.generation.tie.refresh import REPORT_KEYS, PredictorRefresher

TOPICS = ["rome", "paris", "cats", "rivers", "music", "trains", "stars", "bread"]
CAP = 1000


def _traffic(n: int, seed: int, long_median: float) -> list[tuple[str, int]]:
    """Half short answers (median 20), half essays (median ``long_median``); true lengths, uncut."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        t = TOPICS[rng.integers(0, len(TOPICS))]
        short = rng.random() < 0.5
        prompt = f"Answer briefly: what is {t}?" if short else f"Write a detailed long essay about {t}."
        med = 20 if short else long_median
        out.append((prompt, max(1, round(math.exp(math.log(med) + 0.4 * rng.standard_t(3.5))))))
    return out


def _feed(log: LengthLog, traffic: list[tuple[str, int]], start: int = 0) -> None:
    for i, (prompt, x) in enumerate(traffic, start):
        log.add(
            prompt=prompt,
            output_len=min(x, CAP),
            reason="eos" if x < CAP else "max_new_tokens",
            max_new_tokens=CAP,
            prompt_tokens=len(prompt.split()),
            request_id=f"r{i}",
        )


class TrueLaw:
    """The generator's own law of :func:`_traffic` with long median 100 (what no trained predictor can beat)."""

    kind = "logt"

    def predict(self, prompts, batch_size=256):
        mu = np.array([math.log(20 if p.startswith("Answer") else 100) for p in prompts])
        return {"mu": mu, "sigma": np.full_like(mu, 0.4), "nu": np.full_like(mu, 3.5)}


@pytest.fixture(scope="module")
def stale():
    """A tiny predictor trained on traffic whose essays have median 100 tokens."""
    torch.set_num_threads(1)
    old = _traffic(600, seed=0, long_median=100)
    pred = LengthPredictor(PredictorConfig.tiny(epochs=4))
    pred.fit({"prompt": [p for p, _ in old], "output_len": [x for _, x in old]})
    return pred


@pytest.fixture(autouse=True)
def _restore_context():
    from hf_ext.generation.tie.cb import preserved_context

    with preserved_context():
        yield


def test_a_drifted_log_gets_a_better_predictor_installed_and_saved(stale, tmp_path):
    """The served model now writes 4x longer essays: the refit learns it from the log, scores it on the newest
    requests against the stale predictor, installs it in the TIE scheduler and saves it."""
    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler
    from hf_ext.testing import tiny_tokenizer

    enable_tie_scheduler(stale, tiny_tokenizer())
    log = LengthLog()
    _feed(log, _traffic(600, seed=1, long_median=400))
    ref = PredictorRefresher(log, stale, every=100, min_records=300, save_dir=tmp_path / "preds")
    rep = ref.refit()
    assert ref._pool is not None  # trained in the worker process (the default), kept for the next refit
    ref.stop()
    assert ref._pool is None
    assert set(REPORT_KEYS) <= set(rep)
    assert (rep["n_train"], rep["n_held_out"], rep["count"]) == (480, 120, 600)
    assert rep["accepted"] and rep["version"] == ref.version == 1
    assert rep["nll_new"] < rep["nll_served"] - 0.5
    assert rep["above_q0.9_served"] > 0.3 and rep["above_q0.9_new"] < 0.12  # stale: essays run past its q95
    assert CONTEXT.predictor is ref.predictor is not stale
    essay = ["Write a detailed long essay about cats."]
    assert abs(ref.predictor.predict(essay)["mu"][0] - math.log(400)) < 0.3
    assert abs(stale.predict(essay)["mu"][0] - math.log(100)) < 0.3
    saved = LengthPredictor.from_pretrained(rep["saved_to"])
    assert rep["saved_to"] == str(tmp_path / "preds" / "v1")
    np.testing.assert_allclose(saved.predict(essay)["mu"], ref.predictor.predict(essay)["mu"], rtol=1e-5)
    # the held-out share is what the served predictor was judged on: recompute its NLL
    held = log.records[-120:]
    p = stale.predict([r["prompt"] for r in held])
    cal = law_calibration(
        [r["output_len"] for r in held], [r["censored"] for r in held], p["mu"], p["sigma"], p["nu"]
    )
    assert rep["nll_served"] == pytest.approx(cal["nll"])


def test_the_served_predictor_stays_when_the_new_one_is_not_better():
    """Against the true law, or with a margin the new one does not clear, nothing is installed."""
    log = LengthLog()
    _feed(log, _traffic(400, seed=2, long_median=100))
    got: list = []
    truth = TrueLaw()
    ref = PredictorRefresher(
        log, truth, min_records=300, config=PredictorConfig.tiny(epochs=1), install=got.append, isolate=False
    )
    rep = ref.refit()
    assert not rep["accepted"] and rep["nll_new"] > rep["nll_served"]
    assert got == [] and ref.predictor is truth and ref.version == 0 and rep["saved_to"] is None
    # a better predictor that does not clear the margin is not installed either
    stale_log = LengthLog()
    _feed(stale_log, _traffic(400, seed=3, long_median=400))
    ref = PredictorRefresher(
        stale_log,
        truth,
        min_records=300,
        config=PredictorConfig.tiny(epochs=3),
        margin=50.0,
        install=got.append,
        isolate=False,
    )
    rep = ref.refit()
    assert rep["nll_new"] < rep["nll_served"] and not rep["accepted"] and got == []


def test_without_a_predictor_the_baseline_is_the_heuristic_the_scheduler_uses():
    from hf_ext.generation.tie.scheduler import heuristic_prediction

    log = LengthLog()
    _feed(log, _traffic(300, seed=4, long_median=200))
    got: list = []
    ref = PredictorRefresher(
        log,
        None,
        min_records=100,
        window=200,
        held_out=0.25,
        config=PredictorConfig.tiny(epochs=2),
        install=got.append,
        isolate=False,
    )
    rep = ref.refit()
    assert (rep["n_train"], rep["n_held_out"]) == (150, 50)  # the newest 200, the newest quarter held out
    held = log.records[-50:]
    h = heuristic_prediction([r["prompt_tokens"] for r in held], CAP)
    cal = law_calibration(
        [r["output_len"] for r in held], [r["censored"] for r in held], h["mu"], h["sigma"], h["nu"]
    )
    assert rep["nll_served"] == pytest.approx(cal["nll"])
    assert rep["accepted"] and got == [ref.predictor]  # anything trained beats "longer prompt, longer answer"


def test_too_few_usable_records_skip_the_refit():
    log = LengthLog()
    _feed(log, [("  ", 5)] * 50 + _traffic(20, seed=5, long_median=100))
    ref = PredictorRefresher(
        log, min_records=30, config=PredictorConfig.tiny(), install=pytest.fail, isolate=False
    )
    rep = ref.refit()
    assert "skipped" in rep and "20 usable records" in rep["skipped"] and ref.history == [rep]


def test_warm_start_trains_a_copy_of_the_served_weights(stale, monkeypatch):
    seen = {}

    def fake_fit(self, data, **kw):
        seen["self"] = self
        seen["weights"] = [p.detach().clone() for p in self.model.parameters()]
        return {"loss": []}

    log = LengthLog()
    _feed(log, _traffic(100, seed=6, long_median=100))
    monkeypatch.setattr(LengthPredictor, "fit", fake_fit)
    PredictorRefresher(
        log, stale, min_records=50, isolate=False, install=lambda p: None
    ).refit()  # warm: default
    assert seen["self"] is not stale
    assert all(torch.equal(a, b) for a, b in zip(seen["weights"], stale.model.parameters()))
    cold = PredictorRefresher(
        log, stale, min_records=50, warm_start=False, isolate=False, install=lambda p: None
    )
    cold.refit()  # a fresh initialisation
    assert not all(torch.equal(a, b) for a, b in zip(seen["weights"], stale.model.parameters()))


def _wait(cond, timeout: float = 60.0) -> None:
    t_end = time.time() + timeout
    while not cond():
        assert time.time() < t_end, "timed out"
        time.sleep(0.05)


def test_background_refits_every_n_records_and_stops():
    log = LengthLog()
    got: list = []
    ref = PredictorRefresher(
        log,
        every=100,
        min_records=150,
        config=PredictorConfig.tiny(epochs=1),
        install=got.append,
        isolate=False,
    )
    with ref:
        assert ref.running
        _feed(log, _traffic(120, seed=7, long_median=100))
        time.sleep(0.3)
        assert ref.history == []  # 120 records: fewer than min_records
        _feed(log, _traffic(100, seed=8, long_median=100), start=120)
        _wait(lambda: len(ref.history) >= 1)
        _wait(lambda: not ref._refit_lock.locked())
        n = len(ref.history)
        _feed(log, _traffic(100, seed=9, long_median=100), start=220)
        _wait(lambda: len(ref.history) > n)
    assert not ref.running and log._listeners == []
    n = len(ref.history)
    _feed(log, _traffic(300, seed=10, long_median=100), start=320)
    time.sleep(0.3)
    assert len(ref.history) == n  # stopped: no more refits
    with pytest.raises(RuntimeError, match="already started"):
        ref.start()
        ref.start()
    ref.stop()


def test_a_refit_outliving_stop_installs_nothing_and_stays_running(monkeypatch):
    """stop(timeout) returns while a refit trains: ``running`` stays True until it ends, and its (better)
    predictor is not installed over what the process configured since; a refit called directly still installs."""
    log = LengthLog()
    _feed(log, _traffic(60, seed=13, long_median=100))
    installed: list = []
    ref = PredictorRefresher(
        log, every=10, min_records=40, install=installed.append, isolate=False, in_flight=None
    )
    entered, gate = threading.Event(), threading.Event()

    def slow_train(cand, data):
        entered.set()
        assert gate.wait(30)
        return cand, 0.0

    monkeypatch.setattr(ref, "_train", slow_train)
    monkeypatch.setattr(ref, "_new_predictor", TrueLaw)
    ref.start()
    _feed(log, _traffic(10, seed=14, long_median=100), start=60)
    assert entered.wait(30)
    ref.stop(timeout=0.05)
    assert ref.running  # the refit goes on
    with pytest.raises(RuntimeError, match="still ending a refit"):
        ref.start()
    gate.set()
    _wait(lambda: not ref.running)
    assert installed == [] and ref.version == 0 and ref.predictor is None
    assert ref.history[-1]["accepted"] is False and "not installed" in ref.history[-1]["discarded"]
    rep = ref.refit()  # the same refit, asked for directly, installs
    assert rep["accepted"] and installed == [ref.predictor] and ref.version == 1


def test_a_restarted_refresher_waits_for_new_records(monkeypatch):
    """stop() wakes the thread through the refit trigger; start() again must not take that as a refit due."""
    log = LengthLog()
    _feed(log, _traffic(60, seed=15, long_median=100))
    ref = PredictorRefresher(
        log, every=10, min_records=20, install=pytest.fail, isolate=False, in_flight=None
    )
    calls: list = []
    monkeypatch.setattr(ref, "refit", lambda: calls.append(1))
    ref.start()
    ref.stop()
    ref.start()
    time.sleep(0.3)
    assert calls == []
    _feed(log, _traffic(10, seed=16, long_median=100), start=60)  # now one is due
    _wait(lambda: calls == [1])
    ref.stop()


def test_a_failing_refit_is_reported_and_the_refresher_goes_on(caplog, monkeypatch):
    def broken(self, data, **kw):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(LengthPredictor, "fit", broken)
    log = LengthLog()
    ref = PredictorRefresher(
        log, every=60, min_records=60, config=PredictorConfig.tiny(), install=pytest.fail, isolate=False
    )
    with caplog.at_level("WARNING", logger="hf_ext"), ref:
        _feed(log, _traffic(60, seed=11, long_median=400))
        _wait(lambda: ref.errors >= 1)
        _feed(log, _traffic(60, seed=12, long_median=400), start=60)
        _wait(lambda: ref.errors >= 2)  # the thread lives on and tries again
        assert ref.running
    assert ref.history[0]["error"] == "RuntimeError: out of memory" and ref.version == 0
    assert "TIE predictor refresh failed (RuntimeError: out of memory); serving continues" in caplog.text


def test_log_listeners_are_called_per_record_and_never_raise(caplog):
    log = LengthLog()
    seen: list = []
    log.add_listener(seen.append)

    def bad(rec):
        raise KeyError("boom")

    log.add_listener(bad)
    with caplog.at_level("WARNING", logger="hf_ext"):
        _feed(log, _traffic(3, seed=12, long_median=100))
    assert [r["request_id"] for r in seen] == ["r0", "r1", "r2"] and log.errors == 3
    assert caplog.text.count("raised KeyError") == 1  # logged once, counted each time
    log.remove_listener(bad)
    log.remove_listener(bad)  # no error
    _feed(log, _traffic(1, seed=13, long_median=100), start=3)
    assert log.errors == 3 and len(seen) == 4
    with pytest.raises(ValueError, match="fn must be callable"):
        log.add_listener(42)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every": 0}, "every must be an int >= 1"),
        ({"min_records": 5}, "min_records must be an int >= 10"),
        ({"window": 50}, "window must be None or an int >= 500"),
        ({"held_out": 1.0}, r"held_out must be a share in \(0, 1\)"),
        ({"margin": -0.1}, "margin must be a finite number >= 0"),
        ({"margin": float("nan")}, "margin must be a finite number >= 0"),
        ({"min_exact": 1.5}, r"min_exact must be a share in \[0, 1\]"),
        ({"config": PredictorConfig(kind="point")}, "config must be a PredictorConfig with kind='logt'"),
        ({"warm_start": True}, r"warm_start=True needs the served LengthPredictor"),
        ({"threads": 0}, "threads must be None or an int >= 1"),
        ({"install": "set"}, "install must be callable"),
        ({"predictor": object()}, "predictor must be None or a 'logt' LengthPredictor"),
        ({"predictor": TrueLaw()}, "config: the served predictor has no PredictorConfig"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, match):
    log = LengthLog()
    with pytest.raises(ValueError, match=match):
        PredictorRefresher(log, **kwargs)
    assert log._listeners == []
    with pytest.raises(ValueError, match="log must be a LengthLog"):
        PredictorRefresher("lengths.jsonl")
    with pytest.raises(ValueError, match=r"exceeds what the log keeps \(max_records=100\)"):
        PredictorRefresher(LengthLog(max_records=100), min_records=200)


def test_set_tie_predictor_swaps_only_the_predictor():
    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler, set_tie_predictor
    from hf_ext.generation.tie.config import TIEConfig
    from hf_ext.testing import tiny_tokenizer

    with pytest.raises(ValueError, match="no tokenizer or prompt_text"):
        enable_tie_scheduler(None, None)
        set_tie_predictor(TrueLaw())
    tok, cfg, log = tiny_tokenizer(), TIEConfig(beta_max=0.3), LengthLog()
    first = TrueLaw()
    enable_tie_scheduler(first, tok, cfg, length_log=log)
    point = TrueLaw()
    point.kind = "point"
    with pytest.raises(ValueError, match="'logt' LengthPredictor"):
        set_tie_predictor(point)
    second = TrueLaw()
    assert set_tie_predictor(second) is first
    assert (CONTEXT.predictor, CONTEXT.tokenizer, CONTEXT.config, CONTEXT.length_log) == (
        second,
        tok,
        cfg,
        log,
    )
    assert set_tie_predictor(None) is second and CONTEXT.predictor is None


def test_refresh_benchmark_smoke(capsys):
    """benchmarks/tie_refresh.py end to end at smoke size: every policy at every load, refits reported."""
    from tests.tie._scripts import load_script

    bench = load_script("tie_refresh")
    assert bench.main(["--quick", "--no-write", "--loads", "4,8"]) == 0
    out = capsys.readouterr().out
    assert "tie_refresh" in out and out.count("refit at ") == 6  # 300 requests, every 100: 3 refits per load
    assert "vs tie_stale" in out and "vs tie_oracle" in out
    with pytest.raises(SystemExit, match="--every must be in"):
        bench.main(["--every", "5000", "--no-write"])


def test_in_flight_rows_join_the_training_rows_as_lower_bounds(monkeypatch):
    seen = {}

    def fake_fit(self, data, **kw):
        seen["data"], seen["kw"] = data, kw
        return {"loss": []}

    monkeypatch.setattr(LengthPredictor, "fit", fake_fit)
    log = LengthLog()
    _feed(log, _traffic(100, seed=14, long_median=100))
    running = [
        {"prompt": "Write a detailed long essay about rome.", "output_len": 700},
        {"prompt": " ", "output_len": 9},
    ]
    ref = PredictorRefresher(
        log,
        min_records=50,
        config=PredictorConfig.tiny(),
        isolate=False,
        install=lambda p: None,
        in_flight=lambda: running,
    )
    rep = ref.refit()
    data = seen["data"]
    assert (
        rep["n_train"] == 81 and len(data["prompt"]) == 81
    )  # 80 finished + the running essay (blank text dropped)
    assert (data["prompt"][-1], data["output_len"][-1], data["censored"][-1]) == (
        running[0]["prompt"],
        700,
        True,
    )
    assert seen["kw"] == {"censored_column": "censored"}
    with pytest.raises(ValueError, match="in_flight must be callable, None or 'auto'"):
        PredictorRefresher(log, in_flight=[running])
    from hf_ext.generation.tie.refresh import _default_in_flight

    assert PredictorRefresher(log).in_flight is _default_in_flight  # serving through the TIE scheduler
    assert PredictorRefresher(log, install=print).in_flight is None  # elsewhere: nothing to read


class ShortForAll:
    """A stand-in candidate that learns nothing and says every answer has median 15 tokens."""

    kind = "logt"

    def fit(self, data, **kw):
        return {"loss": []}

    def predict(self, prompts, batch_size=256):
        mu = np.full(len(prompts), math.log(15.0))
        return {"mu": mu, "sigma": np.full_like(mu, 0.4), "nu": np.full_like(mu, 3.5)}


@pytest.mark.parametrize("judge", [True, False])
def test_running_requests_are_held_out_too_so_a_log_of_short_answers_cannot_pick_the_refit(
    monkeypatch, judge
):
    """At overload the newest finished rows are the short answers; the essays are still generating. Scored on the
    finished rows only, a candidate that calls every answer short wins. With a share of the running essays held out
    (their tokens so far as lower bounds), it loses to the served law that knows essays are long."""
    rng = np.random.default_rng(16)
    log = LengthLog()
    shorts = [
        ("Answer briefly: what is rome?", max(1, round(15 * math.exp(0.3 * rng.standard_normal()))))
        for _ in range(200)
    ]
    _feed(log, shorts)
    running = [
        {"prompt": f"Write a detailed long essay about {t}.", "output_len": 150}
        for t in TOPICS
        for _ in range(5)
    ]  # 40 rows
    got: list = []
    ref = PredictorRefresher(
        log,
        TrueLaw(),
        min_records=100,
        config=PredictorConfig.tiny(),
        install=got.append,
        isolate=False,
        in_flight=lambda: running,
        in_flight_held_out=judge,
    )
    monkeypatch.setattr(ref, "_new_predictor", ShortForAll)
    rep = ref.refit()
    if judge:
        assert (rep["n_held_in_flight"], rep["n_held_out"], rep["n_train"]) == (8, 48, 192)
        assert not rep["accepted"] and got == [] and rep["nll_new"] > rep["nll_served"]
    else:
        assert (rep["n_held_in_flight"], rep["n_held_out"], rep["n_train"]) == (0, 40, 200)
        assert rep["accepted"] and len(got) == 1  # fooled by the finished rows alone
    # without a served predictor the heuristic baseline needs prompt_tokens: rows lacking it are trained on only
    ref = PredictorRefresher(
        log,
        None,
        min_records=100,
        config=PredictorConfig.tiny(),
        install=got.append,
        isolate=False,
        in_flight=lambda: running[:20] + [{**r, "prompt_tokens": 7} for r in running[20:]],
        in_flight_held_out=judge,
    )
    monkeypatch.setattr(ref, "_new_predictor", ShortForAll)
    assert ref.refit()["n_held_in_flight"] == (4 if judge else 0)  # indices 24, 29, 34, 39
    with pytest.raises(ValueError, match="in_flight_held_out must be True or False"):
        PredictorRefresher(log, in_flight_held_out="yes")


def test_in_flight_rows_reads_the_live_schedulers_running_requests():
    from types import SimpleNamespace

    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler, in_flight_rows

    enable_tie_scheduler(None, None)
    assert in_flight_rows() == []  # no tokenizer or prompt_text: no text for the rows
    enable_tie_scheduler(None, None, prompt_text=lambda ids: f"{len(ids)} prompt tokens")

    def state(rid, n_prompt, n_gen):
        return SimpleNamespace(
            request_id=rid, initial_tokens=list(range(n_prompt)), generated_tokens=[7] * n_gen
        )

    class Live:  # what in_flight_rows reads of a running TIE scheduler
        def __init__(self):
            self.active_requests = {"a": state("a", 5, 12), "b": state("b", 3, 0), "c": state("c", 4, 2)}
            self.active_requests["a"].max_new_tokens = 64
            self._texts = {"c": "the predictor's text of c"}

    live = Live()
    CONTEXT.live.add(live)
    try:
        rows = sorted(in_flight_rows(), key=lambda r: r["request_id"])
    finally:
        CONTEXT.live.discard(live)
    assert rows == [
        {
            "request_id": "a",
            "prompt": "5 prompt tokens",
            "output_len": 12,
            "prompt_tokens": 5,
            "max_new_tokens": 64,
        },
        {
            "request_id": "c",
            "prompt": "the predictor's text of c",
            "output_len": 2,
            "prompt_tokens": 4,
            "max_new_tokens": None,
        },
    ]  # "b" has not generated yet: nothing to learn


def test_a_log_of_cut_lengths_only_is_not_trained_on(monkeypatch):
    """Every row cut at max_tokens: over-estimating would win the held-out comparison, so the refit is skipped
    (unless min_exact=0)."""
    log = LengthLog()
    for i, (prompt, x) in enumerate(_traffic(200, seed=15, long_median=100)):
        log.add(
            prompt=prompt,
            output_len=max(1, x // 2),
            reason="max_new_tokens",
            max_new_tokens=max(1, x // 2),
            prompt_tokens=4,
            request_id=str(i),
        )
    ref = PredictorRefresher(
        log, min_records=100, config=PredictorConfig.tiny(), isolate=False, install=pytest.fail
    )
    rep = ref.refit()
    assert rep["skipped"].startswith("0% of 200 rows have exact lengths < min_exact=10%")
    fitted = []
    monkeypatch.setattr(LengthPredictor, "fit", lambda self, data, **kw: fitted.append(len(data["prompt"])))
    got: list = []
    ref = PredictorRefresher(
        log, min_records=100, config=PredictorConfig.tiny(), isolate=False, install=got.append, min_exact=0.0
    )
    ref.refit()
    assert fitted == [160]


@pytest.mark.filterwarnings("ignore:LengthPredictor.predict called on an untrained predictor")
def test_a_dead_training_worker_is_replaced_at_the_next_refit(monkeypatch):
    """The worker process dies (BrokenProcessPool): that refit fails, and the next one spawns a new worker instead
    of failing on the broken pool forever."""
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    class FakePool:  # a process pool whose first worker dies; later ones train in this process
        made: list = []

        def __init__(self, *args, **kwargs) -> None:
            self.shut = False
            FakePool.made.append(self)

        def submit(self, fn, *args):
            fut: concurrent.futures.Future = concurrent.futures.Future()
            if self is FakePool.made[0]:
                fut.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            else:
                fut.set_result(0.0)
            return fut

        def shutdown(self, wait=True, cancel_futures=False) -> None:
            self.shut = True

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", FakePool)
    log = LengthLog()
    _feed(log, _traffic(60, seed=17, long_median=100))
    ref = PredictorRefresher(
        log, min_records=40, config=PredictorConfig.tiny(), install=lambda p: None, in_flight=None
    )
    with pytest.raises(BrokenProcessPool):
        ref.refit()
    assert FakePool.made[0].shut and ref._pool is None
    assert "nll_new" in ref.refit()  # a new worker
    assert len(FakePool.made) == 2 and ref._pool is FakePool.made[1]
    ref.stop()
