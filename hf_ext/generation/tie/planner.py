"""Expected-cost batch plans for offline static-batch jobs, from predicted length laws.

A ``generate`` batch runs until its *longest* row is done, and its width is bounded by the KV budget for its
*widest* prompt. Cutting one sorted order into batches as wide as memory allows (:func:`.offline.memory_batches`)
ignores both facts. :func:`plan_batches` uses them:

1. **Prompt buckets.** The requests are split into ``K`` buckets by prompt length (the job's own quantiles);
   inside a bucket they keep the given order (TIE's, SSJF's, ...). Batches of short prompts can be wider.
2. **Expected-cost cuts.** Along that order, a dynamic program picks where each batch ends so that the job's
   *expected* time is least: a batch of rows ``S`` costs its prefill plus ``E[max_{i∈S} X_i] - 1`` decode steps
   (with a :class:`~hf_ext.simulate.CostModel`; without one, ``E[max]`` decode steps), subject to the width
   limit (``batch_size`` rows, or ``B × (widest prompt + max_new_tokens) <= kv_tokens``, never exceeded whatever
   the rows generate). With log-t laws, ``E[max] = Σ_{t>=0} (1 - Π_i F_i(t))`` on ``[1, max_new_tokens]``; with
   point predictions, the largest prediction.
3. ``K`` (``prompt_buckets=None``) is the count in :data:`PLAN_BUCKETS`, or ``N`` (the job sorted by prompt
   length), with the least expected cost — chosen from the predictions only, never from the true lengths.

The batch maximum is what a point estimate gets wrong: forty rows whose medians are all 100 tokens but whose
laws are wide have an expected maximum far above 100. That is where a distribution predictor earns its keep
offline.

Example:
    >>> plan = plan_batches([0, 1, 2], [10, 10, 10], max_new_tokens=100, batch_size=2, point=[5, 90, 80])
    >>> plan.batches  # cutting every 2 rows would cost 90 + 80 steps; this costs 5 + 90
    [[0], [1, 2]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import _check_int
from hf_ext.generation.tie.offline import _check_each_fits, _check_sizing, _checked_order, _lengths

PLAN_BUCKETS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12)
GRID_POINTS = 192  # length grid for E[max] (log-spaced above 64 tokens)


@dataclass
class BatchPlan:
    """A job's batches (request indices, in running order) and what the planner expected of them."""

    batches: list[list[int]]
    prompt_buckets: int
    expected_cost: float  # seconds with a cost model, else expected decode steps
    expected_steps: float  # sum over batches of the expected longest output
    costs_by_buckets: dict[int, float]  # expected cost of the best plan for each bucket count tried


def _length_grid(cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid points ``t`` in ``[1, cap - 1]`` and weights such that ``Σ_{t=1}^{cap-1} f(t) ≈ Σ w_k f(t_k)``:
    every integer up to 64, then log-spaced points with trapezoid weights."""
    if cap <= 1:
        return np.zeros(0), np.zeros(0)
    dense = np.arange(1, min(cap - 1, 64) + 1, dtype=np.float64)
    if cap - 1 <= 64:
        return dense, np.ones_like(dense)
    tail = np.unique(np.round(np.geomspace(65, cap - 1, GRID_POINTS - 64)))
    pts = np.concatenate([dense, tail])
    # trapezoid over the integers: each point stands for the integers half-way to its neighbours
    edges = np.concatenate([[0.5], (pts[1:] + pts[:-1]) / 2, [cap - 0.5]])
    return pts, np.diff(edges)


def _log_cdf_grid(mu: np.ndarray, sigma: np.ndarray, nu: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``[N, G]`` log ``P(X <= t)`` of the log-t laws on the grid (floored so sums stay finite)."""
    from hf_ext.generation.tie.distribution import LogT

    cdf = LogT(mu[:, None], sigma[:, None], nu[:, None]).cdf(pts[None, :])
    return np.log(np.clip(cdf, 1e-300, 1.0))


def _emax(cum_log_cdf: np.ndarray, weights: np.ndarray, cap: int) -> np.ndarray:
    """``E[max]`` in whole tokens from ``Σ_i log F_i`` on the grid (last axis): ``1 + Σ_t P(max > t)``."""
    return np.clip(1.0 + (-np.expm1(cum_log_cdf)) @ weights, 1.0, cap)


def expected_max(
    mu: Sequence[float], sigma: Sequence[float], nu: float | Sequence[float], max_new_tokens: int
) -> float:
    """``E[max_i X_i]`` of independent log-t lengths on ``[1, max_new_tokens]`` (``X`` counted in whole tokens:
    ``Σ_{t=0}^{cap-1} P(max > t)``, on the planner's grid) — the decode steps a batch of these rows runs.

    Example:
        >>> expected_max([2.0], [1e-6], 3.5, 100)  # one row of e^2 ≈ 7.4 tokens: 8 whole tokens
        8.0
    """
    _check_int("max_new_tokens", max_new_tokens)
    m, s = np.atleast_1d(np.asarray(mu, dtype=np.float64)), np.atleast_1d(np.asarray(sigma, dtype=np.float64))
    v = np.broadcast_to(np.asarray(nu, dtype=np.float64), m.shape)
    pts, w = _length_grid(max_new_tokens)
    return float(_emax(_log_cdf_grid(m, s, v, pts).sum(axis=0), w, max_new_tokens))


def bucket_order(order: Sequence[int], prompt_lens: Sequence[int], k: int) -> list[int]:
    """``order`` regrouped into ``k`` prompt-length buckets (the job's quantiles), shortest prompts first; inside
    a bucket the order is kept.

    Example:
        >>> bucket_order([0, 1, 2, 3], [900, 10, 800, 20], 2)
        [1, 3, 0, 2]
    """
    _check_int("k (prompt buckets)", k)
    plen = _lengths("prompt_lens", prompt_lens)
    order = _checked_order(order, len(plen))
    if k == 1:
        return order
    edges = np.quantile(plen, np.arange(1, k) / k)
    bucket = np.digitize(plen[order], edges, right=True)
    return [order[j] for j in np.argsort(bucket, kind="stable")]


def _segment_cost(cost_model: Any, rows: int, width: int, steps: float) -> float:
    """Expected time of one batch: ``rows`` prompts padded to ``width``, ``steps`` expected longest output."""
    if cost_model is None:
        return steps
    lo = int(math.floor(steps))
    frac = steps - lo
    ctx = rows * (width + 1)
    d0 = cost_model.decode_span(rows, ctx, lo - 1)
    d1 = cost_model.decode_span(rows, ctx, lo) if frac > 0 else d0
    return cost_model.prefill_time(width, batch=rows) + d0 + frac * (d1 - d0)


def _cut(
    order: list[int],
    plen: np.ndarray,
    cap: int,
    width_ok: Any,
    log_cdf: np.ndarray | None,
    weights: np.ndarray | None,
    point: np.ndarray | None,
    cost_model: Any,
) -> tuple[list[list[int]], float, float]:
    """Least-expected-cost split of ``order`` into consecutive batches (dynamic program over cut points)."""
    n = len(order)
    best = np.full(n + 1, np.inf)
    steps_to = np.zeros(n + 1)
    best[0] = 0.0
    start = np.zeros(n + 1, dtype=np.int64)
    idx = np.asarray(order, dtype=np.int64)
    for a in range(n):
        # the widest batch that may start at a
        rows, widest = 0, 0
        while a + rows < n:
            w = max(widest, int(plen[idx[a + rows]]))
            if not width_ok(rows + 1, w):
                break
            rows, widest = rows + 1, w
        seg = idx[a : a + rows]
        widths = np.maximum.accumulate(plen[seg])
        if point is not None:
            emax = np.clip(np.maximum.accumulate(point[seg]), 1.0, cap)
        else:
            assert log_cdf is not None and weights is not None
            emax = _emax(np.cumsum(log_cdf[seg], axis=0), weights, cap)  # every prefix of the segment at once
        for j in range(rows):
            c = best[a] + _segment_cost(cost_model, j + 1, int(widths[j]), float(emax[j]))
            if c < best[a + j + 1]:
                best[a + j + 1] = c
                start[a + j + 1] = a
                steps_to[a + j + 1] = steps_to[a] + float(emax[j])
    batches: list[list[int]] = []
    end = n
    while end > 0:
        a = int(start[end])
        batches.append([int(i) for i in idx[a:end]])
        end = a
    return batches[::-1], float(best[n]), float(steps_to[n])


def plan_batches(
    order: Sequence[int],
    prompt_lens: Sequence[int],
    max_new_tokens: int,
    *,
    kv_tokens: int | None = None,
    batch_size: int | None = None,
    mu: Sequence[float] | None = None,
    sigma: Sequence[float] | None = None,
    nu: float | Sequence[float] = 3.5,
    point: Sequence[float] | None = None,
    prompt_buckets: int | None = None,
    cost_model: Any = None,
) -> BatchPlan:
    """Batches of a static-batch job with the least expected time (see the module docstring).

    Args:
        order: a permutation of ``range(N)`` — the policy's job order (e.g. :func:`.scheduler.order_batch`).
        prompt_lens: ``[N]`` prompt tokens per request.
        max_new_tokens: the generation cap (lengths live in ``[1, max_new_tokens]``; with ``kv_tokens`` it is
            also each row's KV reservation).
        kv_tokens / batch_size: the width limit, exactly one: a KV budget in tokens (``B × (widest prompt +
            max_new_tokens) <= kv_tokens``) or a fixed row count.
        mu, sigma, nu: ``[N]`` predicted log-t laws (``nu`` scalar or ``[N]``), or ``point``: ``[N]`` predicted
            lengths (SSJF's point estimates; the expected batch maximum is then the largest prediction).
        prompt_buckets: ``K`` prompt-length buckets; ``None`` tries :data:`PLAN_BUCKETS` and ``N`` and keeps the
            least expected cost.
        cost_model: a :class:`~hf_ext.simulate.CostModel` (prefill + decode time); ``None``: decode steps.

    Returns:
        :class:`BatchPlan`; ``batches`` partition ``range(N)``.
    """
    _check_int("max_new_tokens", max_new_tokens)
    _check_sizing(batch_size, kv_tokens)
    plen = _lengths("prompt_lens", prompt_lens)
    n = len(plen)
    idx = _checked_order(order, n)
    if (point is None) == (mu is None or sigma is None):
        raise ValueError(
            "give either mu and sigma (log-t laws) or point (point predictions), not both or neither"
        )
    if prompt_buckets is not None:
        _check_int("prompt_buckets", prompt_buckets)
    log_cdf = weights = pt = None
    if point is not None:
        pt = np.asarray(point, dtype=np.float64)
        if pt.shape != (n,) or not np.all(np.isfinite(pt)):
            raise ValueError(f"point must hold {n} finite predicted lengths")
        pt = np.clip(pt, 1.0, max_new_tokens)
    else:
        m, s = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
        v = (
            np.broadcast_to(np.asarray(nu, dtype=np.float64), (n,))
            if np.ndim(nu) == 0
            else np.asarray(nu, float)
        )
        for name, a in (("mu", m), ("sigma", s), ("nu", v)):
            if a.shape != (n,) or not np.all(np.isfinite(a)):
                raise ValueError(f"{name} must hold {n} finite values (NaN predictions are not allowed)")
        if np.any(s <= 0) or np.any(v <= 0):
            raise ValueError("sigma and nu must be > 0")
        pts, weights = _length_grid(max_new_tokens)
        log_cdf = _log_cdf_grid(m, s, v, pts)
    if kv_tokens is not None:
        _check_int("kv_tokens", kv_tokens)
        _check_each_fits(idx, plen, kv_tokens, max_new_tokens)

        def width_ok(rows: int, widest: int) -> bool:
            return rows * (widest + max_new_tokens) <= kv_tokens

    else:
        _check_int("batch_size", batch_size)

        def width_ok(rows: int, widest: int) -> bool:
            return rows <= batch_size  # type: ignore[operator]

    if n == 0:
        return BatchPlan([], prompt_buckets or 1, 0.0, 0.0, {})
    # auto: the counts of PLAN_BUCKETS, and one bucket per request (the job sorted by prompt length; the order
    # then only breaks ties) for when prompt widths matter more than the predictions can tell apart
    tried = (prompt_buckets,) if prompt_buckets is not None else (*(k for k in PLAN_BUCKETS if k < n), n)
    best: tuple[float, int, list[list[int]], float] | None = None
    costs: dict[int, float] = {}
    for k in tried:
        batches, cost, steps = _cut(
            bucket_order(idx, plen, k), plen, max_new_tokens, width_ok, log_cdf, weights, pt, cost_model
        )
        costs[k] = cost
        if best is None or cost < best[0]:
            best = (cost, k, batches, steps)
    assert best is not None
    cost, k, batches, steps = best
    return BatchPlan(batches, k, cost, steps, costs)


__all__ = ["PLAN_BUCKETS", "BatchPlan", "bucket_order", "expected_max", "plan_batches"]
