"""Torch references for SALE: quantised score estimate, block selection, block-sparse attention.

Everything here is plain PyTorch (any device, any head dim) and defines, element for element, what
the Triton kernels in :mod:`quant_score` and :mod:`block_sparse` compute. Layouts follow transformers:
``q [B, H, Sq, D]``, ``k``/``v`` ``[B, Hkv, Sk, D]`` with ``H % Hkv == 0`` (GQA: query head ``h`` reads
KV head ``h // (H // Hkv)``; K/V are never repeated in memory).

Visibility. Query ``i`` may attend key ``j`` when ``key_padding_mask[b, j]`` is True and, if causal,
``j <= i + Sk - Sq`` (bottom-right alignment, as for a prefill after ``Sk - Sq`` cached tokens).
A query row with no visible key outputs zeros.

Block selection (SALE, "Relative Attention Score"), per (batch, head, query block ``qb``):

1. Smooth K: subtract the per-(batch, KV head) mean of K over the real (unpadded) keys; softmax is
   shift-invariant per row, so this changes no ranking but shrinks K's range before quantisation.
2. Quantise Q per (head, query block) and smoothed K per (KV head, key block) symmetrically to
   ``bits`` (8 or 4; 4 is emulated in int8 storage) with scale ``amax / (2**(bits-1) - 1)`` and
   rounding ``floor(x / scale + 0.5)``. Approximate score ``s_ij = (q̂_i · k̂_j) * s_q * s_k * scale``.
3. Forced blocks are always kept: the sink (the first ``sink_blocks`` key blocks from the first real
   key), and every key block overlapping the local window ``[i0 + off - local_window, i1 + off]``
   (``off = Sk - Sq``, ``i0..i1`` the block's rows; for non-causal attention the window is also
   extended ``local_window`` keys past the aligned diagonal). Forced blocks seed each row's online
   statistics at full resolution: ``m_i = max s_ij``, ``l_i = sum exp(s_ij - m_i)``.
4. The remaining visible key blocks are visited in ascending order. Block ``kb`` is important for
   row ``i`` when ``max_{j in kb} s_ij > m_i + ln(tau_h * l_i)`` with the running ``m_i, l_i``; the
   pair ``(qb, kb)`` is kept when any valid row of ``qb`` finds it important. Then the statistics
   absorb the block: a kept block at full resolution (``sum_j exp(s_ij - m_i)``), a dropped block
   through its row maximum only (``exp(max_j s_ij - m_i)``, one exponential per row and block: the
   "exp-light" lower bound). Running statistics are lower bounds of the final ones, so the
   threshold is never higher than the two-pass definition's: this keeps a superset of what
   :func:`sale_block_mask_ref` with ``mode="exact"`` keeps (given the same quantised scores).

``tau -> 0`` keeps every visible block (the output then equals dense attention).

Example:
    >>> import torch
    >>> q, k, v = (torch.randn(1, 2, 100, 16) for _ in range(3))
    >>> mask = sale_block_mask_ref(q, k, tau=0.0, block_q=32, block_k=32)
    >>> out = block_sparse_attention_ref(q, k, v, mask, block_q=32, block_k=32)
    >>> ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    >>> bool(torch.allclose(out, ref, atol=1e-5))
    True
"""

from __future__ import annotations

import math
import numbers

import torch

__all__ = [
    "block_sparse_attention_ref",
    "check_causal",
    "dense_attention_ref",
    "forced_block_mask",
    "quantize_blocks",
    "sale_block_mask_ref",
    "smooth_k",
    "visible_block_mask",
    "visibility",
]


# ----------------------------------------------------------------------------------------- helpers
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def check_causal(causal: object, name: str = "causal") -> bool:
    """``causal`` as a Python bool: accepts ``True``/``False``, numpy bools and the ints 0 / 1.

    Anything else (a string such as ``"no"``, ``None``, a float, a tensor) raises ``ValueError`` naming ``name``:
    a plain truth test would treat ``"no"`` as causal.

    Example:
        >>> check_causal(1), check_causal(False)
        (True, False)
    """
    if isinstance(causal, bool):
        return causal
    kind = type(causal)
    if kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"):
        return bool(causal)
    if isinstance(causal, numbers.Integral) and causal in (0, 1):
        return bool(causal)
    raise ValueError(f"{name} must be a bool (True / False, or 0 / 1), got {causal!r} ({kind.__name__})")


def visibility(
    sq: int, sk: int, *, causal: bool, key_padding_mask: torch.Tensor | None = None, device=None
) -> torch.Tensor:
    """Token-level visibility ``[B or 1, Sq, Sk]`` (bool): key padding and bottom-right causal."""
    causal = check_causal(causal)
    if key_padding_mask is not None:
        device = key_padding_mask.device
    vis = torch.ones(1, sq, sk, dtype=torch.bool, device=device)
    if causal:
        i = torch.arange(sq, device=device)[:, None]
        j = torch.arange(sk, device=device)[None, :]
        vis = vis & (j <= i + (sk - sq))[None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.bool()[:, None, :]
    return vis


def visible_block_mask(
    sq: int,
    sk: int,
    block_q: int,
    block_k: int,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """``[B or 1, nQB, nKB]`` bool: block pairs holding at least one visible (query, key) pair."""
    vis = visibility(sq, sk, causal=causal, key_padding_mask=key_padding_mask, device=device)
    nqb, nkb = _cdiv(sq, block_q), _cdiv(sk, block_k)
    pad = (0, nkb * block_k - sk, 0, nqb * block_q - sq)
    v = torch.nn.functional.pad(vis.float(), pad)
    return v.reshape(v.shape[0], nqb, block_q, nkb, block_k).amax(dim=(2, 4)) > 0


def _first_real(key_padding_mask: torch.Tensor | None, b: int, sk: int, device) -> torch.Tensor:
    """``[B]`` index of the first real key (0 without padding; ``sk`` when a row has none)."""
    if key_padding_mask is None:
        return torch.zeros(b, dtype=torch.long, device=device)
    kpm = key_padding_mask.bool()
    has = kpm.any(dim=1)
    first = kpm.float().argmax(dim=1)
    return torch.where(has, first, torch.full_like(first, sk))


def forced_block_mask(
    b: int,
    sq: int,
    sk: int,
    block_q: int,
    block_k: int,
    *,
    sink_blocks: int,
    local_window: int,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """``[B, nQB, nKB]`` bool: sink blocks, local-window and diagonal blocks (before visibility)."""
    causal = check_causal(causal)
    nqb, nkb = _cdiv(sq, block_q), _cdiv(sk, block_k)
    off = sk - sq
    qb = torch.arange(nqb, device=device)
    kb = torch.arange(nkb, device=device)
    i0 = qb * block_q
    i1 = torch.clamp((qb + 1) * block_q, max=sq) - 1
    lo = i0 + off - local_window
    hi = i1 + off + (0 if causal else local_window)
    k0 = kb * block_k
    k1 = (kb + 1) * block_k - 1
    local = (k1[None, :] >= lo[:, None]) & (k0[None, :] <= hi[:, None])  # [nQB, nKB]
    first = _first_real(key_padding_mask, b, sk, device) // block_k  # [B]
    sink = (kb[None, :] >= first[:, None]) & (kb[None, :] < first[:, None] + sink_blocks)  # [B, nKB]
    return local[None] | sink[:, None, :]


def smooth_k(k: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``k - mean_j(k)`` over real keys per (batch, KV head), in fp32; padded keys set to 0."""
    kf = k.float()
    if key_padding_mask is None:
        return kf - kf.mean(dim=2, keepdim=True)
    m = key_padding_mask.bool()[:, None, :, None].to(kf.dtype)
    cnt = m.sum(dim=2, keepdim=True).clamp_min(1.0)
    mean = (kf * m).sum(dim=2, keepdim=True) / cnt
    return (kf - mean) * m


def quantize_blocks(x: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block quantisation along dim 2 of ``x [B, H, S, D]`` (fp32).

    Returns ``(xq [B, H, S, D]`` fp32 holding integers in ``[-qmax, qmax]``, ``scale [B, H, nB])``
    with ``qmax = 2**(bits-1) - 1`` and ``scale = amax(|x_block|) / qmax`` (1 for an all-zero block).
    """
    bsz, h, s, d = x.shape
    nb = _cdiv(s, block)
    qmax = float(2 ** (bits - 1) - 1)
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, nb * block - s))
    xb = xp.reshape(bsz, h, nb, block, d)
    amax = xb.abs().amax(dim=(3, 4))
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    xq = torch.floor(xb / scale[..., None, None] + 0.5).clamp(-qmax, qmax)
    return xq.reshape(bsz, h, nb * block, d)[:, :, :s], scale


def _tau_per_head(tau: float | torch.Tensor, h: int, device) -> torch.Tensor:
    t = torch.as_tensor(tau, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(h)
    return t


# ------------------------------------------------------------------------------------- estimation
def approx_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    bits: int = 8,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate scores ``[B, H, Sq, Sk]`` (fp32) from smoothed, quantised Q and K (no masking).

    Integer products are exact in fp32 (``|sum| < 2**24`` for ``D * qmax**2``), so this matches the
    int8 tensor-core dot of the kernel bit for bit before the final scale multiply.
    """
    bsz, h, sq, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    scale = d**-0.5 if scale is None else scale
    qq, sqs = quantize_blocks(q.float(), block_q, bits)  # [B,H,Sq,D], [B,H,nQB]
    kq, sks = quantize_blocks(smooth_k(k, key_padding_mask), block_k, bits)  # [B,Hkv,Sk,D], [B,Hkv,nKB]
    qq = qq.reshape(bsz, hkv, g, sq, d)
    raw = torch.einsum("bkgid,bkjd->bkgij", qq, kq).reshape(bsz, h, sq, -1)
    rq = sqs.repeat_interleave(block_q, dim=2)[:, :, :sq]  # [B,H,Sq]
    rk = sks.repeat_interleave(block_k, dim=2)[:, :, : k.shape[2]]  # [B,Hkv,Sk]
    rk = rk.repeat_interleave(g, dim=1)
    return raw * (rq[..., :, None] * rk[..., None, :]) * scale


@torch.no_grad()
def sale_block_mask_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    tau: float | torch.Tensor,
    block_q: int = 128,
    block_k: int = 64,
    sink_blocks: int = 1,
    local_window: int = 128,
    causal: bool = True,
    scale: float | None = None,
    bits: int = 8,
    key_padding_mask: torch.Tensor | None = None,
    mode: str = "online",
    row_stride: int = 1,
) -> torch.Tensor:
    """SALE block mask ``[B, H, nQB, nKB]`` (bool, True = keep), torch reference.

    ``mode="online"`` is the algorithm of the module docstring (what the Triton estimate computes).
    ``mode="exact"`` is the two-pass definition: a block is important for row ``i`` when some score
    exceeds ``m_i + ln(tau_h * l_i)`` with ``m_i, l_i`` over all visible keys at full resolution.
    Both use the same quantised scores and always keep the forced blocks.

    ``row_stride > 1`` scores only rows ``qb * block_q + r * row_stride`` of each query block (a
    cheaper estimate): the other rows neither vote nor enter Q's quantisation scale.
    """
    if mode not in ("online", "exact"):
        raise ValueError(f"mode must be 'online' or 'exact', got {mode!r}")
    causal = check_causal(causal)
    bsz, h, sq, _ = q.shape
    sk = k.shape[2]
    dev = q.device
    nqb, nkb = _cdiv(sq, block_q), _cdiv(sk, block_k)
    if sq == 0 or sk == 0:  # no (query, key) pair: nothing to keep
        return torch.zeros(bsz, h, nqb, nkb, dtype=torch.bool, device=dev)
    scored = (torch.arange(sq, device=dev) % block_q) % row_stride == 0  # [Sq]
    qs_ = q * scored[:, None].to(q.dtype) if row_stride > 1 else q
    s = approx_scores(
        qs_, k, block_q=block_q, block_k=block_k, bits=bits, scale=scale, key_padding_mask=key_padding_mask
    )
    vis = visibility(sq, sk, causal=causal, key_padding_mask=key_padding_mask, device=dev)[:, None]
    vis = vis & scored[None, None, :, None]
    s = s.masked_fill(~vis, -math.inf)  # [B,H,Sq,Sk]
    # pad to whole blocks: rows with -inf (no votes), keys with -inf
    s = torch.nn.functional.pad(s, (0, nkb * block_k - sk, 0, nqb * block_q - sq), value=-math.inf)
    sb = s.reshape(bsz, h, nqb, block_q, nkb, block_k)
    rowmax = sb.amax(dim=-1)  # [B,H,nQB,bq,nKB]
    forced = forced_block_mask(
        bsz,
        sq,
        sk,
        block_q,
        block_k,
        sink_blocks=sink_blocks,
        local_window=local_window,
        causal=causal,
        key_padding_mask=key_padding_mask,
        device=dev,
    )  # [B,nQB,nKB]
    vblk = visible_block_mask(
        sq, sk, block_q, block_k, causal=causal, key_padding_mask=key_padding_mask, device=dev
    )  # [B or 1,nQB,nKB]
    forced = (forced & vblk)[:, None].expand(bsz, h, nqb, nkb)
    log_tau = torch.log(_tau_per_head(tau, h, dev))[None, :, None, None]  # [1,H,1,1]

    if mode == "exact":
        lse = torch.logsumexp(s.reshape(bsz, h, nqb, block_q, -1), dim=-1)  # [B,H,nQB,bq]
        thr = lse + log_tau
        imp = rowmax > thr[..., None]  # [B,H,nQB,bq,nKB]
        keep = imp.any(dim=3) | forced
        return keep & vblk[:, None]

    # online: seed statistics with the forced blocks at full resolution
    fmask = forced[:, :, :, None, :, None].expand_as(sb)
    sf = sb.masked_fill(~fmask, -math.inf)
    m = sf.amax(dim=(-1, -2))  # [B,H,nQB,bq]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    l = torch.exp(sf - m_safe[..., None, None]).sum(dim=(-1, -2))
    keep = forced.clone()
    for kb in range(nkb):
        cand = ~forced[..., kb]  # [B,H,nQB]
        rm = rowmax[..., kb]  # [B,H,nQB,bq]
        thr = m + torch.log(l) + log_tau  # m=-inf/l=0 -> -inf
        imp = (rm > thr).any(dim=-1) & cand & torch.isfinite(rm).any(dim=-1)
        keep[..., kb] |= imp
        m_new = torch.maximum(m, rm)
        ms = torch.where(torch.isfinite(m_new), m_new, torch.zeros_like(m_new))
        full = torch.exp(sb[..., kb, :] - ms[..., None]).sum(dim=-1)  # kept: full resolution
        light = torch.exp(rm - ms)  # dropped: row maximum only
        add = torch.where(imp[..., None], full, light)
        upd = torch.where(cand[..., None], l * torch.exp(m - ms) + add, l)
        m = torch.where(cand[..., None], m_new, m)
        l = upd
    return keep & vblk[:, None]


# --------------------------------------------------------------------------------------- attention
def _check_scale(d: int, scale: float | None) -> float:
    return d**-0.5 if scale is None else float(scale)


@torch.no_grad()
def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | None,
    *,
    block_q: int = 128,
    block_k: int = 64,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Exact softmax attention restricted to kept blocks, fp32 math, ``out [B, H, Sq, D]`` in q's dtype.

    ``block_mask`` ``[B, H, nQB, nKB]`` (broadcastable; None = all blocks). Rows with no allowed key
    return zeros.
    """
    causal = check_causal(causal)
    bsz, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = h // hkv
    scale = _check_scale(d, scale)
    if sk == 0:  # no key: every row is a row without a visible key
        return q.new_zeros(bsz, h, sq, v.shape[-1])
    allowed = visibility(sq, sk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)[:, None]
    if block_mask is not None:
        tok = block_mask.bool().repeat_interleave(block_q, dim=2)[:, :, :sq]
        tok = tok.repeat_interleave(block_k, dim=3)[:, :, :, :sk]
        allowed = allowed & tok
    allowed = allowed.expand(bsz, h, sq, sk).reshape(bsz, hkv, g, sq, sk)
    qf = q.float().reshape(bsz, hkv, g, sq, d)
    s = torch.einsum("bkgid,bkjd->bkgij", qf, k.float()) * scale
    s = s.masked_fill(~allowed, -math.inf)
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    den = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.einsum("bkgij,bkjd->bkgid", p, v.float())
    return out.reshape(bsz, h, sq, v.shape[-1]).to(q.dtype)


def dense_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense attention with the same visibility rules (GQA, padding, bottom-right causal)."""
    return block_sparse_attention_ref(
        q, k, v, None, causal=causal, scale=scale, key_padding_mask=key_padding_mask
    )
