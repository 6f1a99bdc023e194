"""Layouts set by the user (kept until handed back) and layouts kept per forward call, on 2 gloo ranks."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import checkpointed_replan_between_forwards, pinned_layout


def test_a_layout_set_by_the_user_is_kept_until_released():
    """set_layout said "use layout from the next forward on", but under layout_policy="planner" the next training
    forward re-planned and replaced it. It is now pinned (the planner keeps recording counts) until
    release_layout() hands it back: the planner re-plans at the next step, a fixed policy restores its layout."""
    for res in run_distributed(pinned_layout, 2):
        mine, identity = res["mine"], [[0, 1], [2, 3]]
        for policy in ("planner", "identity"):
            steps = res[policy]
            assert steps[0]["slots"] == identity and not steps[0]["pinned"], steps
            # steps 1 and 2 (training steps, the first two with a history to plan from) ran the user's layout
            assert [s["slots"] for s in steps[1:3]] == [mine, mine], steps
            assert all(s["pinned"] for s in steps[1:3]), steps
            assert [s["pinned"] for s in steps[3:]] == [False, False], steps
            assert all(s["slots"] != mine for s in steps[3:]), steps
        # pinned or not, the planner saw every step
        assert [s["history"] for s in res["planner"]] == [1, 2, 3, 4, 5], res["planner"]
        assert res["identity"][3]["slots"] == identity, res["identity"]


@pytest.mark.parametrize("comm_schedule", ["deferred", "eager"])
def test_checkpoint_recompute_runs_the_layout_of_its_forward(comm_schedule):
    """Non-reentrant activation checkpointing with a re-plan between two forwards before one backward (gradient
    accumulation): the recompute in backward ran the layer's current layout instead of its forward's, and torch's
    checkpoint raised (recomputed tensors of other shapes). Each forward's layout is now kept for its recompute:
    the gradients equal the single-process model's."""
    for res in run_distributed(checkpointed_replan_between_forwards, 2, comm_schedule):
        assert res["checkpointing"]
        first, second = res["slots"]
        assert first != second and any(len(s) > 2 for layer in second for s in layer), res["slots"]
        assert "error" not in res, res["error"]
        assert res["grad_diff"] < 1e-4, res


def test_checkpoint_frames_of_this_torch_are_recognised():
    """The layer finds the non-reentrant checkpoint region of a forward and of its recompute through torch's
    saved-tensor hooks (internals): this fails first if a torch release changes them (the recompute would run the
    current layout again)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    from hf_ext.accelerate.fsep.layer import _checkpoint_frame

    seen = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(_checkpoint_frame())
        return x.sin() * x

    assert _checkpoint_frame() == (None, False)
    x = torch.randn(3, requires_grad=True)
    checkpoint(fn, x, use_reentrant=False).sum().backward()
    assert len(seen) == 2 and seen[0][0] is not None, seen
    assert seen[0][0] is seen[1][0] and [s[1] for s in seen] == [False, True], seen
    seen.clear()
    checkpoint(fn, x, use_reentrant=True).sum().backward()  # reentrant: no frame to find
    assert seen == [(None, False), (None, False)], seen
