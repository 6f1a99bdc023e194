"""apply_plan's runner under ``torch.compile`` (one gloo process, CPU, aot_eager backend)."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.autoparallel import _compile_fns


@pytest.mark.slow  # ~60 s on the 2-core CPU (six aot_eager compiles of a train step)
def test_train_step_of_a_compiled_model_matches_eager():
    """DDP and checkpointed FSDP2 plans on one process: a model compiled before ``apply_plan`` (wrapped, or its
    layers in place) or after (``runner.module.compile()``) gives the eager loss and gradients."""
    (res,) = run_distributed(_compile_fns.compiled_runners, 1)
    assert len(res) == 6, res
    for case, r in res.items():
        assert r["graphs"] >= 1, case  # something was compiled
        assert abs(r["loss"] - r["ref"]) <= 1e-5 * abs(r["ref"]), (case, r)
        assert r["grad_diff"] is not None and r["grad_diff"] <= 1e-5, (case, r)
