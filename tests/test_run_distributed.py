"""hf_ext.testing.run_distributed: one deadline for the whole process group."""

from __future__ import annotations

import time

import pytest


def test_a_hung_group_is_stopped_at_one_deadline_naming_the_ranks(run_distributed):
    # every rank hangs: the old per-rank join waited world_size x timeout (7.5 s here) and reported
    # "(rank, None)" pairs; now the group is killed at one deadline and the hung ranks are named
    from tests._dist_helpers import sleep_on_ranks

    timeout = 2.5
    t0 = time.monotonic()
    with pytest.raises(
        RuntimeError, match=r"ranks \[0, 1, 2\] hung: still running 2.5 s after the start"
    ) as err:
        run_distributed(sleep_on_ranks, 3, 120.0, timeout=timeout)
    elapsed = time.monotonic() - t0
    assert elapsed < 2 * timeout, elapsed
    assert "(0, None)" not in str(err.value)


@pytest.mark.parametrize("timeout", [0, -1.0, float("inf"), "5", None, True])
def test_run_distributed_refuses_a_bad_timeout(run_distributed, timeout):
    from tests._dist_helpers import sleep_on_ranks

    with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
        run_distributed(sleep_on_ranks, 2, 0.0, timeout=timeout)
