"""Replay a (small) workload through real ``transformers`` continuous batching and compare with the simulator.

The bridge checks a scheduling policy on real decoding, not only in simulation: the policy's admission order
(a :class:`~hf_ext.simulate.types.Scheduler` drained on the offline workload) is submitted to transformers'
``ContinuousBatchingManager`` (FIFO admission, so the submission order is the admission order), each request
with its own ``max_new_tokens = output_len`` (random prompts; generation is forced to the request's length),
and per-request finish times are read from the manager's ``lifespan`` stamps.  The same workload runs through
the :class:`~hf_ext.simulate.engine.Simulator` with the same order, batch size and token budget; the report
gives the measured and simulated mean latency per policy and the rank correlation (Kendall tau) of
measured vs simulated finish order.

Example:
    >>> from hf_ext.simulate.bridge import replay
    >>> from hf_ext.simulate import workload as W
    >>> rep = replay(W.offline_batch(6, seed=0, output=W.LengthDist(max_len=24), prompt=W.LengthDist(mu=3, max_len=32)),
    ...              policies=("fcfs",), max_batch=4)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hf_ext.simulate.cost_model import CostModel
from hf_ext.simulate.types import Request


@dataclass
class BridgeReport:
    """Measured (real transformers) vs simulated per-policy results."""

    real_mean_latency: dict[str, float] = field(default_factory=dict)
    sim_mean_latency: dict[str, float] = field(default_factory=dict)
    finish_order_tau: dict[str, float] = field(default_factory=dict)
    real_latency: dict[str, np.ndarray] = field(default_factory=dict)
    sim_latency: dict[str, np.ndarray] = field(default_factory=dict)
    real_tokens: dict[str, int] = field(default_factory=dict)

    def rows(self) -> list[dict[str, float | str]]:
        return [
            {
                "policy": p,
                "real_mean_latency_s": self.real_mean_latency[p],
                "sim_mean_latency_s": self.sim_mean_latency[p],
                "finish_order_kendall_tau": self.finish_order_tau[p],
            }
            for p in self.real_mean_latency
        ]


def policy_order(reqs: Sequence[Request], scheduler: Any) -> list[Request]:
    """Admission order a scheduler gives an offline batch (all added at t=0, then drained)."""
    for r in reqs:
        scheduler.add(r, 0.0)
    out = []
    while len(scheduler):
        r = scheduler.pop_next(0.0)
        if r is None:
            raise RuntimeError(
                f"scheduler {getattr(scheduler, 'name', scheduler)!r} returned None with requests left"
            )
        out.append(r)
    return out


def run_real(
    model: Any,
    ordered: Sequence[Request],
    *,
    max_batch: int = 8,
    max_batch_tokens: int = 512,
    num_blocks: int = 128,
    seed: int = 0,
    timeout_s: float = 120.0,
) -> tuple[np.ndarray, int]:
    """Run ``ordered`` requests (submitted in that order) through transformers continuous batching.

    Returns ``(latency seconds per request in the given order, generated tokens)``; latency is measured from
    the moment the engine picked up its first request to the request's finish stamp (all requests are
    submitted before the engine starts)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    gc = GenerationConfig(
        max_new_tokens=max(r.output_len for r in ordered),
        do_sample=False,
        eos_token_id=-1,
        pad_token_id=model.config.pad_token_id or 0,
    )
    cb = ContinuousBatchingConfig(
        num_blocks=num_blocks,
        max_batch_tokens=max_batch_tokens,
        max_requests_per_batch=max_batch,
        use_cuda_graph=False,
        use_async_batching=False,
    )
    mgr = model.init_continuous_batching(generation_config=gc, continuous_batching_config=cb)
    prompts = [torch.randint(3, vocab, (r.prompt_len,), generator=g).tolist() for r in ordered]
    ids = [f"r{i}" for i in range(len(ordered))]
    t0 = time.perf_counter()
    for rid, p, r in zip(ids, prompts, ordered):
        mgr.add_request(input_ids=p, request_id=rid, max_new_tokens=r.output_len)
    mgr.start()
    outs: dict[str, Any] = {}
    deadline = time.perf_counter() + timeout_s
    try:
        while len(outs) < len(ordered):
            o = mgr.get_result(timeout=max(0.1, deadline - time.perf_counter()))
            if o is None:
                raise TimeoutError(
                    f"continuous batching returned {len(outs)}/{len(ordered)} results in {timeout_s}s"
                )
            outs[o.request_id] = o
    finally:
        mgr.stop(block=True)
        destroy = getattr(model, "destroy_cached_continuous_batching_manager", None)
        if destroy is not None:
            destroy()
    start = min(min(o.lifespan[0] for o in outs.values() if o.lifespan[0] > 0), t0 + timeout_s)
    lat = np.asarray([outs[i].lifespan[1] - start for i in ids])
    toks = int(sum(len(outs[i].generated_tokens) for i in ids))
    return lat, toks


def replay(
    reqs: Sequence[Request],
    policies: Sequence[str] = ("fcfs", "sjf"),
    *,
    model: Any = None,
    cost_model: CostModel | None = None,
    max_batch: int = 8,
    max_batch_tokens: int = 512,
    threads: int | None = 1,
) -> BridgeReport:
    """Replay the offline workload ``reqs`` under each policy on a real tiny model and in the simulator.

    Args:
        reqs: requests (arrivals are ignored: offline batch); keep them small (tens of tokens).
        policies: scheduler names for :func:`hf_ext.simulate.policies.make_scheduler`.
        model: a transformers causal LM (default: hf_ext.testing's tiny Llama).
        cost_model: simulator cost model (default: the shipped CPU tiny calibration if present, else a
            constant-step model).
        max_batch / max_batch_tokens: continuous-batching limits used by both the real engine and the simulator.
    """
    import torch
    from scipy.stats import kendalltau

    from hf_ext.simulate.engine import Simulator
    from hf_ext.simulate.policies import make_scheduler

    if not reqs:
        raise ValueError("reqs must not be empty")
    if threads is not None:
        torch.set_num_threads(threads)
    if model is None:
        from hf_ext.testing import tiny_llama

        model = tiny_llama()
    if cost_model is None:
        from hf_ext.simulate.cost_model import available_calibrations

        cal = [c for c in available_calibrations() if c.startswith("cpu-") and c.endswith("-tiny")]
        cost_model = CostModel.load(cal[0]) if cal else CostModel.constant(0.003)
    offline = [
        Request(id=r.id, arrival=0.0, prompt_len=r.prompt_len, output_len=r.output_len, meta=dict(r.meta))
        for r in reqs
    ]
    rep = BridgeReport()
    for name in policies:
        for r in offline:
            r.meta.pop("sim_generated", None)
        order = policy_order(offline, make_scheduler(name))
        real, toks = run_real(model, order, max_batch=max_batch, max_batch_tokens=max_batch_tokens)
        # simulate with the same order (FCFS over the ordered list = the policy's order)
        from hf_ext.simulate.policies import FCFS

        sim_reqs = [
            Request(id=i, arrival=0.0, prompt_len=r.prompt_len, output_len=r.output_len)
            for i, r in enumerate(order)
        ]
        res = Simulator(
            cost_model,
            FCFS(),
            max_num_seqs=max_batch,
            max_num_batched_tokens=max(max_batch_tokens, max_batch + 1),
        ).run(sim_reqs)
        sim = res.latency[np.argsort(res.cols["id"])]
        rep.real_latency[name] = real
        rep.sim_latency[name] = sim
        rep.real_mean_latency[name] = float(real.mean())
        rep.sim_mean_latency[name] = float(sim.mean())
        rep.finish_order_tau[name] = float(kendalltau(real, sim).statistic)
        rep.real_tokens[name] = toks
    return rep
