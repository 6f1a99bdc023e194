"""SALE Triton kernels vs the torch references on CPU through the Triton interpreter (small shapes).

The checks live in :mod:`tests.kernels._interp_cases` and run in one fresh subprocess, because the
interpreter must be enabled before Triton is first imported (see that module).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernels._interp_cases import CASES, case_id  # noqa: E402
from tests.kernels._subprocess import run_case_module  # noqa: E402


@pytest.fixture(scope="module")
def interp_results() -> dict:
    from hf_ext_kernels.sparse_attn.ops import interpreter_problem

    if (problem := interpreter_problem()) is not None:
        pytest.skip(problem)
    return run_case_module("tests.kernels._interp_cases", interpret=True, timeout=300)


@pytest.mark.parametrize(
    "name", [case_id(c) for c in CASES] + ["tau0-padding", "rowstride-forced-unscored", "huge-sink-window"]
)
def test_triton_matches_reference(name, interp_results):
    """Estimate mask == reference mask (up to threshold ties); sparse forward == fp32 reference."""
    err = interp_results[name]
    assert err is None, err
