"""Compile every SALE Triton kernel for Hopper (sm_90) on a machine without a GPU.

The interpreter tests (:mod:`tests.kernels._interp_cases`) run the kernels' Python semantics; they never go
through Triton's code generator, MLIR passes, LLVM and ``ptxas``, where a construct the interpreter accepts
can still be refused. Compiling ahead of time for a named target needs no driver, so this catches that on
CPU CI. Run in a fresh process without ``TRITON_INTERPRET`` (``python -m tests.kernels._sm90_compile``);
prints one ``@@RESULT@@`` JSON line: case -> {"ok", "cubin_bytes", "ptx_sha" (PTX code without debug info), "error"}.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)


def _case(
    kernel: str, ptrs: dict[str, str], warps: int, stages: int, maxnreg: int | None = None, **const: Any
):
    """(kernel, pointer argument -> element type, constexprs, num_warps, num_stages, maxnreg); other
    arguments are i32 except the float scalars in :data:`_FLOATS`."""
    return kernel, ptrs, const, warps, stages, maxnreg


_FLOATS = ("qk_scale", "sm_scale_log2")
_BSA = "block_sparse._bsa_fwd_kernel"
_EST = "quant_score._estimate_kernel"
_BSA_PTRS = {"Q": "bf16", "K": "bf16", "V": "bf16", "O": "bf16", "IDX": "i32", "CNT": "i32", "NFULL": "i32"}
_EST_PTRS = {"QI": "i8", "QSC": "fp32", "KQ": "i8", "KS": "fp32", "FIRST": "i32", "TAU": "fp32", "MASK": "i8"}
_EST_PTRS["KPM"] = "i8"
_TILE = dict(BLOCK_M=128, BLOCK_N=64, HEAD_DIM=128, INTERP=False)
_FP32 = {**{x: "fp32" for x in "QKVO"}, "IDX": "i32", "CNT": "i32", "NFULL": "i32", "KPM": "i32"}
_EST_CAUSAL = dict(_TILE, CAUSAL=True, HAS_KPM=False, COLMASK=False, PAIR=0)
# the launch configurations the host code uses on H100 (block_sparse._launch_cfg, quant_score._TUNED)
CASES: dict[str, tuple[str, dict[str, str], dict[str, Any], int, int, int | None]] = {
    "bsa_causal_bf16": _case(
        _BSA, {**_BSA_PTRS, "KPM": "i32"}, 4, 2, **_TILE, CAUSAL=True, HAS_KPM=False, IEEE=False
    ),
    "bsa_noncausal_padded_bf16": _case(
        _BSA, {**_BSA_PTRS, "KPM": "i8"}, 4, 2, **_TILE, CAUSAL=False, HAS_KPM=True, IEEE=False
    ),
    "bsa_causal_fp32_128x128": _case(
        _BSA, _FP32, 8, 2, **{**_TILE, "BLOCK_N": 128, "HEAD_DIM": 64}, CAUSAL=True, HAS_KPM=False, IEEE=True
    ),
    "estimate_rows128_causal": _case(_EST, _EST_PTRS, 4, 3, 128, **_EST_CAUSAL, ROW_STRIDE=1, HPC=1),
    "estimate_rows64_gqa_pairs_causal": _case(_EST, _EST_PTRS, 4, 3, 128, **_EST_CAUSAL, ROW_STRIDE=2, HPC=2),
    "estimate_wide_dot_causal": _case(
        _EST, _EST_PTRS, 4, 3, None, **{**_EST_CAUSAL, "PAIR": 2}, ROW_STRIDE=1, HPC=1
    ),
    "estimate_noncausal_padded": _case(
        _EST,
        _EST_PTRS,
        4,
        3,
        None,
        **_TILE,
        CAUSAL=False,
        HAS_KPM=True,
        COLMASK=True,
        ROW_STRIDE=1,
        HPC=1,
        PAIR=1,
    ),
    "quant_k": _case(
        "quant_score._quant_k_kernel",
        {"K": "bf16", "MEAN": "fp32", "KPM": "i8", "KQ": "i8", "KS": "fp32"},
        4,
        2,
        QMAX=7,
        HAS_KPM=True,
        BLOCK_N=64,
        HEAD_DIM=128,
    ),
    "quant_q": _case(
        "quant_score._quant_q_kernel",
        {"Q": "bf16", "QI": "i8", "QSC": "fp32"},
        4,
        2,
        QMAX=7,
        BLOCK_M=128,
        ROW_STRIDE=2,
        HEAD_DIM=128,
    ),
}


def _ptx_sha(ptx: str) -> str:
    """Hash of the code alone: debug sections, line info and comments (which name the checkout path) left out."""
    ptx = ptx.split(".section\t.debug", 1)[0].split(".section .debug", 1)[0]
    body = [ln for ln in ptx.splitlines() if not ln.lstrip().startswith((".loc", ".file", "//"))]
    return hashlib.sha256("\n".join(body).encode()).hexdigest()[:16]


def compile_case(name: str) -> dict[str, Any]:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget

    path, ptrs, const, warps, stages, maxnreg = CASES[name]
    mod, attr = path.split(".")
    fn = getattr(importlib.import_module(f"hf_ext_kernels.sparse_attn.{mod}"), attr)
    sig = {}
    for arg in fn.arg_names:
        if arg in const:
            sig[arg] = "constexpr"
        elif arg in ptrs:
            sig[arg] = "*" + ptrs[arg]
        else:
            sig[arg] = "fp32" if arg in _FLOATS else "i32"
    opts: dict[str, Any] = dict(num_warps=warps, num_stages=stages)
    if maxnreg is not None:
        opts["maxnreg"] = maxnreg
    src = triton.compiler.ASTSource(fn, sig, const)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    return {"ok": True, "cubin_bytes": len(k.asm["cubin"]), "ptx_sha": _ptx_sha(k.asm["ptx"]), "error": ""}


def main(names: list[str]) -> None:
    out = {}
    for name in names or list(CASES):
        try:
            out[name] = compile_case(name)
        except Exception as e:  # reported per case; the test prints the message
            out[name] = {
                "ok": False,
                "cubin_bytes": 0,
                "ptx_sha": "",
                "error": f"{type(e).__name__}: {e}"[-2000:],
            }
    print("@@RESULT@@" + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
