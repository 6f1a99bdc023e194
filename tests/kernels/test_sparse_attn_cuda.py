"""SALE Triton kernels on a real GPU against the torch references, at prefill-sized shapes.

Marked ``gpu`` (skipped by default; on the device machine: ``python -m pytest -m gpu tests``). The CPU suite
checks the same kernels through Triton's interpreter on small shapes (``test_sparse_attn_triton.py``); this file
covers what the interpreter cannot: compiled code, the default 128 x 64 blocks, thousands of tokens, GQA up to
8:1, bf16/fp16 inputs, odd lengths, padding, a prefill after cached tokens and the 4-bit / row-strided estimates.
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("needs CUDA with compiled Triton (TRITON_INTERPRET unset)", allow_module_level=True)

from hf_ext_kernels.sparse_attn import (  # noqa: E402
    DEFAULT_BLOCK_K,
    DEFAULT_BLOCK_Q,
    block_sparse_attention,
    naive,
    sale_attention,
    sale_block_mask,
)
from hf_ext_kernels.sparse_attn.inputs import structured_qkv  # noqa: E402

DEV = "cuda"
# (name, B, H, Hkv, Sq, Sk, D, causal, dtype, block_q, block_k, padding, row_stride, bits)
CASES = [
    ("gqa4-bf16-4k-default-blocks", 1, 8, 2, 4096, 4096, 128, True, torch.bfloat16, 128, 64, None, 1, 8),
    ("gqa8-fp16-odd-3001", 1, 8, 1, 3001, 3001, 128, True, torch.float16, 128, 64, None, 1, 8),
    ("mha-bf16-d64-left-pad", 2, 4, 4, 1777, 1777, 64, True, torch.bfloat16, 64, 64, "left", 1, 8),
    ("gqa2-fp16-chunked-prefill", 2, 4, 2, 1000, 2500, 128, True, torch.float16, 128, 64, "right", 1, 8),
    ("noncausal-fp32-holes", 1, 4, 2, 1500, 1500, 64, False, torch.float32, 64, 128, "holes", 1, 8),
    ("bits4-rowstride4-bf16", 1, 8, 2, 2048, 2048, 128, True, torch.bfloat16, 128, 64, None, 4, 4),
    ("small-blocks-rowstride2", 2, 2, 1, 999, 999, 64, True, torch.bfloat16, 32, 16, "left", 2, 8),
]
LOCAL_WINDOW = 128


def _inputs(b, h, hkv, sq, sk, d, dtype, padding, seed):
    q, k, v = structured_qkv(b, h, hkv, max(sq, sk), d, seed=seed, dtype=torch.float32, device=DEV)
    q = q[:, :, -sq:].to(dtype).contiguous()
    k, v = k[:, :, :sk].to(dtype).contiguous(), v[:, :, :sk].to(dtype).contiguous()
    kpm = None
    if padding is not None:
        kpm = torch.ones(b, sk, dtype=torch.bool, device=DEV)
        if padding == "left":
            kpm[0, : sk // 3] = False
        elif padding == "right":
            kpm[-1, -(sk // 5) :] = False
        else:  # holes: not a contiguous run
            kpm[0, 300:417] = False
            kpm[0, 1200:1203] = False
    return q, k, v, kpm


def _tol(dtype: torch.dtype) -> float:
    return 2e-4 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_estimate_and_sparse_attention_match_reference(case):
    _, b, h, hkv, sq, sk, d, causal, dtype, bq, bk, padding, rs, bits = case
    q, k, v, kpm = _inputs(b, h, hkv, sq, sk, d, dtype, padding, seed=sq + sk)
    sel = dict(causal=causal, block_q=bq, block_k=bk, key_padding_mask=kpm, row_stride=rs, bits=bits)
    tau = torch.linspace(0.002, 0.05, h)  # per-head thresholds
    mt = sale_block_mask(q, k, tau=tau, backend="triton", local_window=LOCAL_WINDOW, **sel)
    mr = sale_block_mask(q, k, tau=tau, backend="torch", local_window=LOCAL_WINDOW, **sel)
    assert mt.shape == mr.shape == (b, h, -(-sq // bq), -(-sk // bk)) and mt.dtype == torch.bool
    # identical up to scores within fp32 rounding of the threshold
    assert (mt != mr).float().mean() <= 0.01, int((mt != mr).sum())
    density = mr.float().mean().item()
    assert density < 0.9, density  # the selection drops blocks; not only forced ones kept
    comp = dict(causal=causal, block_q=bq, block_k=bk, key_padding_mask=kpm)
    out = block_sparse_attention(q, k, v, mr, backend="triton", **comp)
    ref = naive.block_sparse_attention_ref(q.float(), k.float(), v.float(), mr, **comp)
    assert out.dtype == dtype and out.shape == q.shape and not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), ref, atol=_tol(dtype), rtol=_tol(dtype))


@pytest.mark.parametrize("case", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_tau_zero_is_dense_attention(case):
    """``tau = 0`` keeps every visible block: SALE equals dense attention (rows with no real key give 0)."""
    _, b, h, hkv, sq, sk, d, causal, dtype, bq, bk, padding, _, _ = case
    q, k, v, kpm = _inputs(b, h, hkv, sq, sk, d, dtype, padding, seed=7)
    out, mask = sale_attention(
        q, k, v, tau=0.0, causal=causal, key_padding_mask=kpm, block_q=bq, block_k=bk, return_mask=True
    )
    vis = naive.visible_block_mask(sq, sk, bq, bk, causal=causal, key_padding_mask=kpm, device=DEV)
    assert torch.equal(mask, vis[:, None].expand_as(mask))
    ref = naive.dense_attention_ref(q.float(), k.float(), v.float(), causal=causal, key_padding_mask=kpm)
    torch.testing.assert_close(out.float(), ref, atol=_tol(dtype), rtol=_tol(dtype))


def test_default_blocks_and_sparse_error_on_a_long_prompt():
    """The defaults (128 x 64 blocks) at 16k tokens: density well below 1, output close to dense SDPA."""
    assert (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K) == (128, 64)
    q, k, v = structured_qkv(1, 8, 2, 16384, 128, seed=3, device=DEV)
    out, mask = sale_attention(q, k, v, tau=0.01, return_mask=True)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True
    )
    density = mask.float().mean().item()
    o, r = out.float().flatten(), dense.float().flatten()
    cos = torch.nn.functional.cosine_similarity(o, r, dim=0).item()
    rel = ((o - r).norm() / r.norm()).item()
    assert density < 0.5 and cos >= 0.995 and rel < 0.08, (density, cos, rel)


def test_estimate_reads_q_past_2_31_elements():
    """Q with more than 2**31 elements (16448 heads x 1024 x 128, 4.3 GB): the last heads' masks equal the
    masks of the same heads estimated alone (the Q quantisation addressed Q with int32 offsets, which wrap)."""
    h, s, d = 16448, 1024, 128
    assert h * s * d > 2**31
    g = torch.Generator(device=DEV).manual_seed(0)
    k = torch.randn(1, 1, s, d, device=DEV, generator=g, dtype=torch.bfloat16)
    q = torch.zeros(1, h, s, d, device=DEV, dtype=torch.bfloat16)
    q[:, -4:] = k[:, :, torch.randint(0, s, (s,), generator=g, device=DEV)] * 2  # keys worth selecting
    q[:, :4] = q[:, -4:]
    kw = dict(tau=0.05, block_q=128, block_k=64, local_window=64, backend="triton")
    big = sale_block_mask(q, k, **kw)
    alone = sale_block_mask(q[:, -4:].contiguous(), k, **kw)
    assert alone.float().mean() < 0.9
    assert torch.equal(big[:, -4:], alone)
    assert torch.equal(big[:, :4], alone)


def test_estimate_writes_a_mask_past_2_31_bytes():
    """A block mask of more than 2**31 entries (360 heads x 2500 x 2500 blocks of 16): the last heads' masks
    equal those of the same heads estimated alone (the mask was addressed with int32 offsets)."""
    h, s, d, blk = 360, 40000, 64, 16
    assert h * (s // blk) ** 2 > 2**31
    g = torch.Generator(device=DEV).manual_seed(1)
    k = torch.randn(1, 1, s, d, device=DEV, generator=g, dtype=torch.bfloat16)
    q = torch.randn(1, 2, s, d, device=DEV, generator=g, dtype=torch.bfloat16).repeat(1, h // 2, 1, 1)
    kw = dict(tau=0.05, block_q=blk, block_k=blk, local_window=64, backend="triton")
    big = sale_block_mask(q, k, **kw)
    alone = sale_block_mask(q[:, -2:].contiguous(), k, **kw)
    assert torch.equal(big[:, -2:], alone)
    assert torch.equal(big[:, :2], alone)


@pytest.mark.multi_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_tensors_on_a_gpu_other_than_the_current_one():
    """Inputs on ``cuda:1`` while ``cuda:0`` is current (a layer placed by ``device_map="auto"``): the kernels
    run on the inputs' GPU (Triton launches on the current device, so they failed or read foreign memory)."""
    torch.cuda.set_device(0)
    q, k, v = structured_qkv(1, 4, 2, 1000, 128, seed=5, device="cuda:1")
    kpm = torch.ones(1, 1000, dtype=torch.bool, device="cuda:1")
    kpm[0, :100] = False
    kw = dict(tau=0.01, key_padding_mask=kpm, block_q=128, block_k=64)
    out, mask = sale_attention(q, k, v, backend="triton", return_mask=True, **kw)
    assert out.device == mask.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    ref_mask = sale_block_mask(q, k, backend="torch", **kw)
    assert (mask != ref_mask).float().mean() <= 0.01
    ref = naive.block_sparse_attention_ref(q.float(), k.float(), v.float(), mask, key_padding_mask=kpm)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
