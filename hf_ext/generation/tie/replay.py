"""Replay timed requests into real transformers continuous batching, one admission policy per run.

This is how TIE and its baselines are measured on a real engine rather than the simulator: requests are
submitted to a ``ContinuousBatchingManager`` at their arrival times (scaled by ``time_scale``), each with
a forced output length (``max_new_tokens`` and EOS disabled by the caller's generation config), and the
wall-clock first-token and finish times come back from transformers' own per-request timestamps.

Policies (all use the same manager and engine; only the waiting-queue order differs):

=============  ===================================  ==========================================
policy         scheduler_type                       key (lower admitted first)
=============  ===================================  ==========================================
``fcfs``       ``"fifo"`` (transformers' own)       arrival order
``sjf_oracle`` ``"hf_ext_priority"``                the true output length (upper bound)
``ssjf``       ``"hf_ext_priority"``                ``pred_len`` (point predictor)
``ltr``        ``"hf_ext_priority"``                ``ltr_score`` (learning-to-rank predictor)
``tie``        ``"tie"``                            aged TIE score from ``(mu, sigma, nu)``
=============  ===================================  ==========================================

The TIE ablations (the keys of :data:`~hf_ext.generation.tie.config.ABLATION_SETTINGS`, e.g. ``tie_expect_only``)
run the ``"tie"`` scheduler with that part of ``tie_config`` changed, for benchmark reports.

Example (CPU, tiny random model; all arrive at once)::

    from transformers import ContinuousBatchingConfig, GenerationConfig
    from hf_ext.generation.tie.replay import ReplayRequest, run_cb_replay, summarize_replay
    from hf_ext.testing import tiny_llama

    reqs = [ReplayRequest(f"r{i}", 0.0, [5 + i] * 8, n, mu=float(np.log(n)), sigma=0.3, pred_len=n, ltr_score=n)
            for i, n in enumerate([12, 3, 7])]
    gc = GenerationConfig(max_new_tokens=16, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb = ContinuousBatchingConfig(num_blocks=16, page_size=16, max_batch_tokens=64, max_requests_per_batch=1)
    recs = run_cb_replay(tiny_llama(), reqs, "tie", generation_config=gc, continuous_batching_config=cb)
    print(summarize_replay(recs)["per_token_mean"])
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import ABLATION_SETTINGS, ablation_config, tie_config_or_default

TIE_POLICIES = ("tie", *ABLATION_SETTINGS)
POLICIES = ("fcfs", "sjf_oracle", "ssjf", "ltr", *TIE_POLICIES)


@dataclass
class ReplayRequest:
    """One request of a replay.

    Attributes:
        request_id: unique id given to ``add_request``.
        arrival: seconds after the replay starts (before ``time_scale``).
        prompt_ids: prompt token ids (non-empty).
        output_len: tokens to generate (``max_new_tokens`` of this request; the generation config must disable
            EOS for the length to be exact).
        mu, sigma, nu: log-t length prediction (``tie``).
        pred_len: point prediction (``ssjf``).
        ltr_score: rank score, lower = shorter (``ltr``).
    """

    request_id: str
    arrival: float
    prompt_ids: list[int]
    output_len: int
    mu: float = math.nan
    sigma: float = math.nan
    nu: float = 3.5
    pred_len: float = math.nan
    ltr_score: float = math.nan

    def to_sim_request(self, id: int, max_new_tokens: int) -> Any:
        """The same request for the shared simulator / offline planner (predictions in ``meta``)."""
        from hf_ext.simulate import Request

        meta = dict(
            pred_mu=self.mu,
            pred_sigma=self.sigma,
            pred_nu=self.nu,
            pred_len=self.pred_len,
            ltr_score=self.ltr_score,
        )
        return Request(
            id=id,
            arrival=self.arrival,
            prompt_len=len(self.prompt_ids),
            output_len=self.output_len,
            max_new_tokens=max_new_tokens,
            meta=meta,
        )


_NEEDS = {
    "fcfs": (),
    "sjf_oracle": (),
    "ssjf": ("pred_len",),
    "ltr": ("ltr_score",),
    **dict.fromkeys(TIE_POLICIES, ("mu", "sigma", "nu")),
}


def validate_replay(
    requests: Sequence[ReplayRequest], policy: str, time_scale: float = 1.0, tie_config: Any = None
) -> None:
    """Raise ``ValueError`` (naming the field and request) on anything :func:`run_cb_replay` cannot honour."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if tie_config is not None:
        tie_config_or_default(tie_config, "tie_config")
    if policy in TIE_POLICIES and tie_config is not None and tie_config.use_request_cap:
        raise ValueError(
            "tie_config.use_request_cap must be False in a replay: each request's max_new_tokens is set to its "
            "true output_len (that is how its length is forced), and TIE would truncate its length law there, "
            "i.e. see the answer; pass TIEConfig(..., use_request_cap=False) or leave tie_config=None"
        )
    if not (isinstance(time_scale, (int, float)) and math.isfinite(time_scale) and time_scale >= 0):
        raise ValueError(f"time_scale must be a finite number >= 0, got {time_scale!r}")
    if not requests:
        raise ValueError("requests is empty")
    seen: set[str] = set()
    for r in requests:
        if not isinstance(r.request_id, str) or not r.request_id or r.request_id in seen:
            raise ValueError(f"request_id must be a unique non-empty string, got {r.request_id!r}")
        seen.add(r.request_id)
        if not r.prompt_ids:
            raise ValueError(f"request {r.request_id}: prompt_ids is empty")
        if not isinstance(r.output_len, (int, np.integer)) or r.output_len < 1:
            raise ValueError(f"request {r.request_id}: output_len must be an int >= 1, got {r.output_len!r}")
        if not (math.isfinite(r.arrival) and r.arrival >= 0):
            raise ValueError(f"request {r.request_id}: arrival must be finite and >= 0, got {r.arrival!r}")
        for name in _NEEDS[policy]:
            v = getattr(r, name)
            if not math.isfinite(v):
                raise ValueError(
                    f"request {r.request_id}: policy {policy!r} needs a finite {name}, got {v!r}"
                )
        if policy in TIE_POLICIES and (r.sigma <= 0 or r.nu <= 0):
            raise ValueError(f"request {r.request_id}: sigma and nu must be > 0, got {r.sigma}, {r.nu}")


def _install(policy: str, requests: Sequence[ReplayRequest], tie_config: Any) -> str:
    """Register our schedulers, give them the keys/hints of this run; returns the ``scheduler_type``."""
    from hf_ext.generation.tie.cb import (
        PRIORITY_SCHEDULER_NAME,
        SCHEDULER_NAME,
        enable_tie_scheduler,
        register,
        set_length_hints,
        set_priority_keys,
    )

    ids = [r.request_id for r in requests]
    if policy == "fcfs":
        return "fifo"
    if policy in TIE_POLICIES:
        enable_tie_scheduler(config=ablation_config(tie_config, policy))
        set_length_hints(
            None,
            [r.mu for r in requests],
            [r.sigma for r in requests],
            [r.nu for r in requests],
            request_ids=ids,
        )
        return SCHEDULER_NAME
    register()
    key = {"sjf_oracle": "output_len", "ssjf": "pred_len", "ltr": "ltr_score"}[policy]
    set_priority_keys([float(getattr(r, key)) for r in requests], request_ids=ids)
    return PRIORITY_SCHEDULER_NAME


def run_cb_replay(
    model: Any,
    requests: Sequence[ReplayRequest],
    policy: str,
    *,
    generation_config: Any,
    continuous_batching_config: Any,
    tie_config: Any = None,
    time_scale: float = 1.0,
    stall_timeout: float = 120.0,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Submit ``requests`` at ``arrival * time_scale`` seconds into one real CB manager run with ``policy``.

    Args:
        model: a transformers causal LM (``init_continuous_batching``).
        requests: the workload (validated first; nothing starts on bad input).
        policy: one of :data:`POLICIES`.
        generation_config: shared by all requests; disable EOS (e.g. ``eos_token_id=-1``) so that each request
            produces exactly ``output_len`` tokens.
        continuous_batching_config: copied; its ``scheduler_type`` is set from ``policy``.
        tie_config: :class:`~hf_ext.generation.tie.config.TIEConfig` for ``tie`` (its ablations change it); its
            ``use_request_cap`` must be False (a request's ``max_new_tokens`` here is its true length). Default:
            ``TIEConfig`` with ``max_new_tokens`` from ``generation_config`` and ``use_request_cap=False``.
        time_scale: multiplies arrival times (``0`` = everything at once; ``1/k`` = k times the load).
        stall_timeout: seconds without any finished request after which the run is aborted. A request that
            finishes with an error (e.g. CUDA out of memory in the generation thread), or a generation thread
            that ends early, aborts it at once with a ``RuntimeError`` naming the error.
        progress: show a tqdm bar of finished requests.

    The TIE context (predictor, tokenizer, config, per-request hints and keys) is restored afterwards: a replay
    never changes what the caller had set for ``scheduler_type="tie"``.

    Returns:
        One dict per request (input order): ``request_id``, ``submit`` / ``first_token`` / ``finish`` (seconds
        after the replay start), ``n_tokens``, ``output_len``, ``error``, ``soft_resets`` (how often transformers
        evicted its KV and re-queued it; its ``first_token`` stays that of the first token it made).
    """
    from hf_ext.generation.tie.cb import preserved_context

    validate_replay(requests, policy, time_scale, tie_config)
    if tie_config is None:
        from hf_ext.generation.tie.config import TIEConfig

        cap = getattr(generation_config, "max_new_tokens", None) or max(int(r.output_len) for r in requests)
        tie_config = TIEConfig(max_new_tokens=int(cap), use_request_cap=False)
    cb = copy.deepcopy(continuous_batching_config)
    # what the caller had set (predictor, config, hints, keys) comes back afterwards
    with preserved_context(), _soft_resets_keep_token_times() as resets:
        cb.scheduler_type = _install(policy, requests, tie_config)
        mgr = model.init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb
        )
        n = len(requests)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n, desc=f"replay {policy}", leave=False)
        submit: dict[str, float] = {}

        def add(r: ReplayRequest) -> None:
            submit[r.request_id] = time.perf_counter()
            mgr.add_request(
                list(r.prompt_ids),
                request_id=r.request_id,
                max_new_tokens=int(r.output_len),
                record_timestamps=True,
            )

        ordered = sorted(requests, key=lambda x: x.arrival)
        results: dict[str, tuple[float, Any]] = {}
        t0 = time.perf_counter()
        try:
            if time_scale == 0:  # a burst: queue everything before the loop starts (its first step sees all)
                for r in ordered:
                    add(r)
            mgr.start()
            if time_scale > 0:
                for r in ordered:
                    delay = t0 + r.arrival * time_scale - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                    add(r)
            # outputs queue up inside the manager meanwhile; times come from transformers' own stamps
            last = time.perf_counter()
            while len(results) < n:
                g = mgr.get_result(timeout=0.5)
                now = time.perf_counter()
                if g is not None and g.is_finished():
                    if g.error is not None:  # its times and tokens would not be a measurement
                        raise RuntimeError(
                            f"continuous batching failed request {g.request_id!r} after {len(results)}/{n} "
                            f"requests finished ({policy}): {g.error}"
                        )
                    results[g.request_id] = (now, g)
                    last = now
                    if bar is not None:
                        bar.update(1)
                elif g is None and not mgr.is_running():
                    raise RuntimeError(
                        f"continuous batching stopped: its generation thread ended with {len(results)}/{n} "
                        f"requests finished ({policy})"
                    )
                elif now - last > stall_timeout:
                    raise RuntimeError(
                        f"continuous batching stalled: {len(results)}/{n} requests finished, "
                        f"none in {stall_timeout:.0f}s"
                    )
        finally:
            mgr.stop(block=True)
            if bar is not None:
                bar.close()
    out = []
    for r in requests:
        t_recv, g = results[r.request_id]
        ts = list(g.timestamps or [])
        finish = g.lifespan[1] if g.lifespan[1] > 0 else t_recv
        out.append(
            {
                "request_id": r.request_id,
                "submit": submit[r.request_id] - t0,
                "first_token": (ts[0] if ts else finish) - t0,
                "finish": finish - t0,
                "n_tokens": len(g.generated_tokens),
                "output_len": int(r.output_len),
                "error": g.error,
                "soft_resets": resets.get(r.request_id, 0),
            }
        )
    return out


@contextlib.contextmanager
def _soft_resets_keep_token_times() -> Iterator[dict[str, int]]:
    """While a replay runs: a request that transformers soft-resets (KV evicted; a new ``RequestState`` under the
    same id, its tokens so far moved into the prompt) keeps the timestamps of the tokens it had made, so that its
    first token, and TTFT, is the one it first produced, as in the simulator, not the first after the reset.
    Yields a dict that counts the soft resets per request id. transformers' method is put back on exit."""
    from transformers.generation.continuous_batching.requests import RequestState

    real = RequestState.create_equivalent_initial_request
    resets: dict[str, int] = {}

    def keep_times(self: Any) -> Any:
        resets[self.request_id] = resets.get(self.request_id, 0) + 1
        new = real(self)
        if self.record_timestamps:
            new._timestamps = list(self._timestamps) + list(new._timestamps)
        return new

    RequestState.create_equivalent_initial_request = keep_times
    try:
        yield resets
    finally:
        RequestState.create_equivalent_initial_request = real


def summarize_replay(records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-token latency ((finish - submit) / output_len), TTFT, latency (mean, p50, p99), makespan, tok/s, whether
    every request got exactly its length, and the soft resets transformers made (KV evicted, request re-queued)."""
    sub = np.array([r["submit"] for r in records])
    fin = np.array([r["finish"] for r in records])
    first = np.array([r["first_token"] for r in records])
    n = np.array([r["output_len"] for r in records], dtype=np.float64)
    lat = fin - sub
    ptl = lat / n
    ttft = first - sub
    out: dict[str, float] = {"n_requests": float(len(records))}
    for name, a in (("per_token", ptl), ("ttft", ttft), ("latency", lat)):
        out[f"{name}_mean"] = float(a.mean())
        out[f"{name}_p50"] = float(np.percentile(a, 50))
        out[f"{name}_p99"] = float(np.percentile(a, 99))
    out["makespan_s"] = float(fin.max() - sub.min())
    out["throughput_tok_s"] = float(n.sum() / max(out["makespan_s"], 1e-9))
    out["lengths_ok"] = float(all(r["n_tokens"] == r["output_len"] and r["error"] is None for r in records))
    out["soft_resets"] = float(sum(r.get("soft_resets", 0) for r in records))
    return out


REQUEST_COLUMNS = ("request_id", "output_len", "submit", "first_token", "finish")


def request_columns(records: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """A replay's per-request records as compact columns (times in seconds, rounded to 0.1 ms), for a details JSON:
    which requests made a policy's mean can then be read back after the run (:func:`top_contributors`)."""
    cols: dict[str, list[Any]] = {k: [] for k in REQUEST_COLUMNS}
    for r in records:
        for k in REQUEST_COLUMNS:
            v = r[k]
            cols[k].append(round(float(v), 4) if k in ("submit", "first_token", "finish") else v)
    return cols


def top_contributors(per_token: Sequence[float], k: int = 5) -> dict[str, Any]:
    """How much of a mean per-token latency its ``k`` largest values carry.

    A mean over a few hundred requests can turn on a handful of short requests that waited long (a 4-token request
    waiting 40 s adds 10 s/token). Returns ``index`` (the ``k`` largest, largest first), ``share`` (their part of
    the mean, in the mean's units: their sum / n), ``mean`` and ``mean_without`` (the mean over the other requests).

    Example:
        >>> top_contributors([1.0, 1.0, 1.0, 9.0], k=1)["mean_without"]
        1.0
    """
    a = np.asarray(per_token, dtype=np.float64)
    if a.ndim != 1 or len(a) == 0:
        raise ValueError("per_token must be a non-empty 1-D sequence")
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < len(a):
        raise ValueError(f"k must be an int in [0, {len(a) - 1}], got {k!r}")
    idx = np.argsort(-a, kind="stable")[:k]
    rest = np.delete(a, idx)
    return {
        "index": [int(i) for i in idx],
        "share": float(a[idx].sum() / len(a)),
        "mean": float(a.mean()),
        "mean_without": float(rest.mean()),
    }


# bins (upper bound, label) for splitting a latency gap by request: predicted spread, output length
SIGMA_BINS = ((0.5, "sigma < 0.5"), (0.8, "0.5 <= sigma < 0.8"), (math.inf, "sigma >= 0.8"))
LENGTH_BINS = (
    (20, "< 20 tokens"),
    (100, "20-99 tokens"),
    (300, "100-299 tokens"),
    (math.inf, ">= 300 tokens"),
)


def bin_label(value: float, bins: Sequence[tuple[float, str]]) -> str:
    """Label of the first bin whose upper bound exceeds ``value`` (bins ascending, the last unbounded).

    Example:
        >>> bin_label(0.6, SIGMA_BINS)
        '0.5 <= sigma < 0.8'
    """
    for upper, label in bins:
        if value < upper:
            return label
    raise ValueError(f"{value!r} is above every bin (the last bin must be unbounded)")


def split_gap(
    ours: Sequence[float], base: Sequence[float], labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Split the gap between two policies' mean per-token latencies over groups of requests.

    ``ours`` / ``base``: per-request values of the same requests in the same order; ``labels``: each request's
    group. Returns, per group (in first-seen order), ``n`` and ``contribution``: the group's sum of
    ``ours - base`` over the number of *all* requests, so the contributions add up to the difference of the means.

    Example:
        >>> split_gap([3.0, 1.0], [1.0, 1.0], ["short", "long"])["short"]["contribution"]
        1.0
    """
    a, b = np.asarray(ours, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape or len(labels) != len(a) or len(a) == 0:
        raise ValueError("ours, base and labels must be non-empty and of one length")
    out: dict[str, dict[str, float]] = {}
    for lab, d in zip(labels, a - b):
        g = out.setdefault(str(lab), {"n": 0.0, "contribution": 0.0})
        g["n"] += 1
        g["contribution"] += float(d) / len(a)
    return out


def split_gap_by_bins(
    ours: Sequence[float], base: Sequence[float], sigmas: Sequence[float], lengths: Sequence[int]
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`split_gap` of the same requests twice: by predicted spread (``"sigma"``, :data:`SIGMA_BINS`) and by
    output length (``"length"``, :data:`LENGTH_BINS`); groups in bin order, empty bins left out."""
    out = {}
    for name, bins, values in (("sigma", SIGMA_BINS, sigmas), ("length", LENGTH_BINS, lengths)):
        split = split_gap(ours, base, [bin_label(float(v), bins) for v in values])
        out[name] = {lab: split[lab] for _, lab in bins if lab in split}
    return out
