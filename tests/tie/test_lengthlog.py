"""Length logs of served requests: recording in the CB scheduler, censoring-aware training, calibration."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest
import torch

from hf_ext.generation.tie.config import PredictorConfig
from hf_ext.generation.tie.lengthlog import LengthLog, calibration, load_length_log
from hf_ext.generation.tie.predictor import LengthPredictor, logt_scores
from tests.tie.test_cb import PROMPTS  # the engine tests' prompts


class FakePredictor:
    """log-t predictor stand-in: longer prompt, longer expected answer; records the texts it saw."""

    kind = "logt"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def predict(self, prompts, batch_size=256):
        self.seen.extend(prompts)
        mu = np.array([len(p) / 10 for p in prompts], dtype=np.float64)
        return {"mu": mu, "sigma": np.full_like(mu, 0.5), "nu": np.full_like(mu, 3.5)}


def _cb():
    from transformers import ContinuousBatchingConfig

    return ContinuousBatchingConfig(
        num_blocks=16, page_size=16, max_batch_tokens=64, max_requests_per_batch=2, scheduler_type="tie"
    )


@pytest.fixture(scope="module")
def engine():
    """A tiny Llama, its tokenizer, and an EOS id that request 0 produces as its 4th greedy token."""
    from transformers import GenerationConfig

    from hf_ext.testing import tiny_llama, tiny_tokenizer

    torch.set_num_threads(1)
    model, tok = tiny_llama(), tiny_tokenizer()
    ids = [tok(p).input_ids for p in PROMPTS]
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=-1, pad_token_id=0)
    mgr_out = model.generate_batch(ids[:1], generation_config=gc)
    eos = next(iter(mgr_out.values())).generated_tokens[3]
    return model, tok, ids, eos


@pytest.fixture(autouse=True)
def _restore_context():
    from hf_ext.generation.tie.cb import preserved_context

    with preserved_context():
        yield


# ------------------------------------------------------------------------------------------ the log itself
def test_log_records_validates_and_round_trips_a_file(tmp_path):
    path = tmp_path / "lengths.jsonl"
    with LengthLog(path, max_records=2) as log:
        log.add(prompt="a", output_len=3, reason="eos", max_new_tokens=8, prompt_tokens=1, request_id="r0")
        log.add(
            prompt="b",
            output_len=8,
            reason="max_new_tokens",
            max_new_tokens=8,
            prompt_tokens=1,
            request_id="r1",
            law=(2.0, 0.5, 3.5),
            source="predictor",
        )
        log.add(
            prompt="c",
            output_len=5,
            reason="cancelled",
            max_new_tokens=None,
            prompt_tokens=1,
            request_id="r2",
        )
        for bad, match in (
            (dict(output_len=0), "output_len must be an int >= 1"),
            (dict(output_len=2.5), "output_len must be an int >= 1"),
            (dict(reason="stop"), "reason must be one of"),
            (dict(law=(1.0, 1.0, 3.5)), "give law and source together"),
            (dict(law=(1.0, 1.0, 3.5), source="oracle"), "give law and source together"),
            (dict(prompt=None), "prompt must be a str"),
        ):
            kw = dict(
                prompt="x", output_len=1, reason="eos", max_new_tokens=4, prompt_tokens=1, request_id="x"
            )
            with pytest.raises(ValueError, match=match):
                log.add(**{**kw, **bad})
        assert log.count == 3 and len(log) == 2  # memory keeps the newest two, the file all three
        assert [r["request_id"] for r in log.records] == ["r1", "r2"]
    ds = load_length_log(path)
    assert ds["request_id"] == ["r0", "r1", "r2"]
    assert ds["censored"] == [False, True, True] and ds["output_len"] == [3, 8, 5]
    assert ds["pred_mu"] == [None, 2.0, None] and ds["max_new_tokens"] == [8, 8, None]
    # appending: a restarted server keeps adding to the same file
    with LengthLog(path) as log2:
        log2.add(prompt="d", output_len=2, reason="eos", max_new_tokens=4, prompt_tokens=1, request_id="r3")
    assert load_length_log(path)["request_id"] == ["r0", "r1", "r2", "r3"]

    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(ValueError, match=r"lengths.jsonl:5: not a JSON record"):
        load_length_log(path)
    with pytest.raises(ValueError, match="does not exist"):
        LengthLog(tmp_path / "no" / "such.jsonl")
    with pytest.raises(ValueError, match="is a directory"):
        LengthLog(tmp_path)
    with pytest.raises(ValueError, match="max_records"):
        LengthLog(max_records=0)


def test_a_failing_write_is_counted_not_raised(tmp_path, caplog):
    log = LengthLog(tmp_path / "l.jsonl")
    log._fh.close()  # the file goes away under the server (e.g. disk trouble)
    with caplog.at_level("WARNING", logger="hf_ext"):
        for i in range(3):
            log.add(
                prompt="a", output_len=3, reason="eos", max_new_tokens=8, prompt_tokens=1, request_id=f"r{i}"
            )
    assert log.errors == 3 and len(log) == 3
    assert sum("could not append" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------------------------------ in the engine
def test_generate_batch_logs_every_request_with_its_reason(engine):
    from transformers import GenerationConfig

    from hf_ext.generation.tie.cb import tie_generate_batch

    model, tok, ids, eos = engine
    gc = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=0)
    pred = FakePredictor()
    log = LengthLog()
    out = tie_generate_batch(
        model, PROMPTS, tok, pred, generation_config=gc, continuous_batching_config=_cb(), length_log=log
    )
    recs = {r["request_id"]: r for r in log.records}
    assert sorted(recs) == sorted(out) and len(log.records) == len(PROMPTS)  # each finished request once
    want_mu = {f"req_{i}": len(p) / 10 for i, p in enumerate(PROMPTS)}
    for rid, res in out.items():
        r = recs[rid]
        assert r["output_len"] == len(res.generated_tokens)
        assert r["prompt"] == PROMPTS[int(rid.split("_")[1])]  # the caller's own text
        assert r["prompt_tokens"] == len(ids[int(rid.split("_")[1])])
        assert r["source"] == "predictor" and r["pred_mu"] == pytest.approx(
            want_mu[rid]
        )  # predicted up front
        assert r["max_new_tokens"] == 10
        ended_by_eos = res.generated_tokens[-1] == eos
        assert r["reason"] == ("eos" if ended_by_eos else "max_new_tokens")
        assert r["censored"] is (not ended_by_eos)
    assert recs["req_0"]["reason"] == "eos" and recs["req_0"]["output_len"] == 4
    # without a log nothing is recorded and the caller's context is back
    from hf_ext.generation.tie.cb import CONTEXT

    assert CONTEXT.length_log is None


def test_in_loop_predictions_and_cancellations_are_logged(engine):
    """A running manager: laws come from the in-loop predictor; a request cancelled mid-way is a lower bound."""
    from transformers import GenerationConfig

    from hf_ext.generation.tie.cb import enable_tie_scheduler

    model, tok, ids, _ = engine
    gc = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=-1, pad_token_id=0)
    pred = FakePredictor()
    log = LengthLog()
    enable_tie_scheduler(pred, tok, length_log=log)
    mgr = model.init_continuous_batching(generation_config=gc, continuous_batching_config=_cb())
    mgr.start()
    try:
        for i, x in enumerate(ids[1:4]):
            mgr.add_request(x, request_id=f"a{i}", max_new_tokens=4 + i)
        mgr.add_request(ids[0], request_id="long", max_new_tokens=400, streaming=True)
        got: dict[str, int] = {}
        deadline = time.time() + 60
        while time.time() < deadline and not ({"a0", "a1", "a2"} <= set(got) and got.get("long", 0) >= 3):
            r = mgr.get_result(timeout=5)
            if r is not None:
                got[r.request_id] = len(r.generated_tokens)
        assert got.get("long", 0) >= 3, got
        mgr.cancel_request("long")
        while time.time() < deadline and not any(r["request_id"] == "long" for r in log.records):
            time.sleep(0.05)
    finally:
        mgr.stop(block=True)
    recs = {r["request_id"]: r for r in log.records}
    assert sorted(recs) == ["a0", "a1", "a2", "long"]
    for i in range(3):
        r = recs[f"a{i}"]
        assert (r["output_len"], r["max_new_tokens"], r["reason"]) == (4 + i, 4 + i, "max_new_tokens")
        assert r["source"] == "predictor" and r["prompt"] == PROMPTS[1 + i]
        assert r["pred_mu"] == pytest.approx(len(PROMPTS[1 + i]) / 10)
    long = recs["long"]
    assert long["reason"] == "cancelled" and long["censored"] and 3 <= long["output_len"] < 400
    assert pred.seen.count(PROMPTS[0]) == 1  # the predictor's text is reused, not decoded again


def test_each_row_names_where_its_law_came_from(engine):
    from transformers import GenerationConfig

    from hf_ext.generation.tie.cb import enable_tie_scheduler, set_length_hints

    model, tok, ids, _ = engine
    log = LengthLog()
    enable_tie_scheduler(None, tok, length_log=log)
    set_length_hints(ids[:1], [1.0], [0.5])
    set_length_hints(ids[1:2], [2.0], [0.5], source="predictor")
    with pytest.raises(ValueError, match="source must be one of"):
        set_length_hints(ids[2:3], [2.0], [0.5], source="oracle")
    gc = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    with pytest.warns(UserWarning, match="heuristic"):
        out = model.generate_batch(ids[:3], generation_config=gc, continuous_batching_config=_cb())
    by_prompt = {r["prompt"]: r for r in log.records}
    assert len(out) == 3 and len(by_prompt) == 3
    got = [by_prompt[tok.decode(x, skip_special_tokens=True)] for x in ids[:3]]
    assert [r["source"] for r in got] == ["hint", "predictor", "heuristic"]
    assert [r["pred_mu"] for r in got[:2]] == [1.0, 2.0]


def test_a_broken_prompt_text_never_stops_the_engine(engine):
    """The log runs in the engine's thread: a failure there is counted, and every request still finishes."""
    from transformers import ContinuousBatchingConfig, GenerationConfig

    from hf_ext.generation.tie.cb import enable_tie_scheduler

    model, tok, ids, _ = engine

    def broken(ids_):
        raise RuntimeError("no text today")

    log = LengthLog()
    enable_tie_scheduler(None, None, prompt_text=broken, length_log=log)
    gc = GenerationConfig(max_new_tokens=3, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64, scheduler_type="tie")
    with pytest.warns(UserWarning, match="heuristic"):
        out = model.generate_batch(ids[:3], generation_config=gc, continuous_batching_config=cb)
    assert len(out) == 3 and all(len(o.generated_tokens) == 3 for o in out.values())
    assert log.errors == 3 and len(log) == 0


def test_enable_refuses_a_log_it_cannot_fill():
    from hf_ext.generation.tie.cb import CONTEXT, enable_tie_scheduler, tie_generate_batch

    before = CONTEXT.length_log
    with pytest.raises(
        ValueError, match="tokenizer .* or prompt_text is required with predictor= or length_log="
    ):
        enable_tie_scheduler(None, None, length_log=LengthLog())
    with pytest.raises(ValueError, match="length_log must be a LengthLog"):
        enable_tie_scheduler(None, None, length_log="lengths.jsonl")
    with pytest.raises(ValueError, match="length_log must be a LengthLog"):
        tie_generate_batch(None, ["a"], object(), length_log=[])
    assert CONTEXT.length_log is before


# ------------------------------------------------------------------------------------------ training on a log
def _served_log(n: int, seed: int) -> tuple[dict, np.ndarray]:
    """Two prompt kinds served under three client caps: long answers (median 300) are often cut."""
    rng = np.random.default_rng(seed)
    topics = ["rome", "paris", "cats", "rivers", "music", "trains", "stars", "bread"]
    prompts, out_len, cens, true = [], [], [], []
    for _ in range(n):
        t = topics[rng.integers(0, len(topics))]
        short = rng.random() < 0.5
        prompts.append(
            f"Answer briefly: what is {t}?" if short else f"Write a detailed long essay about {t}."
        )
        x = max(1, round(math.exp(math.log(20 if short else 300) + 0.4 * rng.standard_t(3.5))))
        cap = int(rng.choice([64, 300, 2000]))
        true.append(x)
        out_len.append(min(x, cap))
        cens.append(x >= cap)
    return {"prompt": prompts, "output_len": out_len, "censored": cens}, np.asarray(true)


def test_fit_on_a_served_log_uses_the_cut_rows_as_lower_bounds():
    torch.set_num_threads(1)
    data, _ = _served_log(600, seed=0)
    assert 0.2 < np.mean(data["censored"]) < 0.32  # half the long answers: all at cap 64, half at 300
    long_prompt = ["Write a detailed long essay about rome."]
    fits = {}
    for col in (None, "censored"):
        p = LengthPredictor(PredictorConfig.tiny(epochs=6))
        p.fit(data, censored_column=col)
        fits[col] = p.predict(long_prompt)
    assert abs(fits["censored"]["mu"][0] - math.log(300)) < 0.25  # the true median is recovered
    assert fits[None]["mu"][0] < math.log(300) - 0.4  # taken as exact, the cut lengths drag it down
    # evaluate: nll_censored is the training objective with per-row flags
    p = LengthPredictor(PredictorConfig.tiny(epochs=1))
    p.fit(data, censored_column="censored")
    ev = p.evaluate(data, censored_column="censored")
    pr = p.predict(data["prompt"])
    want = logt_scores(data["output_len"], pr["mu"], pr["sigma"], pr["nu"], censored=data["censored"])
    assert ev["nll_censored"] == pytest.approx(want["nll_censored"]) and ev["nll_censored"] != ev["nll"]


def test_fit_refuses_what_it_cannot_use():
    data = {"prompt": ["a b", "c d"], "output_len": [3, 5], "censored": [False, True]}
    with pytest.raises(ValueError, match="kind='point' predictor cannot use a lower bound"):
        LengthPredictor(PredictorConfig.tiny(kind="point")).fit(data, censored_column="censored")
    with pytest.raises(ValueError, match="censored_column='cut' is not a column"):
        LengthPredictor(PredictorConfig.tiny()).fit(data, censored_column="cut")
    with pytest.raises(ValueError, match="must hold one bool"):
        LengthPredictor(PredictorConfig.tiny()).fit(
            {**data, "censored": [0.5, 1]}, censored_column="censored"
        )
    # no censored rows: the point baseline trains on the same log
    LengthPredictor(PredictorConfig.tiny(kind="point", epochs=1)).fit(
        {**data, "censored": [False, False]}, censored_column="censored"
    )


def test_censored_nll_matches_scipy():
    from scipy import stats

    x = np.array([5.0, 40.0, 100.0])
    cens = np.array([False, True, False])
    got = logt_scores(x, 3.0, 0.7, 3.5, censored=cens)["nll_censored"]
    z = (np.log(x) - 3.0) / 0.7
    want = np.where(cens, -stats.t.logsf(z, 3.5), -(stats.t.logpdf(z, 3.5) - math.log(0.7)))
    assert got == pytest.approx(want.mean())
    got_cap = logt_scores(x, 3.0, 0.7, 3.5, censor_at=50, censored=cens)["nll_censored"]
    z50 = (math.log(50) - 3.0) / 0.7
    want[2] = -stats.t.logsf(z50, 3.5)  # 100 >= the cap 50: "at least 50"
    assert got_cap == pytest.approx(want.mean())


# ------------------------------------------------------------------------------------------ calibration
def _records(law_mu: float, n: int = 4000, seed: int = 3) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = np.maximum(1, np.round(np.exp(4.0 + 0.6 * rng.standard_t(3.5, n)))).astype(int)
    caps = rng.choice([40, 200, 5000], n)
    out = []
    for xi, c in zip(x, caps):
        n_out = int(min(xi, c))
        out.append(
            dict(
                output_len=n_out,
                censored=bool(xi >= c),
                pred_mu=law_mu,
                pred_sigma=0.6,
                pred_nu=3.5,
                source="predictor",
            )
        )
    return out


def test_calibration_is_right_for_the_true_law_and_flags_drift():
    good = calibration(_records(4.0))
    assert good["n"] == 4000 and good["n_censored"] > 800 and good["by_source"]["predictor"] == 4000
    for p in (0.5, 0.9):
        assert abs(good[f"above_q{p:g}"] - (1 - p) / 2) < 0.025, good
        assert abs(good[f"below_q{p:g}"] - (1 - p) / 2) < 0.03, good
    assert len(good["pit"]) == 10 and max(abs(v - 0.1) for v in good["pit"]) < 0.02
    assert sum(good["pit"]) == pytest.approx(1.0)
    low = calibration(_records(3.3))  # the predictor under-estimates by a factor of two
    assert low["above_q0.9"] > 0.12 and low["nll"] > good["nll"] + 0.1 and low["pit"][-1] > 0.2
    assert calibration([dict(output_len=3, censored=False, pred_mu=None)])["n"] == 0
    log = LengthLog()
    assert log.calibration() == {
        "n": 0,
        "n_censored": 0,
        "by_source": dict.fromkeys(("predictor", "hint", "heuristic"), 0),
    }


def test_a_row_cut_by_a_crash_is_not_merged_into_and_skipped_at_the_end(tmp_path, caplog):
    """A crash cuts the last row mid-line: the file loads without it (a warning names the line), and a restarted
    log drops the cut row (with a warning) and appends whole rows, so the file loads again."""
    path = tmp_path / "lengths.jsonl"
    kw = dict(output_len=3, reason="eos", max_new_tokens=8, prompt_tokens=1)
    with LengthLog(path) as log:
        for i in range(3):
            log.add(prompt=f"p{i} é", request_id=f"r{i}", **kw)
    data = path.read_bytes()
    for cut in (40, len(data.rsplit(b"\xc3", 1)[1])):  # mid-JSON; mid-UTF-8 character
        path.write_bytes(data[:-cut])
        with caplog.at_level("WARNING", logger="hf_ext"):
            assert load_length_log(path)["request_id"] == ["r0", "r1"]
        assert "lengths.jsonl:3: skipped a record cut off mid-line" in caplog.text
    with caplog.at_level("WARNING", logger="hf_ext"), LengthLog(path) as log:
        log.add(prompt="after restart", request_id="r3", **kw)
    assert "ended with a row cut off mid-line" in caplog.text
    assert load_length_log(path)["request_id"] == ["r0", "r1", "r3"]  # the cut row is gone, the new one whole
    with path.open("a") as fh:  # a broken row in the middle is still refused
        fh.write(
            "{not json\n"
            + json.dumps({"prompt": "x", "output_len": 1, "censored": False, "reason": "eos"})
            + "\n"
        )
    with pytest.raises(ValueError, match=r"lengths.jsonl:4: not a JSON record"):
        load_length_log(path)
    path.write_text("")  # an empty file gets no newline
    with LengthLog(path) as log:
        log.add(prompt="a", request_id="r0", **kw)
    assert path.read_text().count("\n") == 1


def test_load_length_log_rejects_foreign_records(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"prompt": "a", "output_len": 3}) + "\n")
    with pytest.raises(
        ValueError, match=r"x.jsonl:1: not a length-log record \(missing \['censored', 'reason'\]\)"
    ):
        load_length_log(path)


# ------------------------------------------------------------------------------------------ the benchmark
def test_served_log_benchmark(capsys):
    """benchmarks/tie_served_log.py: the simulated log cuts exactly the rows it flags; the smoke run trains and
    schedules every variant."""
    from tests.tie._scripts import load_script

    bench = load_script("tie_served_log")
    rows = [{"prompt": f"p{i}", "output_len": n} for i, n in enumerate([5, 50, 300, 1000, 800] * 200)]
    log = bench.served_log(rows, (64, 512), cancel_rate=0.1, seed=0)
    true = np.asarray([r["output_len"] for r in rows])
    out, cens = np.asarray(log["output_len"]), np.asarray(log["censored"])
    assert np.all(out <= true) and np.all(out[~cens] == true[~cens]) and np.all(out >= 1)
    assert np.all(cens[(out < true)]) and np.all(cens[true >= 1000])
    assert 0.05 < np.mean(cens & (true < 64) & (out < true)) / np.mean(true < 64) < 0.15  # cancellations
    with pytest.raises(SystemExit, match="--caps"):
        bench.parse_caps("256;abc")
    assert bench.main(["--quick", "--no-write", "--caps", "1000;128,256", "--loads", "8"]) == 0
    out_text = capsys.readouterr().out
    for v in ("tie_censored", "tie_as_exact", "ssjf_as_exact", "ssjf_uncut_only", "tie_true_lengths"):
        assert v in out_text
    assert out_text.count("servedlog_caps") == 6  # 2 mixes x 1 load x (fcfs, ssjf, sjf_oracle)


def test_served_log_plot_takes_rows_without_nll(tmp_path):
    """The figure is drawn from main's rows, where the point predictors have no NLL (it once crashed there, after
    the CSV and before the tie.csv rows were written)."""
    from tests.tie._scripts import load_script

    bench = load_script("tie_served_log")
    q = [
        {"scenario": "true", "predictor": "tie_true_lengths", "nll": 1.15, "above_q0.9": 0.05},
        {"scenario": "a", "predictor": "tie_censored", "nll": 1.1, "above_q0.9": 0.05},
        {"scenario": "a", "predictor": "tie_as_exact", "nll": 1.3, "above_q0.9": 0.12},
        {"scenario": "a", "predictor": "ssjf_as_exact", "spearman": 0.7},
        {"scenario": "a", "predictor": "ssjf_uncut_only", "spearman": 0.6},
    ]
    lat = {
        "fcfs": 200.0,
        "tie_censored": 120.0,
        "tie_as_exact": 130.0,
        "ssjf_as_exact": 110.0,
        "ssjf_uncut_only": 115.0,
    }
    s = [
        {"scenario": "all" if k == "fcfs" else "a", "predictor": k, "load": 8.0, "per_token_mean_ms": v}
        for k, v in lat.items()
    ]
    bench.plot(q, s, ["a"], tmp_path / "x.png")
    assert (tmp_path / "x.png").stat().st_size > 1000


# ------------------------------------------------------------------------------------------ hf-ext tie-log
def test_tie_log_cli_reports_and_fits(tmp_path, capsys):
    from hf_ext.cli import main
    from hf_ext.generation.tie.data import generate_workload

    rng = np.random.default_rng(0)
    path = tmp_path / "lengths.jsonl"
    with LengthLog(path) as log:
        for i, r in enumerate(generate_workload(80, seed=5)):
            cap = int(rng.choice([64, 1000]))
            log.add(
                prompt=r["prompt"],
                output_len=min(r["output_len"], cap),
                reason="max_new_tokens" if r["output_len"] >= cap else "eos",
                max_new_tokens=cap,
                prompt_tokens=8,
                request_id=f"r{i}",
                law=(4.0, 1.0, 3.5),
                source="heuristic",
            )
    assert main(["tie-log", str(path)]) == 0
    out = capsys.readouterr().out
    assert "requests" in out and "80" in out and "ended by max_new_tokens" in out and "0 / 0 / 80" in out
    pred_dir = tmp_path / "pred"
    assert main(["tie-log", str(path), "--fit", str(pred_dir), "--tiny", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "held-out 8 of 80 requests" in out and "new predictor" in out and "served with" in out
    assert LengthPredictor.from_pretrained(pred_dir).predict(["hello"])["mu"].shape == (1,)
    with pytest.raises(SystemExit):
        main(["tie-log", str(path), "--held-out", "1.5"])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["tie-log", str(empty)]) == 1
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a usage error, not a traceback
        main(["tie-log", str(tmp_path / "missing.jsonl")])
    assert "log: no such file" in capsys.readouterr().err


def test_tie_log_fit_leaves_out_rows_with_an_empty_prompt_text(tmp_path, capsys):
    """The engine logs a request whose prompt text is empty (special tokens only; scored by the heuristic) with its
    empty text. ``--fit`` gave all rows to ``LengthPredictor.fit``, which refuses empty prompts, so one such row made
    the whole fit fail; they are now left out (as the refresher does), with a line saying how many."""
    from hf_ext.cli import main
    from hf_ext.generation.tie.data import generate_workload

    path = tmp_path / "lengths.jsonl"
    with LengthLog(path) as log:
        for i, r in enumerate(generate_workload(40, seed=3)):
            prompt = "" if i in (4, 17) else (" " if i == 30 else r["prompt"])
            log.add(
                prompt=prompt,
                output_len=r["output_len"],
                reason="eos",
                max_new_tokens=1000,
                prompt_tokens=8,
                request_id=f"r{i}",
                law=(4.0, 1.0, 3.5),
                source="heuristic",
            )
    pred_dir = tmp_path / "pred"
    assert main(["tie-log", str(path), "--fit", str(pred_dir), "--tiny", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "3 record(s) with an empty prompt text left out of the fit" in out
    assert "held-out 4 of 37 requests" in out
    assert (pred_dir / "config.json").exists() or any(pred_dir.iterdir())


def test_offloaded_and_soft_reset_requests_are_recorded_once_in_full():
    """transformers evicts a request under memory pressure: offloaded to the CPU (PENDING) or soft-reset (its tokens
    so far appended to its prompt, FINISHED but not ended). Both come back under the same id; only the real end is
    recorded, with the original prompt, the whole length, the original cap and the law it was first scored with."""
    from transformers.generation.continuous_batching.requests import RequestState, RequestStatus

    from hf_ext.generation.tie.cb import TIECBScheduler, enable_tie_scheduler

    class NoCache:
        def free_blocks(self, request_id):
            pass

    log = LengthLog()
    enable_tie_scheduler(None, None, prompt_text=lambda ids: f"prompt {ids}", length_log=log)
    sched = TIECBScheduler(NoCache(), 0.0, 4)
    state = RequestState(request_id="a", initial_tokens=[1, 2, 3], max_new_tokens=5, eos_token_id=9)
    sched._laws["a"] = ((1.0, 0.5, 3.5), "predictor")
    state._status = RequestStatus.PENDING  # offloaded to the CPU
    sched.active_requests["a"] = state
    sched.finish_request("a")
    state.generated_tokens = [4, 4]
    state._status = RequestStatus.FINISHED  # soft reset
    sched.active_requests["a"] = state
    sched.finish_request("a")
    assert len(log) == 0 and "a" in sched._laws
    again = state.create_equivalent_initial_request()
    again.generated_tokens = [4, 4, 4]  # its remaining cap of 3
    again._status = RequestStatus.FINISHED
    sched.active_requests["a"] = again
    sched.finish_request("a")
    (rec,) = log.records
    assert (rec["prompt"], rec["output_len"], rec["max_new_tokens"], rec["prompt_tokens"]) == (
        "prompt [1, 2, 3]",
        5,
        5,
        3,
    )
    assert (rec["reason"], rec["pred_mu"], rec["source"]) == ("max_new_tokens", 1.0, "predictor")
    failed = RequestState(request_id="b", initial_tokens=[1], max_new_tokens=5)
    sched._laws["b"] = ((1.0, 0.5, 3.5), "hint")
    failed._status = RequestStatus.FAILED
    sched.active_requests["b"] = failed
    sched.finish_request("b")
    assert len(log) == 1 and "b" not in sched._laws
    ended = RequestState(request_id="c", initial_tokens=[1], max_new_tokens=5, eos_token_id=9)
    ended.generated_tokens = [3, 9]
    ended._status = RequestStatus.FINISHED
    sched.active_requests["c"] = ended
    sched.finish_request("c")
    assert log.records[-1]["reason"] == "eos" and log.records[-1]["output_len"] == 2
    assert log.records[-1]["source"] is None  # this scheduler never scored it: no law is made up


def test_periodic_reports_warn_on_drift(caplog):
    """``report_every=N``: after every N records the last N laws are checked; a calibrated stream is an INFO line,
    a stream that outgrew its predictor (answers twice as long) a WARNING that says to retrain."""

    def feed(log: LengthLog, recs: list[dict]) -> None:
        for i, r in enumerate(recs):
            log.add(
                prompt="p",
                output_len=r["output_len"],
                reason="max_new_tokens" if r["censored"] else "eos",
                max_new_tokens=None,
                prompt_tokens=1,
                request_id=f"r{i}",
                law=(r["pred_mu"], r["pred_sigma"], r["pred_nu"]),
                source="predictor",
            )

    log = LengthLog(report_every=1000)
    with caplog.at_level("INFO", logger="hf_ext"):
        feed(log, _records(4.0, n=2000))
        feed(log, _records(3.3, n=1000, seed=4))
    assert [r["count"] for r in log.reports] == [1000, 2000, 3000]
    assert all(r["window"] == 1000 for r in log.reports)
    levels = [r.levelname for r in caplog.records if "TIE length log" in r.message]
    assert levels == ["INFO", "INFO", "WARNING"]
    assert "retrain it on this log" in caplog.records[-1].message
    assert log.reports[-1]["above_q0.9"] > 0.1 > log.reports[0]["above_q0.9"]
    with pytest.raises(ValueError, match="report_every must be None or an int >= 1"):
        LengthLog(report_every=0)
    with pytest.raises(ValueError, match=r"max_records \(10\) must be >= report_every \(20\)"):
        LengthLog(max_records=10, report_every=20)


def test_a_soft_reset_request_is_scored_from_its_true_prompt():
    """A soft-reset request comes back with its generated tokens appended to its prompt; its hint (keyed by the
    prompt ids) and its predictor text are those of the prompt the client sent."""
    from transformers.generation.continuous_batching.requests import RequestState

    from hf_ext.generation.tie.cb import TIECBScheduler, enable_tie_scheduler, set_length_hints

    class NoCache:
        def free_blocks(self, request_id):
            pass

    seen: list[str] = []

    class Pred(FakePredictor):
        def predict(self, prompts, batch_size=256):
            seen.extend(prompts)
            return super().predict(prompts, batch_size)

    enable_tie_scheduler(Pred(), None, prompt_text=lambda ids: f"prompt {ids}", length_log=LengthLog())
    set_length_hints([[1, 2, 3]], [2.5], [0.5])
    sched = TIECBScheduler(NoCache(), 0.0, 4)
    hinted = RequestState(request_id="a", initial_tokens=[1, 2, 3], max_new_tokens=8)
    hinted.generated_tokens = [7, 7]
    predicted = RequestState(request_id="b", initial_tokens=[4, 5], max_new_tokens=8)
    predicted.generated_tokens = [6]
    back = [hinted.create_equivalent_initial_request(), predicted.create_equivalent_initial_request()]
    assert back[0].initial_tokens == [1, 2, 3, 7, 7]
    sched._prepare(back)
    assert sched._laws["a"] == ((2.5, 0.5, 3.5), "hint")
    assert seen == ["prompt [4, 5]"] and sched._laws["b"][1] == "predictor"
