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


def test_bench_rows_name_the_cpu_for_a_cpu_run_on_a_gpu_machine(tmp_path, monkeypatch):
    """A CPU run is labelled cpu-<machine> even where CUDA is available (it was labelled with the GPU's name)."""
    import csv
    import platform

    import torch

    from hf_ext.callbacks.dataflex import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    # as on the device machine: a GPU is there, the runs use the CPU (timed runs replaced by a stand-in)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(bench, "_run", lambda cfg, **kw: (None, 2.0, 0.5))
    monkeypatch.setattr("hf_ext.callbacks.dataflex.synthetic.train_steps", lambda model, *a, **k: model)
    args = ["--quick", "--methods", "dynamic", "--seeds", "1", "--steps", "2", "--skip-quality"]
    assert bench.main(args) == 0
    rows = list(csv.DictReader((tmp_path / "dataflex.csv").open()))
    assert rows and {r["device"] for r in rows} == {f"cpu-{platform.machine()}"}
