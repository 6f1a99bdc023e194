"""Workload generator input checks (audit of hf_ext.simulate.workload): NaN / inf / out-of-range parameters
are ValueErrors naming the parameter, not NaN arrivals or INT64_MIN lengths."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_ext.simulate import workload as W

CSV = "TIMESTAMP,ContextTokens,GeneratedTokens\n" + "".join(
    f"2023-11-16 18:15:{s:02d}.0000000,{100 + s},{(s * 37) % 50}\n" for s in range(10)
)


@pytest.fixture
def trace(tmp_path):
    p = tmp_path / W.AZURE_TRACE_NAME
    p.write_text(CSV)
    return p


@pytest.mark.parametrize("name", ["mu", "sigma", "nu", "mu_spread", "tail_shift", "tail_sigma", "max_len"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_length_dist_non_finite_parameter_is_rejected(name, bad):
    with pytest.raises(ValueError, match=rf"LengthDist\.{name} must be a finite number"):
        W.LengthDist(kind="mixture", **{name: bad})


def test_length_dist_samples_stay_in_range():
    lens, _, _ = W.LengthDist(kind="mixture", mu=3.0, sigma=1.0, max_len=64).sample(
        500, np.random.default_rng(0)
    )
    assert lens.min() >= 1 and lens.max() <= 64


@pytest.mark.parametrize("rate", [math.nan, math.inf, 0.0, -1.0])
@pytest.mark.parametrize("process", ["poisson", "gamma", "mmpp"])
def test_arrival_rate_must_be_finite_and_positive(rate, process):
    with pytest.raises(ValueError, match=r"rate must be a finite number > 0"):
        W.arrival_times(3, rate, process)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"process": "gamma", "cv": math.nan}, "cv must be a finite number > 0"),
        ({"process": "gamma", "cv": math.inf}, "cv must be a finite number > 0"),
        ({"process": "mmpp", "burst_factor": math.inf}, "burst_factor"),
        ({"process": "mmpp", "mean_phase_s": 0.0}, "mean_phase_s"),
    ],
)
def test_arrival_process_parameters_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        W.arrival_times(3, 1.0, **kw)


def test_offline_arrivals_ignore_rate_as_before():
    assert not W.arrival_times(4, 1.0, "offline").any()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"time_scale": math.nan}, r"time_scale must be a finite number > 0"),
        ({"time_scale": math.inf}, r"time_scale must be a finite number > 0"),
        ({"time_scale": 0.0}, r"time_scale must be a finite number > 0"),
        ({"max_output": 0}, r"max_output must be None or an int >= 1"),
        ({"max_output": 2.5}, r"max_output must be None or an int >= 1"),
        ({"n": -5}, r"n must be None or an int >= 0"),
        ({"start": -1}, r"start must be an int >= 0"),
    ],
)
def test_azure_trace_parameters_checked_before_reading(kw, match, tmp_path):
    # checked before the file is looked up: a missing file would be a FileNotFoundError
    with pytest.raises(ValueError, match=match):
        W.azure_trace(tmp_path / "missing.csv", **kw)


def test_azure_trace_max_output_clips(trace):
    reqs = W.azure_trace(trace, max_output=20)
    gen = [(s * 37) % 50 for s in range(10)]
    assert sorted(r.output_len for r in reqs) == sorted(max(1, min(g, 20)) for g in gen)
    assert [r.arrival for r in W.azure_trace(trace, time_scale=2.0)][:3] == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mu": math.nan}, r"mu must be a finite number"),
        ({"sigma_within": -1.0}, r"sigma_within must be a finite number >= 0"),
        ({"prompt_spread": math.inf}, r"prompt_spread must be a finite number >= 0"),
        ({"nu": 0.0}, r"nu must be a finite number > 0"),
        ({"max_len": 0}, r"max_len must be an int >= 1"),
    ],
)
def test_rollout_parameters_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        W.rollout(2, 3, **kw)


def test_trace_stats_empty_is_a_clear_value_error():
    with pytest.raises(ValueError, match="trace_stats needs reqs with at least one request"):
        W.trace_stats([])
    assert W.trace_stats(W.synthetic(5, seed=0))["n"] == 5.0


def test_a_request_longer_than_its_cap_is_refused(tmp_path):
    """``Request.max_new_tokens`` was documented as a cap ``output_len`` never exceeds, but nothing checked it: the
    engine ran such a request for its whole ``output_len``, past the cap, silently. Now a ValueError names both, also
    for a request read back from a JSONL workload."""
    import json

    from hf_ext.simulate import Request

    with pytest.raises(ValueError, match="output_len=50 exceeds max_new_tokens=40"):
        Request(id=3, arrival=0.0, prompt_len=8, output_len=50, max_new_tokens=40)
    assert Request(id=0, arrival=0.0, prompt_len=8, output_len=40, max_new_tokens=40).output_len == 40
    assert Request(id=1, arrival=0.0, prompt_len=8, output_len=10**6).max_new_tokens is None
    path = tmp_path / "w.jsonl"
    row = {"id": 0, "arrival": 0.0, "prompt_len": 8, "output_len": 50, "max_new_tokens": 40, "meta": {}}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="exceeds max_new_tokens"):
        W.load_jsonl(path)
