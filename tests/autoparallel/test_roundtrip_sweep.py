"""Round trips of what autoparallel saves: Plan and profile JSON."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hf_ext.accelerate.autoparallel.plan import Plan
from hf_ext.accelerate.autoparallel.profiler import HardwareProfile
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


def test_a_hardware_profile_with_numpy_values_saves_and_loads(tmp_path):
    hw = dataclasses.replace(
        HardwareProfile.h100(), memory_gb=np.float32(80.0), peak_tflops=np.float64(989.0)
    )
    path = tmp_path / "hw.json"
    hw.save(str(path))
    back = HardwareProfile.load(str(path))
    assert back == hw
    before = path.read_bytes()
    back.save(str(path))
    assert path.read_bytes() == before


def test_a_failed_profile_save_leaves_the_previous_file_and_no_temporary(tmp_path):
    path = tmp_path / "hw.json"
    HardwareProfile.h100().save(str(path))
    before = path.read_bytes()
    with pytest.raises(TypeError):
        dataclasses.replace(HardwareProfile.h100(), notes=object()).save(str(path))
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hw.json"]


def test_a_search_with_numpy_sizes_gives_a_plan_that_saves_and_loads(tmp_path):
    """SearchConfig accepted numpy integers (gpus=np.int64(2)) but kept them, and Plan (which wants Python ints)
    refused the plans the search built from them: 'Plan.gpus must be an int, got np.int64(2)'."""
    import numpy as np

    from hf_ext.accelerate.autoparallel import Plan, SearchConfig, search_plan

    cfg = SearchConfig(
        gpus=np.int64(2), global_batch=np.int64(8), seq_len=np.int64(64), tp_sizes=[np.int64(1)]
    )
    assert type(cfg.gpus) is int and type(cfg.global_batch) is int and cfg.tp_sizes == [1]
    assert type(cfg.tp_sizes[0]) is int
    plan = search_plan(
        "tiny",
        np.int64(2),
        np.float32(80.0),
        global_batch=np.int64(8),
        seq_len=np.int64(64),
        micro_batch_sizes=(np.int64(1), np.int64(2)),
    )
    assert type(plan.gpus) is int and type(plan.micro_batch) is int
    path = tmp_path / "plan.json"
    plan.save(str(path))
    assert Plan.load(str(path)) == plan
