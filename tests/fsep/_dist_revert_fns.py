"""Distributed helpers of ``test_revert_sweep.py`` (module level: run_distributed spawns processes)."""

from __future__ import annotations

import copy
from typing import Any

import torch


def _ids() -> torch.Tensor:
    return torch.randint(3, 500, (2, 6), generator=torch.Generator().manual_seed(0))


def failed_prepare(rank: int, world_size: int) -> dict[str, Any]:
    """``prepare_fsep`` raising while it converts the second MoE block (as an out-of-memory error there would):
    the model must be left as it was (the first block's original experts back, no FSEP attributes, no
    process-wide optimizer hook)."""
    from hf_ext.accelerate.fsep import FSEPConfig, plugin, prepare_fsep
    from hf_ext.accelerate.fsep import layer as fsep_layer
    from hf_ext.testing import tiny_moe

    model = tiny_moe("mixtral", seed=0).eval()
    modules = {n: m for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    attrs = set(vars(model))
    with torch.no_grad():
        ref = model(_ids()).logits
    real = plugin.FSEPExperts
    built = [0]

    class FailsOnTheSecond(real):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            built[0] += 1
            if built[0] == 2:
                raise RuntimeError("out of memory (simulated)")
            super().__init__(*args, **kwargs)

    plugin.FSEPExperts = FailsOnTheSecond
    err = ""
    try:
        prepare_fsep(model, FSEPConfig())
    except RuntimeError as exc:
        err = str(exc)
    finally:
        plugin.FSEPExperts = real
    with torch.no_grad():
        out = model(_ids()).logits
    return {
        "error": err,
        "modules_same": {n: m for n, m in model.named_modules()} == modules,
        "params_same": {n: id(p) for n, p in model.named_parameters()}
        == {n: id(p) for n, p in params.items()},
        "new_attrs": sorted(set(vars(model)) - attrs),
        "step_hook": fsep_layer._STEP_HOOK is not None,
        "outputs_equal": bool(torch.equal(out, ref)),
    }


def remove_keeps_the_current_dtype(rank: int, world_size: int) -> dict[str, Any]:
    """``model.to(torch.bfloat16)`` between ``prepare_fsep`` and ``remove_fsep``: the experts come back in the dtype
    of the FSEP layer (and of the rest of the model), as the device and requires_grad already did."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep, remove_fsep
    from hf_ext.testing import tiny_moe

    base = tiny_moe("mixtral", seed=0).eval()
    model = prepare_fsep(copy.deepcopy(base), FSEPConfig())
    model.to(torch.bfloat16)
    remove_fsep(model)
    ref = copy.deepcopy(base).to(torch.bfloat16)
    with torch.no_grad():
        diff = float((model(_ids()).logits - ref(_ids()).logits).abs().max())
    return {
        "dtypes": sorted({str(p.dtype) for p in model.parameters()}),
        "fwd_diff": diff,
    }


def remove_unprepared(rank: int, world_size: int) -> dict[str, Any]:
    """``remove_fsep`` on a model never prepared, and a second time after a first remove."""
    from hf_ext.accelerate.fsep import FSEPConfig, prepare_fsep, remove_fsep
    from hf_ext.testing import tiny_moe

    out: dict[str, Any] = {}
    for case in ("never", "twice"):
        model = tiny_moe("mixtral", seed=0)
        if case == "twice":
            remove_fsep(prepare_fsep(model, FSEPConfig()))
        try:
            remove_fsep(model)
            out[case] = "no error"
        except Exception as exc:  # noqa: BLE001 - the type is the point of the test
            out[case] = f"{type(exc).__name__}: {exc}"
    return out


def revert_suite(rank: int, world_size: int) -> dict[str, Any]:
    """All of the above in one spawn."""
    return {
        "failed_prepare": failed_prepare(rank, world_size),
        "dtype": remove_keeps_the_current_dtype(rank, world_size),
        "unprepared": remove_unprepared(rank, world_size),
    }
