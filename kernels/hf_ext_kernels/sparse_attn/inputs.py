"""Synthetic attention inputs for SALE tests and benchmarks: random and *structured* Q/K/V.

Random Q/K/V (``random_qkv``) give nearly uniform attention: the worst case for any sparse method
(nothing can be skipped without error) and the best case for speed (the estimate keeps little).

``structured_qkv`` builds per-head pre-RoPE vectors whose dot products have a designed structure, then
applies Llama's rotary embedding (``rope_theta=500000``, rotate-half pairs ``(d, d + D/2)``) to both
Q and K, so the scores the kernels see are RoPE-rotated like a real prefill. Logits (``q·k/sqrt(D)``):

* **attention sinks**: the first ``n_sink`` keys carry a large component on the lowest-frequency
  rotary pair (angle < 0.4 rad even 128K tokens away), matched by every query: logit about
  ``sink_logit`` for all rows.
* **local focus**: queries and keys share a head vector spread over the rotary pairs below the
  retrieval/sink ones (``local_pairs``, default ``D/2 - D/16 - 2``);
  after RoPE, ``q_i·k_j`` peaks at ``local_logit`` for ``j = i`` and decays (oscillating) within a few
  hundred tokens — RoPE's long-range decay.
* **sparse long-range retrieval**: ``n_retrieval`` "needle" keys at random positions hold a random
  content vector on low-frequency pairs; for each needle a span of ``span`` consecutive queries at
  least ``min_gap`` tokens later carries the matching content: logit about ``retrieval_logit``.
* **background**: i.i.d. Gaussian noise on every dimension, logit std ``noise_logit``.

Defaults: ``sink_logit = local_logit = 12 + max(0, ln(S/4096))`` (peak logits rising like the log
of the length keep the sink/local/background balance roughly length-independent, as trained heads
manage to do), ``retrieval_logit = 14``, ``noise_logit = 1``. Measured for D=128 on a few rows: at 8K
~75% of a row's mass sits on the sink block, ~22% within 256 tokens of the diagonal, ~3% elsewhere
(needles, background); at 128K ~41% / ~52% / ~7%. The background share is the floor of the output error of any
method that drops background blocks. V is i.i.d. Gaussian.

Example:
    >>> q, k, v = structured_qkv(1, 4, 2, 512, 64, seed=0)
    >>> q.shape, k.shape
    (torch.Size([1, 4, 512, 64]), torch.Size([1, 2, 512, 64]))
"""

from __future__ import annotations

import math

import torch

__all__ = ["apply_rope", "random_qkv", "structured_qkv"]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 500000.0) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., S, D]`` (fp32) at integer ``positions [S]``."""
    d = x.shape[-1]
    inv = theta ** (-torch.arange(0, d // 2, device=x.device, dtype=torch.float64) * 2 / d)
    ang = positions.to(torch.float64)[:, None] * inv[None, :]  # [S, D/2]
    cos = torch.cos(ang).to(x.dtype).repeat(1, 2)
    sin = torch.sin(ang).to(x.dtype).repeat(1, 2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat((-x2, x1), dim=-1)
    return x * cos + rot * sin


def random_qkv(
    b: int, h: int, hkv: int, s: int, d: int, *, seed: int = 0, dtype=torch.bfloat16, device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """i.i.d. N(0, 1) ``q [b, h, s, d]``, ``k``/``v`` ``[b, hkv, s, d]``."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(device=device, dtype=dtype)
    return q, k, v


@torch.no_grad()
def structured_qkv(
    b: int,
    h: int,
    hkv: int,
    s: int,
    d: int,
    *,
    seed: int = 0,
    dtype=torch.bfloat16,
    device="cpu",
    n_sink: int = 4,
    sink_logit: float | None = None,
    local_logit: float | None = None,
    local_pairs: int | None = None,
    n_retrieval: int = 16,
    retrieval_logit: float = 14.0,
    span: int = 32,
    min_gap: int = 1024,
    noise_logit: float = 1.0,
    rope_theta: float = 500000.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Structured ``q [b, h, s, d]``, ``k``/``v`` ``[b, hkv, s, d]`` (see the module docstring).

    Needles and their query spans are drawn per (batch, KV head) and shared by the query heads of
    the group, like a retrieval head; everything is generated on ``device`` in fp32 then cast.
    """
    if d % 2 or d < 16:
        raise ValueError(f"head dim must be even and >= 16, got {d}")
    if s < 1:
        raise ValueError(f"sequence length s must be >= 1, got {s}")
    if hkv < 1 or h % hkv:
        raise ValueError(f"query heads h ({h}) must be a positive multiple of KV heads hkv ({hkv}) (GQA)")
    grow = max(0.0, math.log(s / 4096))  # peaks rise like log(length), as trained heads' do
    sink_logit = 12.0 + grow if sink_logit is None else sink_logit
    local_logit = 12.0 + grow if local_logit is None else local_logit
    gen = torch.Generator(device="cpu").manual_seed(seed)
    g = h // hkv
    half = d // 2
    n_ret_pairs = max(1, half // 8)
    lp = local_pairs if local_pairs is not None else max(1, half - n_ret_pairs - 2)
    ret_lo = half - 1 - n_ret_pairs  # retrieval content on pairs [ret_lo, half-1), sink on pair half-1
    sq_d = math.sqrt(d)
    sigma = math.sqrt(noise_logit)  # per-dim std of q and k noise: logit noise std = sigma**2

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    pos = torch.arange(s, device=device)
    q = randn(b, h, s, d) * sigma
    k = randn(b, hkv, s, d) * sigma
    # local: unit head vector on the high-frequency pairs, amplitude sqrt(local_logit * sqrt(D))
    u = torch.zeros(hkv, d, device=device)
    u_pairs = randn(hkv, 2, lp)
    u[:, :lp] = u_pairs[:, 0]
    u[:, half : half + lp] = u_pairs[:, 1]
    u = u / u.norm(dim=-1, keepdim=True) * math.sqrt(local_logit * sq_d)
    q += u.repeat_interleave(g, dim=0)[None, :, None, :]
    k += u[None, :, None, :]
    # sinks: lowest-frequency pair, real axis
    a = math.sqrt(sink_logit * sq_d)
    q[..., half - 1] += a
    k[:, :, :n_sink, half - 1] += a
    # retrieval needles
    for bi in range(b):
        for hk in range(hkv):
            for _ in range(n_retrieval):
                if s <= min_gap + span + 1:
                    break
                p = int(torch.randint(n_sink, s - min_gap - span, (1,), generator=gen))
                qs = int(torch.randint(p + min_gap, s - span + 1, (1,), generator=gen))
                c = torch.zeros(d, device=device)
                cp = randn(2, n_ret_pairs)
                c[ret_lo : half - 1] = cp[0]
                c[half + ret_lo : d - 1] = cp[1]
                c = c / c.norm() * math.sqrt(retrieval_logit * sq_d * 1.3)  # 1.3: RoPE phase drift margin
                k[bi, hk, p] += c
                q[bi, hk * g : (hk + 1) * g, qs : qs + span] += c
    q = apply_rope(q, pos, rope_theta)
    k = apply_rope(k, pos, rope_theta)
    v = randn(b, hkv, s, d)
    return q.to(dtype), k.to(dtype), v.to(dtype)
