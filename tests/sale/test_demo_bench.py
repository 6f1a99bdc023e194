"""Demo passes its own check; the benchmark entry runs end to end on a tiny shape and writes the schema."""

from __future__ import annotations

import csv

from hf_ext.utils.bench import COLUMNS


def test_demo_passes():
    from hf_ext.attention.sale.demo import run_demo

    res = run_demo()
    assert res.passed, res
    assert "density" in res.key_figure


def test_bench_e2e_tiny_writes_rows(tmp_path, monkeypatch):
    from hf_ext.attention.sale import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    rc = bench.main(
        [
            "--e2e",
            "--shape",
            "tiny",
            "--layers",
            "1",
            "--lengths",
            "256",
            "--warmup",
            "0",
            "--rep",
            "1",
            "--block-q",
            "32",
            "--block-k",
            "32",
        ]
    )
    assert rc == 0
    with (tmp_path / "sale.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    r = rows[0]
    assert (r["case"], r["baseline"], r["metric"]) == ("tiny_e2e_prefill_256", "sdpa", "prefill_time_ms")
    assert float(r["ratio"]) > 0 and float(r["quality_value"]) > 0.9  # cosine of last logits vs sdpa
    assert (tmp_path / "sale.png").exists()


def test_bench_kernels_delegation_reports_missing_file(tmp_path, monkeypatch, capsys):
    from hf_ext.attention.sale import bench

    monkeypatch.setattr(bench, "_KERNEL_BENCH", tmp_path / "nope.py")
    assert bench.main(["--kernels", "--quick"]) == 1
    assert "missing" in capsys.readouterr().out


def test_kernel_bench_quick_runs_on_cpu(tmp_path, monkeypatch, capsys):
    """benchmarks/sale_kernels.py end to end on CPU (torch backends, tiny shape): rows per dense baseline."""
    from hf_ext.attention.sale import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    assert bench.main(["--kernels", "--quick"]) == 0
    with (tmp_path / "sale.csv").open() as f:
        rows = list(csv.DictReader(f))
    metrics = {r["metric"] for r in rows}
    assert {"attn_time_ms", "estimate_time_ms", "kept_block_density"} <= metrics
    assert all(r["case"].startswith("quick_causal_512") for r in rows)
    assert "relL1=" in capsys.readouterr().out
