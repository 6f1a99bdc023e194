"""Planner, cost-model and config corner cases (single process, no torch.distributed)."""

from __future__ import annotations

import numpy as np
import pytest

from hf_ext.accelerate.fsep import FSEPConfig, Layout, LoadPlanner, MoEShape
from hf_ext.accelerate.fsep.cost_model import PRESETS, cost_from_pairs
from hf_ext.accelerate.fsep.planner import hold_matrix, pair_traffic


@pytest.mark.parametrize("policy", ["identity", "fsdp"])
def test_an_explicit_capacity_too_small_for_the_layout_policy_is_an_error(policy):
    # 8 experts over 2 ranks: the identity layout materialises 4 per rank, the FSDP layout all 8
    need = 4 if policy == "identity" else 8
    with pytest.raises(ValueError, match=f"FSEPConfig.capacity=2 .*layout_policy='{policy}'.*>= {need}"):
        FSEPConfig(layout_policy=policy, capacity=2).resolved_capacity(8, 2)
    with pytest.raises(ValueError, match="FSEPConfig.capacity=2 .*mode='static_ep'.*>= 4"):
        FSEPConfig(mode="static_ep", capacity=2).resolved_capacity(8, 2)
    assert FSEPConfig(layout_policy=policy, capacity=need).resolved_capacity(8, 2) == need
    assert FSEPConfig(layout_policy=policy).resolved_capacity(8, 2) == need


def test_identity_candidate_is_scored_on_the_same_fractional_counts_as_the_planned_ones():
    # few tokens per rank: the scaled counts are fractional; the identity layout's cost must not truncate them
    shape = MoEShape(hidden=64, intermediate=128, num_experts=4, top_k=1, tokens_per_rank=2)
    hw = PRESETS["cpu"]
    counts = np.array([[3, 1, 1, 1], [1, 1, 3, 1]])
    planner = LoadPlanner(4, 2, 2, shape=shape, hardware=hw, num_perturbations=0, tokens_per_rank=2)
    lay = planner.plan(counts)
    assert lay.name == "identity"
    scaled = counts * (shape.tokens_per_rank * shape.top_k * 2 / counts.sum())
    hold = hold_matrix(lay.slots, 4)
    exact = cost_from_pairs(pair_traffic(scaled, hold, "local_first"), hold.sum(axis=0), shape, hw).total
    assert planner.last_cost == pytest.approx(exact, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"routing_policy": "local"}, "routing_policy='local'.*'local_first'"),
        ({"history": 0}, "history=0"),
        ({"history_decay": 0.0}, "history_decay=0.0"),
        ({"history_decay": 1.5}, "history_decay=1.5"),
        ({"num_perturbations": -1}, "num_perturbations=-1"),
    ],
)
def test_planner_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoadPlanner(4, 2, 2, **kwargs)


def test_history_decay_weights_the_newest_step_most():
    old, new = np.array([[80, 0, 1], [80, 0, 1]]), np.array([[0, 30, 1], [0, 30, 1]])
    hot = {}
    kw = dict(num_perturbations=0, tokens_per_rank=4096)  # costed as a real batch: the weighting decides
    for decay in (1.0, 0.5):
        p = LoadPlanner(3, 2, 2, history=3, history_decay=decay, **kw)
        for c in (old, new, new):
            p.observe(c)
        lay = p.plan()
        # weights decay**age, oldest first: 0.25 / 0.5 / 1 at decay 0.5
        ref = LoadPlanner(3, 2, 2, **kw).plan(decay**2 * old + (decay + 1) * new)
        assert lay.slots == ref.slots
        hot[decay] = int(np.argmax(lay.replicas()))
    assert hot == {1.0: 0, 0.5: 1}  # summed, expert 0 (160 vs 120) is hot; decayed, expert 1 (40 vs 90)
    p.observe(new)  # the oldest step falls out of the window of 3
    assert len(p.history) == 3 and all((h == new).all() for h in p.history)


def test_layout_identity_routing_is_the_same_for_every_policy():
    lay = Layout.identity(4, 2)
    for pol in ("uniform", "local_first", "node_first"):
        assert np.array_equal(Layout.from_slots(lay.slots, 4, pol).routing, lay.routing)


def test_planner_costs_the_observed_token_counts_unless_a_batch_is_declared():
    """The planner rescaled any counts to the shape's tokens per rank (4096 by default), so 50 tokens per rank
    were planned like 5,000. It now costs the counts it sees (the history as its mean per step), and
    ``tokens_per_rank`` declares a batch instead."""
    counts = np.array([[9000, 500, 300, 200], [8000, 1000, 600, 400]])  # top-2: 5,000 tokens per rank
    big = LoadPlanner(4, 2, 3)
    assert big.plan(counts).replicas().tolist() == [2, 1, 1, 1] and big.last_tokens_per_rank == 5000
    small = LoadPlanner(4, 2, 3)
    assert small.plan(counts // 100).replicas().tolist() == [1, 1, 1, 1] and small.last_tokens_per_rank == 50
    declared = LoadPlanner(4, 2, 3, tokens_per_rank=5000)
    assert declared.plan(counts // 100).slots == big.plan(counts).slots
    hist = LoadPlanner(4, 2, 3, history=3)
    for _ in range(3):
        hist.observe(counts // 100)
    assert hist.plan().slots == small.plan(counts // 100).slots and hist.last_tokens_per_rank == 50
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="tokens_per_rank"):
            LoadPlanner(4, 2, 3, tokens_per_rank=bad)
        with pytest.raises(ValueError, match="planner_tokens_per_rank"):
            FSEPConfig(planner_tokens_per_rank=bad)
