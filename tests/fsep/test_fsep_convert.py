"""prepare_fsep / remove_fsep conversion details (2 gloo processes)."""

from __future__ import annotations

from hf_ext.testing import run_distributed
from tests.fsep._dist_audit_fns import frozen_experts, layer_edge_cases


def test_frozen_experts_and_eval_mode_survive_prepare_and_remove():
    for res in run_distributed(frozen_experts, 2):
        for mode in ("fsep", "static_ep"):
            assert res[f"{mode}_requires_grad"] == [False, False], res
            assert res[f"{mode}_training"] == [False, False], res
            assert res[f"{mode}_grads"] == [False, False], res
            assert res[f"{mode}_removed_training"] == [True, True], res
            assert res[f"{mode}_removed_requires_grad"] == [(False, False)] * 2, res
        assert "model.layers.0.mlp.experts" in res["mixed"] and "requires_grad" in res["mixed"], res
        assert res["mixed_untouched"] == "Qwen2MoeExperts"


def test_layer_with_an_empty_rank_a_rank_without_tokens_and_ignored_ids_matches_the_dense_experts():
    for res in run_distributed(layer_edge_cases, 2):
        assert len(res) == 8 and max(res.values()) < 1e-4, res
