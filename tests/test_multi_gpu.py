"""Two-GPU (NCCL) runs of the distributed benchmarks, launched with torchrun as a user would.

Skipped by default (marker ``multi_gpu``); on the device machine:
``python -m pytest -m multi_gpu tests/test_multi_gpu.py``.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.multi_gpu


def _child_pythonpath() -> str:
    """The checkout and its kernels first, then whatever this process was given (the device keeps its wheels there:
    replacing it made the ranks import another transformers than the test's own)."""
    return os.pathsep.join(
        p for p in (str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")) if p
    )


def _torchrun(module: str, args: list[str], results: Path, timeout: float) -> list[dict[str, str]]:
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    env = dict(os.environ, HF_EXT_RESULTS_DIR=str(results), PYTHONPATH=_child_pythonpath())
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        module,
    ]
    proc = subprocess.run(cmd + args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (csv_path,) = results.glob("*.csv")
    with csv_path.open() as f:
        return list(csv.DictReader(f))


def _torchrun_results(module: str, outdir: Path, timeout: float) -> list[dict]:
    """Run test script ``module`` on 2 GPUs with torchrun (argument: ``outdir``); the ``@@RESULT@@`` JSON line each
    rank prints, by rank."""
    import json

    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    env = dict(os.environ, PYTHONPATH=_child_pythonpath())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run(
        cmd + ["-m", module, str(outdir)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = [json.loads(x.split("@@RESULT@@", 1)[1]) for x in proc.stdout.splitlines() if "@@RESULT@@" in x]
    assert sorted(r["rank"] for r in res) == [0, 1]
    return sorted(res, key=lambda r: r["rank"])


def test_fsep_layouts_on_two_gpus(tmp_path):
    rows = _torchrun("hf_ext.accelerate.fsep.bench", ["--torchrun", "--quick", "--no-plot"], tmp_path, 300)
    steps = [r for r in rows if r["metric"] == "step_time"]
    assert steps and all(r["case"].endswith("_nccl2") for r in steps)
    assert {r["baseline"] for r in steps} == {"static_ep", "fsdp"}
    # bf16 outputs of every layout against the dense computation
    assert all(math.isfinite(float(r["ours"])) and float(r["quality_value"]) < 0.1 for r in steps)


def test_autoparallel_searched_plan_on_two_gpus(tmp_path):
    rows = _torchrun("hf_ext.accelerate.autoparallel.bench", ["--steps", "2", "--warmup", "1"], tmp_path, 600)
    err = {r["baseline"]: float(r["ratio"]) for r in rows if r["metric"] == "prediction_error"}
    assert sorted(err) == ["hand_ddp", "hand_fsdp", "hand_fsdp_ckpt", "searched_plan"]
    assert all(r["case"].endswith("-2gpu") for r in rows if r["metric"] == "step_time")
    assert all(0.5 < v < 2.0 for v in err.values()), err


def test_fsep_accelerate_save_state_resumes_every_rank_on_two_gpus(tmp_path):
    """The save_state / load_state check of tests/fsep on the GPUs with NCCL (the experts are gathered on the GPU
    and saved from the CPU): each rank gets back its own expert rows and Adam moments."""
    res = _torchrun_results("tests.fsep._nccl_resume", tmp_path, 300)
    for r in res:
        for mode in ("fsep", "static_ep"):
            assert r[f"{mode}_inplace_diff"] == 0.0, r
            assert r[f"{mode}_fresh_diff"] < 1e-4 and r[f"{mode}_moved"] > 1e-3, r
            assert r[f"{mode}_hf_keys"] and "one rank's rows" in r[f"{mode}_per_rank_error"], r


def test_autoparallel_runtime_plans_on_two_gpus(tmp_path):
    """Every runtime plan of the gloo tests (DDP, FSDP2, checkpointing, tensor and pipeline parallel) on the GPUs
    with NCCL, fp32: one SGD step reproduces the single-process losses (also for a left-padded batch with its
    attention mask), the saved model loads with the trained weights, and a pipeline plan puts only this rank's
    stage on its GPU (the other stage stays on the CPU)."""
    from tests.autoparallel import _dist_fns

    by_rank = dict(enumerate(_torchrun_results("tests.autoparallel._nccl_plans", tmp_path, 600)))
    ref0, ref1 = _dist_fns.reference_losses()
    masked_ref = _dist_fns.masked_reference_losses()
    names = sorted(_dist_fns._plans())
    for rank, r in by_rank.items():
        for name in names:
            p = r[name]
            l0, l1 = p["losses"]
            assert l0 == pytest.approx(ref0, rel=1e-4) and l1 == pytest.approx(ref1, rel=1e-3), (name, p)
            assert p["masked"] == pytest.approx(masked_ref, rel=1e-3), (name, p)
            if name.startswith("pp"):
                assert p["own_devices"] == [f"cuda:{rank}"] and p["other_devices"] == ["cpu"], (name, p)
                assert p["gpu_param_fraction"] < 0.9, (name, p)
            else:
                assert p["own_devices"] == [f"cuda:{rank}"], (name, p)
    for name in names:
        assert by_rank[0][name]["saved"] == pytest.approx(ref1, rel=1e-3), name
