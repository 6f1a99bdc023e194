"""FSEP gradients after a backward that raised (2 gloo processes, CPU)."""

from __future__ import annotations

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import backward_after_exception


def test_steps_after_a_raised_backward_match_a_clean_run():
    for res in run_distributed(backward_after_exception, 2):
        assert set(res) == {"deferred_p2p", "deferred_all_to_all", "eager_p2p"}
        assert max(res.values()) < 1e-6, res
