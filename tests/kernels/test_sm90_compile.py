"""Every SALE Triton kernel compiles for H100 (sm_90) through Triton's real code generator and ``ptxas``.

No GPU needed (ahead-of-time compile for a named target). The interpreter tests check what the kernels
compute; this checks that the GPU compiler accepts them, which the interpreter never exercises.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

from tests.kernels._sm90_compile import CASES  # noqa: E402

_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled() -> dict:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a Triton build without the NVIDIA backend
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(_ROOT), str(_ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._sm90_compile"],
        cwd=_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[-1][len("@@RESULT@@") :])


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_sm90(compiled, case):
    res = compiled[case]
    assert res["ok"], f"{case}: {res['error']}"
    assert res["cubin_bytes"] > 0 and len(res["ptx_sha"]) == 16
