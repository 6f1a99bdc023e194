"""prepare_fsep / remove_fsep revert edge cases (2 gloo processes)."""

from __future__ import annotations

import pytest

from hf_ext.testing import run_distributed
from tests.fsep._dist_revert_fns import revert_suite


@pytest.fixture(scope="module")
def results():
    return run_distributed(revert_suite, 2)


def test_a_prepare_that_fails_half_way_leaves_the_model_as_it_was(results):
    """The second MoE block's conversion raising (an out-of-memory error, say) left the first block's experts
    replaced by an FSEP layer with no ``_fsep_state`` to undo it (remove_fsep: AttributeError), and the
    process-wide optimizer step hook registered."""
    for r in results:
        res = r["failed_prepare"]
        assert "out of memory" in res["error"], res
        assert res["modules_same"] and res["params_same"], res
        assert res["new_attrs"] == [], res
        assert res["step_hook"] is False, res
        assert res["outputs_equal"], res


def test_remove_gives_the_experts_the_dtype_the_model_has_now(results):
    """remove_fsep rebuilt the experts from the template taken at prepare time: after model.to(bfloat16) they came
    back in float32 next to a bfloat16 model."""
    for r in results:
        assert r["dtype"]["dtypes"] == ["torch.bfloat16"], r["dtype"]
        assert r["dtype"]["fwd_diff"] == 0.0, r["dtype"]


def test_remove_on_a_model_that_is_not_prepared_says_so(results):
    """remove_fsep on a model never prepared (or removed already) ran a collective state_dict and then failed with
    AttributeError: 'MixtralForCausalLM' object has no attribute '_fsep_templates'."""
    for r in results:
        for case in ("never", "twice"):
            assert (
                r["unprepared"][case].startswith("ValueError") and "prepare_fsep" in r["unprepared"][case]
            ), r


@pytest.mark.parametrize("case", ["unsupported_model", "no_process_group"])
def test_prepare_model_moves_nothing_when_prepare_fsep_would_refuse(case):
    """FSEPPlugin.prepare_model(model, accelerator) moved the model to accelerator.device first and only then let
    prepare_fsep check it: a model refused (not an MoE architecture, no torch.distributed) was left moved. Here the
    device is "meta", where a move loses the weights."""
    from types import SimpleNamespace

    import torch

    from hf_ext.accelerate.fsep import FSEPConfig, FSEPPlugin
    from hf_ext.testing import tiny_llama, tiny_moe

    model = tiny_llama() if case == "unsupported_model" else tiny_moe("mixtral", seed=0)
    accelerator = SimpleNamespace(device=torch.device("meta"))
    with pytest.raises((ValueError, RuntimeError), match="model_type|torch.distributed"):
        FSEPPlugin(FSEPConfig()).prepare_model(model, accelerator=accelerator)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
