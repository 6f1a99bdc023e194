"""Edge cases of the foundation: the results folder, the cells of results CSVs, and ``hf-ext demo``'s
component list."""

from __future__ import annotations

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
