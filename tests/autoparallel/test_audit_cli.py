"""hf-ext plan: bad arguments are refused before any search, naming the flag and what it allows."""

from __future__ import annotations

import re

import pytest

from hf_ext.accelerate.autoparallel import cli


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--gpus", "0"], r"--gpus: must be >= 1"),
        (["--gpus", "8", "--seq-len", "0"], r"--seq-len: must be >= 1"),
        (["--gpus", "8", "--global-batch", "0"], r"--global-batch: must be >= 1"),
        (["--gpus", "8", "--micro-batch-sizes", "1,x"], r"--micro-batch-sizes: .*positive integers"),
        (["--gpus", "8", "--micro-batch-sizes", "0,2"], r"--micro-batch-sizes: .*positive integers"),
        (["--gpus", "8", "--dp-types", "ddp,zero9"], r"--dp-types: .*ddp, fsdp"),
        (["--gpus", "8", "--gpu-memory", "lots"], r"--gpu-memory"),
        (["--gpus", "8", "--hardware", "/nonexistent/hw.json"], r"--hardware: .*/nonexistent/hw.json"),
        (["--gpus", "8", "--profile", "/nonexistent/p.json"], r"--profile: .*/nonexistent/p.json"),
    ],
)
def test_bad_arguments_name_the_flag_before_any_search(args, match, monkeypatch, capsys):
    def no_search(*a, **k):
        raise AssertionError("searched with bad arguments")

    monkeypatch.setattr("hf_ext.accelerate.autoparallel.search.search", no_search)
    with pytest.raises(SystemExit) as ei:
        cli.main(["--model", "tiny", *args])
    assert ei.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_unreadable_hardware_json_is_an_error_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "hw.json"
    bad.write_text("{not json")
    assert cli.main(["--model", "tiny", "--gpus", "2", "--hardware", str(bad)]) == 2
    assert "--hardware" in capsys.readouterr().err
