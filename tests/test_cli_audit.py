"""The user-facing surface found wanting by an audit: `hf-ext demo/bench/plan`, the bench harness's tables,
results folder and plots, install hints, `from hf_ext import *`, and examples/simulate_serving.py.
Fast: every benchmark and demo is stubbed."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --- section: cli
def _stub_components(monkeypatch, benches=None, demos=None):
    """Replace every demo/benchmark the CLI resolves: ``benches``/``demos`` map a component name to a function;
    the others pass. Returns the list of (component, argv) the benchmarks got."""
    from hf_ext import cli, registry

    calls: list[tuple[str, list[str]]] = []
    by_target = {}
    for c in registry.COMPONENTS:
        if c.bench:
            by_target[c.bench] = (c.name, "bench")
        if c.demo:
            by_target[c.demo] = (c.name, "demo")

    def fake_resolve(target):
        name, kind = by_target[target]
        if kind == "demo":
            fn = (demos or {}).get(name)
            return fn or (lambda: SimpleNamespace(what=f"{name} demo", key_figure="1.0x", passed=True))

        def bench(argv):
            calls.append((name, list(argv)))
            fn = (benches or {}).get(name)
            return fn(argv) if fn else 0

        return bench

    monkeypatch.setattr(cli, "_resolve", fake_resolve)
    return calls


def _sale_needs_a_mode(argv):
    # what the real sale bench does without --kernels / --e2e: an argparse error
    if "--e2e" not in argv and "--kernels" not in argv:
        raise SystemExit(2)
    return 0


def test_bench_all_runs_every_benchmark_and_summarises(monkeypatch, capsys):
    from hf_ext import registry
    from hf_ext.cli import main

    def boom(argv):
        raise KeyError("bogus")

    calls = _stub_components(monkeypatch, benches={"sale": _sale_needs_a_mode, "dataflex": boom})
    assert main(["bench", "all"]) == 1  # dataflex failed, and that is no success
    built = [c.name for c in registry.COMPONENTS if c.status == "built" and c.bench]
    assert [n for n, _ in calls] == built  # none stopped the loop
    assert dict(calls)["sale"] == ["--e2e"]  # sale's CPU-capable mode under `all`
    out = capsys.readouterr()
    summary = out.out[out.out.index("hf-ext bench all") :]
    for name in built:
        assert name in summary
    assert "FAIL" in summary and "KeyError" in summary and "pass" in summary
    assert "skipped" in summary  # planned components
    assert "KeyError: 'bogus'" in out.err  # the traceback is shown


def test_bench_all_passes_when_every_benchmark_passes(monkeypatch, tmp_path, capsys):
    from hf_ext.attention.sale import bench as sale_bench
    from hf_ext.cli import main

    calls = _stub_components(monkeypatch, benches={"sale": _sale_needs_a_mode})
    assert main(["bench", "all"]) == 0
    calls.clear()
    kernels = tmp_path / "sale_kernels.py"
    kernels.write_text("")
    monkeypatch.setattr(sale_bench, "_KERNEL_BENCH", kernels)
    assert main(["bench", "all", "--kernels"]) == 0
    assert ("sale", ["--kernels"]) in calls  # a mode the user gives to sale is kept


def test_bench_error_inside_a_benchmark_is_not_reported_as_a_bad_name(monkeypatch):
    from hf_ext.cli import main

    def boom(argv):
        raise KeyError("bogus")

    _stub_components(monkeypatch, benches={"dataflex": boom})
    with pytest.raises(KeyError, match="bogus"):  # its own traceback, not "hf-ext: bogus"
        main(["bench", "dataflex"])


def test_unknown_component_names_fail_early_with_the_choices(monkeypatch, capsys):
    from hf_ext.cli import main

    calls = _stub_components(monkeypatch)
    assert main(["bench", "nope"]) == 2
    assert main(["demo", "simulate", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown component 'nope'" in err and "choose from: all, simulate" in err
    assert calls == []


def test_built_component_that_fails_to_import_is_a_failure_not_not_built(monkeypatch, capsys):
    from hf_ext.cli import main

    monkeypatch.setitem(sys.modules, "hf_ext.simulate.demo", None)  # as when a dependency is missing
    monkeypatch.setitem(sys.modules, "hf_ext.simulate.bench", None)
    assert main(["demo", "simulate"]) == 1
    out = capsys.readouterr()
    assert "FAIL" in out.out and "not built" not in out.out
    assert "ModuleNotFoundError" in out.err
    with pytest.raises(ImportError):
        main(["bench", "simulate"])


def test_demo_all_and_planned_components(monkeypatch, capsys):
    from hf_ext import registry
    from hf_ext.cli import main, run_demos

    _stub_components(monkeypatch)
    assert main(["demo", "all"]) == 0
    recs = {r["component"]: r["status"] for r in run_demos(["all"])}
    assert recs == {c.name: "pass" if c.status == "built" else "not built" for c in registry.COMPONENTS}
    capsys.readouterr()
    assert main(["demo", "adaspa"]) == 1  # nothing ran
    assert "adaspa: planned, not built yet" in capsys.readouterr().err
    assert main(["bench", "adaspa"]) == 1
    assert main(["demo", "all", "sale"]) == 2


def test_bench_without_component_names_only_what_is_required(capsys):
    from hf_ext.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["bench"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "required: component" in err and "bench_args" not in err.splitlines()[-1]


def test_sale_kernels_outside_a_checkout_says_so(monkeypatch, tmp_path, capsys):
    from hf_ext.attention.sale import bench as sale_bench
    from hf_ext.cli import main

    monkeypatch.setattr(sale_bench, "_KERNEL_BENCH", tmp_path / "benchmarks" / "sale_kernels.py")
    calls = _stub_components(monkeypatch)
    assert main(["bench", "sale", "--kernels"]) == 1
    assert "needs a source checkout" in capsys.readouterr().err
    assert calls == []


# --- section: plan
def test_plan_top_k_below_one_is_an_argparse_error(capsys):
    from hf_ext.accelerate.autoparallel import cli as planner
    from hf_ext.cli import main

    for entry in (
        lambda a: main(["plan", *a]),
        planner.main,
    ):  # hf-ext plan, and the planner module run directly
        with pytest.raises(SystemExit) as exc:
            entry(["--model", "llama3-8b", "--gpus", "8", "--top-k", "0"])
        assert exc.value.code == 2
        assert "--top-k: must be >= 1" in capsys.readouterr().err


# --- section: tables
def test_tables_fold_instead_of_truncating(monkeypatch, capsys):
    from hf_ext.utils.bench import Row, print_rows

    monkeypatch.setenv("COLUMNS", "80")
    kw = dict(device="cpu", versions="v", commit="c", command="x", date="d")
    rows = [
        Row.make(
            "tie", "azure_replay_x2_seed0", m, 1.0, "ssjf_point_predictor", 1.2, quality_name="nll", **kw
        )
        for m in ("per_token_latency_mean", "per_token_latency_p99")
    ]
    print_rows(rows)
    out = capsys.readouterr().out
    assert "…" not in out and "p99" in out and "mean" in out


def test_cli_tables_fold_instead_of_truncating(monkeypatch, capsys):
    from hf_ext.cli import main

    monkeypatch.setenv("COLUMNS", "60")
    long = "a_really_long_key_figure_that_does_not_fit_in_sixty_columns_END"
    _stub_components(
        monkeypatch, demos={"sale": lambda: SimpleNamespace(what="x", key_figure=long, passed=True)}
    )
    assert main(["demo", "sale"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "END" in out


# --- section: dataflex
def test_dataflex_bench_checks_methods_before_training(monkeypatch, capsys):
    import hf_ext.callbacks.dataflex.synthetic as synthetic
    from hf_ext.callbacks.dataflex.bench import main

    def no_training(*a, **k):
        raise AssertionError("trained before checking --methods")

    monkeypatch.setattr(synthetic, "train_steps", no_training)
    for argv in (["--methods", "bogus"], ["--methods"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "--methods" in err and "choose from: random, loss" in err


# --- section: results
def test_results_dir_outside_a_checkout_is_under_the_cwd(monkeypatch, tmp_path):
    from hf_ext.utils import bench

    site = tmp_path / "site-packages"
    site.mkdir()
    assert bench.checkout_root(site) is None
    assert bench.checkout_root(bench.REPO_ROOT) == bench.REPO_ROOT  # this checkout
    (site / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    assert bench.checkout_root(site) is None
    (site / "pyproject.toml").write_text('[project]\nname = "hf-ext"\n')
    assert bench.checkout_root(site) == site

    monkeypatch.setattr(bench, "CHECKOUT_ROOT", None)
    monkeypatch.delenv("HF_EXT_RESULTS_DIR", raising=False)
    monkeypatch.delenv("HF_EXT_COMMIT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert bench.results_dir() == tmp_path / "benchmarks" / "results"
    assert bench.git_commit() == "unknown"
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path / "elsewhere"))
    assert bench.results_dir() == tmp_path / "elsewhere"


# --- section: imports
def test_triton_install_hint_names_no_missing_extra(monkeypatch):
    import tomllib

    from hf_ext.utils.imports import require

    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError) as exc:
        require("triton", "the SALE kernels")
    assert "pip install triton" in str(exc.value) and "[gpu]" not in str(exc.value)
    extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    from hf_ext.utils.imports import _EXTRAS

    assert set(_EXTRAS.values()) <= extras


# --- section: all
def test_star_import_exports_the_lazy_names_and_import_stays_light():
    import hf_ext

    assert set(hf_ext.__all__) == {"__version__", *hf_ext._LAZY}
    code = (
        "import sys, hf_ext; print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stdout + res.stderr
    ns: dict = {}
    exec("from hf_ext import *", ns)
    assert {"SALEConfig", "TIEConfig", "DataFlexConfig", "registry"} <= set(ns)


# --- section: example
def _example():
    spec = importlib.util.spec_from_file_location(
        "simulate_serving_example", ROOT / "examples" / "simulate_serving.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_simulate_serving_example_workflows_with_ssjf(tmp_path, capsys):
    ex = _example()
    argv = ["--workload", "workflows", "--capacity", "40000", "--cpu-capacity", "200000", "--n", "6"]
    ex.main([*argv, "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ssjf: mean workflow latency" in out
    assert (tmp_path / "workflows_ssjf.csv").exists()


@pytest.mark.parametrize(
    "argv,msg",
    [
        (["--workload", "rollout", "--time-scale", "2"], "--time-scale applies only to --workload trace"),
        (["--workload", "workflows", "--stop-after", "3"], "--stop-after applies only to --workload rollout"),
        (["--workload", "trace", "--rate", "1"], "--rate applies only to --workload synthetic"),
        (["--n", "0"], "--n must be >= 1"),
        (["--policies", ","], "--policies"),
    ],
)
def test_simulate_serving_example_rejects_flags_it_would_ignore(argv, msg, tmp_path, capsys):
    ex = _example()
    with pytest.raises(SystemExit) as exc:
        ex.main([*argv, "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert msg in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


def test_simulate_serving_example_n_is_not_capped(tmp_path):
    ex = _example()
    ex.main(["--workload", "rollout", "--n", "130", "--policies", "fcfs", "--out", str(tmp_path)])
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "rollout_fcfs.csv")) == 130 * 8


# --- section: plot
def test_plot_results_stays_bounded_and_notes_what_it_leaves_out(tmp_path, capsys):
    from PIL import Image

    from hf_ext.utils import bench

    kw = dict(device="cpu", versions="v", commit="c", command="x", date="d")
    rows = [
        bench.Row.make(
            "big", f"case_{c:03d}_" + "x" * 60, f"metric_{m}", 1.0 + c / 100, f"base_{s}", 2.0, **kw
        )
        for m in range(14)
        for s in range(9)
        for c in range(60)
    ]
    path = bench.append_rows("big", rows, tmp_path / "big.csv")
    png = bench.plot_results("big", path)
    w, h = Image.open(png).size
    assert w <= 2000 and h <= 4000, (w, h)
    assert "not drawn" in capsys.readouterr().out  # 4 metrics over max_panels
    with pytest.raises(ValueError, match="max_cases"):
        bench.plot_results("big", path, max_cases=0)


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--shape", "foo"], "--shape: invalid choice: 'foo'"),
        (["--device", "gpu"], "--device must be cpu or cuda[:i], got 'gpu'"),
        (["--device", "cuda"], "--device cuda: this machine has 0 CUDA device(s)"),
        (["--skip-calibration", "--calib-out", "cal"], "--calib-out only apply to the calibration"),
        (
            ["--skip-calibration", "--reps", "2", "--shape", "small"],
            "--shape, --reps only apply to the calib",
        ),
        (["--skip-speed", "--n", "500"], "--n only apply to the speed run, which --skip-speed skips"),
    ],
)
def test_bench_simulate_refuses_bad_or_ignored_flags_before_any_work(args, msg, monkeypatch, capsys):
    """`hf-ext bench simulate`: an unknown --shape or a --device with no CUDA device was a traceback from inside
    the calibration; a flag of a skipped part (--calib-out with --skip-calibration) was silently ignored."""
    import torch

    from hf_ext import cli
    from hf_ext.simulate import bench

    def no_work(*a, **k):
        raise AssertionError("bench ran")

    monkeypatch.setattr(bench, "_calibration_rows", no_work)
    monkeypatch.setattr(bench, "_speed_rows", no_work)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "simulate", *args])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_cli_docstring_bench_example_is_accepted_by_the_benchmark():
    """hf_ext.cli's usage example `hf-ext bench sale -- --lengths ...` gave sale's 'one of the arguments --kernels
    --e2e is required'."""
    import shlex

    from hf_ext import cli
    from hf_ext.attention.sale import bench as sale_bench

    lines = [
        ln.strip()[2:] for ln in cli.__doc__.splitlines() if ln.strip().startswith("$ hf-ext bench sale")
    ]
    assert lines
    for line in lines:
        args = cli.build_parser().parse_args(shlex.split(line)[1:])
        argv = cli._bench_argv(args.component, args.bench_args, under_all=False)
        sale_bench._parser().parse_args(argv)  # SystemExit(2) on a usage error


def test_is_available_of_a_submodule_whose_package_is_missing_is_false():
    """is_available("pkg.sub") raised ModuleNotFoundError when pkg was not installed (find_spec imports the
    parent), where a component's requirement check wants False."""
    from hf_ext.utils.imports import is_available

    assert is_available("json.decoder") and not is_available("json.no_such_module")
    assert is_available("hf_ext_no_such_package.sub") is False
    assert is_available("json.decoder.no_such") is False  # the parent is a module, not a package


def test_plot_results_of_a_csv_of_another_schema_names_the_missing_columns(tmp_path):
    """plot_results on a CSV written by another tool (benchmarks/results/tie_refresh.csv) failed with
    KeyError: 'case'; an empty file still gives the '(no finite ratios)' figure."""
    from hf_ext.utils import bench

    p = tmp_path / "tie_refresh.csv"
    p.write_text("load,policy,per_token_mean_ms\n1,fcfs,2.0\n")
    with pytest.raises(ValueError, match=r"tie_refresh\.csv is not a results CSV .*lacks case, metric"):
        bench.plot_results("tie_refresh", p)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert bench.plot_results("empty", empty).exists()
