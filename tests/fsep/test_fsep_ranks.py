"""FSEP gradients with replicas on 3 gloo ranks, both weight exchanges (the point-to-point one pairs sends
and receives per peer in slot order; 2 ranks cannot catch a mismatched pairing)."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import checkpointed_training, grads_with_replicas


def test_shard_gradients_match_dense_on_three_ranks():
    for rank_res in run_distributed(grads_with_replicas, 3):
        assert rank_res.pop("auto_picks_p2p") == (False, True)
        assert set(rank_res) == {"sync_p2p", "sync_all_to_all", "async_p2p", "async_all_to_all"}
        assert max(rank_res.values()) < 1e-5, rank_res


def test_gather_option_is_validated():
    from hf_ext.accelerate.fsep import FSEPConfig

    with pytest.raises(ValueError, match="gather='nccl'.*'p2p'"):
        FSEPConfig(gather="nccl")
    with pytest.raises(ValueError, match="gather_p2p_min_bytes=-1"):
        FSEPConfig(gather_p2p_min_bytes=-1)


def test_activation_checkpointing_trains_like_one_process_and_observes_each_step_once():
    for res in run_distributed(checkpointed_training, 2):
        assert res["checkpointing"]
        assert res["train_max_diff"] < 1e-4, res
        # the recompute in backward does not enter the planner history a second time
        assert res["history_lengths"] and all(n == 3 for n in res["history_lengths"]), res
