"""Edge cases of the foundation: the results folder, the cells of results CSVs, and ``hf-ext demo``'s
component list."""

from __future__ import annotations

import re

import pytest


def test_results_dir_that_is_a_file_is_a_clear_error(monkeypatch, tmp_path):
    from hf_ext.utils import bench

    a_file = tmp_path / "results.csv"
    a_file.write_text("not a folder\n")
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(a_file))
    with pytest.raises(ValueError, match=r"HF_EXT_RESULTS_DIR=.*results\.csv.* is a file, not a folder"):
        bench.results_dir()
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(a_file / "sub"))  # a path above it is a file
    with pytest.raises(ValueError, match=r"HF_EXT_RESULTS_DIR=.*a path above it is a file"):
        bench.results_dir()
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "missing")
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(link))
    with pytest.raises(ValueError, match=r"HF_EXT_RESULTS_DIR=.*broken symbolic link"):
        bench.results_dir()
    monkeypatch.setenv("HF_EXT_RESULTS_DIR", str(tmp_path / "new" / "results"))  # a folder still works
    assert bench.results_dir() == tmp_path / "new" / "results"
    assert (tmp_path / "new" / "results").is_dir()


def test_tensor_and_numpy_values_are_written_as_plain_numbers(tmp_path):
    import numpy as np
    import torch

    from hf_ext.utils.bench import Row, append_rows, print_rows, read_rows

    fixed = dict(device="cpu-x", versions="v", date="d", commit="c", command="cmd")
    row = Row.make(
        "comp",
        "case",
        "ms",
        torch.tensor(2.0),  # a 0-d tensor, and the ratio Row.make computes from it
        "eager",
        np.float64(4.0),
        quality_name="max_err",
        quality_value=torch.tensor(0.25, dtype=torch.float64),
        **fixed,
    )
    ints = Row("comp", "ints", "tokens/s", np.int64(7), "eager", np.array(3.5), ratio=np.bool_(True), **fixed)
    path = append_rows("comp", [row, ints], path=tmp_path / "comp.csv")
    text = path.read_text()
    assert "tensor" not in text and "np." not in text and "array" not in text, text
    got = read_rows(path)
    assert [(r["ours"], r["baseline_value"], r["ratio"], r["quality_value"]) for r in got] == [
        ("2.0", "4.0", "2.0", "0.25"),
        ("7", "3.5", "True", ""),
    ]
    print_rows([row, ints])  # the table shows the numbers too


@pytest.mark.parametrize(
    "field, kind, dims",
    [("ours", "tensor", (2,)), ("baseline_value", "array", (1,)), ("quality_value", "tensor", (1, 1))],
)
def test_non_scalar_tensor_or_array_values_are_refused_naming_the_field(tmp_path, field, kind, dims):
    import numpy as np
    import torch

    from hf_ext.utils.bench import Row, append_rows

    kw: dict = dict(ours=1.0, baseline_value=2.0, quality_value="")
    kw[field] = torch.ones(dims) if kind == "tensor" else np.ones(dims)
    fixed = dict(device="cpu-x", versions="v", date="d", commit="c", command="cmd")
    row = Row("comp", "case", "ms", baseline="eager", **kw, **fixed)
    path = tmp_path / "comp.csv"
    msg = rf"Row\.{field} must be a number or a string, got a {kind} of shape {re.escape(str(dims))}"
    with pytest.raises(ValueError, match=msg):
        append_rows("comp", [row], path=path)
    assert not path.exists()  # refused before anything was written


def test_a_results_csv_with_a_byte_order_mark_is_appended_to_and_read(tmp_path):
    from hf_ext.utils.bench import COLUMNS, Row, append_rows, plot_results, read_rows

    fixed = dict(device="cpu-x", versions="v", date="d", commit="c", command="cmd")
    path = tmp_path / "comp.csv"
    first = ",".join(
        ["comp", "old", "cpu-x", "ms", "1.0", "eager", "2.0", "2.0", "", "", "v", "d", "c", "cmd"]
    )
    path.write_bytes(
        b"\xef\xbb\xbf" + (",".join(COLUMNS) + "\r\n" + first + "\r\n").encode()
    )  # as Excel saves it
    append_rows("comp", [Row.make("comp", "new", "ms", 1.0, "eager", 3.0, **fixed)], path=path)
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf" + ",".join(COLUMNS).encode()) and data.count(b"component") == 1
    rows = read_rows(path)
    assert [(r["component"], r["case"], r["ratio"]) for r in rows] == [
        ("comp", "old", "2.0"),
        ("comp", "new", "3.0"),
    ]
    assert plot_results("comp", path=path).exists()


def test_demo_runs_a_component_named_twice_once(monkeypatch, capsys):
    from types import SimpleNamespace

    from hf_ext import cli, registry

    built = [c.name for c in registry.COMPONENTS if c.status == "built" and c.demo][:2]
    assert len(built) == 2
    ran: list[str] = []

    def fake_resolve(target):
        name = next(c.name for c in registry.COMPONENTS if c.demo == target)
        return lambda: ran.append(name) or SimpleNamespace(what=f"{name} demo", key_figure="1x", passed=True)

    monkeypatch.setattr(cli, "_resolve", fake_resolve)
    a, b = built
    assert cli.main(["demo", a, a]) == 0
    assert ran == [a]
    ran.clear()
    assert cli.main(["demo", b, a, b, a]) == 0  # the order of first mention is kept
    assert ran == [b, a]
    assert [r["component"] for r in cli.run_demos([a, a])] == [a]
    ran.clear()
    assert cli.main(["demo", "all", "all"]) == 0  # 'all' twice is 'all', not "'all' cannot be combined"
    assert ran == [c.name for c in registry.COMPONENTS if c.status == "built" and c.demo]  # each once
    assert cli.main(["demo", "all", a]) == 2  # still refused
    assert "'all' cannot be combined" in capsys.readouterr().err
