"""Input sweep of DataFlex's public config: bad method fields are refused, naming the field, before training."""

from __future__ import annotations

import math

import pytest

from hf_ext.callbacks.dataflex import DataFlexCallback, build


@pytest.mark.parametrize(
    "kind, name, field",
    [
        ("weighter", "loss", "temperature"),  # NaN weights: a NaN training loss
        ("weighter", "loss", "max_weight"),  # NaN: no comparison holds, the cap was silently dropped
        ("weighter", "adapt", "beta"),
        ("mixer", "doremi", "eta"),
        ("selector", "nice", "temperature"),
    ],
)
@pytest.mark.parametrize("value", [math.nan, math.inf, "nan"], ids=["nan", "inf", "str_nan"])
def test_method_float_fields_must_be_finite(kind, name, field, value):
    with pytest.raises(ValueError, match=rf"{kind} {name!r} field {field!r} must be a finite float"):
        build(kind, name, **{field: value})
    with pytest.raises(ValueError, match=rf"field {field!r} must be a finite float"):
        DataFlexCallback({kind: name, f"{kind}_args": {field: value}})


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--steps", "0"], "--steps"),  # 'a.steps or default': silently the default step count
        (["--steps", "-5"], "--steps"),  # handed to the Trainer as max_steps=-5
        (["--seeds", "0"], "--seeds"),  # silently 3 seeds
        (["--update-step", "0"], "--update-step"),  # failed after the reference run
    ],
)
def test_bench_refuses_non_positive_counts_before_any_training(argv, flag, capsys):
    from hf_ext.callbacks.dataflex import bench

    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--no-write", "--quick"])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= 1" in capsys.readouterr().err


def test_bench_quick_keeps_an_explicit_update_step(monkeypatch):
    """--quick replaced --update-step N by 10 without a word."""
    from hf_ext.callbacks.dataflex import bench, synthetic

    class Stop(Exception):
        pass

    seen = {}

    def fake_run(cfg, **common):
        seen["update_step"] = common["update_step"]
        raise Stop

    monkeypatch.setattr(synthetic, "train_steps", lambda *a, **k: __import__("torch").zeros(1))
    monkeypatch.setattr(bench, "_run", fake_run)
    with pytest.raises(Stop):
        bench.main(["--quick", "--no-write", "--update-step", "7"])
    assert seen["update_step"] == 7
    with pytest.raises(Stop):
        bench.main(["--quick", "--no-write"])
    assert seen["update_step"] == 10


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_samples": 2.5}, r"num_samples must be an int >= 1, got 2.5"),  # drew 2 samples
        ({"num_samples": 4, "seed": 1.5}, r"seed must be an int, got 1.5"),  # seeded with 1
        (
            {"num_samples": 4, "dataset_size": 0},
            r"dataset_size must be None or an int >= 1, got 0",
        ),  # 'or': 4
        ({"num_samples": 4, "dataset_size": -3}, r"dataset_size must be None or an int >= 1, got -3"),
        ({"num_samples": 4, "max_pending": 1.5}, r"max_pending must be an int >= 1, got 1.5"),
    ],
)
def test_sampler_checks_its_arguments(kwargs, match):
    from hf_ext.callbacks.dataflex import DataFlexSampler

    with pytest.raises(ValueError, match=match):
        DataFlexSampler(**kwargs)


@pytest.mark.parametrize("value", [None, "", 3, ["domain"]], ids=["none", "empty", "int", "list"])
def test_config_domain_column_must_be_a_column_name(value):
    """domain_column accepted anything (a YAML 'domain_column:' left empty is None); the error came only when the
    training dataset was read ('domain_column=None is not a column of the training dataset')."""
    from hf_ext.callbacks.dataflex import DataFlexConfig

    with pytest.raises(
        ValueError, match=r"domain_column must be a non-empty string \(a dataset column name\)"
    ):
        DataFlexConfig(selector="loss", domain_column=value)
