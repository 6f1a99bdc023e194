"""``--quick`` (smoke) benchmark runs keep out of the committed results: without ``$HF_EXT_RESULTS_DIR`` they write
under ``benchmarks/results/quick/`` (git-ignored), not beside the CSVs and figures the docs cite."""

from __future__ import annotations

import pytest

from hf_ext.utils import bench as ubench


@pytest.fixture
def checkout(tmp_path, monkeypatch):
    """A stand-in checkout root, with no $HF_EXT_RESULTS_DIR."""
    monkeypatch.setattr(ubench, "CHECKOUT_ROOT", tmp_path)
    monkeypatch.delenv("HF_EXT_RESULTS_DIR", raising=False)
    return tmp_path


def test_a_quick_main_writes_under_quick_and_the_state_ends_with_it(checkout, tmp_path, monkeypatch):
    @ubench.bench_main
    def main(quick: bool) -> object:
        ubench.mark_quick_run(quick)
        return ubench.results_dir()

    results = checkout / "benchmarks" / "results"
    assert main(True) == results / "quick"
    assert ubench.results_dir() == results  # restored when the main returned
    assert main(False) == results
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path / "mine"))
    assert main(True) == tmp_path / "mine"  # a folder the user names is used as it is

    @ubench.bench_main
    def failing() -> int:
        ubench.mark_quick_run(True)
        raise RuntimeError("boom")

    monkeypatch.delenv("HF_EXT_RESULTS_DIR")
    with pytest.raises(RuntimeError):
        failing()
    assert ubench.results_dir() == results


def test_dataflex_bench_quick_leaves_the_committed_csv_and_figure_alone(checkout, monkeypatch):
    """`hf-ext bench dataflex --quick` appended its rows to benchmarks/results/dataflex.csv and redrew
    dataflex.png, the files the docs cite (found by the docs audit)."""
    from hf_ext.callbacks.dataflex import bench

    monkeypatch.setattr(bench, "_run", lambda cfg, **kw: (None, 2.0, 0.5))  # stand-in timed runs
    monkeypatch.setattr("hf_ext.callbacks.dataflex.synthetic.train_steps", lambda model, *a, **k: model)
    assert (
        bench.main(["--quick", "--methods", "dynamic", "--seeds", "1", "--steps", "2", "--skip-quality"]) == 0
    )
    results = checkout / "benchmarks" / "results"
    assert (results / "quick" / "dataflex.csv").exists() and (results / "quick" / "dataflex.png").exists()
    assert sorted(p.name for p in results.iterdir()) == ["quick"]
