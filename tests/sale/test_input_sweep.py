"""Input sweep of SALE's public CLI: hf-ext bench sale flags are checked before any model is built."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "argv, flag, low",
    [
        (["--rep", "0"], "--rep", 1),  # max(1, rep): silently one timed prefill
        (["--warmup", "-1"], "--warmup", 0),  # silently no warm-up
        (["--layers", "0"], "--layers", 1),  # 'layers or default': silently the shape's layer count
        (["--min-seq-len", "0"], "--min-seq-len", 2),  # 'or default': silently the default threshold
        (["--lengths", "512", "0"], "--lengths", 1),
    ],
)
def test_bench_e2e_refuses_out_of_range_counts_before_building_the_model(
    argv, flag, low, capsys, monkeypatch
):
    from hf_ext.attention.sale import bench

    def no_model(*a, **k):
        raise AssertionError("the model was built before the bad flag was refused")

    monkeypatch.setattr(bench, "_build_model", no_model)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--e2e", "--shape", "tiny", "--no-write", *argv])
    assert exc.value.code == 2
    assert f"argument {flag}: must be >= {low}" in capsys.readouterr().err
