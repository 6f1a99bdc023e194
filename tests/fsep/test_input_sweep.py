"""Input sweep of FSEP's public planner API: bad arguments are refused, naming the argument, at construction."""

from __future__ import annotations

import pytest

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
