"""The LatentOmni benchmark on CPU: both runs timed interleaved, rows written with the cache check."""

from __future__ import annotations

import csv

import pytest


def test_cpu_bench_writes_a_row(tmp_path, monkeypatch, capsys):
    from hf_ext.models.latent_omni import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    calls = []
    real = bench.run_case

    def spy(*args, **kwargs):
        calls.append(args[-1])  # rep: the timed rounds
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "run_case", spy)
    assert bench.main(["--mode", "cpu", "--prompt-len", "16", "--steps", "4", "--rep", "2"]) == 0
    assert calls == [2]
    rows = list(csv.DictReader((tmp_path / "latent_omni.csv").open()))
    assert len(rows) == 1 and rows[0]["baseline"] == "text_cot" and float(rows[0]["ours"]) > 0
    assert float(rows[0]["quality_value"]) < 1e-3  # KV-cache latent decoding matches recompute
    with pytest.raises(SystemExit, match="rep"):
        bench.main(["--mode", "cpu", "--rep", "0", "--no-write"])
