"""The FSEP benchmark's measured path (``--torchrun``) on 2 gloo processes, and its routing cases."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.accelerate.fsep import bench
from hf_ext.testing import run_distributed

SPEC = dict(
    hidden=32,
    inter=32,
    experts=8,
    top_k=2,
    tokens=256,
    layers=2,
    steps=4,
    warmup=1,
    cases=[("balanced", 0.0), ("skew_colocated", 1.5), ("skew_drift", 1.0)],
)


def test_case_probs_shapes_and_drift():
    for regime, alpha in SPEC["cases"]:
        probs = bench._case_probs(regime, alpha, 8, 5, drift=0.3)
        assert len(probs) == 5 and all(p.shape == (8,) and abs(p.sum() - 1) < 1e-9 for p in probs)
    colocated = bench._case_probs("skew_colocated", 1.5, 8, 1, 0.3)[0]
    assert np.all(np.diff(colocated) < 0)  # hottest experts first: they share rank 0 under static EP
    drift = bench._case_probs("skew_drift", 1.0, 8, 5, 0.3)
    assert not np.allclose(drift[0], drift[-1])  # the hot experts move
    assert np.allclose(
        bench._case_probs("skew", 1.0, 8, 3, 0.3)[0], bench._case_probs("skew", 1.0, 8, 3, 0.3)[2]
    )


def test_layouts_take_turns_in_every_position():
    names = ["fsep", "static_ep", "fsdp", "fsep_eager"]
    orders = [bench._mode_order(names, step) for step in range(8)]
    assert all(sorted(o) == sorted(names) for o in orders)
    for pos in range(len(names)):  # each layout first (second, ...) once in any 4 consecutive steps
        assert sorted(o[pos] for o in orders[2:6]) == sorted(names)


@pytest.fixture(scope="module")
def measured():
    return run_distributed(bench.stack_worker, 2, SPEC)


def test_stack_worker_outputs_match_dense_and_planner_balances(measured):
    res = measured[0]
    for regime, alpha in SPEC["cases"]:
        case = bench._case(regime, alpha)
        for mode in ("fsep", "static_ep", "fsdp"):
            ms, err = res[f"{case}/{mode}"]
            assert ms > 0 and err < 1e-4, (case, mode, err)
    # colocated skew: static EP's busiest rank gets most rows; the planner's layout spreads them
    c = bench._case("skew_colocated", 1.5)
    assert res[f"{c}/static_ep/max_tokens"] > 1.3 * res[f"{c}/fsep/max_tokens"]
    # balanced routing: no layout can do much better than static EP
    b = bench._case("balanced", 0.0)
    assert res[f"{b}/fsep/max_tokens"] == pytest.approx(res[f"{b}/static_ep/max_tokens"], rel=0.2)


def test_measured_rows_name_the_baselines(measured):
    rows = bench.measured_rows(measured[0], SPEC["cases"], "cpu-gloo", "tiny_gloo2", "cmd")
    assert {(r.metric, r.baseline) for r in rows} == {
        (m, b)
        for m in ("step_time", "max_rank_expert_rows", "max_rank_expert_cpu_ms")
        for b in ("static_ep", "fsdp")
    }
    assert all(r.case.endswith("_tiny_gloo2") and ("skew" in r.case or "balanced" in r.case) for r in rows)


def test_decoder_stack_with_attention_and_the_eager_schedule():
    spec = dict(
        SPEC, layers=3, steps=3, cases=[("skew_colocated", 1.5)], eager=True, attention=(4, 2, 8), seq=64
    )
    res = run_distributed(bench.stack_worker, 2, spec)[0]
    c = bench._case("skew_colocated", 1.5)
    for mode in ("fsep", "static_ep", "fsdp", "fsep_eager"):
        ms, err = res[f"{c}/{mode}"]
        assert ms > 0 and err < 1e-4, (mode, err)  # the dense reference runs the same attention blocks
    rows = bench.measured_rows(res, spec["cases"], "cpu-gloo", "tiny_attn64_gloo2", "cmd")
    assert {r.baseline for r in rows} == {"static_ep", "fsdp", "fsep_eager"}
    with pytest.raises(ValueError, match="multiple of seq"):
        bench.stack_worker(0, 1, dict(spec, seq=100))


def test_attention_block_is_causal_gqa():
    import torch

    from hf_ext.accelerate.fsep.bench_blocks import AttnBlock

    blk = AttnBlock(16, 4, 2, 8, 8, torch.Generator().manual_seed(0))
    x = torch.randn(16, 16)
    y = blk(x)
    x2 = x.clone()
    x2[7] += 1.0  # changes row 7 onward of the first sequence only
    y2 = blk(x2)
    assert torch.equal(y[:7], y2[:7]) and not torch.allclose(y[7], y2[7]) and torch.equal(y[8:], y2[8:])
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        AttnBlock(16, 4, 3, 8, 8, torch.Generator())
