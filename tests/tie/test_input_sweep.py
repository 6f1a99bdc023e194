"""Input sweep of TIE's public entry points: bad input is refused, naming the parameter, before any work."""

from __future__ import annotations

import pytest

from hf_ext.generation.tie import cb
from hf_ext.generation.tie.cb import enable_tie_scheduler, tie_generate_batch
from hf_ext.generation.tie.offline import policy_order, tie_batched_generate
from hf_ext.generation.tie.scheduler import TIEScheduler, order_batch
from hf_ext.simulate import Request
from hf_ext.testing import tiny_tokenizer


class _Untouchable:
    """A model no refused call may use."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the bad config was refused")


@pytest.mark.parametrize("bad", [{"alpha": 0.8}, {}, "tie"], ids=["dict", "empty_dict", "str"])
def test_a_config_that_is_not_a_tieconfig_is_refused_before_any_work(bad):
    """A dict such as {"alpha": 0.8} was kept as the process-wide config by enable_tie_scheduler (the CB engine
    then failed with AttributeError mid-serving), an empty dict was silently replaced by the defaults, and
    TIEScheduler / order_batch / policy_order accepted it or failed with AttributeError."""
    saved = cb.CONTEXT.config
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        enable_tie_scheduler(config=bad)
    assert cb.CONTEXT.config is saved
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        TIEScheduler(config=bad)
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        order_batch(["a b c", "d"], config=bad, prompt_tokens=[3, 1])
    req = Request(id=0, arrival=0.0, prompt_len=5, output_len=5, meta={"pred_mu": 1.0, "pred_sigma": 1.0})
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        policy_order("tie", [req], config=bad)
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        tie_generate_batch(_Untouchable(), ["a b", "c"], tok, config=bad)
    with pytest.raises(ValueError, match=r"config must be a TIEConfig"):
        tie_batched_generate(_Untouchable(), tok, ["a b", "c"], batch_size=2, config=bad)


def test_a_replay_tie_config_that_is_not_a_tieconfig_is_refused():
    """validate_replay (run_cb_replay's check before any work) read tie_config.use_request_cap: AttributeError."""
    from hf_ext.generation.tie.replay import ReplayRequest, validate_replay

    req = ReplayRequest(request_id="r0", prompt_ids=[1, 2], output_len=3, arrival=0.0)
    with pytest.raises(ValueError, match=r"tie_config must be a TIEConfig"):
        validate_replay([req], "tie", tie_config={"use_request_cap": False})


@pytest.mark.parametrize("seed", [-1, 2.5, True, None, "3"])
def test_predictor_config_seed_must_be_a_non_negative_int(seed):
    """PredictorConfig checked every field but seed: "3" / 2.5 / True were turned into 3 / 2 / 1 by
    torch.manual_seed, None failed in LengthPredictor() with a TypeError, -1 in fit() with numpy's 'expected
    non-negative integer'."""
    from hf_ext.generation.tie.config import PredictorConfig

    with pytest.raises(ValueError, match=r"seed must be an int >= 0"):
        PredictorConfig(seed=seed)


def test_tie_log_refuses_a_negative_seed_before_reading_the_log(tmp_path, capsys):
    """hf-ext tie-log LOG --fit DIR --seed -1 printed the summary, then crashed in the train / held-out split with
    numpy's 'ValueError: expected non-negative integer' (no flag named)."""
    from hf_ext.generation.tie.lengthlog import main

    out = tmp_path / "predictor"
    with pytest.raises(SystemExit) as exc:
        main([str(tmp_path / "log.jsonl"), "--fit", str(out), "--seed", "-1"])
    assert exc.value.code == 2
    assert "--seed must be >= 0" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"isolate": "no"},
            r"isolate must be True or False, got 'no'",
        ),  # truthy: trained in a worker process
        (
            {"isolate": None},
            r"isolate must be True or False, got None",
        ),  # falsy: trained in the serving process
        (
            {"warm_start": "no"},
            r"warm_start must be None, True or False, got 'no'",
        ),  # told 'warm_start=True needs'
        ({"warm_start": 0}, r"warm_start must be None, True or False, got 0"),
    ],
)
def test_refresher_flags_must_be_booleans(tmp_path, kwargs, match):
    from hf_ext.generation.tie.lengthlog import LengthLog
    from hf_ext.generation.tie.refresh import PredictorRefresher

    with pytest.raises(ValueError, match=match):
        PredictorRefresher(LengthLog(tmp_path / "log.jsonl"), **kwargs)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: _data().generate_workload(3, seed=-1),
            r"seed must be an int >= 0, got -1",
        ),  # numpy's message
        (
            lambda: _data().generate_workload(3, seed=None),
            r"seed must be an int >= 0, got None",
        ),  # a random run
        (
            lambda: _data().generate_workload(3, task_weights=(float("nan"),) + (0.1,) * 10),
            r"task_weights must be 11 finite non-negative weights",  # numpy's 'Probabilities contain NaN'
        ),
        (
            lambda: _data().match_to_lengths([3], _data().generate_workload(4), chunk=0),
            r"chunk must be an int >= 1",
        ),
        (
            lambda: _data().match_to_lengths([3], _data().generate_workload(4), seed=-1),
            r"seed must be an int >= 0",
        ),
    ],
    ids=["seed_neg", "seed_none", "weights_nan", "chunk_zero", "match_seed_neg"],
)
def test_workload_generators_name_their_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _data():
    from hf_ext.generation.tie import data

    return data


class _Stop(Exception):
    pass


def _tie_bench_args(monkeypatch, argv):
    """The arguments bench tie's main runs with (stopped before any work)."""
    from hf_ext.generation.tie import bench

    seen = {}

    def capture(name):
        raise _Stop

    real_parser = bench._parser

    def spy_parser():
        p = real_parser()
        parse = p.parse_args

        def parse_args(a=None, ns=None):
            args = parse(a, ns)
            seen["args"] = args
            return args

        p.parse_args = parse_args
        return p

    monkeypatch.setattr(bench, "_parser", spy_parser)
    monkeypatch.setattr(bench, "load_cost_model", capture)
    with pytest.raises(_Stop):
        bench.main(argv)
    return vars(seen["args"])


def test_tie_bench_quick_keeps_the_flags_given(monkeypatch):
    """--quick overwrote --n-train, --epochs, --minutes and --offline-n even when given, so --quick --epochs 0
    also passed the checks and ran."""
    got = _tie_bench_args(monkeypatch, ["--quick", "--epochs", "1", "--minutes", "2", "--n-train", "100"])
    assert (got["epochs"], got["minutes"], got["n_train"], got["offline_n"]) == (1, 2.0, 100, 600)
    got = _tie_bench_args(monkeypatch, ["--quick"])
    assert (got["n_train"], got["epochs"], got["minutes"], got["offline_n"]) == (1500, 3, 5.0, 600)
    got = _tie_bench_args(monkeypatch, [])
    assert (got["n_train"], got["epochs"], got["minutes"], got["offline_n"]) == (40000, 4, 20.0, 2000)


@pytest.mark.parametrize(
    "argv, match",
    [
        (
            ["--quick", "--epochs", "0"],
            r"--epochs must be >= 1",
        ),  # --quick reset the value given to 3: it ran
        (["--quick", "--n-train", "0"], r"--n-train must be >= 1"),
        (["--quick", "--minutes", "0"], r"--minutes must be > 0"),
        (["--loads", "0"], r"--loads must be comma-separated finite numbers > 0"),  # a division by zero load
        (
            ["--loads", "2,x"],
            r"--loads must be comma-separated finite numbers > 0",
        ),  # ValueError after training
        (["--seed", "-1"], r"--seed must be >= 0"),  # numpy's error after the cost model loaded
    ],
)
def test_tie_bench_refuses_bad_flags_before_any_work(argv, match, monkeypatch):
    from hf_ext.generation.tie import bench

    def no_work(name):
        raise AssertionError("the benchmark started before the bad flag was refused")

    monkeypatch.setattr(bench, "load_cost_model", no_work)
    with pytest.raises(ValueError, match=match):
        bench.main([*argv, "--no-write"])


@pytest.mark.parametrize("nodes", [0, 2.5, True, "24"])
@pytest.mark.parametrize("fn", ["expected_length", "per_token_index", "expected_inverse_length"])
def test_law_integrals_name_a_bad_node_count(fn, nodes):
    """nodes=0 / 2.5 failed in numpy ('deg must be a positive integer', 'deg must be an integer'), True ran one node."""
    from hf_ext.generation.tie import distribution

    with pytest.raises(ValueError, match=r"nodes must be an int >= 1"):
        getattr(distribution, fn)(1.0, 1.0, 3.5, 100, nodes=nodes)


def test_cvar_names_a_bad_node_count():
    from hf_ext.generation.tie.distribution import cvar_length

    with pytest.raises(ValueError, match=r"nodes must be an int >= 1"):
        cvar_length(1.0, 1.0, 3.5, 0.9, 100, nodes=0)


@pytest.mark.parametrize(
    "flags",
    [["--tie-refit-min", "100"], ["--tie-refit-window", "1000"], ["--tie-refit-dir", "predictors"]],
    ids=["min", "window", "dir"],
)
def test_serve_refuses_refit_settings_without_refit_every(flags, monkeypatch):
    """hf-ext serve MODEL --tie-refit-min / --tie-refit-window / --tie-refit-dir without --tie-refit-every served
    with no retraining at all: the settings were silently dropped."""
    from hf_ext.generation.tie import serve

    def no_serving():
        raise AssertionError("serving started before the flags were refused")

    monkeypatch.setattr(serve, "require_serving", no_serving)
    with pytest.raises(SystemExit, match=r"--tie-refit-\w+ needs? --tie-refit-every N"):
        serve.main(["some-model", "--tie-length-log", "log.jsonl", *flags])


@pytest.mark.parametrize("predictor", [None, "predictor_dir"], ids=["none", "str"])
def test_annotate_requests_names_a_missing_predictor(predictor):
    """annotate_requests(requests, None) failed with AttributeError: 'NoneType' object has no attribute 'predict'."""
    from hf_ext.generation.tie.scheduler import annotate_requests

    req = Request(id=0, arrival=0.0, prompt_len=5, output_len=5, prompt="hi there")
    with pytest.raises(ValueError, match=r"predictor must be a LengthPredictor \(an object with \.predict\)"):
        annotate_requests([req], predictor)
    assert req.meta == {}
