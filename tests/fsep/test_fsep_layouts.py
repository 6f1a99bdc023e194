"""Layouts set by the user (kept until handed back) and layouts kept per forward call, on 2 gloo ranks."""

from __future__ import annotations

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import pinned_layout


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
