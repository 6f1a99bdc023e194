"""Calibration input checks: noisy decode pairs, fit() points, reps (audit of hf_ext.simulate.calibrate)."""

from __future__ import annotations

import json
import math
import warnings

import pytest

from hf_ext.simulate import calibrate as C
from hf_ext.simulate.cost_model import CostModel

TRUTH = CostModel(
    decode_floor_s=0.004,
    base_s=0.003,
    per_seq_s=1e-5,
    per_ctx_token_s=5e-7,
    per_prefill_token_s=1e-5,
    per_prefill_attn_s=8e-8,
)


def _exact_times(grid: dict) -> dict:
    n1, n2 = grid["n1n2"]
    times = {(b, t, 1): C.predict_generate(TRUTH, b, t, 1) for b, t in grid["prefill"]}
    for b in grid["batches"]:
        for c in grid["contexts"]:
            for n in (n1, n2):
                times[(b, c, n)] = C.predict_generate(TRUTH, b, c, n)
    return times


def test_noisy_decode_pair_is_dropped_with_warning_not_clamped():
    grid = C._GRIDS["cpu"]
    n1, n2 = grid["n1n2"]
    times = _exact_times(grid)
    times[(1, 32, n1)] = times[(1, 32, n2)] * 1.01  # one noisy repetition: T(n1) above T(n2)
    with pytest.warns(RuntimeWarning, match=r"batch=1, prompt=32"):
        pts = C._points_from(times, grid)
    dec = [p for p in pts if p["kind"] == "decode"]
    assert len(dec) == len(grid["batches"]) * len(grid["contexts"]) - 1
    assert all(p["seconds"] > 1e-3 for p in dec)  # the old code kept a 1e-9 s point here
    cm = C.fit(pts)
    assert cm.extra["fit_mean_abs_rel_err"] < 0.01
    assert math.isclose(cm.decode_time(16, 200), TRUTH.decode_time(16, 200), rel_tol=0.01)


def test_clean_decode_pairs_do_not_warn():
    grid = C._GRIDS["cpu"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pts = C._points_from(_exact_times(grid), grid)
    assert sum(p["kind"] == "decode" for p in pts) == len(grid["batches"]) * len(grid["contexts"])


def test_all_decode_pairs_noisy_is_a_value_error():
    grid = C._GRIDS["cpu"]
    n1, n2 = grid["n1n2"]
    times = _exact_times(grid)
    for b in grid["batches"]:
        for c in grid["contexts"]:
            times[(b, c, n2)] = times[(b, c, n1)]
    with pytest.raises(ValueError, match="too few decode points"):
        C._points_from(times, grid)


_OK_PRE = {"kind": "prefill", "batch": 1, "ctx": 0, "tokens": 16, "prompt": 16, "seconds": 0.01}


@pytest.mark.parametrize("bad", [0.0, -0.01, math.nan, math.inf, None, "0.01"])
def test_fit_rejects_non_positive_or_non_finite_seconds(bad):
    dec = {"kind": "decode", "batch": 1, "ctx": 10, "tokens": 0, "seconds": bad}
    with pytest.raises(ValueError, match=r"points\[0\]\['seconds'\] must be a finite time > 0"):
        C.fit([dec, _OK_PRE])


def test_fit_rejects_unknown_kind():
    with pytest.raises(ValueError, match=r"points\[1\]\['kind'\] must be 'decode' or 'prefill'"):
        C.fit([dict(_OK_PRE), dict(_OK_PRE, kind="prefil")])


@pytest.mark.parametrize("reps", [0, -1, 1.5, True])
def test_reps_below_one_rejected_before_any_work(reps, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("work started before reps was checked")

    monkeypatch.setattr(C, "model_for_shape", no_work)
    monkeypatch.setattr(C, "_gen_once", no_work)
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        C.calibrate("tiny", "cpu", reps=reps)
    with pytest.raises(ValueError, match="reps must be an int >= 1"):
        C.time_jobs(object(), [(1, 8, 2)], reps=reps)


@pytest.mark.parametrize("value", ["0", "-1", "x"])
def test_calibrate_cli_reps_below_one_is_argparse_error(value, capsys, monkeypatch, tmp_path):
    def no_work(*a, **k):
        raise AssertionError("calibrate ran")

    monkeypatch.setattr(C, "calibrate", no_work)
    with pytest.raises(SystemExit) as e:
        C.main(["--reps", value, "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "--reps: must be an integer >= 1" in capsys.readouterr().err


def test_bench_cli_reps_below_one_is_argparse_error(capsys, monkeypatch):
    from hf_ext.simulate import bench

    def no_work(*a, **k):
        raise AssertionError("bench ran")

    monkeypatch.setattr(bench, "_calibration_rows", no_work)
    monkeypatch.setattr(bench, "_speed_rows", no_work)
    with pytest.raises(SystemExit) as e:
        bench.main(["--reps", "0"])
    assert e.value.code == 2
    assert "--reps: must be an integer >= 1" in capsys.readouterr().err


def test_cost_model_unknown_key_is_a_value_error_listing_valid_keys(tmp_path):
    d = {"decode_floor": 0.045, "per_seq": 1e-4, "name": "typo"}  # misspelt: used to load as all zeros
    with pytest.raises(
        ValueError, match=r"unknown CostModel key\(s\) \['decode_floor', 'per_seq'\].*decode_floor_s"
    ):
        CostModel.from_dict(d)
    p = tmp_path / "typo.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"typo\.json: unknown CostModel key"):
        CostModel.load(p)


def test_every_shipped_calibration_still_loads_and_round_trips():
    from hf_ext.simulate.cost_model import available_calibrations

    names = available_calibrations()
    assert "cpu-x86-64-tiny" in names and "gpu_md-h100-llama3.1-8b" in names
    for name in names:
        cm = CostModel.load(name)
        assert CostModel.from_dict(cm.to_dict()) == cm, name


@pytest.mark.parametrize(
    "n, name",
    [
        (100_000, "sim_seconds_100k"),
        (10_000, "sim_seconds_10k"),
        (500, "sim_seconds_n500"),
        (1999, "sim_seconds_n1999"),
    ],
)
def test_bench_speed_metric_names_n_exactly(n, name):
    from hf_ext.simulate import bench

    assert bench.speed_metric(n) == name  # 100k keeps the name of the rows already in simulator.csv


def test_bench_speed_rows_of_500_requests_are_not_named_0k(monkeypatch):
    from hf_ext.simulate import bench
    from hf_ext.simulate import workload as W

    def no_trace(*a, **k):
        raise FileNotFoundError("no trace in this test")

    monkeypatch.setattr(W, "azure_trace", no_trace)
    rows = bench._speed_rows(500, 5.5)
    assert {r.metric for r in rows} == {"sim_seconds_n500"}


@pytest.mark.parametrize(
    "args, match",
    [
        (["--n", "0"], "--n: must be an integer >= 1"),
        (["--n", "-3"], "--n: must be an integer >= 1"),
        (["--rate", "0"], "--rate: must be a finite number > 0"),
        (["--rate", "-1"], "--rate: must be a finite number > 0"),
        (["--rate", "nan"], "--rate: must be a finite number > 0"),
        (["--rate", "inf"], "--rate: must be a finite number > 0"),
    ],
)
def test_bench_cli_n_and_rate_are_argparse_errors(args, match, capsys, monkeypatch):
    from hf_ext.simulate import bench

    def no_work(*a, **k):
        raise AssertionError("bench ran")

    monkeypatch.setattr(bench, "_calibration_rows", no_work)
    monkeypatch.setattr(bench, "_speed_rows", no_work)
    with pytest.raises(SystemExit) as e:
        bench.main(["--skip-calibration", *args])
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_docs_state_the_shipped_cpu_calibration():
    """docs/simulate.md quotes cpu-x86-64-tiny.json's own figures (it quoted another run's)."""
    from pathlib import Path

    docs = (Path(__file__).resolve().parents[2] / "docs" / "simulate.md").read_text()
    cm = CostModel.load("cpu-x86-64-tiny")
    assert "calibrations/cpu-x86-64-tiny.json" in docs
    assert f"**{cm.extra['calibration_error']:.3f}**" in docs
    assert f"mean relative error {cm.extra['fit_mean_abs_rel_err']:.3f}" in docs
    for v in cm.extra["validation"]:
        pct = f"{abs(v['rel_err']):.1%}"
        row = f"B={v['batch']} P={v['prompt']} new={v['new']}"
        line = next(ln for ln in docs.splitlines() if row in ln and "time, s" in ln)
        assert ("+" if v["rel_err"] > 0 else "−") + pct in line, line
        assert f"{v['simulated_s']:.4f}" in line and f"{v['measured_s']:.4f}" in line, line
    pre = [p for p in cm.extra["points"] if p["kind"] == "prefill" and p["prompt"] in (16, 64)]
    for p in pre:
        err = C._predict(cm, p) / p["seconds"] - 1
        assert f"{p['prompt']} tokens +{err:.0%}".replace("%", " %") in docs
