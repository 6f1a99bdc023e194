"""fsep_clip_grad_norm_ on 2 gloo processes (CPU) vs clip_grad_norm_ of the single-process model."""

from __future__ import annotations

from hf_ext.testing import run_distributed
from tests.fsep._dist_fns import clipped_grads


def test_clip_grad_norm_matches_the_single_process_model():
    for res in run_distributed(clipped_grads, 2):
        assert set(res) == {
            f"{setup}_{what}"
            for setup in ("fsep_ddp", "static_ep_ddp", "fsep_fsdp2")
            for what in ("inf_norm", "norm", "clipped_grads")
        }
        # total norms equal the unsharded model's (the same on every rank), clipped gradients too
        assert max(res.values()) < 1e-4, res
