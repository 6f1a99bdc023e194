"""FSEP gradients with replicas on 3 gloo ranks, both weight exchanges (the point-to-point one pairs sends
and receives per peer in slot order; 2 ranks cannot catch a mismatched pairing)."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import (
    checkpointed_training,
    comm_schedules,
    grads_with_replicas,
    planner_token_scale,
)


def test_shard_gradients_match_dense_on_three_ranks():
    for rank_res in run_distributed(grads_with_replicas, 3):
        assert rank_res.pop("auto_picks_p2p") == (False, True)
        assert set(rank_res) == {
            f"{sync}_{gather}"
            for sync in ("sync", "async_eager", "async_deferred")
            for gather in ("p2p", "all_to_all")
        } | {"rowadd_p2p"}
        assert max(rank_res.values()) < 1e-5, rank_res


def test_gather_option_is_validated():
    from hf_ext.accelerate.fsep import FSEPConfig

    with pytest.raises(ValueError, match="gather='nccl'.*'p2p'"):
        FSEPConfig(gather="nccl")
    with pytest.raises(ValueError, match="gather_p2p_min_bytes=-1"):
        FSEPConfig(gather_p2p_min_bytes=-1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"history": 2.5}, "history=2.5 must be an int"),
        ({"capacity": 2.5}, "capacity=2.5 must be None or an integer"),
        ({"capacity": True}, "capacity=True must be None or an integer"),
        ({"extra_capacity": 0.5}, "extra_capacity=0.5 must be an int"),
        ({"replan_interval": 1.5}, "replan_interval=1.5 must be an int"),
        ({"num_perturbations": 1.5}, "num_perturbations=1.5 must be an int"),
        ({"gather_p2p_min_bytes": 1.5}, "gather_p2p_min_bytes=1.5 must be an int"),
        ({"history_decay": "0.5"}, "history_decay='0.5' must be a number"),
        ({"average_grads": "False"}, "average_grads='False' must be True or False"),
        ({"prefetch": "no"}, "prefetch='no' must be True or False"),
        ({"async_grad_reduce": None}, "async_grad_reduce=None must be True or False"),
        ({"broadcast_from_rank0": 0}, "broadcast_from_rank0=0 must be True or False"),
    ],
)
def test_config_refuses_values_of_the_wrong_type(kwargs, match):
    """Counts given as floats and flags given as strings were accepted: average_grads='False' averaged (a
    non-empty string is true), capacity=2.5 became a capacity of 2.5 and history=2.5 failed inside the layer's
    planner with a TypeError. Each is now a ValueError naming the field."""
    from hf_ext.accelerate.fsep import FSEPConfig

    with pytest.raises(ValueError, match=match):
        FSEPConfig(**kwargs)


def test_config_takes_numpy_integers():
    import numpy as np

    from hf_ext.accelerate.fsep import FSEPConfig

    cfg = FSEPConfig(capacity=np.int64(3), history=np.int32(2), history_decay=1)
    assert cfg.resolved_capacity(4, 2) == 3


def test_activation_checkpointing_trains_like_one_process_and_observes_each_step_once():
    for res in run_distributed(checkpointed_training, 2):
        assert res["checkpointing"]
        assert res["train_max_diff"] < 1e-4, res
        # the recompute in backward does not enter the planner history a second time
        assert res["history_lengths"] and all(n == 3 for n in res["history_lengths"]), res


def test_reentrant_activation_checkpointing_feeds_the_planner_once_per_step():
    """Reentrant checkpointing runs the MoE blocks' forward under no_grad and builds the graph in the recompute;
    the layer observed counts only in a forward with grad that was not a recompute, so the planner saw nothing
    (history 0, the identity layout for ever). The recompute now observes what its forward could not."""
    for res in run_distributed(checkpointed_training, 2, 3, True):
        assert res["checkpointing"]
        assert res["train_max_diff"] < 1e-4, res
        assert res["history_lengths"] and all(n == 3 for n in res["history_lengths"]), res


def test_deferred_schedule_starts_each_gradient_exchange_after_the_token_all_to_alls():
    for res in run_distributed(comm_schedules, 2):
        assert res["grad_diff"] == 0.0, res["grad_diff"]
        assert res["slots_deferred"] == res["slots_eager"]
        assert any(len(s) > 1 for s in res["slots_deferred"][0]), "the planned layout should have replicas"
        trace = res["trace_deferred"]
        # the first MoE layer's exchange starts after its dispatch all-to-all, before the end of backward
        assert trace[-2:] == [("grad_exchange", 0), ("backward_end", -1)], trace
        trace = trace[:-1]
        pos = {ev: n for n, ev in enumerate(trace)}
        assert len(pos) == len(trace) == 3 * 3, trace  # per layer: combine, dispatch, exchange, once each
        for j in range(3):
            # never ahead of the layer's own dispatch all-to-all on the NCCL stream ...
            assert pos[("grad_exchange", j)] > pos[("dispatch_a2a_backward", j)], trace
            # ... and started only once the layer below has queued its combine all-to-all
            if j > 0:
                assert pos[("grad_exchange", j)] > pos[("combine_a2a_backward", j - 1)], trace
                assert pos[("grad_exchange", j)] < pos[("dispatch_a2a_backward", j - 1)], trace
        assert trace[-1] == ("grad_exchange", 0), trace
        # the eager schedule starts each exchange before the same layer's dispatch all-to-all
        eager = {ev: n for n, ev in enumerate(res["trace_eager"][:-1])}
        assert all(eager[("grad_exchange", j)] < eager[("dispatch_a2a_backward", j)] for j in range(3))


@pytest.mark.parametrize("min_numel", [0, 1 << 30])
def test_add_rows_matches_index_add_with_repeated_rows(monkeypatch, min_numel):
    import torch

    from hf_ext.accelerate.fsep import layer

    monkeypatch.setattr(layer, "_ROW_ADD_MIN_NUMEL", min_numel)
    out = torch.randn(5, 7)
    ref = out.clone()
    rows = [3, 0, 3, 1]  # expert 3 twice: two replicas' chunks add up
    src = torch.randn(4, 7, dtype=torch.float64)
    layer._add_rows(out, rows, src, 0.5)
    ref.index_add_(0, torch.tensor(rows), src.float(), alpha=0.5)
    assert torch.allclose(out, ref)
    layer._add_rows(out, [], src[:0], 0.5)  # nothing to add
    assert torch.allclose(out, ref)


def test_in_layer_planner_costs_the_observed_token_counts():
    """The layer's planner costed every step as 4096 tokens per rank, whatever was routed: 32 tokens per rank
    got the replicas of a large batch. It now plans from the observed counts (a replica's weight gather does not
    pay for 32 tokens, it does for 4096), unless FSEPConfig.planner_tokens_per_rank declares a batch."""
    for res in run_distributed(planner_token_scale, 2):
        assert res["small_tokens"] == 32 and res["large_tokens"] == 4096, res
        assert res["small"] == [1, 1, 1, 1], res
        assert res["large"][0] == 2, res  # the expert every token picks is replicated
        assert res["small_declared_tokens"] == 4096 and res["small_declared"] == res["large"], res
