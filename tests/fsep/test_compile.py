"""A model prepared by ``prepare_fsep`` under ``torch.compile`` (2 gloo processes, CPU, aot_eager backend)."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep import _compile_fns


@pytest.mark.slow  # ~35-40 s a mode on the 2-core CPU (two ranks, dynamo through the FSEP layers' collectives)
@pytest.mark.parametrize("mode", ["fsep", "static_ep"])
def test_compiled_fsep_model_matches_eager(mode):
    """Eval logits, training loss and gradients (expert shards included) equal the eager model's on both ranks. The
    FSEP layers graph-break (async all_to_all, Work.wait, data-dependent routing sizes) and run eagerly in between."""
    for res in run_distributed(_compile_fns.compiled_fsep_model, 2, mode):
        assert res["graphs"] >= 1, res
        assert res["logits_diff"] <= 1e-5, res
        ref, got = res["loss"]
        assert got == pytest.approx(ref, rel=1e-6), res
        assert res["grad_names_equal"] and res["expert_grads"] >= 2, res
        assert res["grad_diff"] <= 1e-5, res
