"""FSEP gradients with replicas on 3 gloo ranks (the point-to-point exchange pairs sends and receives per
peer in slot order; 2 ranks cannot catch a mismatched pairing)."""

from __future__ import annotations

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import grads_with_replicas


def test_shard_gradients_match_dense_on_three_ranks():
    for rank_res in run_distributed(grads_with_replicas, 3):
        assert rank_res["sync"] < 1e-5 and rank_res["async"] < 1e-5, rank_res
