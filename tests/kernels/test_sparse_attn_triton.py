"""SALE Triton kernels vs the torch references on CPU through the Triton interpreter (small shapes).

The checks live in :mod:`tests.kernels._interp_cases` and run in one fresh subprocess, because the
interpreter must be enabled before Triton is first imported (see that module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.kernels._interp_cases import CASES, case_id  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interp_results() -> dict:
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join([str(_ROOT), str(_ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._interp_cases"],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1][len("@@RESULT@@") :])


@pytest.mark.parametrize("name", [case_id(c) for c in CASES] + ["tau0-padding"])
def test_triton_matches_reference(name, interp_results):
    """Estimate mask == reference mask (up to threshold ties); sparse forward == fp32 reference."""
    err = interp_results[name]
    assert err is None, err
