"""``python -m hf_ext bench autoparallel --quick`` on 1 and 2 gloo processes (the N-GPU path on CPU)."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest

from hf_ext.accelerate.autoparallel.profiler import ModelProfile


def bench_quick(rank: int, world_size: int, results_dir: str) -> int:
    """Run in each child process: the quick benchmark with results under ``results_dir``."""
    os.environ["HF_EXT_RESULTS_DIR"] = results_dir
    from hf_ext.accelerate.autoparallel import bench

    return bench.main(["--quick"])


@pytest.mark.parametrize("world", [1, 2])
def test_bench_quick_ranks(tmp_path, world):
    from hf_ext.testing import run_distributed

    assert run_distributed(bench_quick, world, str(tmp_path)) == [0] * world
    with (tmp_path / "autoparallel.csv").open() as f:
        all_rows = list(csv.DictReader(f))  # written by rank 0 only: one set of rows
    rows = [r for r in all_rows if not r["case"].endswith("[predicted]")]
    assert rows and all(r["case"].endswith(f"-{world}gpu") for r in rows)
    # cost-model rows for --predict-gpus (default 2) only where it differs from the world size
    predicted = [r for r in all_rows if r["case"].endswith("-2gpu [predicted]")]
    assert len(predicted) == (3 if world == 1 else 0)
    step = {r["baseline"]: r for r in rows if r["metric"] == "step_time"}
    assert sorted(step) == ["hand_ddp", "hand_fsdp", "hand_fsdp_ckpt"]
    assert all(float(r["ours"]) > 0 and float(r["baseline_value"]) > 0 for r in step.values())
    err = {r["baseline"]: float(r["ratio"]) for r in rows if r["metric"] == "prediction_error"}
    assert sorted(err) == ["hand_ddp", "hand_fsdp", "hand_fsdp_ckpt", "searched_plan"]
    assert all(math.isfinite(v) and v > 0 for v in err.values())
    # the profile and each prediction's terms are saved beside the CSV
    (prof_path,) = tmp_path.glob("autoparallel_profile_*.json")
    prof = ModelProfile.load(str(prof_path))
    assert prof.runtime_micro_batches == [1, 2]
    # the harness's world (not the bench's own private one-rank group) runs the runtime probes at world 1 only
    assert set(prof.runtime) == ({"ddp", "fsdp"} if world == 1 else set()), prof.probe_notes
    (bd_path,) = tmp_path.glob(f"autoparallel_breakdown_*-{world}gpu.json")
    bd = json.loads(bd_path.read_text())["configs"]
    assert sorted(bd) == ["hand_ddp", "hand_fsdp", "hand_fsdp_ckpt", "searched"]
    for c in bd.values():
        terms = c["breakdown_ms"]
        assert terms["total"] == pytest.approx(c["predicted_ms"])
        assert sum(v for k, v in terms.items() if k != "total") == pytest.approx(terms["total"])
    assert bd["hand_fsdp_ckpt"]["breakdown_ms"]["recompute"] >= 0  # a CPU timing may clamp it to 0


def test_unsupported_plans_are_named():
    """The bench falls back from plans apply_plan refuses (pipeline + ddp, ddp + tp with dp > 1)."""
    from hf_ext.accelerate.autoparallel.apply import unsupported_reason
    from hf_ext.accelerate.autoparallel.plan import Plan

    kw = dict(gpus=4, dp_type="ddp", global_batch=4, seq_len=8)
    assert "pipeline" in unsupported_reason(Plan.uniform("tiny", pp=2, **kw))
    assert "tensor" in unsupported_reason(Plan.uniform("tiny", tp=2, **kw))
    assert (
        unsupported_reason(Plan.uniform("tiny", gpus=2, dp_type="ddp", pp=2, global_batch=4, seq_len=8)) == ""
    )
    assert unsupported_reason(Plan.uniform("tiny", tp=2, **{**kw, "dp_type": "fsdp"})) == ""


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--quick", "--predict-gpus", "8"], r"--global-batch 4 must be divisible by --predict-gpus 8 x"),
        (["--quick", "--predict-gpus", "3"], r"--predict-gpus 3 x --hand-micro-batch 1 = 3"),
        (["--hand-micro-batch", "0"], r"--hand-micro-batch must be at least 1"),
    ],
)
def test_bench_refuses_batches_the_hand_configs_cannot_split_before_profiling(
    tmp_path, monkeypatch, argv, match
):
    """`hf-ext bench autoparallel --quick --predict-gpus 8` profiled, measured every configuration and only then
    failed with `ValueError: global_batch=4 must be divisible by dp*micro_batch=8` (a docs audit found it); the
    sizes are now checked first, naming the flags, and nothing is written."""
    from hf_ext.accelerate.autoparallel import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit, match=match):
        bench.main(argv)
    assert not list(tmp_path.iterdir())
