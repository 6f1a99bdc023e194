"""FSEP checkpoints on 2 gloo processes (CPU): Accelerate's save_state / load_state, HF-format save / load
with the dense part under FSDP2, remove_fsep."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import checkpoint_suite


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(checkpoint_suite, 2, str(tmp_path_factory.mktemp("fsep_state")))


@pytest.mark.parametrize("mode", ["fsep", "static_ep"])
def test_accelerate_save_state_resumes_every_rank_own_expert_rows_and_adam_state(results, mode):
    # save_state writes rank 0's file and load_state reads it on every rank: each rank must get its own rows
    assert [r[f"{mode}_inplace_diff"] for r in results] == [0.0, 0.0]
    # a fresh run resuming before its first step (its planner has no history yet: another layout, another
    # summation order) takes the same next step
    assert all(r[f"{mode}_fresh_diff"] < 1e-6 for r in results), results
    assert all(r[f"{mode}_moved"] > 1e-3 for r in results)  # the steps after the save changed the weights
    for r in results:
        assert r[f"{mode}_hf_keys"]  # the model's state dict has the HF keys, full experts
        assert "one rank's rows" in r[f"{mode}_per_rank_error"]
        assert "one rank's rows" in r[f"{mode}_per_rank_optim_error"]


def test_hf_format_save_and_load_with_the_dense_part_under_fsdp2(results):
    r0 = results[0]
    assert r0["fsdp2_saved_keys_equal"]
    assert r0["fsdp2_saved_max_diff"] == 0.0
    for r in results:  # another model's HF state dict loaded into the FSDP2 + FSEP model
        assert r["fsdp2_loaded_max_diff"] == 0.0
        assert r["fsdp2_loaded_fwd_diff"] < 1e-5


def test_remove_fsep_restores_the_model_as_it_was(results):
    for r in results:
        assert r["removed_has_ignore"] is False  # prepare_fsep added the DDP ignore list: it goes again
        assert r["removed_ignore_list"] == ["lm_head.weight", "model.norm.weight"]  # a list it had, in order
        assert r["removed_fsep_attrs"] == []
        assert r["removed_fwd_diff"] == 0.0
        # the process-wide optimizer step pre-hook: gone with the last FSEP layer, back with the next one
        assert r["step_hook"] == [False, True, False]


def test_generate_keeps_ranks_in_step_when_one_finishes_first(results):
    # rank 0's row ends at its first token, rank 1's runs on: the FSEP model's generate syncs the ranks (it hung)
    assert [r["gen_len"] for r in results][0] < results[1]["gen_len"]
    assert all(r["gen_equal"] for r in results)  # the same tokens as the plain model on each rank
    assert not any(r["generate_left"] for r in results)  # remove_fsep takes the wrapper away


def test_optimizer_state_of_experts_added_later_or_assigned_is_saved_as_full_experts():
    """An optimizer holding no expert parameter at its first step was marked as prepared without hooks, so
    expert parameters added by add_param_group kept one rank's rows in its state dict (save_state writes rank 0's,
    load_state gives them to every rank, unchecked); load_state_dict(assign=True) replaced the expert parameters
    by ones the hooks did not know, with the same effect. Both now get the full experts."""
    from tests.fsep._dist_fns import optimizer_hooks_for_later_experts

    for r in run_distributed(optimizer_hooks_for_later_experts, 2):
        assert r["add_param_group"] == r["full_shape"], r
        assert r["assign"] == r["full_shape"], r


def test_factored_optimizer_states_resume_each_rank_own_values():
    """Adafactor's row_var / col_var of an expert parameter are computed from the rank's own rows, but have
    neither the parameter's nor the full experts' shape, so optimizer.state_dict() kept rank 0's values and
    load_state gave them to every rank, silently. They are now saved for every rank and each rank loads its own
    (the same number of ranks and mode; otherwise an error)."""
    from tests.fsep._dist_fns import factored_optimizer_resume

    res = run_distributed(factored_optimizer_resume, 2)
    for mode in ("fsep", "static_ep"):
        # the ranks' moments differ, so rank 0's values on rank 1 would show
        assert res[0][f"{mode}_differs_between_ranks"] != res[1][f"{mode}_differs_between_ranks"]
        assert [r[f"{mode}_diff"] for r in res] == [0.0, 0.0], (mode, res)
        for r in res:
            assert "saved per rank" in r[f"{mode}_other_world_size"], (mode, r)
            assert "by 3 ranks" in r[f"{mode}_other_world_size"], (mode, r)


def test_a_model_left_with_a_gather_in_flight_can_be_copied_and_pickled():
    """A forward that raised after an FSEP layer had prefetched the next one's experts left that gather (its
    communication handles) on the layer, and copy.deepcopy / pickle of the model then failed with 'cannot pickle
    Work object'. A copy now leaves the gather behind and gathers its own experts."""
    from tests.fsep._dist_fns import copy_after_a_failed_forward

    for r in run_distributed(copy_after_a_failed_forward, 2):
        assert r["left_prefetched"], r
        assert r["error"] == "", r
        assert r["logits_diff"] < 1e-6, r
