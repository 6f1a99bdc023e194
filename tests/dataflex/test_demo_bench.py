"""The demo passes its own check; the benchmark runs end to end (smoke, nothing written)."""

from __future__ import annotations


def test_demo_passes():
    from hf_ext.callbacks.dataflex.demo import run_demo

    res = run_demo()
    assert res.passed, res.key_figure


def test_bench_smoke(capsys):
    from hf_ext.callbacks.dataflex.bench import main

    assert main(["--quick", "--no-write", "--methods", "dynamic", "--seeds", "1", "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "DataFlex (tiny/cpu)" in out and "static" in out
