"""The TIE benchmark end to end in its quick mode (slow: trains three small predictors)."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_bench_quick_runs_every_section(tmp_path, capsys, monkeypatch):
    from hf_ext.generation.tie.bench import OFFLINE_BUDGETS, main

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    export = tmp_path / "replay.json"
    rc = main(
        ["--quick", "--loads", "4", "--cache-dir", str(tmp_path / "cache"), "--export-replay", str(export)]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "azure2023conv_5min_x4" in out and "real CB tiny Llama" in out
    assert out.count("budget ") >= len(OFFLINE_BUDGETS)
    csv = (tmp_path / "tie.csv").read_text()
    for needle in ("offline_throughput_tokens", "_budget0.25", "real_cb_tiny_llama_cpu_burst16", "ttft"):
        assert needle in csv
    assert (tmp_path / "tie_policies.png").stat().st_size > 0 and export.stat().st_size > 0
