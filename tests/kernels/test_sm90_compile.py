"""Every SALE Triton kernel compiles for H100 (sm_90) through Triton's real code generator and ``ptxas``.

No GPU needed (ahead-of-time compile for a named target). The interpreter tests check what the kernels
compute; this checks that the GPU compiler accepts them, which the interpreter never exercises.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tests.kernels._sm90_compile import CASES  # noqa: E402
from tests.kernels._subprocess import run_case_module  # noqa: E402


@pytest.fixture(scope="module")
def compiled() -> dict:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as e:  # a Triton build without the NVIDIA backend
        pytest.skip(f"Triton's NVIDIA backend is not available: {e}")
    return run_case_module("tests.kernels._sm90_compile", interpret=False, timeout=600)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_sm90(compiled, case):
    res = compiled[case]
    assert res["ok"], f"{case}: {res['error']}"
    assert res["cubin_bytes"] > 0 and len(res["ptx_sha"]) == 16
