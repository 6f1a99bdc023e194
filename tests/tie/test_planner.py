"""Expected-cost batch plans: E[max] of log-t rows, the dynamic program, prompt buckets, limits and bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from hf_ext.generation.tie.offline import memory_batches, simulate_static_batches
from hf_ext.generation.tie.planner import PLAN_BUCKETS, bucket_order, expected_max, plan_batches
from hf_ext.simulate import CostModel


def _partitions(n):
    """Every split of range(n) into consecutive non-empty runs."""
    for cuts in itertools.product([0, 1], repeat=n - 1):
        out, cur = [], [0]
        for i, c in enumerate(cuts, start=1):
            if c:
                out.append(cur)
                cur = []
            cur.append(i)
        yield out + [cur]


@pytest.mark.parametrize("cap", [50, 1000, 8192])
def test_expected_max_matches_monte_carlo(cap):
    rng = np.random.default_rng(0)
    mu = np.array([3.0, 4.0, 4.5, 2.0])
    sigma = np.array([0.3, 0.8, 1.2, 0.5])
    t = rng.standard_t(3.5, size=(200_000, 4))
    x = np.ceil(np.clip(np.exp(mu + sigma * t), 1, cap))  # whole tokens in [1, cap]
    mc = x.max(axis=1).mean()
    assert expected_max(mu, sigma, 3.5, cap) == pytest.approx(mc, rel=0.01)
    # one row: its own clipped mean, in whole tokens
    assert expected_max(mu[:1], sigma[:1], 3.5, cap) == pytest.approx(x[:, 0].mean(), rel=0.01)
    # more rows never lower the expected maximum
    vals = [expected_max(mu[:k], sigma[:k], 3.5, cap) for k in range(1, 5)]
    assert vals == sorted(vals)


@pytest.mark.parametrize("kind", ["point", "laws"])
def test_cuts_are_the_least_expected_cost_of_all_consecutive_splits(kind):
    rng = np.random.default_rng(3 if kind == "point" else 4)
    n, cap = 8, 400
    mu, sigma = rng.normal(4.0, 1.0, size=n), rng.uniform(0.1, 1.2, size=n)
    point = np.exp(mu)
    plen = rng.integers(5, 60, size=n)
    order = list(rng.permutation(n))
    kw = {"point": point} if kind == "point" else {"mu": mu, "sigma": sigma}

    def cost(batch):
        if kind == "point":
            return float(np.clip(point[batch].max(), 1, cap))
        return expected_max(mu[batch], sigma[batch], 3.5, cap)

    plan = plan_batches(order, plen, cap, batch_size=4, prompt_buckets=1, **kw)
    brute = min(
        sum(cost([order[i] for i in run]) for run in split)
        for split in _partitions(n)
        if all(len(run) <= 4 for run in split)
    )
    assert plan.expected_cost == pytest.approx(brute, rel=1e-6)
    assert plan.expected_steps == pytest.approx(sum(cost(b) for b in plan.batches), rel=1e-6)
    assert [i for b in plan.batches for i in b] == order  # one bucket: the order is kept, only cut


def test_the_plan_keeps_the_width_limits_and_partitions_the_job():
    rng = np.random.default_rng(5)
    n, cap, kv = 300, 500, 20_000
    plen = rng.integers(10, 1500, size=n)
    mu, sigma = rng.normal(4.5, 1.0, size=n), rng.uniform(0.2, 1.0, size=n)
    order = list(np.argsort(mu, kind="stable"))
    plan = plan_batches(order, plen, cap, kv_tokens=kv, mu=mu, sigma=sigma)
    assert sorted(i for b in plan.batches for i in b) == list(range(n))
    assert all(len(b) * (int(plen[b].max()) + cap) <= kv for b in plan.batches)
    # the chosen bucket count is the cheapest one tried, and every count in PLAN_BUCKETS (and N) was tried
    assert set(plan.costs_by_buckets) == {*PLAN_BUCKETS, n}
    assert plan.prompt_buckets == min(plan.costs_by_buckets, key=plan.costs_by_buckets.get)
    assert plan.expected_cost == pytest.approx(min(plan.costs_by_buckets.values()))
    fixed = plan_batches(order, plen, cap, batch_size=7, mu=mu, sigma=sigma, prompt_buckets=3)
    assert fixed.prompt_buckets == 3 and set(fixed.costs_by_buckets) == {3}
    assert max(len(b) for b in fixed.batches) <= 7


def test_prompt_buckets_group_prompt_widths_and_keep_the_order_inside():
    # short and long prompts alternate; two buckets put all the short ones first, each bucket in the given order
    plen = np.array([10, 900] * 6)
    order = list(range(12))[::-1]
    plan = plan_batches(order, plen, 100, kv_tokens=2_200, point=[50] * 12, prompt_buckets=2)
    flat = [i for b in plan.batches for i in b]
    short = [i for i in order if plen[i] == 10]
    assert flat == short + [i for i in order if plen[i] == 900]
    # two short-prompt batches fit 20 rows; mixed, a batch of widest prompt 900 holds only 2
    assert all(len(b) * (int(plen[b].max()) + 100) <= 2_200 for b in plan.batches)
    mixed = plan_batches(order, plen, 100, kv_tokens=2_200, point=[50] * 12, prompt_buckets=1)
    assert len(plan.batches) < len(mixed.batches)
    assert plan.expected_cost < mixed.expected_cost


def test_bucket_order_refuses_bad_input():
    with pytest.raises(ValueError, match=r"k \(prompt buckets\) must be an int >= 1"):
        bucket_order([0, 1], [5, 6], 0)
    with pytest.raises(ValueError, match="order must be a permutation"):
        bucket_order([0, 2], [5, 6], 2)
    assert bucket_order([1, 0], [5, 6], 1) == [1, 0]


def test_the_plan_beats_memory_cuts_on_a_heavy_tailed_job_in_the_cost_model():
    """Predictions with signal: the expected-cost plan of the same TIE-like order takes less simulated time than
    cutting that order as wide as memory allows, and no more than it expected to save is a fluke."""
    rng = np.random.default_rng(7)
    n, cap, kv = 600, 1000, 120_000
    mu = rng.normal(4.5, 1.0, size=n)
    sigma = rng.uniform(0.2, 0.9, size=n)
    out = np.clip(np.ceil(np.exp(mu + sigma * rng.standard_t(3.5, size=n))), 1, cap).astype(int)
    plen = rng.integers(20, 2000, size=n)
    pred_mu = mu + rng.normal(0, 0.3, size=n)
    order = list(np.argsort(pred_mu, kind="stable"))
    cm = CostModel.constant(0.02)
    cut = simulate_static_batches(cm, plen, out, order, kv_tokens=kv, max_new_tokens=cap)
    plan = plan_batches(order, plen, cap, kv_tokens=kv, mu=pred_mu, sigma=sigma, cost_model=cm)
    planned = simulate_static_batches(cm, plen, out, None, batches=plan.batches)
    assert planned.makespan_s < 0.85 * cut.makespan_s
    assert planned.tokens == cut.tokens
    # the plan's expectation is close to what the job then took (same cost model)
    assert plan.expected_cost == pytest.approx(planned.makespan_s, rel=0.1)


def test_the_plan_refuses_bad_input():
    plen, order = [5, 6, 7], [2, 0, 1]
    law = {"mu": [1.0, 2.0, 3.0], "sigma": [0.5, 0.5, 0.5]}
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        plan_batches(order, plen, 10, point=[1, 2, 3])
    with pytest.raises(ValueError, match="exactly one of batch_size"):
        plan_batches(order, plen, 10, batch_size=2, kv_tokens=100, point=[1, 2, 3])
    with pytest.raises(ValueError, match="either mu and sigma"):
        plan_batches(order, plen, 10, batch_size=2)
    with pytest.raises(ValueError, match="either mu and sigma"):
        plan_batches(order, plen, 10, batch_size=2, point=[1, 2, 3], **law)
    with pytest.raises(ValueError, match="mu must hold 3 finite values"):
        plan_batches(order, plen, 10, batch_size=2, mu=[1.0, np.nan, 3.0], sigma=[0.5] * 3)
    with pytest.raises(ValueError, match="sigma and nu must be > 0"):
        plan_batches(order, plen, 10, batch_size=2, mu=[1.0] * 3, sigma=[0.5, 0.0, 0.5])
    with pytest.raises(ValueError, match="point must hold 3 finite"):
        plan_batches(order, plen, 10, batch_size=2, point=[1, 2])
    with pytest.raises(ValueError, match=r"order must be a permutation of range\(3\)"):
        plan_batches([0, 1, 3], plen, 10, batch_size=2, point=[1, 2, 3])
    with pytest.raises(ValueError, match="order must not repeat an index"):
        plan_batches([0, 0, 1], plen, 10, batch_size=2, point=[1, 2, 3])
    with pytest.raises(ValueError, match="prompt_lens must hold ints >= 1"):
        plan_batches(order, [5, 0, 7], 10, batch_size=2, point=[1, 2, 3])
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        plan_batches(order, plen, 0, batch_size=2, point=[1, 2, 3])
    with pytest.raises(ValueError, match="prompt_buckets must be an int >= 1"):
        plan_batches(order, plen, 10, batch_size=2, point=[1, 2, 3], prompt_buckets=0)
    with pytest.raises(ValueError, match=r"kv_tokens=12 cannot hold request 1 alone"):
        plan_batches(order, [1, 5, 1], 10, kv_tokens=12, point=[1, 2, 3])
    assert plan_batches([], [], 10, batch_size=2, point=[]).batches == []


def test_memory_cuts_are_one_of_the_plans_the_program_considers():
    """With one bucket the program can always reproduce the memory-sized cut, so its expected cost is never
    higher than that cut's."""
    rng = np.random.default_rng(11)
    n, cap, kv = 120, 300, 15_000
    plen = rng.integers(10, 900, size=n)
    mu, sigma = rng.normal(4.0, 1.0, size=n), rng.uniform(0.2, 1.0, size=n)
    order = list(rng.permutation(n))
    plan = plan_batches(order, plen, cap, kv_tokens=kv, mu=mu, sigma=sigma, prompt_buckets=1)
    cut = memory_batches(order, plen, kv, cap)
    assert plan.expected_cost <= sum(expected_max(mu[b], sigma[b], 3.5, cap) for b in cut) + 1e-9
