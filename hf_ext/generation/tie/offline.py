"""Offline batch jobs with static batches: transformers ``generate`` on padded batches, in TIE order.

Synthetic-data generation is often a loop of ``model.generate`` over padded batches. Such a batch runs
until its *longest* member finishes; the other rows are padded (their decode steps are computed and
thrown away). Which prompts share a batch therefore sets the job's time: a heavy-tailed length
distribution puts a long request into almost every batch of a random (FCFS) order. Sorting the job by
the TIE score before cutting it into batches groups requests of similar predicted length (and similar
tail risk), so fewer steps are wasted on padding.

* :func:`tie_batched_generate` — the user API: order the prompts by TIE (:func:`.scheduler.order_batch`),
  run ``generate`` batch by batch, return the outputs in the caller's order.
* :func:`policy_order`, :func:`static_batches`, :func:`batch_size_for_memory` — the planning pieces
  (FCFS / SJF-oracle / SSJF / LTR / TIE orders of simulator requests).
* :func:`simulate_static_batches` — the job in the shared simulator's cost model.
* :func:`run_static_generate` — the job on a real model with forced per-request output lengths
  (:func:`forced_lengths_processor`, for random-weight benchmark models), wall-clock timed.

Example:
    >>> static_batches([3, 0, 2, 1], 3)
    [[3, 0, 2], [1]]
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.generation.tie.config import TIEConfig, _check_int, tie_config_or_default
from hf_ext.generation.tie.scheduler import order_batch, predict_laws, validate_prompts
from hf_ext.utils.sdpa import check_sdpa_cudnn, sdpa_without_cudnn

OFFLINE_POLICIES = ("fcfs", "sjf_oracle", "ssjf", "ltr", "tie")
PLANS = ("order", "expected")  # tie_batched_generate: cut the order as wide as allowed / expected-cost plan


# ------------------------------------------------------------------------------------------ planning
def policy_order(policy: str, requests: Sequence[Any], config: TIEConfig | None = None) -> list[int]:
    """Indices of ``requests`` (simulator :class:`~hf_ext.simulate.Request`) in ``policy``'s job order.

    ``fcfs``: by ``arrival`` then position; ``sjf_oracle``: true ``output_len``; ``ssjf``: ``meta["pred_len"]``;
    ``ltr``: ``meta["ltr_score"]``; ``tie``: ``E[X̃] + β·CVaR`` with β for the whole job queued at once
    (``meta["pred_mu"]``/``["pred_sigma"]``, see :func:`.scheduler.annotate_requests`). Ties keep input order.
    """
    if policy not in OFFLINE_POLICIES:
        raise ValueError(f"policy must be one of {OFFLINE_POLICIES}, got {policy!r}")
    cfg = tie_config_or_default(config)
    reqs = list(requests)
    if policy == "fcfs":
        key = np.asarray([float(r.arrival) for r in reqs], dtype=np.float64)
    elif policy == "sjf_oracle":
        key = np.asarray([float(r.output_len) for r in reqs], dtype=np.float64)
    elif policy == "tie":
        from hf_ext.generation.tie.scheduler import TIEScheduler

        sched = TIEScheduler(cfg)
        key = np.asarray([sched.score_of(r, len(reqs)) for r in reqs], dtype=np.float64)
    else:
        name = "pred_len" if policy == "ssjf" else "ltr_score"
        missing = [r.id for r in reqs if name not in r.meta]
        if missing:
            raise ValueError(
                f"policy {policy!r} needs meta[{name!r}] on every request; missing on {missing[:5]}"
            )
        key = np.asarray([float(r.meta[name]) for r in reqs], dtype=np.float64)
    if not np.all(np.isfinite(key)):
        raise ValueError(f"policy {policy!r}: non-finite sort keys (NaN/inf predictions?)")
    return [int(i) for i in np.argsort(key, kind="stable")]


def static_batches(order: Sequence[int], batch_size: int, n: int | None = None) -> list[list[int]]:
    """Cut a job order into consecutive batches of ``batch_size`` (the last may be smaller); with ``n``,
    ``order`` must be a permutation of ``range(n)`` (every request of the job exactly once)."""
    _check_int("batch_size", batch_size)
    order = _checked_order(order, n)
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def _checked_order(order: Sequence[int], n: int | None) -> list[int]:
    """``order`` as ints; ``ValueError`` if it repeats an index or (with ``n``) is not a permutation of ``range(n)``."""
    order = [int(i) for i in order]
    if len(set(order)) != len(order):
        raise ValueError("order must not repeat an index")
    if n is not None and sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}) (one entry per request)")
    return order


def batch_size_for_memory(kv_tokens: int, max_prompt_len: int, max_new_tokens: int) -> int:
    """Largest static batch whose KV cache fits ``kv_tokens`` in the worst case (every row padded to
    ``max_prompt_len`` and generating ``max_new_tokens``) — what a ``generate`` user must provision."""
    for name, v in (
        ("kv_tokens", kv_tokens),
        ("max_prompt_len", max_prompt_len),
        ("max_new_tokens", max_new_tokens),
    ):
        _check_int(name, v)
    b = kv_tokens // (max_prompt_len + max_new_tokens)
    if b < 1:
        raise ValueError(
            f"kv_tokens={kv_tokens} cannot hold one sequence of {max_prompt_len} + {max_new_tokens} tokens"
        )
    return int(b)


def memory_batches(
    order: Sequence[int], prompt_lens: Sequence[int], kv_tokens: int, max_new_tokens: int
) -> list[list[int]]:
    """Cut a job order into consecutive batches, each as wide as the KV budget allows for *its own* prompts.

    A padded batch of ``B`` rows whose longest prompt has ``P`` tokens needs at most ``B × (P + max_new_tokens)``
    KV tokens, whatever the rows generate, so every batch fits ``kv_tokens`` with no prediction involved: rows are
    added along ``order`` while ``(B + 1) × (max(P, p_next) + max_new_tokens) <= kv_tokens``. Batches of short
    prompts get wider than the one size :func:`batch_size_for_memory` gives for the longest prompt of the job.

    Example:
        >>> memory_batches([0, 1, 2, 3], [10, 10, 50, 10], kv_tokens=100, max_new_tokens=10)
        [[0, 1], [2], [3]]
    """
    _check_int("kv_tokens", kv_tokens)
    _check_int("max_new_tokens", max_new_tokens)
    plen = _lengths("prompt_lens", prompt_lens)
    order = _checked_order(order, len(plen))
    _check_each_fits(order, plen, kv_tokens, max_new_tokens)
    batches: list[list[int]] = []
    cur: list[int] = []
    width = 0
    for i in order:
        w = max(width, int(plen[i]))
        if cur and (len(cur) + 1) * (w + max_new_tokens) > kv_tokens:
            batches.append(cur)
            cur, w = [], int(plen[i])
        cur.append(i)
        width = w
    if cur:
        batches.append(cur)
    return batches


def _check_sizing(batch_size: int | None, kv_tokens: int | None) -> None:
    """``ValueError`` unless exactly one of ``batch_size`` / ``kv_tokens`` is given."""
    if (batch_size is None) == (kv_tokens is None):
        raise ValueError(
            "give exactly one of batch_size (rows per batch) and kv_tokens (KV budget: memory-sized batches)"
        )


def _cut_batches(
    order: Sequence[int],
    plen: np.ndarray,
    batch_size: int | None,
    kv_tokens: int | None,
    max_new_tokens: int | None,
) -> list[list[int]]:
    """The job's batches along ``order``: :func:`memory_batches` with ``kv_tokens``, else :func:`static_batches`."""
    if kv_tokens is not None:
        assert max_new_tokens is not None
        return memory_batches(order, plen, kv_tokens, max_new_tokens)
    assert batch_size is not None
    return static_batches(order, batch_size, len(plen))


def _job_batches(
    order: Sequence[int] | None,
    plen: np.ndarray,
    out: np.ndarray,
    batch_size: int | None,
    kv_tokens: int | None,
    max_new_tokens: int | None,
    batches: Sequence[Sequence[int]] | None = None,
) -> tuple[list[list[int]], int]:
    """A job's batches (checked first: exactly one sizing; with ``kv_tokens`` a reservation covering every output)
    and its batch size: ``batch_size``, or the widest memory-sized batch. ``batches``: a complete plan instead
    (e.g. :func:`.planner.plan_batches`), then ``order`` and the sizing must be ``None``."""
    if batches is not None:
        if order is not None or batch_size is not None or kv_tokens is not None:
            raise ValueError("batches is a complete plan: give it without order, batch_size or kv_tokens")
        plan = [[int(i) for i in b] for b in batches]
        if any(not b for b in plan) or sorted(i for b in plan for i in b) != list(range(len(plen))):
            raise ValueError(f"batches must be non-empty lists partitioning range({len(plen)})")
        return plan, max((len(b) for b in plan), default=0)
    if order is None:
        raise ValueError("give order (with batch_size or kv_tokens) or batches")
    _check_sizing(batch_size, kv_tokens)
    _check_reservation(kv_tokens, max_new_tokens, out)
    cut = _cut_batches(order, plen, batch_size, kv_tokens, max_new_tokens)
    if kv_tokens is not None:
        return cut, max((len(b) for b in cut), default=0)
    assert batch_size is not None
    return cut, batch_size


def _check_reservation(kv_tokens: int | None, max_new_tokens: int | None, out: np.ndarray) -> None:
    """With ``kv_tokens``: ``ValueError`` unless ``max_new_tokens`` (each row's reservation) covers every output."""
    if kv_tokens is not None and (max_new_tokens is None or (len(out) and max_new_tokens < int(out.max()))):
        raise ValueError(
            f"kv_tokens needs max_new_tokens >= every output length (got {max_new_tokens!r}, longest "
            f"output {int(out.max()) if len(out) else 0})"
        )


def _check_each_fits(order: Sequence[int], plen: np.ndarray, kv_tokens: int, max_new_tokens: int) -> None:
    """``ValueError`` unless every request of ``order`` fits ``kv_tokens`` alone (its prompt + ``max_new_tokens``);
    the first one in ``order`` that does not is named."""
    too_long = [i for i in order if plen[i] + max_new_tokens > kv_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(
            f"kv_tokens={kv_tokens} cannot hold request {i} alone ({int(plen[i])} prompt + {max_new_tokens} new "
            "tokens); raise kv_tokens or lower max_new_tokens"
        )


# ---------------------------------------------------------------------------------------- results
@dataclass
class StaticBatchResult:
    """One static-batch job: per-batch and whole-job figures (times in seconds)."""

    policy: str
    batch_size: int
    makespan_s: float
    tokens: int  # useful generated tokens (sum of the requests' output lengths)
    n_requests: int
    decode_steps: int  # sum over batches of the longest output (the steps every row pays)
    row_steps: int = 0  # sum over batches of rows x longest output (computed row-steps, padding included)
    batch_times: list[float] = field(default_factory=list)
    finish: list[float] = field(default_factory=list)  # per request (input order): end of its batch

    @classmethod
    def from_batches(
        cls,
        policy: str,
        batch_size: int,
        batches: Sequence[Sequence[int]],
        batch_times: Sequence[float],
        output_lens: np.ndarray,
    ) -> StaticBatchResult:
        """The job's figures from its batches (request indices) and their times, in running order."""
        ends = np.cumsum(batch_times) if len(batch_times) else np.zeros(0)
        finish = [0.0] * len(output_lens)
        for b, end in zip(batches, ends):
            for i in b:
                finish[i] = float(end)
        longest = [int(output_lens[list(b)].max()) for b in batches]
        makespan = float(ends[-1]) if len(ends) else 0.0
        tokens, n = int(output_lens.sum()), len(output_lens)
        row_steps = sum(len(b) * m for b, m in zip(batches, longest))
        times = [float(t) for t in batch_times]
        return cls(policy, batch_size, makespan, tokens, n, sum(longest), row_steps, times, finish)

    @property
    def padding_share(self) -> float:
        """Share of computed row-steps that were padding (a finished row still in its batch)."""
        return 0.0 if self.row_steps == 0 else max(0.0, 1.0 - self.tokens / self.row_steps)

    def summary(self) -> dict[str, float]:
        return {
            "makespan_s": self.makespan_s,
            "throughput_tok_s": self.tokens / self.makespan_s if self.makespan_s > 0 else math.inf,
            "requests_per_s": self.n_requests / self.makespan_s if self.makespan_s > 0 else math.inf,
            "decode_steps": float(self.decode_steps),
            "padding_share": self.padding_share,
            "batch_size": float(self.batch_size),
        }


def _lengths(name: str, values: Sequence[int], n: int | None = None) -> np.ndarray:
    a = np.asarray(values)
    if a.ndim != 1 or (n is not None and len(a) != n):
        raise ValueError(f"{name} must be a 1-D sequence of {n if n is not None else 'N'} ints")
    if len(a) and (not np.issubdtype(a.dtype, np.integer) or a.min() < 1):
        raise ValueError(f"{name} must hold ints >= 1")
    return a.astype(np.int64)


def simulate_static_batches(
    cost_model: Any,
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    order: Sequence[int] | None,
    batch_size: int | None = None,
    policy: str = "",
    *,
    kv_tokens: int | None = None,
    max_new_tokens: int | None = None,
    batches: Sequence[Sequence[int]] | None = None,
) -> StaticBatchResult:
    """Time a static-batch job with a :class:`~hf_ext.simulate.CostModel`.

    Batches are ``batch_size`` rows cut from ``order`` or, with ``kv_tokens`` (and ``max_new_tokens``), as wide
    as :func:`memory_batches` allows; give exactly one of ``batch_size`` / ``kv_tokens``. Or ``batches``, a complete
    plan (:func:`.planner.plan_batches`; ``order=None``, no sizing). Each batch (``B`` rows,
    prompts left-padded to the batch's longest ``P``, outputs up to its longest ``L``): one prefill of ``B × P``
    tokens (which yields the first token), then ``L - 1`` decode steps of all ``B`` rows (finished rows are
    padding but still computed, as in ``generate``), the context growing by one a step.
    """
    plen = _lengths("prompt_lens", prompt_lens)
    out = _lengths("output_lens", output_lens, len(plen))
    batches, batch_size = _job_batches(order, plen, out, batch_size, kv_tokens, max_new_tokens, batches)
    times = []
    for b in batches:
        n, p, longest = len(b), int(plen[b].max()), int(out[b].max())
        times.append(
            cost_model.prefill_time(p, batch=n) + cost_model.decode_span(n, n * (p + 1), longest - 1)
        )
    return StaticBatchResult.from_batches(policy, batch_size, batches, times, out)


@dataclass
class ChunkedJobResult:
    """A chunked static-batch job in the cost model (see :func:`simulate_chunked_batches`); times in seconds."""

    makespan_s: float
    tokens: int
    rounds: int  # passes over the queue (1: no row was carried over)
    batches: int
    carried: int  # row continuations (a row cut at its batch's horizon and run again later)
    reprefill_tokens: int  # prompt + generated tokens prefilled again for the continuations
    row_steps: int  # sum over batches of rows x steps (computed row-steps, padding included)

    @property
    def throughput_tok_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s > 0 else math.inf

    def summary(self) -> dict[str, float]:
        return {
            "makespan_s": self.makespan_s,
            "throughput_tok_s": self.throughput_tok_s,
            "padding_share": max(0.0, 1.0 - self.tokens / self.row_steps) if self.row_steps else 0.0,
            "rounds": float(self.rounds),
            "carried": float(self.carried),
            "reprefill_tokens": float(self.reprefill_tokens),
        }


def simulate_chunked_batches(
    cost_model: Any,
    prompt_lens: Sequence[int],
    output_lens: Sequence[int],
    order: Sequence[int],
    kv_tokens: int,
    reserve: Any,
) -> ChunkedJobResult:
    """What-if, in the cost model only: a static-batch job whose batches stop at a horizon and carry unfinished rows.

    There is no engine for this in the package; it answers whether sizing static batches from predicted lengths
    (instead of the cap every ``generate`` user must provision) would pay, and how much of that is the prediction.
    Each row ``i`` that has generated ``g`` tokens reserves ``reserve(i, g) >= 1`` more. Batches are cut along the
    queue while ``rows × (widest prompt-plus-generated + largest reservation) <= kv_tokens``; a batch runs
    ``min(largest reservation, longest remaining output)`` steps (one prefill of its padded width, which yields the
    first token, then decode steps). Rows still unfinished are carried into the next pass, which re-prefills their
    prompt plus what they generated, in order of their next reservation. ``reserve(i, g) = cap - g`` is the plain
    static job (:func:`simulate_static_batches` with ``kv_tokens``), a constant is prediction-free chunking.
    """
    plen = _lengths("prompt_lens", prompt_lens)
    out = _lengths("output_lens", output_lens, len(plen))
    _check_int("kv_tokens", kv_tokens)
    queue = [(i, 0) for i in _checked_order(order, len(plen))]
    t, rounds, batches, carried, reprefill, row_steps = 0.0, 0, 0, 0, 0, 0
    while queue:
        rounds += 1
        nxt: list[tuple[int, int]] = []
        k = 0
        while k < len(queue):
            rows: list[tuple[int, int]] = []
            width = horizon = 0
            while k < len(queue):
                i, g = queue[k]
                r = int(reserve(i, g))
                if r < 1:
                    raise ValueError(f"reserve({i}, {g}) must be >= 1 token, got {r}")
                if int(plen[i]) + g + r > kv_tokens:
                    raise ValueError(
                        f"kv_tokens={kv_tokens} cannot hold request {i} alone ({int(plen[i]) + g} context + {r} "
                        "reserved tokens)"
                    )
                w, h = max(width, int(plen[i]) + g), max(horizon, r)
                if rows and (len(rows) + 1) * (w + h) > kv_tokens:
                    break
                rows.append((i, g))
                width, horizon = w, h
                k += 1
            steps = min(horizon, max(int(out[i]) - g for i, g in rows))
            t += cost_model.prefill_time(width, batch=len(rows)) + cost_model.decode_span(
                len(rows), len(rows) * (width + 1), steps - 1
            )
            batches += 1
            row_steps += len(rows) * steps
            for i, g in rows:
                if out[i] - g > steps:
                    nxt.append((i, g + steps))
                    carried += 1
                    reprefill += int(plen[i]) + g + steps
        nxt.sort(key=lambda ig: reserve(*ig))
        queue = nxt
    return ChunkedJobResult(t, int(out.sum()), rounds, batches, carried, reprefill, row_steps)


# --------------------------------------------------------------------------------- real generate
def forced_lengths_processor(targets: Sequence[int], prompt_len: int, eos_token_id: int) -> Any:
    """A ``LogitsProcessor`` making row ``i`` of a batch emit EOS as its ``targets[i]``-th new token and
    never before (benchmarks with random-weight models, whose EOS timing means nothing).

    ``prompt_len`` is the padded prompt width of the batch (``input_ids.shape[1]`` at the first step).
    """
    import torch
    from transformers import LogitsProcessor

    tgt = torch.as_tensor([int(x) for x in targets], dtype=torch.long)
    if tgt.numel() == 0 or int(tgt.min()) < 1:
        raise ValueError("targets must be ints >= 1")

    class _Forced(LogitsProcessor):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            made = input_ids.shape[1] - prompt_len  # tokens generated so far
            t = tgt.to(scores.device)
            scores = scores.clone()
            scores[:, eos_token_id] = torch.where(
                t > made + 1, torch.full_like(t, float("-inf"), dtype=scores.dtype), scores[:, eos_token_id]
            )
            stop = t == made + 1
            if bool(stop.any()):
                scores[stop] = float("-inf")
                scores[stop, eos_token_id] = 0.0
            return scores

    return _Forced()


def _left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Any, Any]:
    """``input_ids`` / ``attention_mask`` ``[len(rows), longest]`` (long), each row right-aligned (left padding)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for j, row in enumerate(rows):
        ids[j, width - len(row) :] = torch.as_tensor(list(row), dtype=torch.long)
        mask[j, width - len(row) :] = 1
    return ids, mask


def run_static_generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    output_lens: Sequence[int],
    order: Sequence[int] | None,
    batch_size: int | None = None,
    *,
    eos_token_id: int,
    pad_token_id: int,
    kv_tokens: int | None = None,
    max_new_tokens: int | None = None,
    batches: Sequence[Sequence[int]] | None = None,
    policy: str = "",
    progress: bool = False,
    sdpa_cudnn: bool = False,
) -> StaticBatchResult:
    """The job on a real model: ``generate`` per batch (greedy, left padding), each row forced to its
    ``output_lens[i]`` tokens (EOS last). Wall-clock times; the generated lengths are checked.
    ``sdpa_cudnn=False`` (default) keeps SDPA off cuDNN's kernel, as :func:`tie_batched_generate` does.

    Batches are ``batch_size`` rows cut from ``order`` or, with ``kv_tokens`` and ``max_new_tokens`` (the
    reservation per row, >= every output length), as wide as :func:`memory_batches` allows under that KV budget,
    as in :func:`simulate_static_batches`; give exactly one of ``batch_size`` / ``kv_tokens``, or ``batches`` (a
    complete plan, ``order=None``).
    """
    import torch
    from transformers import GenerationConfig, LogitsProcessorList

    check_sdpa_cudnn(sdpa_cudnn)
    out = _lengths("output_lens", output_lens, len(prompt_ids))
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt must have at least one token")
    plen = np.asarray([len(p) for p in prompt_ids], dtype=np.int64)
    batches, batch_size = _job_batches(order, plen, out, batch_size, kv_tokens, max_new_tokens, batches)
    device = next(model.parameters()).device
    times: list[float] = []
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=f"static {policy}", leave=False)
    for b in it:
        ids, mask = _left_pad([prompt_ids[i] for i in b], pad_token_id)
        width = ids.shape[1]
        longest = int(out[b].max())
        gc = GenerationConfig(
            max_new_tokens=longest, do_sample=False, eos_token_id=eos_token_id, pad_token_id=pad_token_id
        )
        proc = forced_lengths_processor(out[b].tolist(), width, eos_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), sdpa_without_cudnn(not sdpa_cudnn):
            seq = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=gc,
                logits_processor=LogitsProcessorList([proc]),
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        new = seq[:, width:].cpu()
        for r, i in enumerate(b):
            got = len(trim_at_eos(new[r].tolist(), {eos_token_id}))
            if got != int(out[i]):
                raise RuntimeError(f"request {i}: generated {got} tokens, forced {int(out[i])}")
        times.append(dt)
    return StaticBatchResult.from_batches(policy, batch_size, batches, times, out)


# ------------------------------------------------------------------------------------- user API
def tie_batched_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    predictor: Any = None,
    *,
    batch_size: int | None = None,
    kv_tokens: int | None = None,
    generation_config: Any = None,
    config: TIEConfig | None = None,
    plan: str = "order",
    prompt_buckets: int | None = None,
    progress: bool = False,
    sdpa_cudnn: bool = False,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """``model.generate`` over ``prompts`` in static batches cut from the TIE order.

    Args:
        model: a transformers causal LM.
        tokenizer: its tokenizer (needs a pad token); prompts are left-padded per batch (the tokenizer's own
            ``padding_side`` is not changed).
        prompts: N non-empty strings.
        predictor: ``logt`` :class:`~hf_ext.generation.tie.predictor.LengthPredictor`; ``None`` uses the
            prompt-length heuristic with a warning.
        batch_size: rows per ``generate`` call (from your memory budget, e.g. :func:`batch_size_for_memory`).
        kv_tokens: instead of ``batch_size``, the KV-cache budget in tokens: each batch is as wide as fits it with
            its own padded prompt width plus ``max_new_tokens`` per row (:func:`memory_batches`; never exceeded,
            whatever the rows generate). Give exactly one of the two.
        generation_config / generate_kwargs: passed to every ``generate`` call; ``max_new_tokens`` (here
            or in the config) is also the cap of the length distribution.
        config: :class:`TIEConfig` (β, ν, α; ``max_new_tokens`` when the generation config has none).
        plan: ``"order"`` cuts the TIE order into batches as wide as the limit allows; ``"expected"`` groups the
            prompts by length and cuts the order where the job's expected decode steps are least, from the
            predicted laws (:func:`.planner.plan_batches`; same width limit, never exceeded).
        prompt_buckets: with ``plan="expected"``, the number of prompt-length buckets (``None``: the planner
            picks it by expected cost).
        sdpa_cudnn: allow PyTorch's cuDNN SDPA kernel in ``generate``. ``False`` (default) runs each call inside
            :func:`hf_ext.utils.sdpa.sdpa_without_cudnn`: cuDNN plans its kernel per KV length, which changes
            every step (2.8x slower on a fresh H100 job; see that module).

    Returns:
        For each prompt, in the order given, its new token ids (up to and including EOS, no padding).
    """
    import torch

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a non-empty list of strings")
    prompts = validate_prompts(prompts, non_empty=True)
    cfg = tie_config_or_default(config)
    _check_sizing(batch_size, kv_tokens)
    if batch_size is not None:
        _check_int("batch_size", batch_size)
    if kv_tokens is not None:
        _check_int("kv_tokens", kv_tokens)
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    check_sdpa_cudnn(sdpa_cudnn)
    if prompt_buckets is not None:
        if plan != "expected":
            raise ValueError(f"prompt_buckets needs plan='expected', got plan={plan!r}")
        _check_int("prompt_buckets", prompt_buckets)
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    gen_cap = generate_kwargs.get("max_new_tokens", getattr(generation_config, "max_new_tokens", None))
    max_length = generate_kwargs.get("max_length", getattr(generation_config, "max_length", None))
    if (
        gen_cap is None
        and max_length is not None
        and "max_length" in (set(generate_kwargs) | set(getattr(generation_config, "to_diff_dict", dict)()))
    ):
        # a cap on prompt + new tokens differs per padded batch: the plan and the KV budget need one per request
        raise ValueError(
            f"max_length={max_length} is set without max_new_tokens; tie_batched_generate plans with a per-request "
            "cap on new tokens: pass max_new_tokens (in generate_kwargs or generation_config) instead"
        )
    cap = gen_cap if gen_cap is not None else cfg.max_new_tokens
    _check_int("max_new_tokens", cap)
    enc = tokenizer(list(prompts), add_special_tokens=True)["input_ids"]  # one batched call
    plen = [len(e) for e in enc]
    if kv_tokens is not None:  # before any prediction or generate: one prompt alone must fit
        _check_each_fits(range(len(enc)), np.asarray(plen), kv_tokens, cap)
    laws = predict_laws(list(prompts), predictor, cap, prompt_tokens=plen)
    order = order_batch(list(prompts), predictor, cfg, max_new_tokens=cap, laws=laws)
    if gen_cap is None:
        generate_kwargs["max_new_tokens"] = cap
    if getattr(generation_config, "pad_token_id", None) is None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    # the EOS generate stops at: the call's, else the config's, else the model's defaults (generate merges them),
    # else the tokenizer's
    sources = (
        generate_kwargs.get("eos_token_id"),
        getattr(generation_config, "eos_token_id", None),
        getattr(getattr(model, "generation_config", None), "eos_token_id", None),
        tokenizer.eos_token_id,
    )
    eos = next((e for e in map(_eos_ids, sources) if e is not None), set())
    device = next(model.parameters()).device
    results: list[list[int]] = [[] for _ in prompts]
    if plan == "expected":
        from hf_ext.generation.tie.planner import plan_batches

        batches = plan_batches(
            order,
            plen,
            cap,
            kv_tokens=kv_tokens,
            batch_size=batch_size,
            prompt_buckets=prompt_buckets,
            **laws,
        ).batches
    else:
        batches = _cut_batches(order, np.asarray(plen), batch_size, kv_tokens, cap)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="tie_batched_generate")
    for b in batches:
        ids, mask = _left_pad([enc[i] for i in b], tokenizer.pad_token_id)
        width = ids.shape[1]
        with torch.inference_mode(), sdpa_without_cudnn(not sdpa_cudnn):
            seq = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=generation_config,
                **generate_kwargs,
            )
        for r, i in enumerate(b):
            results[i] = trim_at_eos(seq[r, width:].tolist(), eos)
    return results


def _eos_ids(value: Any) -> set[int] | None:
    """EOS ids of a generation config / tokenizer value (int, list or tensor); ``None`` if unset."""
    if value is None:
        return None
    vals = value.tolist() if hasattr(value, "tolist") else value
    vals = vals if isinstance(vals, (list, tuple)) else [vals]
    return {int(v) for v in vals if int(v) >= 0}


def trim_at_eos(row: Sequence[int], eos: set[int]) -> list[int]:
    """``row`` up to and including its first EOS (the padding ``generate`` adds after it dropped)."""
    out = []
    for t in row:
        out.append(int(t))
        if t in eos:
            break
    return out


__all__ = [
    "OFFLINE_POLICIES",
    "PLANS",
    "StaticBatchResult",
    "batch_size_for_memory",
    "forced_lengths_processor",
    "memory_batches",
    "policy_order",
    "run_static_generate",
    "simulate_static_batches",
    "static_batches",
    "tie_batched_generate",
    "trim_at_eos",
]
