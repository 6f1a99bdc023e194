"""Input sweep of autoparallel's public config: bad values are refused, naming the field, before any search."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_ext.accelerate.autoparallel import SearchConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("gpus", 2.5),  # int() made it 2 ... and a 'tp does not divide gpus=2.5' error
        ("gpus", True),
        ("memory_gb", math.inf),  # OverflowError in the search
        ("memory_gb", "80"),
        ("global_batch", "64"),  # searched as 64, recorded as the string
        ("global_batch", 64.5),
        ("seq_len", 4096.5),  # searched with a fractional sequence length
        ("seq_len", True),
        ("micro_batch_sizes", "12"),  # TypeError in the search
        ("micro_batch_sizes", (1.5,)),
        ("micro_batch_sizes", ()),
        ("tp_sizes", (2.5,)),  # silently searched as tp=2
        ("pp_sizes", ("2",)),
        ("pp_sizes", ()),
        ("allow_ckpt", "false"),  # a truthy string: checkpointing was allowed
        ("exhaustive_partitions", "no"),  # a truthy string: the exhaustive (very slow) partition search ran
        ("top_k", math.nan),  # IndexError in the search
        ("top_k", 2.5),
        ("granularity_bytes", 0),  # falsy: silently replaced by the default bucket
        ("granularity_bytes", -5.0),  # NoFeasiblePlanError
        ("granularity_bytes", math.nan),
        ("granularity_bytes", "1e6"),
    ],
)
def test_search_config_refuses_values_of_the_wrong_type_or_range(field, value):
    with pytest.raises(ValueError, match=rf"SearchConfig\.{field} must be"):
        SearchConfig(**{"gpus": 8, field: value})


def test_search_config_still_takes_numpy_ints_and_lists():
    cfg = SearchConfig(
        gpus=np.int64(8),
        memory_gb=np.float32(40.0),
        global_batch=np.int64(64),
        seq_len=1024,
        micro_batch_sizes=[1, np.int64(2)],
        tp_sizes=[1, 2],
        granularity_bytes=1e6,
        top_k=3,
    )
    assert cfg.gpus == 8 and cfg.micro_batch_sizes == [1, 2]


class _Untouchable:
    """A model no refused call may use."""

    def __getattr__(self, name):
        raise AssertionError(f"the model was used ({name}) before the bad argument was refused")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"repeats": 0}, r"repeats=0"),  # StatisticsError after the model was moved and put in train mode
        ({"repeats": 2.5}, r"repeats=2.5"),
        ({"warmup": -1}, r"warmup=-1"),
        ({"max_layers": 0}, r"max_layers=0"),  # silently profiled 1 layer
        ({"seq_len": 16.5}, r"seq_len=16.5"),  # randint TypeError after the model was put in train mode
        ({"micro_batches": (1.5,)}, r"micro_batches=\(1.5,\)"),  # run with b=1, fitted at b=1.5
        ({"runtime_micro_batches": (2.5,)}, r"runtime_micro_batches=\(2.5,\)"),
        ({"runtime_probe": "no"}, r"runtime_probe='no'"),  # a truthy string: the probe ran
        ({"ckpt_probe": None}, r"ckpt_probe=None"),
    ],
)
def test_profile_model_refuses_bad_arguments_before_touching_the_model(kwargs, match):
    from hf_ext.accelerate.autoparallel import profile_model

    with pytest.raises(ValueError, match=match):
        profile_model(_Untouchable(), **kwargs)


@pytest.mark.parametrize("memory_gb", [-1, 0, math.nan, math.inf, "80", True])
def test_predict_refuses_a_memory_budget_that_is_not_a_positive_number(memory_gb):
    """predict(plan, memory_gb=-1 / nan) silently reported the plan infeasible; '80' raised a TypeError."""
    from hf_ext.accelerate.autoparallel import Plan, predict

    plan = Plan.uniform("tiny", gpus=2, dp_type="fsdp", global_batch=8, seq_len=64, micro_batch=1)
    with pytest.raises(ValueError, match=r"memory_gb must be None or a finite number of GiB > 0"):
        predict(plan, memory_gb=memory_gb)
    assert predict(plan, memory_gb=80).feasible


class _Stop(Exception):
    pass


def _bench_args(monkeypatch, argv):
    """The arguments bench autoparallel's main runs with (stopped before any model is built)."""
    from hf_ext.accelerate.autoparallel import bench

    seen = {}

    def capture(args):
        seen.update(vars(args))
        raise _Stop

    monkeypatch.setattr(bench, "_model_config", capture)
    with pytest.raises(_Stop):
        bench.main(argv)
    return seen


def test_bench_quick_keeps_the_flags_given(monkeypatch):
    """--quick overwrote --seq-len, --global-batch, --steps, --warmup, --hand-micro-batch (and capped
    --runtime-micro-batch at 2) without a word; now it only sets the ones not given."""
    got = _bench_args(
        monkeypatch,
        [
            "--quick",
            "--steps",
            "3",
            "--warmup",
            "0",
            "--seq-len",
            "32",
            "--global-batch",
            "8",
            "--runtime-micro-batch",
            "4",
        ],
    )
    assert (got["steps"], got["warmup"], got["seq_len"], got["global_batch"], got["runtime_micro_batch"]) == (
        3,
        0,
        32,
        8,
        4,
    )
    got = _bench_args(monkeypatch, ["--quick"])
    assert (got["seq_len"], got["global_batch"], got["steps"], got["warmup"], got["hand_micro_batch"]) == (
        64,
        4,
        2,
        1,
        1,
    )
    assert got["runtime_micro_batch"] == 2
    got = _bench_args(monkeypatch, [])
    assert (got["seq_len"], got["global_batch"], got["steps"], got["warmup"], got["hand_micro_batch"]) == (
        2048,
        8,
        4,
        2,
        2,
    )
    assert got["runtime_micro_batch"] == 4


@pytest.mark.parametrize(
    "argv, flag, low",
    [
        (["--steps", "0"], "--steps", 1),  # statistics' 'no median for empty data' after profiling
        (["--warmup", "-1"], "--warmup", 0),
        (["--seq-len", "0"], "--seq-len", 1),
        (["--global-batch", "0"], "--global-batch", 1),
        (["--predict-gpus", "0"], "--predict-gpus", 1),
        (["--runtime-micro-batch", "0"], "--runtime-micro-batch", 1),
    ],
)
def test_bench_refuses_out_of_range_counts_before_any_work(argv, flag, low, monkeypatch, capsys):
    from hf_ext.accelerate.autoparallel import bench

    def no_model(args):
        raise AssertionError("the benchmark started before the bad flag was refused")

    monkeypatch.setattr(bench, "_model_config", no_model)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick", *argv])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= {low}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"global_batch": 8.5}, r"TrainingSpec\.global_batch must be an int >= 1, got 8.5"),
        ({"seq_len": math.nan}, r"TrainingSpec\.seq_len must be an int >= 1, got nan"),  # `nan < 1` is False
        (
            {"state_bytes_per_param": -16.0},
            r"TrainingSpec\.state_bytes_per_param must be a finite number >= 0",
        ),
        ({"logit_bytes": math.nan}, r"TrainingSpec\.logit_bytes must be a finite number >= 0"),
        ({"act_bytes_per_elem": "2"}, r"TrainingSpec\.act_bytes_per_elem must be a finite number >= 0"),
    ],
)
def test_training_spec_refuses_values_of_the_wrong_type_or_range(kwargs, match):
    from hf_ext.accelerate.autoparallel import TrainingSpec

    with pytest.raises(ValueError, match=match):
        TrainingSpec(**{"global_batch": 8, "seq_len": 128, **kwargs})


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (
            "LayerStrategy",
            {"ckpt": "no"},
            r"LayerStrategy\.ckpt must be True or False",
        ),  # truthy: checkpointed
        ("LayerStrategy", {"zero": False}, r"LayerStrategy\.zero must be one of 0, 2, 3"),  # False == 0
        ("ParallelConfig", {"sp": "no"}, r"ParallelConfig\.sp must be True or False"),
        ("ParallelConfig", {"micro_batch": 1.5}, r"ParallelConfig\.micro_batch must be an int >= 1"),
        ("ParallelConfig", {"tp": True}, r"ParallelConfig\.tp must be an int >= 1"),
    ],
)
def test_plan_dataclasses_refuse_values_of_the_wrong_type(cls, kwargs, match):
    from hf_ext.accelerate import autoparallel

    base = {}
    if cls == "ParallelConfig":
        base = dict(gpus=2, pp=1, tp=1, sp=False, micro_batch=1, num_micro_batches=1, dp_type="fsdp")
    with pytest.raises(ValueError, match=match):
        getattr(autoparallel, cls)(**{**base, **kwargs})


def test_profile_model_puts_the_training_mode_back_when_a_probe_raises(monkeypatch):
    """profile_model switches the model to train mode; a probe that raised left it there."""
    from hf_ext.accelerate.autoparallel import profiler
    from hf_ext.testing import tiny_llama

    model = tiny_llama().eval()

    def boom(*args, **kwargs):
        raise RuntimeError("probe failed")

    monkeypatch.setattr(profiler, "_time_embedding", boom)
    with pytest.raises(RuntimeError, match="probe failed"):
        profiler.profile_model(model, seq_len=16, micro_batches=(1,), repeats=1, runtime_probe=False)
    assert not any(m.training for m in model.modules())
