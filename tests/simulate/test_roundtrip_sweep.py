"""Round trips of what the simulator saves: workload JSONL."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.simulate.types import Request
from hf_ext.simulate.workload import load_jsonl, save_jsonl


def _numpy_requests() -> list[Request]:
    # a workload built from numpy arrays (what rng draws give): the simulator runs it as is
    ids, lens = np.arange(3), np.array([4, 5, 6])
    return [
        Request(
            id=ids[i],
            arrival=np.float32(0.5 * i),
            prompt_len=lens[i],
            output_len=lens[i] - 1,
            prompt="ünïcode",
            max_new_tokens=np.int64(8),
            meta={"pred_len": np.float32(3.5), "prefix_segments": [(np.int64(1), 2)]},
        )
        for i in range(3)
    ]


def test_a_workload_of_numpy_values_saves_and_loads(tmp_path):
    reqs = _numpy_requests()
    path = tmp_path / "wörk load.jsonl"
    save_jsonl(reqs, path)
    back = load_jsonl(path)
    assert [(r.id, r.arrival, r.prompt_len, r.output_len, r.prompt, r.max_new_tokens) for r in back] == [
        (int(r.id), float(r.arrival), int(r.prompt_len), int(r.output_len), r.prompt, 8) for r in reqs
    ]
    assert back[1].meta == {"pred_len": 3.5, "prefix_segments": [(1, 2)]}
    before = path.read_bytes()
    save_jsonl(back, path)
    assert path.read_bytes() == before


def test_a_failed_save_leaves_no_partial_workload(tmp_path):
    path = tmp_path / "w.jsonl"
    good = [Request(id=0, arrival=0.0, prompt_len=4, output_len=3)]
    save_jsonl(good, path)
    before = path.read_bytes()
    bad = [
        Request(id=7, arrival=0.0, prompt_len=9, output_len=2),
        Request(id=8, arrival=0.1, prompt_len=4, output_len=3, meta={"x": object()}),
    ]
    with pytest.raises(TypeError):
        save_jsonl(bad, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.jsonl"]
