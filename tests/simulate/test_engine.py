"""Engine correctness: textbook queueing results, conservation, caching, branches, rollouts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_ext.simulate import FCFS, SSJF, CostModel, LRUCachePolicy, Request, SimConfig, Simulator, SJFOracle
from hf_ext.simulate import workload as W

H100ISH = CostModel(
    decode_floor_s=0.044,
    prefill_floor_s=0.035,
    base_s=0.03,
    per_seq_s=1e-4,
    per_ctx_token_s=2e-7,
    per_prefill_token_s=3.3e-5,
    per_prefill_attn_s=1e-9,
    kv_bytes_per_token=131072,
)


def _fresh(reqs):
    for r in reqs:
        r.meta.pop("sim_generated", None)
    return reqs


def test_hand_computed_single_server():
    dt = 0.01
    reqs = [
        Request(id=0, arrival=0.0, prompt_len=4, output_len=3),
        Request(id=1, arrival=0.0, prompt_len=4, output_len=2),
    ]
    res = Simulator(CostModel.constant(dt), FCFS(), max_num_seqs=1, max_num_batched_tokens=None).run(reqs)
    assert np.allclose(res.cols["finish"], [3 * dt, 5 * dt])
    assert np.allclose(res.ttft, [dt, 4 * dt])
    res = Simulator(CostModel.constant(dt), SJFOracle(), max_num_seqs=1, max_num_batched_tokens=None).run(
        _fresh(reqs)
    )
    assert np.allclose(res.cols["finish"], [5 * dt, 2 * dt])
    # batched: both run together, one iteration per token
    res = Simulator(CostModel.constant(dt), FCFS()).run(_fresh(reqs))
    assert np.allclose(res.cols["finish"], [3 * dt, 2 * dt])


def test_decode_span_closed_form_matches_sum():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cm = CostModel(
            decode_floor_s=rng.uniform(0, 0.05),
            base_s=rng.uniform(0, 0.01),
            per_seq_s=rng.uniform(0, 1e-3),
            per_ctx_token_s=rng.uniform(0, 1e-6),
        )
        n, ctx0, k = int(rng.integers(1, 64)), float(rng.integers(0, 100000)), int(rng.integers(1, 3000))
        brute = sum(cm.decode_time(n, (ctx0 + n * i) / n) for i in range(k))
        assert math.isclose(cm.decode_span(n, ctx0, k), brute, rel_tol=1e-9, abs_tol=1e-12)
        budget = brute * rng.uniform(0.1, 1.2)
        kk = cm.steps_within(n, ctx0, budget, k)
        assert cm.decode_span(n, ctx0, kk) >= budget or kk == k
        assert kk == 1 or cm.decode_span(n, ctx0, kk - 1) < budget


def test_mm1_mean_waiting_time_within_5pct():
    """max_num_seqs=1 and constant step time: a single server with (near-)exponential service."""
    lam, dt, mean = 0.5, 1e-3, 1000  # service mean 1 s, rho = 0.5
    rng = np.random.default_rng(0)
    n = 50_000
    arr = np.cumsum(rng.exponential(1 / lam, n))
    outs = rng.geometric(1 / mean, n)
    reqs = [Request(id=i, arrival=float(arr[i]), prompt_len=1, output_len=int(outs[i])) for i in range(n)]
    res = Simulator(
        CostModel.constant(dt), FCFS(), max_num_seqs=1, max_num_batched_tokens=None, record_timeline=False
    ).run(reqs)
    mu = 1 / (mean * dt)
    wq_formula = lam / (mu * (mu - lam))  # M/M/1: rho / (mu - lam)
    wq = float(res.queue_delay.mean())
    assert abs(wq - wq_formula) / wq_formula < 0.05, (wq, wq_formula)


def test_sjf_beats_fcfs_on_heavy_tail():
    reqs = W.synthetic(4000, rate=9.0, output=W.azure_output_dist("logt"), seed=3)
    out = {}
    for s in (FCFS(), SJFOracle()):
        out[s.name] = (
            Simulator(H100ISH, s, max_num_seqs=64, kv_capacity_tokens=200_000).run(_fresh(reqs)).summary()
        )
    assert out["sjf-oracle"]["latency_mean"] < 0.7 * out["fcfs"]["latency_mean"]
    assert out["sjf-oracle"]["per_token_mean"] < out["fcfs"]["per_token_mean"]


def test_ssjf_uses_prediction():
    reqs = W.synthetic(300, rate=20.0, seed=1)
    for r in reqs:
        r.meta["pred_len"] = -r.output_len  # adversarial predictor: longest first
    bad = Simulator(H100ISH, SSJF(), max_num_seqs=8).run(_fresh(reqs)).summary()["latency_mean"]
    for r in reqs:
        r.meta["pred_len"] = r.output_len
    good = Simulator(H100ISH, SSJF(), max_num_seqs=8).run(_fresh(reqs)).summary()["latency_mean"]
    assert good < bad
    with pytest.raises(ValueError, match="pred_len"):
        Simulator(H100ISH, SSJF()).run([Request(id=0, arrival=0.0, prompt_len=2, output_len=2)])


def test_conservation_with_preemption():
    reqs = W.synthetic(1500, rate=30.0, output=W.azure_output_dist("logt", max_len=3000), seed=5)
    cap = 40_000
    res = Simulator(H100ISH, FCFS(), max_num_seqs=128, kv_capacity_tokens=cap).run(reqs)
    c = res.cols
    assert res.num_finished == len(reqs)
    assert res.counters["preemptions"] > 0 and c["recomputed"].sum() > 0
    # every token generated exactly once
    assert res.tokens_generated == sum(r.output_len for r in reqs)
    assert np.array_equal(c["generated"], c["output_len"])
    assert np.all(c["finish"][c["preemptions"] > 0] > 0)
    assert res.counters["peak_kv_tokens"] <= cap
    assert res.timeline["kv_tokens"].max() <= cap
    assert np.all(c["arrival"] <= c["first_admit"]) and np.all(c["first_admit"] < c["first_token"])
    assert np.all(c["first_token"] <= c["finish"])
    # prefill work: each prompt once plus the recomputed tokens
    assert c["prefill_computed"].sum() == c["prompt_len"].sum() + c["recomputed"].sum()


def test_chunked_prefill_splits_long_prompts():
    dt = 0.01
    r = [Request(id=0, arrival=0.0, prompt_len=1000, output_len=1)]
    res = Simulator(CostModel.constant(dt), FCFS(), max_num_batched_tokens=300, chunked_prefill=True).run(r)
    assert math.isclose(res.cols["finish"][0], 4 * dt)  # 300+300+300+100
    res = Simulator(CostModel.constant(dt), FCFS(), max_num_batched_tokens=300, chunked_prefill=False).run(
        _fresh(r)
    )
    assert math.isclose(res.cols["finish"][0], dt)


def test_prefix_cache_hits_reduce_prefill():
    reqs = [
        Request(
            id=i,
            arrival=0.5 * i,
            prompt_len=1100,
            output_len=20,
            meta={"prefix_segments": [("sys", 1000), (f"u{i}", 100)]},
        )
        for i in range(20)
    ]
    on = Simulator(H100ISH, FCFS(), kv_capacity_tokens=50_000).run(reqs).summary()
    off = (
        Simulator(H100ISH, FCFS(), kv_capacity_tokens=50_000, prefix_caching=False)
        .run(_fresh(reqs))
        .summary()
    )
    assert off["hit_tokens"] == 0 and on["hit_tokens"] == 19 * 1000
    assert on["prefill_computed_tokens"] == off["prefill_computed_tokens"] - 19 * 1000
    assert on["ttft_mean"] < off["ttft_mean"]
    assert math.isclose(on["cache_hit_rate"], 19000 / 22000)


def test_cpu_tier_and_lru_eviction():
    # two alternating system prompts that do not both fit the GPU: with a CPU tier they come back as CPU hits
    reqs = [
        Request(
            id=i,
            arrival=1.0 * i,
            prompt_len=3050,
            output_len=5,
            meta={"prefix_segments": [(f"sys{i % 2}", 3000)]},
        )
        for i in range(10)
    ]
    cfg = dict(kv_capacity_tokens=5000, transfer_bandwidth=1e9)
    no_cpu = Simulator(H100ISH, FCFS(), **cfg).run(reqs)
    with_cpu = Simulator(H100ISH, FCFS(), cpu_capacity_tokens=10_000, **cfg).run(_fresh(reqs))
    s0, s1 = no_cpu.summary(), with_cpu.summary()
    assert s0["evict_recomputed_tokens"] > 0 and with_cpu.cols["hit_cpu"].sum() > 0
    assert s1["prefill_computed_tokens"] < s0["prefill_computed_tokens"]
    assert with_cpu.counters["peak_kv_tokens"] <= 5000


def test_multi_branch_early_stop_and_prune():
    lens = [10, 50, 20, 200]
    req = Request(id=0, arrival=0.0, prompt_len=8, output_len=50, meta={"branch_lens": lens, "stop_after": 2})
    res = Simulator(CostModel.constant(0.01), FCFS()).run([req])
    # stops when the 2nd branch (len 20) finishes; the others generated 20 tokens each and are discarded
    assert math.isclose(res.cols["finish"][0], 0.20)
    assert res.cols["branches_finished"][0] == 2 and res.tokens_generated == 10 + 20 + 20 + 20
    assert res.counters["tokens_discarded"] == 40

    class PruneLongest:
        def on_check(self, req, states, now):
            run = [s for s in states if s.status == "running"]
            return [max(run, key=lambda s: s.target).index] if len(run) > 1 else []

    req2 = Request(id=0, arrival=0.0, prompt_len=8, output_len=50, meta={"branch_lens": lens})
    res = Simulator(CostModel.constant(0.01), FCFS(), branch_policy=PruneLongest(), check_every=5).run([req2])
    # step 5: prune the 200 branch (5 tokens); step 10: the 10 branch finishes, then prune the 50 branch
    # (10 tokens); the 20 branch finishes alone
    assert res.num_finished == 1 and res.cols["branches_finished"][0] == 2
    assert res.tokens_generated == 10 + 20 + 10 + 5 and res.counters["tokens_discarded"] == 15
    assert math.isclose(res.cols["finish"][0], 0.20)


def test_rollout_mode_makespan_and_tail():
    full = Simulator(H100ISH, FCFS(), max_num_seqs=256).run(W.rollout(16, 8, seed=0))
    rs = full.rollout_summary(0.1)
    assert 0.2 < rs["tail_share"] < 1.0  # heavy within-prompt tail dominates the makespan
    grp = W.rollout(16, 8, as_branches=True, seed=0)
    early = Simulator(H100ISH, FCFS(), max_num_seqs=256, stop_after=6).run(grp)
    assert early.makespan < full.makespan
    assert np.all(early.cols["branches_finished"] == 6)
    assert early.tokens_generated < full.tokens_generated


def test_workflows_dependencies_and_reuse():
    wfs = W.agent_workflows(8, "react", seed=1)
    res = W.run_workflows(Simulator(H100ISH, FCFS(), kv_capacity_tokens=60_000), wfs)
    assert res.num_finished == sum(len(w.calls) for w in wfs)
    fin = {(r.meta["workflow_id"], r.meta["call"]): f for r, f in zip(res.requests, res.cols["finish"])}
    for r, adm in zip(res.requests, res.cols["first_admit"]):
        for d in r.meta["deps"]:
            assert adm >= fin[(r.meta["workflow_id"], d)]
    assert res.summary()["cache_hit_rate"] > 0.5 and len(res.workflow_latency) == 8


def test_bad_input_errors():
    with pytest.raises(ValueError, match="max_num_seqs"):
        SimConfig(max_num_seqs=0)
    with pytest.raises(ValueError, match="kv_capacity_tokens"):
        Simulator(H100ISH, FCFS(), kv_capacity_tokens=100).run(
            [Request(id=0, arrival=0.0, prompt_len=90, output_len=20)]
        )
    with pytest.raises(ValueError, match="per_seq_s"):
        CostModel(per_seq_s=-1.0)
    with pytest.raises(ValueError, match="kind"):
        W.LengthDist(kind="pareto")
    with pytest.raises(ValueError, match="process"):
        W.arrival_times(3, 1.0, "weibull")


def test_prefetch_hook_hides_cpu_loads():
    # A and B reuse their system prompts; C (no prefix) pushes both to the CPU tier. A prefetch policy brings
    # them back while the engine idles, so A/B hit on the GPU and do not stall on the link.
    kinds = [("sys0", 3000), ("sys1", 3000), (None, 6400)] * 4
    reqs = []
    for i, (key, n) in enumerate(kinds):
        meta = {"prefix_segments": [(key, n)]} if key else {}
        reqs.append(Request(id=i, arrival=2.0 * i, prompt_len=n + 50 if key else n, output_len=5, meta=meta))

    class LRUPrefetchAll(LRUCachePolicy):
        name = "lru+prefetch"

        def prefetch(self, sim, now):
            return [k for k, e in sim.cache.items() if e.tier == "cpu"]

    cfg = dict(kv_capacity_tokens=6500, cpu_capacity_tokens=20_000, transfer_bandwidth=2e9)
    base = Simulator(H100ISH, FCFS(), **cfg).run(reqs)
    pre = Simulator(H100ISH, FCFS(), cache_policy=LRUPrefetchAll(), **cfg).run(_fresh(reqs))
    sb, sp = base.summary(), pre.summary()
    assert sb["cpu_loaded_tokens"] > 0 and sp["prefetched_tokens"] > 0
    assert sp["cpu_loaded_tokens"] < sb["cpu_loaded_tokens"]
    assert pre.cols["hit_gpu"].sum() > base.cols["hit_gpu"].sum()
    assert sp["ttft_mean"] < sb["ttft_mean"]
    assert pre.counters["peak_kv_tokens"] <= 6500


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_randomized_invariants_branches_cache_preemption(seed):
    """Random mix of single/multi-branch requests with shared prefixes, a random pruner, small KV capacity."""
    rng = np.random.default_rng(seed)
    reqs = []
    for i in range(300):
        n_br = int(rng.choice([1, 1, 2, 4]))
        lens = [int(x) for x in rng.integers(1, 300, n_br)]
        segs = [(f"sys{rng.integers(0, 4)}", 200)] + ([(f"u{i}", 30)] if rng.random() < 0.5 else [])
        meta = {"prefix_segments": segs}
        if n_br > 1:
            meta["branch_lens"] = lens
            meta["stop_after"] = int(rng.integers(1, n_br + 1))
        if rng.random() < 0.2:
            meta["output_key"] = f"out{i}"
        reqs.append(
            Request(
                id=i, arrival=0.02 * i, prompt_len=sum(t for _, t in segs) + 20, output_len=lens[0], meta=meta
            )
        )

    class RandomPrune:
        def on_check(self, req, states, now):
            run = [s.index for s in states if s.status == "running"]
            return [int(rng.choice(run))] if run and rng.random() < 0.1 else []

    cap = 3000
    res = Simulator(
        H100ISH,
        FCFS(),
        max_num_seqs=32,
        max_num_batched_tokens=512,
        kv_capacity_tokens=cap,
        cpu_capacity_tokens=500,
        branch_policy=RandomPrune(),
        check_every=7,
    ).run(reqs)
    c = res.cols
    assert res.num_finished == len(reqs)
    assert res.tokens_generated == c["generated"].sum()  # each generated token counted once
    assert res.counters["peak_kv_tokens"] <= cap and res.timeline["kv_tokens"].max() <= cap
    single = c["n_branches"] == 1
    assert np.array_equal(c["generated"][single], c["output_len"][single])
    assert res.counters["preemptions"] > 0 and c["hit_gpu"].sum() > 0


def test_admission_resumes_one_step_after_a_preemption():
    """Constant 1 s steps, 20 KV tokens, two slots: B is preempted at t=6, which frees room for C (arrived at 2).
    C is admitted at the next step (t=7), first token 8, finished 9, as a step-by-step engine does; the decode
    jump used to run on to the next finish first (C finished at 12)."""
    from hf_ext.simulate import CostModel, SimConfig, Simulator, SJFOracle

    reqs = [Request(0, 0.0, 4, 10), Request(1, 0.0, 4, 10), Request(2, 2.0, 4, 2)]
    res = Simulator(
        CostModel.constant(1.0), SJFOracle(), SimConfig(max_num_seqs=2, kv_capacity_tokens=20)
    ).run(reqs)
    df = res.to_dataframe().set_index("id")
    assert df.loc[1, "preemptions"] == 1
    assert (df.loc[2, "first_admit"], df.loc[2, "first_token"], df.loc[2, "finish"]) == (7.0, 8.0, 9.0)


def test_arrivals_reach_the_scheduler_at_their_time_while_every_slot_is_busy():
    """An arrival during a decode jump with all slots taken is handed to the scheduler within one step of its
    arrival (a scheduler's clock, e.g. TIE's aging, starts then), not at the next finish."""
    from hf_ext.simulate import FCFS, CostModel, SimConfig, Simulator

    seen: dict[int, float] = {}

    class Spy(FCFS):
        def add(self, req, now):
            seen.setdefault(req.id, now)
            super().add(req, now)

    reqs = [Request(0, 0.0, 4, 50), Request(1, 3.5, 4, 5), Request(2, 20.25, 4, 5)]
    Simulator(CostModel.constant(1.0), Spy(), SimConfig(max_num_seqs=1)).run(reqs)
    assert all(seen[r.id] - r.arrival <= 1.0 for r in reqs), seen


def test_fcfs_puts_a_preempted_request_back_ahead_of_its_equal_arrival_peers():
    from hf_ext.simulate import FCFS

    a, b, c = (Request(i, 0.0, 4, 10) for i in range(3))
    s = FCFS()
    for r in (a, b, c):
        s.add(r, 0.0)
    assert [s.pop_next(0.0), s.pop_next(0.0)] == [a, b]
    s.requeue(
        b, 5.0
    )  # preempted (the engine requeues through requeue): back to its arrival position, ahead of c
    assert s.peek_next(5.0) is b


def test_cpu_tier_hits_of_the_request_being_admitted_are_not_spilled_away():
    """Room made on the GPU by spilling into a full CPU tier must not evict the CPU entry the admitted request hit
    (it was loaded although deleted, leaking GPU KV until the simulation got stuck)."""
    from hf_ext.simulate import FCFS, CostModel, Simulator

    reqs = [
        Request(0, 0.0, 8, 1, meta={"prefix_segments": [("X", 6)]}),
        Request(1, 1.0, 8, 1, meta={"prefix_segments": [("Y", 6)]}),
        Request(2, 2.0, 8, 1, meta={"prefix_segments": [("X", 6)]}),
        Request(3, 3.0, 11, 1),
    ]
    sim = Simulator(
        CostModel.constant(1.0, kv_bytes_per_token=1.0), FCFS(), kv_capacity_tokens=12, cpu_capacity_tokens=6
    )
    res = sim.run(reqs)
    assert res.num_finished == 4
    assert sim.cpu_used == sum(e.tokens for e in sim.cache.values() if e.tier == "cpu")


def test_a_rerun_of_the_same_requests_starts_without_the_last_runs_progress():
    from hf_ext.simulate import FCFS, CostModel, SimConfig, Simulator, SJFOracle

    def run(reqs, sched):
        cfg = SimConfig(max_num_seqs=2, kv_capacity_tokens=20)
        return list(Simulator(CostModel.constant(1.0), sched, cfg).run(reqs).to_dataframe()["finish"])

    def fresh():
        return [Request(0, 0.0, 4, 10), Request(1, 0.0, 4, 10), Request(2, 2.0, 4, 2), Request(3, 2.0, 4, 7)]

    reused = fresh()
    run(reused, FCFS())  # leaves meta["sim_generated"] on the preempted request
    assert run(reused, SJFOracle()) == run(fresh(), SJFOracle())
