"""Foundation: packaging, import cost, registry, CLI, harness, fixtures."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _py(code: str, cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_import_kernels_is_never_ours(tmp_path):
    # From an unrelated folder (as a user would), `import kernels` must not resolve to this repo.
    code = (
        "import importlib.util, json\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "locs = [] if spec is None else list(spec.submodule_search_locations or []) + [str(spec.origin)]\n"
        "print(json.dumps(locs))\n"
    )
    res = _py(code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    locs = json.loads(res.stdout.strip().splitlines()[-1])
    assert not any(str(ROOT) in loc for loc in locs), locs
    assert not (ROOT / "kernels" / "__init__.py").exists()
    res = _py("import hf_ext_kernels, os; print(os.path.dirname(hf_ext_kernels.__file__))", cwd=tmp_path)
    assert res.returncode == 0 and "kernels" in res.stdout


def test_import_hf_ext_is_light(tmp_path):
    code = (
        "import sys, time\n"
        "import torch, transformers\n"
        "before = set(sys.modules)\n"
        "t0 = time.perf_counter()\n"
        "import hf_ext\n"
        "dt = time.perf_counter() - t0\n"
        "new = set(sys.modules) - before\n"
        "heavy = sorted(m for m in new if m.split('.')[0] in ('diffusers', 'trl', 'triton'))\n"
        "print(dt, heavy)\n"
    )
    # Best of three runs (the CI machine may be busy).
    times = []
    for _ in range(3):
        res = _py(code, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        dt, heavy = res.stdout.strip().splitlines()[-1].split(" ", 1)
        assert heavy == "[]", f"import hf_ext loaded heavy modules: {heavy}"
        times.append(float(dt))
    assert min(times) < 0.5, times


def test_registry_complete_and_consistent():
    from hf_ext import registry

    names = registry.names()
    assert len(names) == len(set(names))
    expected = {
        "simulate",
        "sale",
        "adaspa",
        "rollout_shaping",
        "fsep",
        "autoparallel",
        "dataflex",
        "sart",
        "tie",
        "pbkv",
        "latent_omni",
    }
    assert expected <= set(names)
    for c in registry.COMPONENTS:
        assert c.status in ("built", "planned"), c
        if c.status == "built":
            import importlib

            assert c.demo, f"{c.name} is built but has no demo"
            mod, _, fn = c.demo.partition(":")
            assert callable(getattr(importlib.import_module(mod), fn))
            if c.example:
                assert (ROOT / c.example).exists(), c.example
    with pytest.raises(KeyError, match="known components"):
        registry.get("nope")


def test_cli_doctor_and_unknown_component():
    from hf_ext.cli import doctor_report, main

    rep = doctor_report()
    assert rep["versions"]["torch"] != "not installed"
    assert {c["name"] for c in rep["components"]} >= {"sale", "tie"}
    assert main(["doctor"]) == 0
    assert main(["demo", "no-such-component"]) == 2


def test_cli_plan_takes_its_own_flags(tmp_path, capsys):
    """`hf-ext plan --model ...`: flags after the sub-command reach the planner (an argparse REMAINDER
    refused a first argument starting with "--")."""
    from hf_ext.cli import main

    out = tmp_path / "plan.json"
    assert (
        main(["plan", "--model", "llama3-8b", "--gpus", "8", "--gpu-memory", "80GB", "--out", str(out)]) == 0
    )
    assert out.exists() and "tokens/s" in capsys.readouterr().out
    assert main(["plan", "--model", "nope", "--gpus", "8"]) == 2
    assert "built-in shapes" in capsys.readouterr().err


def test_cli_console_script_runs():
    exe = Path(sys.executable).parent / "hf-ext"
    if not exe.exists():
        pytest.skip("console script not installed in this environment")
    res = subprocess.run([str(exe), "doctor"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "transformers" in res.stdout


def test_time_interleaved_rotates_the_order_and_times_each_call():
    import time

    from hf_ext.utils import bench

    calls = []

    def fn(name, sleep=0.0):
        def run():
            calls.append(name)
            time.sleep(sleep)

        return run

    ms = bench.time_interleaved({"a": fn("a"), "b": fn("b", 0.02), "c": fn("c")}, rounds=6, warmup=1)
    rounds = [calls[i : i + 3] for i in range(0, len(calls), 3)]
    assert len(rounds) == 7 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds[1:4]] == ["b", "c", "a"]  # the first of each round rotates
    assert ms["b"] >= 20 > ms["a"] and ms["c"] < 20
    with pytest.raises(ValueError, match="rounds"):
        bench.time_interleaved({"a": fn("a")}, rounds=0)
    with pytest.raises(ValueError, match="fns"):
        bench.time_interleaved({})


def test_bench_harness_rows_csv_and_plot(tmp_path, monkeypatch):
    from hf_ext.utils import bench

    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path))
    t = bench.time_fn(lambda: sum(range(100)), warmup=1, rep=3)
    assert t > 0
    rows = [
        bench.Row.make("demo", "case_a", "time_ms", 2.0, "base", 4.0, quality_name="cos", quality_value=0.99),
        bench.Row.make("demo", "case_b", "tokens_per_s", 300.0, "base", 100.0, higher_is_better=True),
    ]
    assert rows[0].ratio == pytest.approx(2.0) and rows[1].ratio == pytest.approx(3.0)
    path = bench.append_rows("demo", rows)
    bench.append_rows("demo", rows[:1])
    with path.open() as f:
        got = list(csv.DictReader(f))
    assert list(got[0].keys()) == bench.COLUMNS
    assert len(got) == 3 and got[0]["component"] == "demo"
    png = bench.plot_results("demo")
    assert png.exists() and png.stat().st_size > 1000


def test_rows_record_the_torchrun_launch(monkeypatch):
    from hf_ext.utils import bench

    monkeypatch.setattr("sys.argv", ["/x/hf_ext/accelerate/fsep/bench.py", "--torchrun"])
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert (
        bench.Row.make("d", "c", "m", 1.0, "b", 1.0).command
        == "/x/hf_ext/accelerate/fsep/bench.py --torchrun"
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    cmd = bench.Row.make("d", "c", "m", 1.0, "b", 1.0).command
    assert cmd == "torchrun --nproc-per-node 2 /x/hf_ext/accelerate/fsep/bench.py --torchrun"


def test_tiny_models_and_tokenizer(tokenizer, tiny_llama):
    import torch

    ids = tokenizer("Attention is all you need", return_tensors="pt").input_ids
    assert tokenizer.decode(ids[0]) == "Attention is all you need"
    out = tiny_llama.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 3
    assert tiny_llama.config.num_key_value_heads < tiny_llama.config.num_attention_heads
    with torch.no_grad():
        assert torch.isfinite(tiny_llama(ids).logits).all()


def test_tiny_moe_builds(tiny_moe):
    import torch

    with torch.no_grad():
        out = tiny_moe(torch.tensor([[1, 5, 6, 7]]))
    assert out.logits.shape == (1, 4, tiny_moe.config.vocab_size)


def test_triton_interpret_fixture(triton_interpret):
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_gloo_two_processes(run_distributed):
    from tests._dist_helpers import allreduce_rank

    assert run_distributed(allreduce_rank, 2) == [3.0, 3.0]


def test_unknown_moe_kind_is_clear_error():
    from hf_ext.testing import tiny_moe

    with pytest.raises(ValueError, match="kind='nope'.*qwen2_moe"):
        tiny_moe("nope")


def test_demo_of_every_built_component_passes():
    # What `make demo` runs: every built component end to end on tiny CPU models; exit 0 only if all pass.
    from hf_ext import registry
    from hf_ext.cli import run_demos

    recs = run_demos([])
    by = {r["component"]: r for r in recs}
    for c in registry.COMPONENTS:
        if c.status == "built":
            assert by[c.name]["status"] == "pass", by[c.name]
        else:
            assert by[c.name]["status"] == "not built"


def test_run_distributed_retries_native_crash_but_not_python_errors(run_distributed, tmp_path):
    from tests._dist_helpers import abort_once, raise_on_rank1

    with pytest.warns(UserWarning, match="retrying") as caught:
        assert run_distributed(abort_once, 2, str(tmp_path / "marker")) == [0, 1]
    # the crashed rank's own stderr (faulthandler's dump of the signal) comes with the warning
    assert any("rank 1 stderr" in str(w.message) and "Aborted" in str(w.message) for w in caught)
    with pytest.raises(RuntimeError, match=r"\(1, 1\)") as err:
        run_distributed(raise_on_rank1, 2, retries=3)
    assert "ValueError: boom" in str(err.value)  # the failing rank's traceback


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "openai", "pydantic"])
def test_doctor_names_missing_optional_extras(monkeypatch, missing):
    """A component's optional module that is not installed shows in its doctor note with how to get it (tie: any
    module transformers' is_serve_available needs)."""
    import hf_ext.cli as cli
    import hf_ext.utils.imports as imports

    real = imports.is_available
    monkeypatch.setattr(imports, "is_available", lambda m: m != missing and real(m))
    tie = {c["name"]: c for c in cli.doctor_report()["components"]}["tie"]
    assert tie["can_run"] and "hf-ext serve needs pip install 'hf-ext[serve]'" in tie["why"]
    monkeypatch.setattr(imports, "is_available", lambda m: True)
    assert {c["name"]: c for c in cli.doctor_report()["components"]}["tie"]["why"] == "ok"


def _row(case: str, **kw):
    from hf_ext.utils.bench import Row

    kw = {"device": "cpu", "versions": "v", "date": "d", "commit": "abc", "command": "cmd", **kw}
    return Row.make("demo", case, "time_ms", 1.0, "base", 3.0, **kw)


def test_append_rows_follows_the_files_header_and_refuses_a_foreign_one(tmp_path):
    from hf_ext.utils import bench

    # the schema's columns in another order: the new row goes in the file's order
    p = tmp_path / "reordered.csv"
    p.write_text(",".join(reversed(bench.COLUMNS)) + "\r\n")
    bench.append_rows("demo", [_row("case_a")], path=p)
    got = bench.read_rows(p)
    assert [(r["case"], r["metric"], r["ratio"], r["commit"]) for r in got] == [
        ("case_a", "time_ms", "3.0", "abc")
    ]
    # an extra column (e.g. a withdrawn_because note) is kept and left empty
    p = tmp_path / "extra.csv"
    p.write_text(",".join([*bench.COLUMNS, "withdrawn_because"]) + "\r\n")
    bench.append_rows("demo", [_row("case_b")], path=p)
    (r,) = bench.read_rows(p)
    assert r["case"] == "case_b" and r["withdrawn_because"] == "" and r["command"] == "cmd"
    # another tool's CSV: refused, untouched
    p = tmp_path / "foreign.csv"
    p.write_text("load,policy,per_token_mean_ms\r\n1,fcfs,2.0\r\n")
    with pytest.raises(ValueError, match="lacks component, case"):
        bench.append_rows("demo", [_row("case_c")], path=p)
    assert p.read_bytes() == b"load,policy,per_token_mean_ms\r\n1,fcfs,2.0\r\n"
    # a last row left without its line end (an interrupted write): the new row starts on its own line
    p = tmp_path / "unterminated.csv"
    p.write_text(",".join(bench.COLUMNS) + "\r\n" + "demo,old,cpu,time_ms,1,base,2,2,,,v,d,abc,cmd")
    bench.append_rows("demo", [_row("case_d")], path=p)
    assert [r["case"] for r in bench.read_rows(p)] == ["old", "case_d"]
    assert all(None not in r for r in bench.read_rows(p))  # no row with fields past the header


def test_append_rows_at_the_same_time_write_one_header_and_whole_rows(tmp_path):
    """Two appends to a new file at once (torchrun ranks, benchmarks side by side): one header, every row."""
    import threading

    from hf_ext.utils import bench

    path = tmp_path / "race.csv"
    started, other_done = threading.Event(), threading.Event()

    class Slow:
        """A quality value whose formatting waits for the other append (bounded), to hold this one mid-way."""

        def __str__(self) -> str:
            started.set()
            other_done.wait(timeout=5)
            return "0.5"

        def __deepcopy__(self, memo: dict) -> Slow:
            return self

    errors: list[BaseException] = []

    def first() -> None:
        try:
            bench.append_rows("demo", [_row("slow", quality_value=Slow())], path=path)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(timeout=5)
    bench.append_rows("demo", [_row("fast")], path=path)
    other_done.set()
    t.join(timeout=10)
    assert not errors, errors
    text = path.read_text()
    assert text.count("component,case,") == 1, text
    got = bench.read_rows(path)
    assert sorted(r["case"] for r in got) == ["fast", "slow"] and all(None not in r for r in got)


def test_git_commit_of_a_copy_that_another_repository_does_not_track_is_unknown(tmp_path, monkeypatch):
    """A source tree exported into another project (no .git of its own): the enclosing repository's commit
    says nothing about this code, so rows must not record it."""
    import importlib.util
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    monkeypatch.delenv("HF_EXT_COMMIT", raising=False)
    outer = tmp_path / "project"
    vendored = outer / "vendor" / "hf-ext"
    (vendored / "hf_ext" / "utils").mkdir(parents=True)
    shutil.copy(ROOT / "hf_ext" / "utils" / "bench.py", vendored / "hf_ext" / "utils" / "bench.py")
    shutil.copy(ROOT / "pyproject.toml", vendored / "pyproject.toml")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"

    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=outer, capture_output=True, text=True, env=env, check=True)
        return res.stdout.strip()

    def load_copy():
        spec = importlib.util.spec_from_file_location("vendored_bench", vendored / "hf_ext/utils/bench.py")
        mod = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "vendored_bench", mod)  # dataclasses look their module up
        spec.loader.exec_module(mod)
        return mod

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "the project's own history")
    (outer / ".gitignore").write_text("vendor/\n")
    untracked = load_copy()
    assert vendored == untracked.CHECKOUT_ROOT
    assert untracked.git_commit() == "unknown"
    # once the project tracks the copy, its commit does describe the code
    (outer / ".gitignore").unlink()
    git("add", "-A")
    git("commit", "-q", "-m", "vendor hf-ext")
    assert load_copy().git_commit() == git("rev-parse", "--short", "HEAD")


def test_timing_on_a_named_gpu_synchronises_and_measures_that_gpu(monkeypatch):
    """time_interleaved(..., device="cuda:1") synchronised only the current GPU (cuda:0), and time_fn ran
    do_bench on the current GPU, so work launched on cuda:1 was timed as its launch. Checked on CPU with
    stand-ins for the CUDA calls."""
    import contextlib

    import torch
    import triton.testing

    from hf_ext.utils import bench

    synced: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    bench.time_interleaved({"a": lambda: None, "b": lambda: None}, rounds=2, warmup=1, device="cuda:1")
    assert len(synced) == 12
    assert all(d is not None and torch.device(d) == torch.device("cuda:1") for d in synced), synced

    current = ["cuda:0"]

    @contextlib.contextmanager
    def on_device(device):
        before, current[0] = current[0], str(torch.device(device))
        try:
            yield
        finally:
            current[0] = before

    seen: list[str] = []

    def do_bench(fn, warmup, rep, return_mode):
        seen.append(current[0])
        return 1.0

    monkeypatch.setattr(torch.cuda, "device", on_device)
    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    assert bench.time_fn(lambda: None, device="cuda:1") == 1.0
    assert bench.time_fn(lambda: None, device=torch.device("cuda", 1)) == 1.0
    assert seen == ["cuda:1", "cuda:1"] and current == ["cuda:0"]


def test_doctor_reports_the_version_of_the_hf_ext_it_runs(monkeypatch):
    """Run from a checkout on PYTHONPATH (as the README shows), doctor said hf-ext was 'not installed' (it read
    the installed distribution's metadata, which may also be another copy than the one imported)."""
    from importlib import metadata

    import hf_ext
    import hf_ext.cli as cli

    real = metadata.version

    def version(pkg: str) -> str:
        if pkg.replace("_", "-") == "hf-ext":
            raise metadata.PackageNotFoundError(pkg)
        return real(pkg)

    monkeypatch.setattr(metadata, "version", version)
    assert cli.doctor_report()["versions"]["hf-ext"] == hf_ext.__version__
    # the version the package reports is the one it is built with
    text = (ROOT / "pyproject.toml").read_text()
    assert f'\nversion = "{hf_ext.__version__}"\n' in text


def test_git_commit_is_not_dirty_from_the_results_files_a_benchmark_appends_to(tmp_path, monkeypatch):
    """A benchmark run on a clean checkout appends to a tracked benchmarks/results CSV, so every row written after
    its first append (another batch, the next benchmark of `hf-ext bench all`) recorded the commit as +dirty."""
    import importlib.util
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git not installed")
    monkeypatch.delenv("HF_EXT_COMMIT", raising=False)
    repo = tmp_path / "hf-ext"
    (repo / "hf_ext" / "utils").mkdir(parents=True)
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(ROOT / "hf_ext" / "utils" / "bench.py", repo / "hf_ext" / "utils" / "bench.py")
    shutil.copy(ROOT / "pyproject.toml", repo / "pyproject.toml")
    csv_path = repo / "benchmarks" / "results" / "demo.csv"
    csv_path.write_text("component,case\r\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@t"

    def git(*args: str) -> str:
        res = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=env, check=True)
        return res.stdout.strip()

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "checkout")
    spec = importlib.util.spec_from_file_location("checkout_bench", repo / "hf_ext/utils/bench.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "checkout_bench", mod)
    spec.loader.exec_module(mod)
    sha = git("rev-parse", "--short", "HEAD")
    assert mod.git_commit() == sha
    with csv_path.open("a") as f:  # what the benchmark's own append_rows does
        f.write("demo,a\r\n")
    assert mod.git_commit() == sha
    with (repo / "pyproject.toml").open("a") as f:  # a change to the project itself still counts
        f.write("\n")
    assert mod.git_commit() == sha + "+dirty"


def test_tiny_moe_overrides_reach_the_config_constructor():
    """tiny_moe set overrides on the built config, so fields derived at construction went stale:
    tiny_moe("qwen2_moe", num_hidden_layers=3) failed with IndexError (layer_types had 2 entries)."""
    import torch

    from hf_ext.testing import tiny_moe

    ids = torch.tensor([[1, 5, 6, 7]])
    for kind in ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe"):
        model = tiny_moe(kind, num_hidden_layers=3)
        assert (
            len(model.model.layers) == 3 and len(getattr(model.config, "layer_types", None) or [0] * 3) == 3
        )
        with torch.no_grad():
            assert model(ids).logits.shape == (1, 4, model.config.vocab_size), kind
    assert tiny_moe("olmoe", num_experts=3).config.num_experts == 3
