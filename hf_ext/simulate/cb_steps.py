"""Iterations of transformers continuous batching, recorded, and the simulator's cost model fit to them.

:mod:`~hf_ext.simulate.calibrate` fits the :class:`~hf_ext.simulate.cost_model.CostModel` to ``generate``
calls. A serving engine is not ``generate``: transformers' ``ContinuousBatchingManager`` mixes prefill chunks
and decode tokens in one step under a token budget, reads a paged KV cache and pays its own scheduling and
bookkeeping on the host. This module measures that engine directly:

* :func:`record_cb_steps` — a context manager that times every iteration of every
  ``ContinuousBatchProcessor`` run inside it and notes what the step computed (decoding sequences and their
  context, prefill tokens and their attention work), plus the engine's limits (token budget, KV pages,
  requests per batch). Patches two methods of the processor class and restores them on exit.
* :func:`fit_steps` — least-squares fit (relative errors, robust loss) of the cost model's iteration time to
  the recorded steps; decode-only steps fit the decode terms, steps with prefill the prefill terms; then each
  kind's terms are scaled so that the model spends the measured total time on those steps (stalls included).
* :func:`steps_summary` — the fit's error on held-out steps, per kind of step.

A step's time is the interval between the starts of two consecutive busy iterations, so host work
(scheduling, tensor preparation, output handling) is part of it, as it is for a request in the engine. That is
exact for synchronous batching (what the recorded runs used). With ``use_async_batching`` the host prepares a
batch while the device runs the previous one: the intervals still add up to the engine's time, but a step's
make-up and its interval may be one iteration apart (``StepLog.limits[i]["async"]`` says which mode ran).

Example:
    >>> steps = [{"dt": 0.02 + 1e-4 * n, "n_decode": n, "ctx_decode": 100.0 * n, "prefill_tokens": 0,
    ...           "prefill_attn": 0.0} for n in (1, 4, 8, 16, 32)]
    >>> steps += [{"dt": 0.03 + 2e-5 * p, "n_decode": 0, "ctx_decode": 0.0, "prefill_tokens": p,
    ...            "prefill_attn": p * p / 2.0} for p in (64, 256, 512, 1024)]
    >>> cm = fit_steps(steps, match_total=False)
    >>> round(cm.decode_time(8, 100), 4), round(cm.prefill_time(512), 4)
    (0.0208, 0.0402)
"""

from __future__ import annotations

import contextlib
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.simulate.calibrate import _lsq
from hf_ext.simulate.cost_model import CostModel

STEP_KEYS = ("dt", "n_decode", "ctx_decode", "prefill_tokens", "prefill_attn")
# calibrations fit to an engine's own steps are named "<prefix>-<device>-<shape>"
CALIBRATION_PREFIX = "transformers_cb"


def is_cb_calibration(name: str) -> bool:
    """Whether the calibration ``name`` was fit to transformers CB steps (:func:`fit_steps`), not to ``generate``."""
    return name.startswith(CALIBRATION_PREFIX)


@dataclass
class StepLog:
    """What :func:`record_cb_steps` saw.

    ``steps``: one dict per timed iteration with ``dt`` (seconds), ``n_decode`` (sequences decoding one token),
    ``ctx_decode`` (their summed context, tokens), ``prefill_tokens`` (prompt tokens in the step),
    ``prefill_attn`` (sum over prefill chunks of ``chunk * (offset + chunk / 2)``), ``n_prefill`` (chunks) and
    ``run`` (which processor, in order of creation). ``limits``: per run, the engine's ``max_batch_tokens``,
    ``kv_tokens`` (paged cache capacity), ``max_requests_per_batch`` and ``block_size`` (tokens per KV block;
    None when this transformers version does not expose it).
    """

    steps: list[dict[str, float]] = field(default_factory=list)
    limits: list[dict[str, Any]] = field(default_factory=list)

    def arrays(self) -> dict[str, np.ndarray]:
        """Columns of :attr:`steps` as float arrays (keys of :data:`STEP_KEYS`)."""
        return {k: np.asarray([s[k] for s in self.steps], dtype=np.float64) for k in STEP_KEYS}


def _block_size(proc: Any, cache: Any) -> int | None:
    """Tokens per KV block of the paged cache, or None when this transformers version keeps it elsewhere.

    transformers <= 5.16 had ``cache.block_size``; from 5.17 the size is the config's ``page_size`` (tokens of a
    full-attention page: ``proc.cb_config.page_size``, also each cache allocator's ``tokens_per_page``)."""
    cfg = getattr(proc, "cb_config", None)
    for v in (
        getattr(cache, "block_size", None),
        getattr(cache, "page_size", None),
        getattr(cfg, "page_size", None),
    ):
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    allocators = getattr(cache, "cache_allocators", None)
    pages = [
        getattr(a, "tokens_per_page", None)
        for a in (allocators.values() if isinstance(allocators, dict) else ())
    ]
    pages = [v for v in pages if isinstance(v, int) and v > 0]
    return max(pages) if pages else None


def _engine_limits(proc: Any) -> dict[str, Any]:
    cache = getattr(proc, "cache", None)
    kv = getattr(cache, "num_pages", None)  # transformers <= 5.17
    if kv is None:
        kv = getattr(cache, "max_tokens_read", None)
    sched = getattr(proc, "scheduler", None)
    return {
        "max_batch_tokens": int(getattr(proc, "max_batch_tokens", 0) or 0),
        "kv_tokens": int(kv or 0),
        "max_requests_per_batch": int(getattr(sched, "max_requests_per_batch", 0) or 0),
        "block_size": _block_size(proc, cache),  # None, never 0, when it cannot be found
        "async": bool(getattr(proc, "use_async_batching", False)),
    }


def _composition(scheduled: Sequence[Any]) -> dict[str, float]:
    """Decode / prefill make-up of one scheduled batch (``FutureRequestState`` list, before the step ran)."""
    n_dec = n_pre = 0
    ctx = pre_tok = attn = 0.0
    for fs in scheduled:
        state = fs.state
        q = int(fs.query_length)
        off = int(state.position_offset)
        # a decode token follows a prompt already in the cache (the status is not reliable here: a prompt that
        # fits the budget whole is marked DECODING when it is scheduled)
        if q == 1 and off >= len(state.initial_tokens):
            n_dec += 1
            ctx += off + q
        else:
            n_pre += 1
            pre_tok += q
            attn += q * (off + q / 2.0)
    return {
        "n_decode": float(n_dec),
        "ctx_decode": ctx,
        "prefill_tokens": pre_tok,
        "prefill_attn": attn,
        "n_prefill": float(n_pre),
    }


_LOCK = threading.Lock()


@contextlib.contextmanager
def record_cb_steps() -> Iterator[StepLog]:
    """Record the iterations of every transformers continuous-batching run started inside the block.

    Wraps ``ContinuousBatchProcessor.prepare_next_batch`` (class attribute) for the block's duration; each call
    wraps its scheduler's ``schedule_batch`` for that call only, to read the batch it chose. Everything is put
    back on exit, also on error. Not re-entrant: nesting raises ``RuntimeError``.

    Yields:
        The :class:`StepLog` being filled (complete once the block exits).
    """
    from transformers.generation.continuous_batching import continuous_api

    proc_cls = continuous_api.ContinuousBatchProcessor
    orig_prepare = proc_cls.__dict__["prepare_next_batch"]
    if not _LOCK.acquire(blocking=False):
        raise RuntimeError("record_cb_steps is already active (not re-entrant)")
    log = StepLog()
    # per processor (weak: a finished manager's paged cache must stay free to go): run index, pending step
    runs: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()
    last: weakref.WeakKeyDictionary[Any, tuple[float, dict[str, float]] | None] = weakref.WeakKeyDictionary()

    def prepare_next_batch(self: Any) -> bool:
        t0 = time.perf_counter()
        key = self
        if key not in runs:
            runs[key] = len(log.limits)
            log.limits.append(_engine_limits(self))
        sched = self.scheduler
        chosen: list[dict[str, float] | None] = []
        had = "schedule_batch" in sched.__dict__
        prev = sched.__dict__.get("schedule_batch")
        bound = sched.schedule_batch

        def schedule_batch(*args: Any, **kwargs: Any) -> Any:
            out = bound(*args, **kwargs)
            # read now: preparing the batch tensors moves the states' offsets and statuses on
            chosen.append(_composition(out[0]) if out and out[0] else None)
            return out

        sched.schedule_batch = schedule_batch
        try:
            busy = orig_prepare(self)
        finally:
            if had:
                sched.schedule_batch = prev
            else:
                del sched.schedule_batch
        pending = last.get(key)
        if pending is not None:  # the previous busy step ran until this call began
            start, done = pending
            log.steps.append({"dt": t0 - start, **done, "run": float(runs[key])})
        comp = chosen[-1] if chosen else None
        last[key] = (t0, comp) if busy and comp else None
        return busy

    proc_cls.prepare_next_batch = prepare_next_batch
    try:
        yield log
    finally:
        proc_cls.prepare_next_batch = orig_prepare
        _LOCK.release()


# ------------------------------------------------------------------------------------------------- fit
def _iter_times(z: np.ndarray, a: dict[str, np.ndarray]) -> np.ndarray:
    """Vectorised :meth:`CostModel.iteration_time` for parameters ``z`` (order of :data:`_PARAMS`)."""
    f_dec, f_pre, base, pbase, per_seq, per_ctx, per_tok, per_attn = z
    has_pre = a["prefill_tokens"] > 0
    lin = base + per_seq * a["n_decode"] + per_ctx * a["ctx_decode"]
    lin = lin + has_pre * (pbase + per_tok * a["prefill_tokens"] + per_attn * a["prefill_attn"])
    floor = np.where(a["n_decode"] > 0, f_dec, f_pre)
    return np.maximum(lin, floor)


_PARAMS = (
    "decode_floor_s",
    "prefill_floor_s",
    "base_s",
    "prefill_base_s",
    "per_seq_s",
    "per_ctx_token_s",
    "per_prefill_token_s",
    "per_prefill_attn_s",
)


_ROBUST = {"loss": "soft_l1", "f_scale": 0.1}  # a stalled step (graph capture, GC) must not pull the fit


def _subset(a: dict[str, np.ndarray], m: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[m] for k, v in a.items()}


def fit_steps(
    steps: Sequence[dict[str, float]],
    name: str = "transformers-cb",
    source: str = "measured: transformers continuous batching steps",
    kv_bytes_per_token: float = 0.0,
    match_total: bool = True,
) -> CostModel:
    """Fit the :class:`CostModel` iteration time to recorded steps (relative residuals, soft-L1 loss).

    Stage 1: decode-only steps give ``decode_floor_s, base_s, per_seq_s, per_ctx_token_s``. Stage 2: steps with
    prefill tokens give ``prefill_floor_s, prefill_base_s, per_prefill_token_s, per_prefill_attn_s`` with stage 1
    held fixed. The robust loss follows the typical step; an engine also stalls now and then (a CUDA-graph
    capture for a new padded shape, an allocation), and those stalls are part of what a request waits for. With
    ``match_total`` each stage's terms are then scaled so that the summed model time of its steps equals the
    summed measured time (factors in ``extra["total_scale"]``); the simulator then spends a run's time right.

    Steps need the keys of :data:`STEP_KEYS`; both kinds must be present (``ValueError`` otherwise, also for
    non-positive or non-finite times).
    """
    if not steps:
        raise ValueError("fit_steps needs recorded steps, got none")
    missing = [k for k in STEP_KEYS if k not in steps[0]]
    if missing:
        raise ValueError(f"steps need the keys {STEP_KEYS}; missing {missing}")
    a = {k: np.asarray([s[k] for s in steps], dtype=np.float64) for k in STEP_KEYS}
    if not np.all(np.isfinite(a["dt"])) or np.any(a["dt"] <= 0):
        raise ValueError("every step's dt must be a finite number > 0")
    dec = (a["prefill_tokens"] == 0) & (a["n_decode"] > 0)
    pre = a["prefill_tokens"] > 0
    if not dec.any() or not pre.any():
        raise ValueError(
            f"fit_steps needs decode-only and prefill steps, got {int(dec.sum())} and {int(pre.sum())}"
        )
    ad, ap = _subset(a, dec), _subset(a, pre)
    sd, sp = float(np.median(ad["dt"])), float(np.median(ap["dt"]))
    mag_d = np.asarray([sd, sd, sd / max(ad["n_decode"].max(), 1), sd / max(ad["ctx_decode"].max(), 1)])
    mag_p = np.asarray(
        [sp, sp, sp / max(ap["prefill_tokens"].max(), 1), sp / max(ap["prefill_attn"].max(), 1)]
    )

    def dec_params(z: np.ndarray) -> np.ndarray:
        f, b0, b, c = np.abs(z) * mag_d
        return np.asarray([f, 0.0, b0, 0.0, b, c, 0.0, 0.0])

    zd = dec_params(_lsq(lambda z: _iter_times(dec_params(z), ad) / ad["dt"] - 1.0, 4, **_ROBUST))
    k_dec = float(ad["dt"].sum() / _iter_times(zd, ad).sum()) if match_total else 1.0
    zd[[0, 2, 4, 5]] *= k_dec

    def all_params(z: np.ndarray) -> np.ndarray:
        f, pb, p, q = np.abs(z) * mag_p
        out = zd.copy()
        out[[1, 3, 6, 7]] = [f, pb, p, q]
        return out

    zp = all_params(_lsq(lambda z: _iter_times(all_params(z), ap) / ap["dt"] - 1.0, 4, **_ROBUST))
    k_pre = _total_scale(zp, ap) if match_total else 1.0
    zp[[1, 3, 6, 7]] *= k_pre
    cm = CostModel(**dict(zip(_PARAMS, (float(x) for x in zp), strict=True)))
    cm.name, cm.source, cm.kv_bytes_per_token = name, source, float(kv_bytes_per_token)
    cm.extra = {
        "fit": steps_summary(cm, steps),
        "n_steps": len(steps),
        "total_scale": {"decode": k_dec, "prefill": k_pre},
    }
    return cm


def _total_scale(z: np.ndarray, a: dict[str, np.ndarray]) -> float:
    """Factor ``k`` on the prefill terms (indices 1, 3, 6, 7) with summed model time = summed measured time on
    the steps ``a`` (bisection: the sum is non-decreasing in ``k``)."""

    def total(k: float) -> float:
        zk = z.copy()
        zk[[1, 3, 6, 7]] *= k
        return float(_iter_times(zk, a).sum())

    target = float(a["dt"].sum())
    lo, hi = 0.0, 1.0
    while total(hi) < target and hi < 1e6:
        hi *= 2.0
    if total(lo) >= target:  # the decode terms alone already exceed it: keep the robust fit
        return 1.0
    for _ in range(60):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return (lo + hi) / 2.0


def steps_summary(cm: CostModel, steps: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Model vs measured per kind of step (``decode``, ``prefill``, ``all``): count, median and mean absolute
    relative error, and the ratio of summed times (simulated / measured: the bias over a whole run)."""
    a = {k: np.asarray([s[k] for s in steps], dtype=np.float64) for k in STEP_KEYS}
    z = np.asarray([getattr(cm, p) for p in _PARAMS])
    sim = _iter_times(z, a)
    out = {}
    for kind, m in (
        ("decode", a["prefill_tokens"] == 0),
        ("prefill", a["prefill_tokens"] > 0),
        ("all", np.ones(len(sim), dtype=bool)),
    ):
        if not m.any():
            continue
        rel = sim[m] / a["dt"][m] - 1.0
        out[kind] = {
            "steps": int(m.sum()),
            "median_abs_rel_err": float(np.median(np.abs(rel))),
            "mean_abs_rel_err": float(np.mean(np.abs(rel))),
            "sum_ratio": float(sim[m].sum() / a["dt"][m].sum()),
            "measured_median_s": float(np.median(a["dt"][m])),
        }
    return out
