"""Triton SALE estimate: smoothed int8 Q·Kᵀ fused with online row statistics and the RAS threshold.

Three launches:

* :func:`_quant_k_kernel` — K minus its per-(batch, KV head) mean over real keys, quantised per key
  block to int8 (``bits`` 8, or 4 emulated in int8) with one fp32 scale per block.
* :func:`_quant_q_kernel` — the scored rows of each (query block, head) to int8, one scale per block.
* :func:`_estimate_kernel` — one program per (query block, batch, ``HPC`` query heads of one GQA
  group). It visits the forced key blocks (sink, local window, diagonal) at full resolution to
  seed each row's running max ``m`` and sum ``l``, then every other visible key block in ascending
  order: int8 tensor-core dot (int32 accumulate), per-row maximum taken **in the integer domain**
  (one ``max`` per score, no conversion, no exponential; no column mask unless key padding or a
  partial non-causal tail needs one), scaled once per row, compared with the running threshold
  ``m + log(τ·l)``. Kept blocks update ``l`` at full resolution; dropped blocks through their row
  maximum only (one exponential per row and block). The kept bit goes straight to the
  ``[B, H, nQB, nKB]`` mask.

Speed (H100, Llama-8B shape, causal, row_stride 1): 140 -> 81.5 ms at 128K, 36.6 -> 20.8 ms at 64K
(``benchmarks/sale_estimate_sweep.py``). What mattered: registers (a 2-D reduction of the forced
blocks' visibility mask and the in-kernel Q quantisation pushed the kernel to 255 registers with
spills, 2 programs per SM; now 128 with ``maxnreg``, 4 programs of 4 warps per SM, whose int8 dots
overlap each other's scalar work), then no per-score column select, one exponential per row and
block. Two-heads-per-program and two-blocks-per-iteration variants are kept as launch knobs; they
did not beat one head, one block on H100.

Exactly the algorithm of :func:`.naive.sale_block_mask_ref` (``mode="online"``); results agree
except for blocks whose score lies within fp32 rounding of the threshold. Every launch variant
computes bit-identical masks.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INT_MIN = tl.constexpr(-2147483647)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _quant_k_kernel(
    K,
    MEAN,
    KPM,
    KQ,
    KS,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_qb,
    stride_qh,
    stride_qs,
    HKV,
    SK,
    NKB,
    QMAX: tl.constexpr,
    HAS_KPM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)  # int64 offsets: K may hold more than 2**31 elements
    h = (pid_bh % HKV).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_n < SK
    if HAS_KPM:
        ok = ok & (tl.load(KPM + b * SK + offs_n, mask=offs_n < SK, other=0) != 0)
    k = tl.load(
        K
        + b * stride_kb
        + h * stride_kh
        + offs_n[:, None].to(tl.int64) * stride_ks
        + offs_d[None, :] * stride_kd,
        mask=ok[:, None],
        other=0.0,
    ).to(tl.float32)
    mean = tl.load(MEAN + pid_bh * HEAD_DIM + offs_d)
    k = tl.where(ok[:, None], k - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(k), axis=1), axis=0)
    scale = tl.where(amax > 0, amax / QMAX, 1.0)
    kq = tl.floor(k / scale + 0.5)
    kq = tl.minimum(tl.maximum(kq, -QMAX), QMAX)
    tl.store(
        KQ + b * stride_qb + h * stride_qh + offs_n[:, None].to(tl.int64) * stride_qs + offs_d[None, :],
        kq.to(tl.int8),
        mask=offs_n[:, None] < SK,
    )
    tl.store(KS + pid_bh * NKB + pid_n, scale)


@triton.jit
def _quant_q_kernel(
    Q,
    QI,
    QSC,
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    H,
    SQ,
    NQB,
    QMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ROW_STRIDE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """Scored rows of one (query block, batch·head) to int8 with one scale per block.

    ``QI [B*H, nQB*BMR, D]`` int8 (BMR = BLOCK_M // ROW_STRIDE; rows past Sq are 0), ``QSC [B*H, nQB]``.
    """
    BMR: tl.constexpr = BLOCK_M // ROW_STRIDE
    qb = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 offsets: Q may hold more than 2**31 elements
    h = (pid_bh % H).to(tl.int64)
    offs_r = tl.arange(0, BMR)
    offs_m = qb * BLOCK_M + offs_r * ROW_STRIDE
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < SQ
    q = tl.load(
        Q
        + b * stride_qb
        + h * stride_qh
        + offs_m[:, None].to(tl.int64) * stride_qs
        + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None],
        other=0.0,
    ).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(q), axis=1), axis=0)
    q_scale = tl.where(amax > 0, amax / QMAX, 1.0)
    qi = tl.minimum(tl.maximum(tl.floor(q / q_scale + 0.5), -QMAX), QMAX).to(tl.int8)
    base = pid_bh.to(tl.int64) * (NQB * BMR) + qb * BMR
    tl.store(QI + (base + offs_r)[:, None] * HEAD_DIM + offs_d[None, :], qi)
    tl.store(QSC + pid_bh * NQB + qb, q_scale)


@triton.jit
def _int_dot(qi, ki, INTERP: tl.constexpr):
    # qi [R, D] int8, ki [BN, D] int8 -> [R, BN] int32
    if INTERP:
        acc = tl.dot(qi.to(tl.float32), tl.trans(ki.to(tl.float32)), input_precision="ieee").to(tl.int32)
    else:
        acc = tl.dot(qi, tl.trans(ki), out_dtype=tl.int32)
    return acc


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _keep_bits(cond, is_hi, HPC: tl.constexpr):
    """Per-program keep decision: bit ``j`` set when some row of head ``j`` (of HPC) votes keep."""
    if HPC == 1:
        bits = tl.max(cond.to(tl.int32), axis=0)
    else:
        bits = tl.reduce(cond.to(tl.int32) << is_hi, 0, _or)
    return bits


@triton.jit
def _load_kblock(kq_base, n0, offs_nb, offs_d, stride_ks, SK, COLMASK: tl.constexpr):
    offs_n = n0 + offs_nb
    ptr = kq_base + offs_n[:, None] * stride_ks + offs_d[None, :]
    if COLMASK:
        ki = tl.load(ptr, mask=offs_n[:, None] < SK, other=0)
    else:
        ki = tl.load(ptr)
    return ki


@triton.jit
def _step(
    acc,
    kb,
    m_i,
    l_i,
    row_scale,
    ks_base,
    kpm_base,
    mask_base,
    mask_hi_off,
    offs_nb,
    row_ok,
    is_hi,
    log2_tau,
    SK,
    HAS_KPM: tl.constexpr,
    COLMASK: tl.constexpr,
    HPC: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One scanned key block ``kb`` given its int32 scores ``acc [R, BLOCK_N]``: keep decision,
    exp-light update of ``(m_i, l_i)``, mask bit(s) written."""
    offs_n = kb * BLOCK_N + offs_nb
    fac = row_scale * tl.load(ks_base + kb)  # [R]
    if COLMASK:
        col_ok = offs_n < SK
        if HAS_KPM:
            col_ok = col_ok & (tl.load(kpm_base + offs_n, mask=offs_n < SK, other=0) != 0)
        acc = tl.where(col_ok[None, :], acc, _INT_MIN)
        rmax_i = tl.max(acc, axis=1)  # integer-domain row maximum: no conversion, no exp per score
        ok = row_ok & (rmax_i > _INT_MIN)
    else:
        rmax_i = tl.max(acc, axis=1)
        ok = row_ok
    smax = tl.where(ok, rmax_i.to(tl.float32) * fac, float("-inf"))
    thr = m_i + tl.log2(tl.maximum(l_i, 1e-30)) + log2_tau  # l_i >= 1 once m_i is finite
    bits = _keep_bits(smax > thr, is_hi, HPC)
    # exp-light update with one exponential per row: only one of the rescale factor and the added
    # term differs from 1 (bit-identical to alpha = exp2(m - m_new), add = exp2(smax - m_new))
    up = smax > m_i
    m_fin = tl.where(m_i == float("-inf"), 0.0, m_i)
    e = tl.exp2(-tl.abs(smax - m_fin))
    alpha = tl.where(up, e, 1.0)
    add = tl.where(up, 1.0, e)
    if bits != 0:  # rare: some row keeps the block -> its rows absorb it at full resolution
        m_use = tl.where(up, smax, m_fin)
        if COLMASK:
            s_ok = row_ok[:, None] & col_ok[None, :]
        else:
            s_ok = row_ok[:, None]
        s = tl.where(s_ok, acc.to(tl.float32) * fac[:, None], float("-inf"))
        full = tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        if HPC == 1:
            add = full
        else:
            add = tl.where(((bits >> is_hi) & 1) != 0, full, add)
    tl.store(mask_base + kb, (bits & 1).to(tl.int8))
    if HPC == 2:
        tl.store(mask_base + mask_hi_off + kb, ((bits >> 1) & 1).to(tl.int8))
    l_new = l_i * alpha + add
    return tl.maximum(m_i, smax), l_new


@triton.jit
def _scan(
    qi,
    m_i,
    l_i,
    kb_start,
    kb_end,
    kq_base,
    ks_base,
    kpm_base,
    mask_base,
    mask_hi_off,
    offs_nb,
    offs_d,
    stride_ks,
    row_ok,
    is_hi,
    row_scale,
    log2_tau,
    SK,
    HAS_KPM: tl.constexpr,
    COLMASK: tl.constexpr,
    HPC: tl.constexpr,
    PAIR: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Visit key blocks [kb_start, kb_end) in order: decide keep, update (m_i, l_i), write the bit(s).

    ``PAIR`` 0: one key block per iteration; 1: two adjacent blocks per iteration (two dots, then the
    two blocks' decisions in order); 2: one ``2*BLOCK_N``-wide dot split into the two blocks.
    """
    # what every _step call shares (constexprs apart)
    st = (row_scale, ks_base, kpm_base, mask_base, mask_hi_off, offs_nb, row_ok, is_hi, log2_tau, SK)
    if PAIR == 0:
        for kb in range(kb_start, kb_end):
            ki = _load_kblock(kq_base, kb * BLOCK_N, offs_nb, offs_d, stride_ks, SK, COLMASK)
            acc = _int_dot(qi, ki, INTERP)
            m_i, l_i = _step(acc, kb, m_i, l_i, *st, HAS_KPM, COLMASK, HPC, BLOCK_N)
    else:
        n = tl.maximum(kb_end - kb_start, 0)
        for p in range(0, n // 2):
            kb = kb_start + 2 * p
            if PAIR == 1:
                k0 = _load_kblock(kq_base, kb * BLOCK_N, offs_nb, offs_d, stride_ks, SK, COLMASK)
                k1 = _load_kblock(kq_base, (kb + 1) * BLOCK_N, offs_nb, offs_d, stride_ks, SK, COLMASK)
                a0 = _int_dot(qi, k0, INTERP)
                a1 = _int_dot(qi, k1, INTERP)
            else:
                offs_2n = tl.arange(0, 2 * BLOCK_N)
                kk = _load_kblock(kq_base, kb * BLOCK_N, offs_2n, offs_d, stride_ks, SK, COLMASK)
                a = _int_dot(qi, kk, INTERP)  # [R, 2*BLOCK_N]
                a0, a1 = tl.split(tl.permute(tl.reshape(a, [a.shape[0], 2, BLOCK_N]), [0, 2, 1]))
            m_i, l_i = _step(a0, kb, m_i, l_i, *st, HAS_KPM, COLMASK, HPC, BLOCK_N)
            m_i, l_i = _step(a1, kb + 1, m_i, l_i, *st, HAS_KPM, COLMASK, HPC, BLOCK_N)
        if n % 2 == 1:
            kb = kb_end - 1
            ki = _load_kblock(kq_base, kb * BLOCK_N, offs_nb, offs_d, stride_ks, SK, COLMASK)
            acc = _int_dot(qi, ki, INTERP)
            m_i, l_i = _step(acc, kb, m_i, l_i, *st, HAS_KPM, COLMASK, HPC, BLOCK_N)
    return m_i, l_i


@triton.jit
def _forced(
    m_i,
    l_i,
    kb_start,
    kb_end,
    qi,
    kq_base,
    ks_base,
    kpm_base,
    mask_base,
    mask_hi_off,
    offs_nb,
    offs_d,
    offs_m,
    stride_ks,
    row_ok,
    row_scale,
    SK,
    OFF,
    QE,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    HPC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    INTERP: tl.constexpr,
):
    """Forced key blocks [kb_start, kb_end): full-resolution statistics, bit set where visible.

    ``QE`` is the query block's last real row: the block is visible when some key of it is visible to
    that row (the most permissive one), whether or not the row is scored (``row_stride > 1``).
    """
    for kb in range(kb_start, kb_end):
        offs_n = kb * BLOCK_N + offs_nb
        ki = tl.load(
            kq_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=offs_n[:, None] < SK, other=0
        )
        acc = _int_dot(qi, ki, INTERP)
        col_ok = offs_n < SK
        if HAS_KPM:
            col_ok = col_ok & (tl.load(kpm_base + offs_n, mask=offs_n < SK, other=0) != 0)
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + OFF)
            col_ok = col_ok & (offs_n <= QE + OFF)
        fac = row_scale * tl.load(ks_base + kb)
        s = tl.where(valid, acc.to(tl.float32) * fac[:, None], float("-inf"))
        smax = tl.max(s, axis=1)
        m_new = tl.maximum(m_i, smax)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_use) + tl.sum(tl.exp2(s - m_use[:, None]), axis=1)
        m_i = m_new
        # some (row, key) pair visible <=> some key visible to the last row: a 1-D reduction (a 2-D one
        # of `valid` would cost ~90 registers, and with row_stride > 1 the scored rows alone would miss
        # keys only an unscored row sees); visibility is the same for every head of the program
        if tl.max(col_ok.to(tl.int32), axis=0) > 0:
            tl.store(mask_base + kb, 1)
            if HPC == 2:
                tl.store(mask_base + mask_hi_off + kb, 1)
    return m_i, l_i


@triton.jit
def _estimate_kernel(
    QI,
    QSC,
    KQ,
    KS,
    KPM,
    FIRST,
    TAU,
    MASK,
    stride_kb,
    stride_kh,
    stride_ks,
    H,
    G,
    SQ,
    SK,
    NQB,
    NKB,
    OFF,
    sm_scale_log2,
    SINK_BLOCKS,
    WINDOW,
    CAUSAL: tl.constexpr,
    HAS_KPM: tl.constexpr,
    COLMASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    INTERP: tl.constexpr,
    ROW_STRIDE: tl.constexpr,
    HPC: tl.constexpr,
    PAIR: tl.constexpr,
):
    BMR: tl.constexpr = BLOCK_M // ROW_STRIDE  # scored rows per query block and head
    R: tl.constexpr = HPC * BMR  # rows of the program: HPC heads of one GQA group, same query block
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if CAUSAL:
        qb = NQB - 1 - pid_m  # heaviest query blocks first
    else:
        qb = pid_m
    HP = H // HPC
    b = pid_bh // HP
    h0 = (pid_bh % HP) * HPC
    hk = h0 // G
    qs = qb * BLOCK_M
    offs_r = tl.arange(0, R)
    is_hi = offs_r // BMR  # which of the program's heads a row belongs to (0 when HPC == 1)
    offs_m = qs + (offs_r % BMR) * ROW_STRIDE  # scored query rows
    offs_d = tl.arange(0, HEAD_DIM)
    offs_nb = tl.arange(0, BLOCK_N)
    row_ok = offs_m < SQ
    head_r = h0 + is_hi

    # ---- the pre-quantised Q block(s) (see _quant_q_kernel): int8 rows and one scale per (head, block)
    bh_r = (b * H + head_r).to(tl.int64)
    qi = tl.load(QI + (bh_r * (NQB * BMR) + qb * BMR + offs_r % BMR)[:, None] * HEAD_DIM + offs_d[None, :])
    row_scale = tl.load(QSC + bh_r * NQB + qb) * sm_scale_log2

    kq_base = KQ + b.to(tl.int64) * stride_kb + hk.to(tl.int64) * stride_kh
    ks_base = KS + (b * (H // G) + hk) * NKB
    kpm_base = KPM + b * SK
    mask_base = MASK + ((b * H + h0).to(tl.int64) * NQB + qb) * NKB  # the mask may exceed 2**31 bytes
    mask_hi_off = NQB * NKB  # next head's mask
    log2_tau = tl.load(TAU + head_r)  # log2(tau) per row's head, -inf for tau = 0

    # ---- block ranges
    qe = tl.minimum(qs + BLOCK_M, SQ) - 1  # forced/visible ranges follow the whole block
    s0 = tl.minimum(tl.load(FIRST + b) // BLOCK_N, NKB)
    s1 = tl.minimum(s0 + SINK_BLOCKS, NKB)
    lo = qs + OFF - WINDOW
    if CAUSAL:
        hi = qe + OFF
    else:
        hi = qe + OFF + WINDOW
    kb_lo = tl.maximum(lo, 0) // BLOCK_N
    kb_hi = tl.where(hi >= 0, tl.minimum(hi // BLOCK_N, NKB - 1), -1)
    if CAUSAL:
        kb_vis = tl.where(qe + OFF >= 0, tl.minimum((qe + OFF) // BLOCK_N, NKB - 1), -1)
    else:
        kb_vis = NKB - 1

    m_i = tl.full([R], float("-inf"), tl.float32)
    l_i = tl.zeros([R], tl.float32)

    # ---- phase 1: forced blocks (sink, then local window + diagonal, ascending) at full resolution
    # (the arguments every call shares go in one tuple, splat once per call as the GPU-verified version did;
    # the constexprs stay explicit)
    fargs = (qi, kq_base, ks_base, kpm_base, mask_base, mask_hi_off, offs_nb, offs_d, offs_m, stride_ks, row_ok,
             row_scale, SK, OFF, qe)  # fmt: skip
    f_sink = tl.minimum(s1, kb_vis + 1)
    m_i, l_i = _forced(m_i, l_i, s0, f_sink, *fargs, CAUSAL, HAS_KPM, HPC, BLOCK_N, INTERP)
    f_hi = tl.minimum(kb_hi + 1, s0)
    m_i, l_i = _forced(m_i, l_i, kb_lo, f_hi, *fargs, CAUSAL, HAS_KPM, HPC, BLOCK_N, INTERP)
    f_lo = tl.maximum(kb_lo, s1)
    m_i, l_i = _forced(m_i, l_i, f_lo, kb_hi + 1, *fargs, CAUSAL, HAS_KPM, HPC, BLOCK_N, INTERP)

    # ---- phase 2: other visible blocks, ascending, sink excluded; exp-light statistics for dropped
    # blocks. causal: [0, kb_lo) (fully below the diagonal, no causal test); non-causal also (kb_hi, NKB).
    sargs = (kq_base, ks_base, kpm_base, mask_base, mask_hi_off, offs_nb, offs_d, stride_ks, row_ok, is_hi,
             row_scale, log2_tau, SK)  # fmt: skip
    n_lo = tl.minimum(kb_lo, kb_vis + 1)
    s_hi = tl.minimum(n_lo, s0)
    m_i, l_i = _scan(qi, m_i, l_i, 0, s_hi, *sargs, HAS_KPM, COLMASK, HPC, PAIR, BLOCK_N, HEAD_DIM, INTERP)
    m_i, l_i = _scan(qi, m_i, l_i, s1, n_lo, *sargs, HAS_KPM, COLMASK, HPC, PAIR, BLOCK_N, HEAD_DIM, INTERP)
    if not CAUSAL:
        t0 = kb_hi + 1
        t_hi = tl.minimum(NKB, s0)
        m_i, l_i = _scan(
            qi, m_i, l_i, t0, t_hi, *sargs, HAS_KPM, COLMASK, HPC, PAIR, BLOCK_N, HEAD_DIM, INTERP
        )
        t_lo = tl.maximum(t0, s1)
        m_i, l_i = _scan(
            qi, m_i, l_i, t_lo, NKB, *sargs, HAS_KPM, COLMASK, HPC, PAIR, BLOCK_N, HEAD_DIM, INTERP
        )


def _kmean(k: torch.Tensor, kpm: torch.Tensor | None) -> torch.Tensor:
    """``[B, Hkv, D]`` fp32 mean of K over real keys."""
    if kpm is None:
        return k.sum(dim=2, dtype=torch.float32) / max(k.shape[2], 1)
    m = kpm[:, None, :, None]
    cnt = kpm.sum(dim=1).clamp_min(1).to(torch.float32)[:, None, None]
    return (k * m.to(k.dtype)).sum(dim=2, dtype=torch.float32) / cnt


def quantize_k(
    k: torch.Tensor, *, block_k: int, bits: int, key_padding_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed int8 K ``[B, Hkv, Sk, D]`` and per-block scales ``[B, Hkv, nKB]`` (fp32)."""
    bsz, hkv, sk, d = k.shape
    nkb = triton.cdiv(sk, block_k)
    mean = _kmean(k, key_padding_mask).contiguous()
    kq = torch.empty((bsz, hkv, sk, d), dtype=torch.int8, device=k.device)
    ks = torch.empty((bsz, hkv, nkb), dtype=torch.float32, device=k.device)
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else kq
    _quant_k_kernel[(nkb, bsz * hkv)](
        k,
        mean,
        kpm,
        kq,
        ks,
        *k.stride(),
        kq.stride(0),
        kq.stride(1),
        kq.stride(2),
        hkv,
        sk,
        nkb,
        QMAX=float(2 ** (bits - 1) - 1),
        HAS_KPM=key_padding_mask is not None,
        BLOCK_N=block_k,
        HEAD_DIM=d,
        num_warps=4,
    )
    return kq, ks


def _first_real(kpm: torch.Tensor | None, bsz: int, sk: int, device) -> torch.Tensor:
    if kpm is None:
        return torch.zeros(bsz, dtype=torch.int32, device=device)
    has = kpm.any(dim=1)
    first = kpm.to(torch.int8).argmax(dim=1)
    return torch.where(has, first, torch.full_like(first, sk)).to(torch.int32)


# Launch configuration of the estimate per (head_dim, block_q // row_stride, block_k) on Hopper:
# (heads per program, pair mode, num_warps, num_stages, maxnreg). From benchmarks/sale_estimate_sweep.py.
# H100, triton 3.6, Llama-8B shape, 64K/128K causal: 128 registers -> 4 programs of 4 warps per SM.
_TUNED: dict[tuple[int, int, int], tuple[int, int, int, int, int | None]] = {
    (128, 128, 64): (1, 0, 4, 3, 128),  # row_stride 1: 20.8 / 81.5 ms at 64K / 128K (was 36.6 / 140.3)
    (128, 64, 64): (2, 0, 4, 3, 128),  # row_stride 2: 41.5 ms at 128K
}
_FALLBACK = (1, 0, 4, 3, None)


def _config(d: int, rows: int, block_k: int, g: int) -> tuple[int, int, int, int, int | None]:
    hpc, pair, warps, stages, maxnreg = _TUNED.get((d, rows, block_k), _FALLBACK)
    if g % hpc != 0:
        hpc = 1
    return hpc, pair, warps, stages, maxnreg


def sale_estimate(
    q: torch.Tensor,
    k: torch.Tensor,
    tau: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    sink_blocks: int,
    local_window: int,
    causal: bool,
    scale: float,
    bits: int,
    key_padding_mask: torch.Tensor | None,
    row_stride: int = 1,
    num_warps: int | None = None,
    num_stages: int | None = None,
    heads_per_program: int | None = None,
    pair: int | None = None,
    maxnreg: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the estimate. Returns ``(mask bool [B, H, nQB, nKB], mask_u8 int8 view of the same memory)``.

    ``tau`` is a ``[H]`` fp32 tensor on q's device (validated by :mod:`.ops`). The launch knobs
    (``num_warps``, ``num_stages``, ``heads_per_program`` 1/2: query heads of one GQA group scored
    by one program against one K tile, ``pair`` 0/1/2: key blocks per loop iteration, see
    :func:`_scan`, ``maxnreg``: register cap per thread, 0 = none) change speed only, never the mask;
    ``None`` takes the tuned default.
    """
    bsz, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    nqb, nkb = triton.cdiv(sq, block_q), triton.cdiv(sk, block_k)
    mask = torch.zeros((bsz, h, nqb, nkb), dtype=torch.int8, device=q.device)
    if sq == 0 or sk == 0:
        return mask.view(torch.bool), mask
    kq, ks = quantize_k(k, block_k=block_k, bits=bits, key_padding_mask=key_padding_mask)
    kpm = key_padding_mask.to(torch.int8).contiguous() if key_padding_mask is not None else kq
    first = _first_real(key_padding_mask, bsz, sk, q.device)
    interp = _interpret()
    hpc, pr, nw, ns, mr = _config(d, block_q // row_stride, block_k, g)
    hpc = hpc if heads_per_program is None else heads_per_program
    pr = pr if pair is None else pair
    nw = nw if num_warps is None else num_warps
    ns = ns if num_stages is None else num_stages
    mr = mr if maxnreg is None else (maxnreg or None)
    if hpc not in (1, 2) or g % hpc != 0:
        raise ValueError(f"heads_per_program must be 1 or 2 and divide H // Hkv = {g}, got {hpc}")
    if pr not in (0, 1, 2):
        raise ValueError(f"pair must be 0, 1 or 2, got {pr}")
    launch = {"num_warps": nw, "num_stages": ns}
    if interp:
        launch["num_stages"] = 1
    elif mr:
        launch["maxnreg"] = mr  # fewer registers -> more resident programs per SM
    # scanned key blocks need a column mask only with key padding, or past Sk (non-causal tail)
    colmask = key_padding_mask is not None or (not causal and sk % block_k != 0)
    rows = block_q // row_stride
    qi = torch.empty((bsz * h, nqb * rows, d), dtype=torch.int8, device=q.device)
    qsc = torch.empty((bsz * h, nqb), dtype=torch.float32, device=q.device)
    qmax = float(2 ** (bits - 1) - 1)
    _quant_q_kernel[(nqb, bsz * h)](
        q,
        qi,
        qsc,
        *q.stride(),
        h,
        sq,
        nqb,
        QMAX=qmax,
        BLOCK_M=block_q,
        ROW_STRIDE=row_stride,
        HEAD_DIM=d,
        num_warps=4,
    )
    _estimate_kernel[(nqb, bsz * h // hpc)](
        qi,
        qsc,
        kq,
        ks,
        kpm,
        first,
        torch.log2(tau.to(torch.float32)).contiguous(),
        mask,
        kq.stride(0),
        kq.stride(1),
        kq.stride(2),
        h,
        g,
        sq,
        sk,
        nqb,
        nkb,
        sk - sq,
        scale * _LOG2E,
        min(sink_blocks, nkb),  # larger values change nothing but overflow the kernel's int32 block math
        min(local_window, sq + sk),
        CAUSAL=causal,
        HAS_KPM=key_padding_mask is not None,
        COLMASK=colmask,
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        HEAD_DIM=d,
        INTERP=interp,
        ROW_STRIDE=row_stride,
        HPC=hpc,
        PAIR=pr,
        **launch,
    )
    return mask.view(torch.bool), mask


__all__ = ["quantize_k", "sale_estimate"]
