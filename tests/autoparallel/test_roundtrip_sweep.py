"""Round trips of what autoparallel saves: Plan JSON."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.search import search_plan


@pytest.mark.parametrize("memory_gb", [np.float32(80.0), np.float64(80.0)], ids=["float32", "float64"])
def test_a_plan_searched_with_a_numpy_memory_size_saves_and_loads(tmp_path, memory_gb):
    plan = search_plan("llama3-8b", 8, memory_gb)
    path = tmp_path / "plän.json"
    plan.save(str(path))
    back = Plan.load(str(path))
    assert back == plan
    assert back.to_json() == plan.to_json()
    before = path.read_bytes()
    back.save(str(path))
    assert path.read_bytes() == before


def test_a_failed_plan_save_leaves_the_previous_file(tmp_path):
    plan = search_plan("llama3-8b", 8, 80.0)
    path = tmp_path / "plan.json"
    plan.save(str(path))
    before = path.read_bytes()
    plan.predicted["note"] = object()
    with pytest.raises(TypeError):
        plan.save(str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
