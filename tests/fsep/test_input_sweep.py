"""Input sweep of FSEP's public API: bad arguments are refused, naming the argument, before any work."""

from __future__ import annotations

import math
import re

import pytest
import torch

from hf_ext.accelerate.fsep import LoadPlanner


@pytest.mark.parametrize(
    "args, kwargs, match",
    [
        ((8, -2, -4), {}, r"world_size=-2 must be an int >= 1"),  # -2 x -4 >= 8 passed the capacity check
        ((8, 2, 4.5), {}, r"capacity=4.5 must be an int >= 1"),
        ((8.0, 2, 4), {}, r"num_experts=8.0 must be an int >= 1"),
        ((0, 2, 4), {}, r"num_experts=0 must be an int >= 1"),  # accepted, an empty layout
        ((8, True, 8), {}, r"world_size=True must be an int >= 1"),
        ((8, 2, 8), {"history": 2.5}, r"history=2.5 must be an int >= 1"),  # deque's TypeError
        ((8, 2, 8), {"num_perturbations": 1.5}, r"num_perturbations=1.5 must be an int >= 0"),
        ((8, 2, 8), {"seed": -1}, r"seed=-1 must be an int >= 0"),  # numpy's 'expected non-negative integer'
        ((8, 2, 8), {"seed": "0"}, r"seed='0' must be an int >= 0"),
    ],
)
def test_load_planner_sizes_and_seed_must_be_ints(args, kwargs, match):
    with pytest.raises(ValueError, match=rf"LoadPlanner: {match}"):
        LoadPlanner(*args, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_norm": -1.0}, r"max_norm=-1.0"),  # a negative clip coefficient flipped every gradient's sign
        ({"max_norm": math.nan}, r"max_norm=nan"),  # NaN gradients
        ({"max_norm": "1.0"}, r"max_norm='1.0'"),
        ({"max_norm": 1.0, "norm_type": 0}, r"norm_type=0"),  # a 0-norm, then total ** (1 / 0)
        ({"max_norm": 1.0, "norm_type": -2.0}, r"norm_type=-2.0"),
        ({"max_norm": 1.0, "norm_type": "fro"}, r"norm_type='fro'"),  # float('fro') deep inside
        ({"max_norm": 1.0, "error_if_nonfinite": "yes"}, r"error_if_nonfinite='yes'"),
    ],
)
def test_clip_grad_norm_refuses_bad_arguments_before_any_collective(kwargs, match):
    from hf_ext.accelerate.fsep import fsep_clip_grad_norm_

    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    before = model.weight.grad.clone()
    with pytest.raises(ValueError, match=rf"fsep_clip_grad_norm_: {match}"):
        fsep_clip_grad_norm_(model, **kwargs)
    assert torch.equal(model.weight.grad, before)


@pytest.mark.parametrize("config", [{"mode": "static_ep"}, {}, "fsep"], ids=["dict", "empty_dict", "str"])
def test_a_config_that_is_not_an_fsepconfig_is_refused(config):
    """FSEPPlugin kept a dict as its config (prepare_model then failed later), and prepare_fsep turned an empty
    dict into the defaults ('config or FSEPConfig()') and a non-empty one into a later AttributeError."""
    from hf_ext.accelerate.fsep import FSEPPlugin, prepare_fsep
    from hf_ext.testing import tiny_moe

    with pytest.raises(ValueError, match=r"config must be an FSEPConfig or None, got"):
        FSEPPlugin(config)
    with pytest.raises(ValueError, match=r"prepare_fsep: config must be an FSEPConfig or None, got"):
        prepare_fsep(tiny_moe(), config)


class _Stop(Exception):
    pass


@pytest.fixture
def fsep_bench(monkeypatch):
    """The FSEP benchmark with its planner timing stubbed and its first prediction recorded, then stopped."""
    from hf_ext.accelerate.fsep import bench

    seen = []

    def first_prediction(model, n, *a, **k):
        seen.append(n)
        raise _Stop

    monkeypatch.setattr(bench, "planner_time_ms", lambda **k: (1.0, 1.0))
    monkeypatch.setattr(bench, "predict", first_prediction)
    return bench, seen


def test_bench_quick_keeps_the_gpu_counts_given(fsep_bench):
    """--quick replaced --gpus by [2, 8] without a word."""
    bench, seen = fsep_bench
    with pytest.raises(_Stop):
        bench.main(["--quick", "--skip-gloo", "--no-plot", "--gpus", "4"])
    with pytest.raises(_Stop):
        bench.main(["--quick", "--skip-gloo", "--no-plot"])
    assert seen == [4, 2]


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--experts", "16"], r"--experts only applies? with --torchrun"),  # silently ignored
        (["--attention", "--seq", "128"], r"--attention, --seq only apply with --torchrun"),
        (["--torchrun", "--gpus", "8"], r"--gpus only applies? without --torchrun"),  # silently ignored
        (["--gpus", "0"], r"argument --gpus: must be >= 1"),  # predicted a 0-GPU layout
        (["--alphas", "nan"], r"argument --alphas: must be finite numbers >= 0"),  # numpy error after work
        (["--alphas", "-1"], r"argument --alphas: must be finite numbers >= 0"),
    ],
)
def test_bench_refuses_flags_it_would_ignore_or_cannot_use(argv, match, fsep_bench, capsys):
    bench, seen = fsep_bench
    with pytest.raises(SystemExit) as exc:
        bench.main(["--skip-gloo", "--no-plot", *argv] if "--torchrun" not in argv else argv)
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not seen
