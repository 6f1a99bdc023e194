"""SALE Triton-vs-reference checks, run in a fresh process with ``TRITON_INTERPRET=1`` set first.

Triton 3.8's interpreter only works when ``TRITON_INTERPRET=1`` is set before ``import triton``
(``tl.max``/``tl.sum`` are ``@triton.jit`` helpers bound at import), so the test module runs this
file in a subprocess: ``python -m tests.kernels._interp_cases`` prints ``{case: error or null}``.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from hf_ext_kernels.sparse_attn import block_sparse_attention, naive, sale_attention, sale_block_mask
from hf_ext_kernels.sparse_attn.inputs import structured_qkv

# (B, H, Hkv, Sq, Sk, D, causal, dtype, block_q, block_k, padding, row_stride)
CASES = [
    (1, 2, 1, 150, 150, 64, True, torch.bfloat16, 32, 16, None, 1),  # GQA 2:1, odd length
    (2, 2, 2, 70, 133, 64, True, torch.float16, 32, 32, "left", 1),  # Sq < Sk, left padding
    (2, 4, 2, 90, 90, 128, False, torch.float32, 16, 32, "right", 1),  # non-causal, right padding
    (1, 2, 1, 128, 160, 64, True, torch.float32, 32, 32, None, 2),  # row-strided estimate
]


def _inputs(b, h, hkv, sq, sk, d, dtype, padding, seed):
    q, k, v = structured_qkv(
        b,
        h,
        hkv,
        max(sq, sk),
        d,
        seed=seed,
        dtype=torch.float32,
        min_gap=32,
        span=8,
        sink_logit=6.0,
        local_logit=6.0,
        retrieval_logit=8.0,
    )
    q = q[:, :, -sq:].to(dtype)
    k, v = k[:, :, :sk].to(dtype), v[:, :, :sk].to(dtype)
    kpm = None
    if padding == "left":
        kpm = torch.ones(b, sk, dtype=torch.bool)
        kpm[0, :45] = False
    elif padding == "right":
        kpm = torch.ones(b, sk, dtype=torch.bool)
        kpm[-1, -17:] = False
    return q, k, v, kpm


def check_case(case) -> None:
    b, h, hkv, sq, sk, d, causal, dtype, bq, bk, padding, rs = case
    q, k, v, kpm = _inputs(b, h, hkv, sq, sk, d, dtype, padding, seed=sq + sk)
    kw = dict(causal=causal, block_q=bq, block_k=bk, key_padding_mask=kpm, local_window=16)
    # estimate: identical to the reference except for scores within fp32 rounding of the threshold
    for tau in (0.0, 0.05):
        mt = sale_block_mask(q, k, tau=tau, backend="triton", row_stride=rs, **kw)
        mr = sale_block_mask(q, k, tau=tau, backend="torch", row_stride=rs, **kw)
        assert mt.shape == mr.shape and mt.dtype == torch.bool
        assert (mt != mr).float().mean() <= 0.02, (mt != mr).sum()
    assert mr.float().mean() < 1.0  # the selection is exercised, not only forced blocks
    # sparse compute on the same (reference) mask, vs fp32 reference
    ot = block_sparse_attention(
        q, k, v, mr, backend="triton", **{x: kw[x] for x in kw if x != "local_window"}
    )
    orf = block_sparse_attention(
        q.float(), k.float(), v.float(), mr, backend="torch", **{x: kw[x] for x in kw if x != "local_window"}
    )
    assert ot.dtype == q.dtype and not torch.isnan(ot).any()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ot.float(), orf, atol=tol, rtol=tol)


def check_tau_zero_padding() -> None:
    q, k, v, _ = _inputs(2, 2, 1, 100, 100, 64, torch.float32, None, seed=7)
    kpm = torch.ones(2, 100, dtype=torch.bool)
    kpm[1, :60] = False  # left padding: rows 0..59 of batch 1 see no real key
    out = sale_attention(q, k, v, tau=0.0, key_padding_mask=kpm, block_q=32, block_k=32, backend="triton")
    ref = naive.dense_attention_ref(q, k, v, key_padding_mask=kpm)
    assert not torch.isnan(out).any()
    assert out[1, :, :60].abs().max() == 0
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def check_row_stride_keeps_forced_blocks_seen_by_unscored_rows() -> None:
    """With ``row_stride > 1`` a forced block visible only to an unscored row is still kept.

    Left padding of 31 keys: the first real key (31) sits in key block 1 (keys 16..31) and is seen, in
    query block 0 (rows 0..31), only by row 31, which ``row_stride=2`` does not score. A prefill one token
    after the cache (``Sk = Sq + 1``): the last row of each 32-row block is the only one that sees the
    first key of the next 16-key block (its own token). Both blocks are forced (sink, diagonal).
    """
    torch.manual_seed(11)
    kw = dict(tau=0.5, block_q=32, block_k=16, row_stride=2, local_window=0)
    q, k, v = (torch.randn(1, 1, 64, 64) for _ in range(3))
    kpm = torch.ones(1, 64, dtype=torch.bool)
    kpm[0, :31] = False
    q2, k2, v2 = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 65, 64), torch.randn(1, 1, 65, 64)
    for q_, k_, v_, pad in ((q, k, v, kpm), (q2, k2, v2, None)):
        mt = sale_block_mask(q_, k_, backend="triton", key_padding_mask=pad, **kw)
        mr = sale_block_mask(q_, k_, backend="torch", key_padding_mask=pad, **kw)
        assert torch.equal(mt, mr), (mt.int(), mr.int())
        out = sale_attention(q_, k_, v_, backend="triton", key_padding_mask=pad, **kw)
        # the rows' own (diagonal) key and the first real key are never dropped
        ref = naive.block_sparse_attention_ref(q_, k_, v_, mr, block_q=32, block_k=16, key_padding_mask=pad)
        torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert mt[0, 0, 0, 2] and mr[0, 0, 0, 2]


def check_huge_sink_and_window() -> None:
    """``sink_blocks`` / ``local_window`` past the sequence (e.g. 2**31 - 1 for "keep them all") mean "every
    block": the same mask as the reference (the kernel's int32 block arithmetic overflowed on them)."""
    torch.manual_seed(12)
    q, k = torch.randn(1, 1, 64, 64), torch.randn(1, 1, 100, 64)
    kpm = torch.ones(1, 100, dtype=torch.bool)
    kpm[0, :20] = False  # the first real key is in block 1: s0 + sink_blocks overflowed
    for causal, sink, window in ((True, 2**31 - 1, 0), (False, 0, 2**31 - 1)):
        kw = dict(tau=0.9, block_q=32, block_k=16, causal=causal, sink_blocks=sink, local_window=window)
        mt = sale_block_mask(q, k, backend="triton", key_padding_mask=kpm, **kw)
        mr = sale_block_mask(q, k, backend="torch", key_padding_mask=kpm, **kw)
        assert torch.equal(mt, mr), (mt.int(), mr.int())


def case_id(c) -> str:
    return f"{'c' if c[6] else 'nc'}-{str(c[7]).split('.')[-1]}-{c[10]}-rs{c[11]}"


def run_all() -> dict[str, str | None]:
    torch.set_num_threads(1)
    jobs = {case_id(c): (lambda c=c: check_case(c)) for c in CASES}
    jobs["tau0-padding"] = check_tau_zero_padding
    jobs["rowstride-forced-unscored"] = check_row_stride_keeps_forced_blocks_seen_by_unscored_rows
    jobs["huge-sink-window"] = check_huge_sink_and_window
    res: dict[str, str | None] = {}
    for name, fn in jobs.items():
        try:
            fn()
            res[name] = None
        except Exception:  # report every failure with its traceback
            res[name] = traceback.format_exc(limit=4)
    return res


if __name__ == "__main__":
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("set TRITON_INTERPRET=1 before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"  # hf_ext_kernels imports triton lazily, at the first launch
    sys.stdout.write("@@RESULT@@" + json.dumps(run_all()) + "\n")
